"""The worker's side of speculative decoding (ModelRunner): drafts are verified in the step's batched
forward, each speculating request emits its accepted drafts plus one token, and its KV rolls back.

Real SmolLM2 on the CPU, hand-built StepPlans. A small `Batcher` stands in for the real one: it hands
out blocks (a freed block is the next one handed out, so a rolled-back block is soon rewritten by
someone else) and applies the rollback rule of the contract (keep ceil(num_computed / block_size)
blocks after a speculative step). Greedy output with speculation must be the plain greedy output.
"""
from __future__ import annotations

import pytest
import torch

from workers.engine.config import EngineConfig
from workers.engine.model_runner import ModelRunner
from workers.engine.plan import NewRequestPlan, RunningRequestPlan, StepPlan, StepResult
from workers.engine.sampling_params import SamplingParams
from workers.engine.step_inputs import SeqSlot, StepInputs

BS = 16
GREEDY = SamplingParams(temperature=0.0, ignore_eos=True)
N_REF = 12
PROMPTS = {
    # 13 tokens: after the first token L = 14, so drafting 4 needs a second block that a rollback drops
    "a": "The quick brown fox jumps over the lazy dog. The quick brown",
    "b": "def fibonacci(n):\n    if n < 2:\n        return n\n",
    "c": "List three primary colors:",
}


