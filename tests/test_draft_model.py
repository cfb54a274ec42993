"""Draft-model speculation on the worker (workers/engine/draft_model.py), on the real SmolLM2.

A small harness drives a ModelRunner as the batcher would (new requests, one-token decodes, blocks
appended as positions need them) and asks a drafter for drafts between steps. Every draft is checked
against greedy tokens computed from scratch: a plain full-sequence forward per token (no paged KV
reuse), by an independent model (SmolLM2 truncated to N layers, or the draft model itself).
"""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from workers.engine.attention import build_attention_metadata
from workers.engine.config import EngineConfig
from workers.engine.draft_model import SelfDraft, build_drafter
from workers.engine.llama import LlamaForCausalLM
from workers.engine.loader import LoadedModel, load_model
from workers.engine.model_runner import ModelRunner
from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan
from workers.engine.sampling_params import SamplingParams
from workers.engine.step_inputs import StepInputs

BS = 16
NUM_BLOCKS = 96
GREEDY = SamplingParams(temperature=0.0, max_tokens=64, ignore_eos=True)
PROMPTS = [
    [1, 504, 3458, 282, 4649, 314, 253, 1345, 3458, 30, 378, 3458, 282, 4649, 314],   # 15 tokens
    [1, 2362, 1215, 392, 314, 1345, 28, 3102, 30],
    [1] + list(range(700, 740)),                                                     # 41: crosses blocks
    [1, 1070, 1064, 3006, 2468, 25, 216],
]


@pytest.fixture(scope="module")
def runner(smollm2):
    return ModelRunner(smollm2, EngineConfig(num_kv_blocks=NUM_BLOCKS, block_size=BS, max_loras=0,
                                             use_cuda_graphs=False))


class Worker:
    """Drives the runner: blocks handed out in a scrambled order and appended only when a position
    needs them (so the draft's reads go through the same BlockTable rows the target's do)."""

    def __init__(self, runner: ModelRunner, pack: bool = False):
        runner.reset()
        # pack: the CUDA layout (a device copy of the block table, patched per step), on the CPU
        runner.inputs = StepInputs(8, runner.max_blocks_per_seq, BS, runner.device, runner.model_config.vocab_size,
                                   pack=pack)
        self.runner = runner
        self.free = list(np.random.default_rng(0).permutation(NUM_BLOCKS))
        self.nblocks: dict[str, int] = {}
        self.step = 0

    def st(self, rid):
        return self.runner.seqs[rid]

    def _need(self, rid: str, positions: int) -> list[int]:
        extra = max(0, -(-positions // BS) - self.nblocks.get(rid, 0))
        new = [int(self.free.pop()) for _ in range(extra)]
        self.nblocks[rid] = self.nblocks.get(rid, 0) + extra
        return new

    def add(self, prompts: dict[str, list[int]], sampling=GREEDY) -> None:
        news = [NewRequestPlan(rid, list(p), len(p), 0, len(p), self._need(rid, len(p)), sampling, seed=7 + i)
                for i, (rid, p) in enumerate(prompts.items())]
        self._run(StepPlan(self._next(), new_requests=news))

    def decode(self, rids: list[str]) -> None:
        plans = [RunningRequestPlan(r, 1, self._need(r, len(self.st(r).token_ids))) for r in rids]
        self._run(StepPlan(self._next(), running=plans))

    def room(self, rids: list[str], k: int) -> None:
        """Blocks for positions up to L-1+k, appended to the rows now (as the worker does before drafting)."""
        for r in rids:
            st = self.st(r)
            self.runner.inputs.table.append(st.row, self._need(r, len(st.token_ids) + st.pending + k))

    def _next(self) -> int:
        self.step += 1
        return self.step

    def _run(self, plan: StepPlan) -> None:
        self.runner.execute(plan)


def propose(worker: Worker, drafter, rids: list[str], ks: list[int]) -> list[list[int]]:
    """drafter.propose after making room, checking it leaves every seq as it was."""
    worker.room(rids, max(ks))
    seqs = [worker.st(r) for r in rids]
    before = [(list(s.token_ids), s.num_computed, s.pending) for s in seqs]
    out = drafter.propose(seqs, ks)
    assert [(list(s.token_ids), s.num_computed, s.pending) for s in seqs] == before
    assert [len(d) for d in out] == ks
    return out


@pytest.fixture(scope="module")
def first_8_layers(smollm2):
    return truncated(smollm2, 8)


def truncated(loaded: LoadedModel, n: int) -> LlamaForCausalLM:
    """A standalone copy of the model's first n layers + its norm + its head (fresh, plain torch ops)."""
    cfg = replace(loaded.config, num_hidden_layers=n)
    m = LlamaForCausalLM(cfg, device="meta", dtype=torch.float32)
    keep = {k: v for k, v in loaded.model.hf_state_dict().items()
            if not k.startswith("model.layers.") or int(k.split(".")[2]) < n}
    m.load_weights(keep)
    return m.eval()


@torch.inference_mode()
def greedy_from_scratch(model: LlamaForCausalLM, tokens: list[int], k: int) -> list[int]:
    """k greedy tokens after `tokens`, each from one plain forward over the whole sequence."""
    cfg = model.config
    seq = list(tokens)
    for _ in range(k):
        n = len(seq)
        nb = -(-n // BS)
        shape = (nb, BS, cfg.num_key_value_heads, cfg.head_dim)
        caches = [(torch.zeros(shape), torch.zeros(shape)) for _ in range(cfg.num_hidden_layers)]
        meta = build_attention_metadata([(n, n, list(range(nb)))], [], BS, "cpu")
        h = model(torch.tensor(seq), torch.arange(n), meta, caches)
        seq.append(int(model.compute_logits(h[-1:]).argmax()))
    return seq[len(tokens):]


def spy_tokens(drafter) -> list[int]:
    """Records the number of input tokens of each draft forward."""
    calls: list[int] = []
    real = drafter._forward
    drafter._forward = lambda ids, pos, meta: calls.append(int(ids.numel())) or real(ids, pos, meta)
    return calls


# ---- self-draft -------------------------------------------------------------------------------------

@pytest.mark.parametrize("pack", [False, True], ids=["cpu-layout", "packed-device-table"])
def test_self_draft_equals_a_standalone_truncated_model(first_8_layers, runner, pack):
    """Drafts of the first 8 layers + head, for a batch with different k (0 too), equal greedy
    tokens of a separate 8-layer model run from scratch; again two decode steps later."""
    w = Worker(runner, pack=pack)
    rids = ["a", "b", "c", "d"]
    w.add(dict(zip(rids, PROMPTS)))
    drafter = build_drafter(runner, EngineConfig(speculative_method="self_draft", self_draft_layers=8))
    assert isinstance(drafter, SelfDraft) and drafter.name == "self_draft" and drafter.num_layers == 8
    ref = first_8_layers
    ks = [4, 2, 0, 3]
    for _ in range(2):
        got = propose(w, drafter, rids, ks)
        want = [greedy_from_scratch(ref, w.st(r).token_ids, k) for r, k in zip(rids, ks)]
        assert got == want
        w.decode(rids)
        w.decode(rids)


def test_self_draft_of_every_layer_is_the_targets_continuation_and_acceptance_by_depth(runner, capsys):
    """With all 30 layers the drafts are the target's next greedy tokens (acceptance 100%), and the
    drafts' KV writes leave the target's own greedy output unchanged. Also prints how many of k = 4
    drafts a greedy verification would accept at N = 8, 15, 22 (a figure, not a check)."""
    rids = ["a", "b", "c", "d"]
    steps, k = 6, 4
    plain = Worker(runner)
    plain.add(dict(zip(rids, PROMPTS)))
    for _ in range(steps + k):
        plain.decode(rids)
    target = {r: list(plain.st(r).token_ids) for r in rids}

    w = Worker(runner)
    w.add(dict(zip(rids, PROMPTS)))
    depths = [8, 15, 22, 30]
    drafters = {n: build_drafter(runner, EngineConfig(speculative_method="self_draft", self_draft_layers=n))
                for n in depths}
    accepted: dict[int, list[int]] = {n: [] for n in depths}
    for step in range(steps):
        for n, d in drafters.items():
            if n == 30 and step >= 2:
                continue
            for r, drafts in zip(rids, propose(w, d, rids, [k] * len(rids))):
                L = len(w.st(r).token_ids)
                truth = target[r][L:L + k]
                accepted[n].append(next((i for i, (x, y) in enumerate(zip(drafts, truth)) if x != y), k))
        w.decode(rids)
    assert {r: w.st(r).token_ids for r in rids} == {r: t[:len(w.st(r).token_ids)] for r, t in target.items()}
    assert accepted[30] == [k] * 2 * len(rids)
    with capsys.disabled():
        print(f"\nself-draft acceptance, SmolLM2 (30 layers), greedy, k={k}, {len(rids)} prompts x {steps} steps:")
        for n in depths[:-1]:
            a = np.array(accepted[n])
            print(f"  N={n:2d}: accepted per step {a.mean():.2f} of {k} ({a.mean() / k:.0%}), "
                  f"first draft right {np.mean(a > 0):.0%}")


def test_self_draft_reads_the_token_still_being_sampled(runner):
    """Overlapped steps: the last token is still on the device (st.pending); the first draft forward
    takes it from the launched step, as the step's own layout does (all layers: the drafts are the
    target's next tokens)."""
    w = Worker(runner)
    w.add({"a": PROMPTS[0], "b": PROMPTS[1]})
    drafter = build_drafter(runner, EngineConfig(speculative_method="self_draft", self_draft_layers=30))
    inflight = runner.launch(StepPlan(w._next(), running=[RunningRequestPlan("a", 1, w._need("a", 16)),
                                                          RunningRequestPlan("b", 1, w._need("b", 10))]))
    assert w.st("a").pending == 1
    got = propose(w, drafter, ["a", "b"], [3, 2])
    inflight.result()
    for _ in range(3):
        w.decode(["a", "b"])
    assert got == [w.st("a").token_ids[-3:], w.st("b").token_ids[-3:-1]]


def test_drafts_stop_where_the_requests_blocks_end(runner):
    """A request without blocks for k more positions gets only the drafts its blocks can hold."""
    w = Worker(runner)
    w.add({"a": PROMPTS[0], "b": PROMPTS[1]})            # 16 and 10 tokens in one block each
    drafter = build_drafter(runner, EngineConfig(speculative_method="self_draft", self_draft_layers=2))
    got = drafter.propose([w.st("a"), w.st("b")], [4, 4])
    assert [len(d) for d in got] == [1, 4]              # "a": inputs at 15 only; "b": at 9..12


def test_self_draft_layers_default_and_bounds(runner):
    assert build_drafter(runner, EngineConfig(speculative_method="self_draft")).num_layers == 30 // 4
    with pytest.raises(ValueError, match="self_draft_layers 31"):
        build_drafter(runner, EngineConfig(speculative_method="self_draft", self_draft_layers=31))
    for method in ("off", "prompt_lookup", "suffix", "ngram"):
        assert build_drafter(runner, EngineConfig(speculative_method=method)) is None


# ---- separate draft model ---------------------------------------------------------------------------

def test_draft_model_catches_up_and_reuses_the_kv_of_accepted_drafts(smollm2, runner):
    """SmolLM2 as its own draft (its own KV cache): drafts are the target's greedy continuation.
    The first proposal catches up over the whole prompt; after k + 1 steps (all drafts accepted plus
    one) it recomputes only the last two positions; a request seated later is caught up alongside
    (a prefill segment with one-token segments in the same forward)."""
    w = Worker(runner)
    w.add({"a": PROMPTS[0], "b": PROMPTS[2]})
    drafter = build_drafter(runner, EngineConfig(speculative_method="draft_model", draft_model="smollm2-135m"),
                            draft=smollm2)
    assert drafter.name == "draft_model"
    calls = spy_tokens(drafter)
    k = 3
    first = propose(w, drafter, ["a", "b"], [k, k])
    assert calls[0] == 16 + 42             # the prompts and their first sampled token
    for _ in range(k + 1):
        w.decode(["a", "b"])
    for r, d in zip(["a", "b"], first):
        L = len(w.st(r).token_ids) - (k + 1)
        assert w.st(r).token_ids[L:L + k] == d
    calls.clear()
    w.add({"c": PROMPTS[1]})
    got = propose(w, drafter, ["a", "b", "c"], [k, k, k])
    assert calls[0] == 2 + 2 + 10
    for _ in range(k):
        w.decode(["a", "b", "c"])
    assert got == [w.st(r).token_ids[-k:] for r in ("a", "b", "c")]


def test_random_draft_model_tracks_rejections_and_row_reuse(runner, monkeypatch):
    """A random-weight draft with SmolLM2's vocabulary (loaded from the config) against a sampling
    target, so most drafts are rejected: after every step the drafts equal the draft model's greedy
    tokens from scratch. Long catch-ups run in budget-sized pieces; a forgotten request, or another
    request in its row, is caught up from position 0."""
    cfg = EngineConfig(speculative_method="draft_model", draft_random_weights="tiny")
    drafter = build_drafter(runner, cfg)
    ref = drafter.loaded.model
    drafter.max_catchup_tokens = 12
    calls = spy_tokens(drafter)
    w = Worker(runner)
    hot = SamplingParams(temperature=1.0, max_tokens=64, ignore_eos=True)
    rids = ["a", "b", "c"]
    w.add(dict(zip(rids, PROMPTS)), sampling=hot)
    for step in range(4):
        got = propose(w, drafter, rids, [4, 1, 3])
        assert got == [greedy_from_scratch(ref, w.st(r).token_ids, k) for r, k in zip(rids, [4, 1, 3])]
        if step == 0:
            assert len(calls) > 3 and max(calls) <= 12     # the 16 + 10 + 42 tokens in pieces
        w.decode(rids)
    calls.clear()
    drafter.forget(w.st("a"))
    assert w.st("a").row not in drafter._state
    propose(w, drafter, ["a"], [1])
    assert sum(calls) == len(w.st("a").token_ids)
    row = w.st("b").row                     # "b" leaves without a forget(); "e" gets its row
    runner.execute(StepPlan(w._next(), finished_ids=["b"]))
    w.nblocks.pop("b")
    w.add({"e": PROMPTS[3]}, sampling=hot)
    assert w.st("e").row == row
    calls.clear()
    got = propose(w, drafter, ["e"], [2])
    assert calls[0] == len(PROMPTS[3]) + 1
    assert got == [greedy_from_scratch(ref, w.st("e").token_ids, 2)]


def test_draft_model_with_another_vocabulary_is_refused(runner):
    cfg = replace(load_model("random", random_weights="tiny").config, vocab_size=1000)
    other = LoadedModel(name="tiny-1000", config=cfg, model=LlamaForCausalLM(cfg, device="meta"),
                        tokenizer=None, path=None)
    with pytest.raises(ValueError, match=r"'tiny-1000' has a vocabulary of 1000 tokens .*49152"):
        build_drafter(runner, EngineConfig(speculative_method="draft_model", draft_model="x"), draft=other)