class Batcher:
    """Seats requests, grows and trims their block lists as the real batcher does, runs steps."""

    def __init__(self, runner: ModelRunner):
        runner.reset()                          # a new session: the worker forgets every request
        self.runner = runner
        self.free = list(range(runner.num_blocks - 1, -1, -1))
        self.blocks: dict[str, list[int]] = {}
        self.tokens: dict[str, list[int]] = {}
        self.prompt_len: dict[str, int] = {}
        self.done: dict[str, int] = {}          # tokens whose KV the worker holds (the batcher's view)

    def _grow(self, rid: str, upto: int) -> list[int]:
        """Blocks so that positions < upto have one; returns the new ones."""
        new = []
        while len(self.blocks[rid]) * BS < upto:
            new.append(self.free.pop())
            self.blocks[rid].append(new[-1])
        return new

    def new(self, rid: str, ids: list[int], chunk: int | None = None, sampling: SamplingParams = GREEDY,
            seed: int = 0, adapter: str | None = None) -> NewRequestPlan:
        self.blocks[rid], self.tokens[rid], self.prompt_len[rid] = [], list(ids), len(ids)
        n = chunk or len(ids)
        self._grow(rid, n)
        self.done[rid] = n
        return NewRequestPlan(rid, list(ids), len(ids), 0, n, list(self.blocks[rid]), sampling, seed, adapter)

    def chunk(self, rid: str, n: int) -> RunningRequestPlan:
        c = self.done[rid]
        self.done[rid] = c + n
        return RunningRequestPlan(rid, n, self._grow(rid, c + n))

    def decode(self, rid: str, k: int = 0, drafts: list[int] | tuple = ()) -> RunningRequestPlan:
        L = len(self.tokens[rid])
        return RunningRequestPlan(rid, 1, self._grow(rid, L + k), num_spec_tokens=k, draft_token_ids=list(drafts))

    def step(self, new=(), running=(), finished=(), step_id: int = 0) -> StepResult:
        plan = StepPlan(step_id, list(new), list(running), list(finished))
        res = self.runner.execute(plan)
        self.absorb(plan, res)
        return res

    def absorb(self, plan: StepPlan, res: StepResult, check: bool = True) -> None:
        spec = {rr.request_id for rr in plan.running if rr.num_spec_tokens > 0}
        counts = res.num_emitted or [1] * len(res.request_ids)
        assert len(set(res.request_ids)) == len(res.request_ids) == len(counts)
        off = 0
        for rid, e in zip(res.request_ids, counts):
            self.tokens[rid] += res.token_ids[off:off + e]
            off += e
        assert off == len(res.token_ids)
        for rid in spec:
            self.done[rid] = len(self.tokens[rid]) - 1
            keep = -(-self.done[rid] // BS)
            self.free += reversed(self.blocks[rid][keep:])     # freed blocks are handed out next
            del self.blocks[rid][keep:]
            if check:               # the worker trimmed its table row by the same rule
                assert self.runner.inputs.table.num_blocks[self.runner.seqs[rid].row] == keep
                assert self.runner.seqs[rid].num_computed == self.done[rid]
        for rr in plan.running:
            if rr.request_id not in spec and rr.request_id in res.request_ids:
                self.done[rr.request_id] = len(self.tokens[rr.request_id]) - 1

    def out(self, rid: str) -> list[int]:
        return self.tokens[rid][self.prompt_len[rid]:]


def make_runner(smollm2, **kw) -> ModelRunner:
    return ModelRunner(smollm2, EngineConfig(**{"num_kv_blocks": 48, "max_num_seqs": 8, **kw}))


@pytest.fixture(scope="module")
def runner(smollm2, tmp_path_factory):
    """One runner for the module (each Batcher resets it): building one costs about a second. It
    serves a random LoRA adapter "ad" (requests without it run on the bare base model)."""
    from bench.lora_bench import write_peft_adapter
    path = write_peft_adapter(tmp_path_factory.mktemp("lora") / "ad", smollm2.config, r=8, alpha=16,
                              targets=["q_proj", "v_proj"], seed=1, std=0.05)
    return make_runner(smollm2, max_loras=1, lora_adapters={"ad": str(path)})


@pytest.fixture(scope="module")
def ids(smollm2):
    return {k: smollm2.tokenizer.encode(v) for k, v in PROMPTS.items()}


LOGPROBS = SamplingParams(temperature=0.0, ignore_eos=True, logprobs=True)


@pytest.fixture(scope="module")
def ref(runner, ids):
    """Plain greedy continuations, the truth every speculative run must reproduce: a, b, c, and x (a's
    prompt with the adapter); "lp": the logprob of each of b's tokens."""
    b = Batcher(runner)
    b.step(new=[b.new(r, ids[r], sampling=LOGPROBS) for r in PROMPTS] + [b.new("x", ids["a"], adapter="ad")])
    lps = []
    for _ in range(N_REF - 1):
        res = b.step(running=[b.decode(r) for r in [*PROMPTS, "x"]])
        lps.append(res.logprobs[res.request_ids.index("b")])
    out = {r: b.out(r) for r in [*PROMPTS, "x"]}
    return {**out, "lp": lps}


def wrong(tok: int) -> int:
    return (tok + 1) % 1000 + 7


def started(runner, ids, *rids) -> Batcher:
    """The runner with each request prefilled (its first token sampled)."""
    b = Batcher(runner)
    b.step(new=[b.new(r, ids[r]) for r in rids])
    return b


def test_right_drafts_are_all_accepted_plus_one_token(runner, ids, ref):
    b = started(runner, ids, "a")
    res = b.step(running=[b.decode("a", k=4, drafts=ref["a"][1:5])])
    assert res.request_ids == ["a"] and res.num_emitted == [5] and res.num_drafted == [4]
    assert res.token_ids == ref["a"][1:6]
    res = b.step(running=[b.decode("a", k=3, drafts=ref["a"][6:9])])
    assert res.token_ids == ref["a"][6:10]
    assert b.out("a") == ref["a"][:10]


def test_wrong_drafts_emit_exactly_the_right_token(runner, ids, ref):
    b = started(runner, ids, "a")
    res = b.step(running=[b.decode("a", k=4, drafts=[wrong(t) for t in ref["a"][1:5]])])
    assert res.token_ids == [ref["a"][1]] and res.num_emitted == [1] and res.num_drafted == [4]


def test_partly_right_drafts_emit_the_right_prefix_then_the_correction(runner, ids, ref):
    b = started(runner, ids, "a")
    drafts = ref["a"][1:3] + [wrong(ref["a"][3]), ref["a"][4]]
    res = b.step(running=[b.decode("a", k=4, drafts=drafts)])
    assert res.token_ids == ref["a"][1:4] and res.num_emitted == [3]


def test_rollback_then_plain_decoding_is_the_run_that_never_speculated(runner, ids, ref):
    """A rejected step wrote KV for 4 drafts into a second block; the rollback drops that block, the
    batcher gives it to another request at once, and both continue exactly as if nobody speculated."""
    assert len(ids["a"]) == 13                      # L = 14 after the first token: drafts 2..4 reach block 1
    b = started(runner, ids, "a")
    row = b.runner.seqs["a"].row
    res = b.step(running=[b.decode("a", k=4, drafts=[wrong(t) for t in ref["a"][1:5]])])
    assert res.token_ids == [ref["a"][1]]
    freed = b.free[-1]
    assert b.runner.inputs.table.num_blocks[row] == 1 and len(b.blocks["a"]) == 1
    # c's prefill takes the dropped block (and overwrites it) in the same step as a's next decode
    res = b.step(new=[b.new("c", ids["c"])], running=[b.decode("a")])
    assert freed in b.blocks["c"]
    for _ in range(3):
        b.step(running=[b.decode("a"), b.decode("c")])
    assert b.out("a") == ref["a"][:6] and b.out("c") == ref["c"][:4]


def test_speculation_without_drafts_is_a_plain_decode_and_still_trims(runner, ids, ref):
    b = started(runner, ids, "a", "b")
    res = b.step(running=[b.decode("a", k=4), b.decode("b")])     # no drafts, no draft model
    assert sorted(zip(res.request_ids, res.token_ids)) == [("a", ref["a"][1]), ("b", ref["b"][1])]
    assert res.num_emitted == [1, 1] and res.num_drafted == [0, 0]
    assert b.runner.inputs.table.num_blocks[b.runner.seqs["a"].row] == 1
    res = b.step(running=[b.decode("a"), b.decode("b")])
    assert res.num_emitted == [] and res.num_drafted == []        # no row speculated: the wire as before


def test_a_mixed_step_gives_each_request_its_own_tokens(runner, ids, ref):
    """One forward holds a prefill chunk (c), a plain decode (b) and a verification row (a)."""
    b = started(runner, ids, "a", "b")
    half = len(ids["c"]) // 2
    res = b.step(new=[b.new("c", ids["c"], chunk=half)],
                 running=[b.decode("a", k=3, drafts=ref["a"][1:3] + [wrong(ref["a"][3])]), b.decode("b")])
    assert sorted(res.request_ids) == ["a", "b"]
    assert res.num_drafted[res.request_ids.index("a")] == 3 and res.num_drafted[res.request_ids.index("b")] == 0
    res = b.step(running=[b.chunk("c", len(ids["c"]) - half), b.decode("b"),
                          b.decode("a", k=4, drafts=ref["a"][4:8])])
    assert sorted(res.request_ids) == ["a", "b", "c"]
    for _ in range(2):
        b.step(running=[b.decode("a", k=2, drafts=[wrong(ref["a"][0])] * 2), b.decode("b"), b.decode("c")])
    assert b.out("a") == ref["a"][:11] and b.out("b") == ref["b"][:5] and b.out("c") == ref["c"][:3]


def test_a_decode_reading_the_token_still_on_the_device_beside_a_verification(runner, ids, ref):
    """Launch-ahead: b's next input is the token this step samples for b, read through pending_src in
    the step's sampled ids, which also hold a's verified tokens."""
    b = started(runner, ids, "a", "b")
    runner = b.runner
    p1 = StepPlan(1, running=[b.decode("a", k=3, drafts=ref["a"][1:4]), b.decode("b")])
    first = runner.launch(p1)
    b.tokens["b"].append(-1)                        # b's token is pending: its next decode position
    second = runner.launch(StepPlan(2, running=[b.decode("b")]))
    b.tokens["b"].pop()
    assert runner.seqs["b"].pending == 2
    b.absorb(p1, first.result())
    b.absorb(StepPlan(2, running=[RunningRequestPlan("b", 1)]), second.result())
    assert b.out("a") == ref["a"][:5] and b.out("b") == ref["b"][:3]


def test_a_request_planned_again_while_its_verification_is_in_flight_waits_for_it(runner, ids, ref):
    """The batcher does not do this; if it did, the runner reads the verification first."""
    b = started(runner, ids, "a")
    p1 = StepPlan(1, running=[b.decode("a", k=2, drafts=[ref["a"][1], wrong(ref["a"][2])])])   # in block 0
    first = runner.launch(p1)
    p2 = StepPlan(2, running=[RunningRequestPlan("a", 1)])
    second = runner.launch(p2)
    assert first.resolved
    b.absorb(p1, first.result(), check=False)          # the runner has moved on to step 2
    b.absorb(p2, second.result())
    assert b.out("a") == ref["a"][:4]


def test_penalties_never_speculate_they_decode_plainly(runner, ids):
    sp = SamplingParams(temperature=0.0, repetition_penalty=1.3, ignore_eos=True)
    b = Batcher(runner)
    b.step(new=[b.new("p", ids["b"], sampling=sp), b.new("q", ids["b"], sampling=sp)])
    res = b.step(running=[b.decode("p", k=3, drafts=[1, 2, 3]), b.decode("q")])
    assert res.num_emitted == [1, 1] and res.num_drafted == [0, 0] and b.out("p") == b.out("q")


def test_logprobs_of_verified_tokens_are_the_plain_ones(runner, ids, ref):
    want = ref["b"]
    b = Batcher(runner)
    b.step(new=[b.new("b", ids["b"], sampling=LOGPROBS)])
    res = b.step(running=[b.decode("b", k=4, drafts=want[1:3] + [wrong(want[3]), want[4]])])
    assert res.token_ids == want[1:4]
    assert res.logprobs == pytest.approx(ref["lp"][:3], abs=1e-4)


SAMPLED = SamplingParams(temperature=0.9, top_k=20, ignore_eos=True)


def test_sampled_rows_depend_only_on_seed_and_position(runner, ids, ref):
    """The same request speculating alone, or beside others, draws the same tokens; drafts the
    truncation excludes are all rejected and the token drawn is the plain sampler's."""
    likely = ref["b"][1:5]                          # the greedy tokens: often accepted when sampling
    rare = [runner.model_config.vocab_size - 1] * 3     # outside every top 20
    b = Batcher(runner)
    b.step(new=[b.new("s", ids["b"], sampling=SAMPLED, seed=42)])
    b.step(running=[b.decode("s", k=4, drafts=likely)])
    alone = b.out("s")

    b = Batcher(runner)
    b.step(new=[b.new("a", ids["a"]), b.new("c", ids["c"], sampling=SAMPLED, seed=5)]
           + [b.new(r, ids["b"], sampling=SAMPLED, seed=42) for r in ("s", "rare", "plain")])
    b.step(running=[b.decode("c", k=2, drafts=ref["c"][1:3]), b.decode("a"), b.decode("rare", k=3, drafts=rare),
                    b.decode("plain"), b.decode("s", k=4, drafts=likely)])
    assert b.out("s") == alone
    assert b.out("rare") == b.out("plain") and len(b.out("plain")) == 2


def test_a_lora_request_speculates_with_its_adapter(runner, ids, ref):
    want = ref["x"]
    # the adapter keeps the base model's first 4 tokens, then leaves them
    assert want[:4] == ref["a"][:4] and want[4] != ref["a"][4]
    b = Batcher(runner)
    b.step(new=[b.new("x", ids["a"], adapter="ad"), b.new("c", ids["c"])])
    # the base model's continuation as drafts: the adapter's verification takes 3, then corrects
    res = b.step(running=[b.decode("x", k=4, drafts=ref["a"][1:5]), b.decode("c")])
    assert res.num_emitted[res.request_ids.index("x")] == 4 and b.out("x") == want[:5]
    res = b.step(running=[b.decode("x", k=4, drafts=want[5:9]), b.decode("c", k=2, drafts=ref["c"][2:4])])
    assert res.num_emitted == [5, 3] or res.num_emitted == [3, 5]
    assert b.out("x") == want[:10] and b.out("c") == ref["c"][:5]


class FakeDrafter:
    """Proposes from a known continuation: the first `right` tokens right, then wrong ones."""

    def __init__(self, truth: dict[int, list[int]], right: int):
        self.truth, self.right, self.calls, self.forgotten = truth, right, [], []

    def propose(self, seqs: list[SeqSlot], ks: list[int]) -> list[list[int]]:
        self.calls.append(([(list(s.token_ids), s.num_computed) for s in seqs], list(ks)))
        out = []
        for s, k in zip(seqs, ks):
            cont = self.truth[s.num_prompt_tokens][len(s.token_ids) - s.num_prompt_tokens:]
            out.append([t if i < self.right else wrong(t) for i, t in enumerate(cont[:k])])
        return out

    def forget(self, st: SeqSlot) -> None:
        self.forgotten.append(st)


def test_a_draft_model_is_asked_for_the_speculating_rows_without_drafts(runner, ids, ref):
    assert len(ids["a"]) != len(ids["b"])           # the fake tells them apart by prompt length
    b = started(runner, ids, "a", "b", "c")
    fake = FakeDrafter({len(ids[r]): ref[r] for r in "ab"}, right=2)
    runner.drafter = fake
    try:
        before = {r: list(b.tokens[r]) for r in "ab"}
        res = b.step(running=[b.decode("a", k=3), b.decode("b", k=4), b.decode("c", k=2, drafts=ref["c"][1:3])])
        # called once, for a and b (c brought its own drafts), each at L known tokens, L - 1 computed
        assert fake.calls == [([(before["a"], len(before["a"]) - 1), (before["b"], len(before["b"]) - 1)], [3, 4])]
        got = dict(zip(res.request_ids, zip(res.num_emitted, res.num_drafted)))
        assert got == {"a": (3, 3), "b": (3, 4), "c": (3, 2)} and res.draft_ms > 0
        assert b.out("a") == ref["a"][:4] and b.out("b") == ref["b"][:4] and b.out("c") == ref["c"][:4]
        st = runner.seqs["a"]
        b.step(running=[b.decode("b")], finished=["a"])
        assert fake.forgotten == [st]
    finally:
        runner.drafter = None


def test_verification_layout_is_the_same_packed_for_the_device():
    """The CUDA layout (one packed host->device copy) against the CPU one, for a step holding a prefill
    chunk, a verification row with its drafts and a decode. The verification is decode-shaped: one
    decode token per position, each attending to the context up to itself."""
    def prepare(pack: bool):
        inputs = StepInputs(max_rows=4, max_blocks_per_seq=4, block_size=BS, device=torch.device("cpu"),
                            vocab_size=100, pack=pack)
        hot = SamplingParams(temperature=0.5, top_k=7, seed=1)
        a = SeqSlot(list(range(20)), 10, 19, inputs.seat([3, 1], hot, 9), hot, 9)
        p = SeqSlot(list(range(30, 50)), 20, 4, inputs.seat([2, 0], GREEDY, 1), GREEDY, 1)
        d = SeqSlot([5, 6, 7], 2, 2, inputs.seat([6], GREEDY, 2), GREEDY, 2)
        step = inputs.prepare([("p", p, 8), ("a", a, 4), ("d", d, 1)], drafts={"a": [71, 72, 73]})
        assert a.num_computed == 23
        return step

    cpu, dev = prepare(False), prepare(True)
    assert cpu.input_ids.tolist() == dev.input_ids.tolist() == list(range(34, 42)) + [19, 71, 72, 73, 7]
    assert cpu.positions.tolist() == list(range(4, 12)) + [19, 20, 21, 22, 2]
    assert cpu.meta.slot_mapping.tolist() == dev.meta.slot_mapping.tolist()
    assert cpu.meta.slot_mapping.tolist()[8:12] == [1 * BS + 3, 1 * BS + 4, 1 * BS + 5, 1 * BS + 6]
    assert cpu.meta.prefill_query_lens == [8] and cpu.meta.prefill_context_lens == [12]
    assert cpu.meta.num_decode_tokens == 5
    assert cpu.meta.decode_context_lens.tolist() == dev.meta.decode_context_lens.tolist() == [20, 21, 22, 23, 3]
    assert cpu.meta.decode_rows.tolist() == dev.meta.decode_rows.tolist() == [0, 0, 0, 0, 2]
    # the plain rows (d), then a's four positions; steps: the output index of each position's sample
    assert cpu.sample_idx.tolist() == dev.sample_idx.tolist() == [12, 8, 9, 10, 11]
    assert [r for r, _ in cpu.sample_seqs] == ["d"] and [r for r, _ in cpu.verify.seqs] == ["a"]
    for s in (cpu, dev):
        v = s.verify
        assert v.width == 4 and v.draft_lens == [3] and v.draft_ids.tolist() == [[71, 72, 73]]
        assert v.sampling.steps.tolist() == [10, 11, 12, 13] and v.sampling.seeds.tolist() == [9] * 4
        assert v.sampling.top_ks.tolist() == [7] * 4 and not v.sampling.all_greedy
        assert s.sampling.all_greedy and s.sampling.steps.tolist() == [1]
