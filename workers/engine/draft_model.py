"""Draft-model speculation on the worker: k greedy (point-mass) drafts per request, verified by the target.

Two drafters behind one interface (`build_drafter` -> `Drafter.propose` / `forget`):

* `SelfDraft`: the target's first N layers + its final norm + its LM head; no second model, no KV of
  its own. Its forwards write layers < N of the target's cache at the draft positions; the
  verification forward rewrites the same positions (identical values for the accepted inputs), and
  rejected positions lie past the target's computed count, so they are overwritten before any read.
* `DraftModel`: a separate Llama-family model with the target's vocabulary and its own KV caches of
  the target's num_blocks and block_size, so it addresses them through the target's BlockTable rows.
  It remembers per row how far its KV is valid (the true tokens it fed, plus the drafts it fed that
  turned out to be the request's tokens, never past the target's own computed count) and catches up
  from there before proposing: the whole prompt the first time.

A propose runs k forwards, each over every speculating request: one ragged forward up to the last
known token t_{L-1} (for the self-draft a one-token decode at L-1; a catch-up for the draft model),
then k-1 one-token decodes of the previous drafts at L..L+k-2. Requests are ordered by k, most first,
so each later forward's batch is a prefix of the one before and its inputs a prefix of the previous
argmax, which stays on the device; the drafts are read back once at the end. Inputs of all k forwards
travel to the device in one copy.
"""
from __future__ import annotations

import numpy as np
import torch

from workers.engine.attention import AttentionMetadata
from workers.engine.config import EngineConfig, ModelConfig
from workers.engine.step_inputs import SeqSlot

_I64 = np.int64


def self_draft_num_layers(config: EngineConfig, model_config: ModelConfig) -> int:
    """config.self_draft_layers, or a quarter of the target's layers when 0."""
    total = model_config.num_hidden_layers
    n = config.self_draft_layers or max(1, total // 4)
    if not 1 <= n <= total:
        raise ValueError(f"self_draft_layers {n}: between 1 and the target's {total} layers")
    return n


def load_draft(config: EngineConfig, device, dtype: torch.dtype):
    """The draft model of `speculative_method = "draft_model"` (a loader.LoadedModel), on the target's
    device and dtype. Load it before sizing the KV cache: its KV costs draft_kv_bytes_per_block()
    more per block of the target's (the draft's cache has the target's num_blocks)."""
    from workers.engine.loader import load_model
    return load_model(config.draft_model or "random", random_weights=config.draft_random_weights,
                      device=device, dtype=dtype)


def draft_kv_bytes_per_block(draft_config: ModelConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.empty((), dtype=dtype).element_size()
    return 2 * draft_config.num_hidden_layers * block_size * draft_config.num_key_value_heads * \
        draft_config.head_dim * elem


def build_drafter(runner, config: EngineConfig, draft=None) -> "Drafter | None":
    """The worker's drafter for config.speculative_method, or None for the batcher's (model-free)
    methods and "off". `runner`: the ModelRunner (model, kv_caches, inputs.table, block_size, device,
    dtype, model_config). `draft`: an already loaded draft (load_draft) for "draft_model"."""
    method = config.speculative_method
    if method == "self_draft":
        return SelfDraft(runner, self_draft_num_layers(config, runner.model_config), config)
    if method == "draft_model":
        if draft is None:
            draft = load_draft(config, runner.device, runner.dtype)
        return DraftModel(runner, draft, config)
    return None


def _allot(need: np.ndarray, budget: int) -> np.ndarray:
    """Tokens per segment for one pass: segments in order take what they need while the budget lasts."""
    before = np.cumsum(need) - need
    return np.clip(budget - before, 0, need)


class Drafter:
    """Proposes k greedy drafts per request (see the module docstring); subclasses say which model
    runs the forwards and where each request's draft KV is valid from."""
    name = ""

    def __init__(self, runner, model, config: EngineConfig):
        self.runner = runner
        self.model = model
        self.device = runner.device
        self.block_size = runner.block_size
        self.max_positions = int(model.rotary_emb.max_positions)
        # A catch-up longer than this runs in several forwards (a first proposal over long prompts).
        self.max_catchup_tokens = max(512, int(config.max_num_batched_tokens))

    # ---- what subclasses provide ----------------------------------------------------------------
    def _forward(self, ids: torch.Tensor, positions: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        raise NotImplementedError

    def _start(self, st: SeqSlot, known: int) -> int:
        """First position whose draft KV must be computed (<= known - 1)."""
        return min(st.num_computed, known - 1)

    def _commit(self, st: SeqSlot, known: int, fed: list[int]) -> None:
        """After a propose: the KV of positions < known holds the true tokens, then of `fed` (drafts)."""

    def forget(self, st: SeqSlot) -> None:
        """Drop what this drafter holds for a request (finished, aborted or preempted)."""

    def reset(self) -> None:
        """Forget every request."""

    # ---- proposing ------------------------------------------------------------------------------
    @torch.inference_mode()
    def propose(self, seqs: list[SeqSlot], ks: list[int]) -> list[list[int]]:
        """ks[i] greedy drafts for each decoding seq (L = len(token_ids) + pending known tokens,
        num_computed == L - 1, blocks allotted up to position L - 1 + ks[i]); fewer where its blocks
        or the model's positions end sooner. Leaves the seqs as they are. A token the previous
        launched step is still sampling (st.pending) is read on the device, as StepInputs.prepare does."""
        out: list[list[int]] = [[] for _ in seqs]
        if not seqs:
            return out
        table = self.runner.inputs.table
        known = np.array([len(st.token_ids) + st.pending for st in seqs], dtype=_I64)
        # Drafts at positions L..L+k-1 feed inputs at L-1..L+k-2: inside the rope table and the
        # request's own blocks (a table entry past them is stale: another request's block).
        held = table.num_blocks[np.array([st.row for st in seqs], dtype=_I64)] * self.block_size
        kk = np.minimum(np.asarray(ks, dtype=_I64), np.minimum(self.max_positions, held) - known + 1)
        order = np.argsort(-kk, kind="stable")
        order = order[kk[order] > 0]
        B = int(order.size)
        if not B:
            return out
        self._sync_table(table)
        seqs_o = [seqs[i] for i in order]
        L = known[order]
        k = kk[order]
        rows = np.array([st.row for st in seqs_o], dtype=_I64)
        start = np.array([self._start(st, int(n)) for st, n in zip(seqs_o, L)], dtype=_I64)

        # Catch-up beyond the budget first (never the last token: the final pass samples from it).
        rem = L - start
        while int(rem.sum()) > self.max_catchup_tokens:
            take = _allot(rem - 1, self.max_catchup_tokens)
            sel = np.nonzero(take)[0]
            if not sel.size:
                break
            self._ragged(table, [seqs_o[i] for i in sel], rows[sel], start[sel], take[sel], None)
            start += take
            rem -= take

        kmax = int(k[0])
        n_j = [int((k > j).sum()) for j in range(1, kmax)]      # batch of decode forward j
        d_pos = [L[:n] - 1 + j for j, n in zip(range(1, kmax), n_j)]
        d_rows = [rows[:n] for n in n_j]
        hidden, last, dec = self._ragged(table, seqs_o, rows, start, rem, (d_pos, d_rows))
        tok = self.model.compute_logits(hidden.index_select(0, last)).argmax(-1)
        drafts = [tok]
        for j, n in enumerate(n_j):
            ids = tok[:n]
            pos, meta = dec(j)
            tok = self.model.compute_logits(self._forward(ids, pos, meta)).argmax(-1)
            drafts.append(tok)
        flat = torch.cat(drafts).tolist()         # the one device -> host read
        off = np.cumsum([0, B] + n_j)
        for i, (src, st) in enumerate(zip(order, seqs_o)):
            d = [flat[off[j] + i] for j in range(int(k[i]))]
            out[src] = d
            self._commit(st, int(L[i]), d[:-1])
        return out

    def _sync_table(self, table) -> None:
        """On CUDA the device copy of the block table gets this step's new blocks in the step's own
        prepare(), after propose(): patch them in now (prepare then finds nothing left to patch)."""
        if table.mirror:
            idx, val = table.take_updates()
            if idx.size:
                dev = table.device_table
                dev.view(-1).index_copy_(0, torch.from_numpy(idx).to(dev.device),
                                         torch.from_numpy(val).to(dev.device, torch.int32))

    def _ragged(self, table, seqs: list[SeqSlot], rows: np.ndarray, starts: np.ndarray, lens: np.ndarray,
                decodes):
        """One forward over segments (seq, first position, tokens) given in any order: prefill
        segments (with their prior context) laid out first, then one-token ones, as StepInputs does.
        Returns the hidden states, the flat index of each segment's last token (in the given order)
        and, when `decodes` = (positions, rows) per later decode forward is given, a function j ->
        (positions, metadata) of decode forward j, whose inputs came over in the same copy."""
        bs = self.block_size
        lay = np.argsort(lens == 1, kind="stable")
        r, s, n = rows[lay], starts[lay], lens[lay]
        ids: list[int] = []
        late_dst: list[int] = []
        late_src: list[int] = []
        for i in lay:
            st, c, m = seqs[i], int(starts[i]), int(lens[i])
            have = len(st.token_ids)
            if c + m > have:                      # the last input is the previous step's sample
                ids.extend(st.token_ids[c:have])
                late_dst.append(len(ids))
                late_src.append(st.pending_src)
                ids.append(0)
            else:
                ids.extend(st.token_ids[c:c + m])
        T, B = len(ids), len(lay)
        P = int((n > 1).sum())
        if T == B:
            pos, tok_rows = s, r
        else:
            seg_start = np.cumsum(n) - n
            pos = np.arange(T, dtype=_I64) + np.repeat(s - seg_start, n)
            tok_rows = np.repeat(r, n)
        ends = np.cumsum(n) - 1
        last = np.empty(B, dtype=_I64)
        last[lay] = ends
        ctx = s + n
        qsl = np.zeros(P + 1, dtype=_I64)
        np.cumsum(n[:P], out=qsl[1:])
        slots = table.np[tok_rows, pos // bs].astype(_I64) * bs + pos % bs
        ints = [np.array(ids, dtype=_I64), pos, slots, ctx, r, qsl, last]
        if late_dst:
            ints += [np.array(late_dst, dtype=_I64), np.array(late_src, dtype=_I64)]
        if decodes is not None:
            d_pos, d_rows = decodes
            d_slots = [table.np[rr, p // bs].astype(_I64) * bs + p % bs for p, rr in zip(d_pos, d_rows)]
            ints += [np.concatenate([*d_pos, *d_slots, *d_rows]) if d_pos else np.empty(0, dtype=_I64)]
        dev = self._to_device(ints)
        ids_t, pos_t, slots_t, ctx_t, rows_t, qsl_t, last_t = dev[:7]
        if late_dst:
            prev = self.runner._last.tokens if self.runner._last is not None else None
            if prev is None:
                raise RuntimeError("a draft needs a token no launched step is sampling")
            ids_t.index_copy_(0, dev[7], prev.index_select(0, dev[8]))
        ctx32 = ctx_t.to(torch.int32)
        rows32 = rows_t.to(torch.int32)
        meta = AttentionMetadata(
            slot_mapping=slots_t, prefill_query_lens=n[:P].tolist(), prefill_context_lens=ctx[:P].tolist(),
            num_decode_tokens=B - P, decode_context_lens=ctx32[P:] if B > P else None,
            max_decode_context_len=int(ctx[P:].max()) if B > P else 0, block_table=table.device_table,
            prefill_rows=r[:P].tolist(), prefill_rows_t=rows32[:P], prefill_query_start_loc=qsl_t.to(torch.int32),
            prefill_seq_lens=ctx32[:P], max_prefill_query_len=int(n[:P].max()) if P else 0,
            decode_rows=rows32[P:] if B > P else None)
        hidden = self._forward(ids_t, pos_t, meta)
        if decodes is None:
            return hidden, last_t, None
        d_pos, d_rows = decodes
        sizes = [p.size for p in d_pos]
        total = sum(sizes)
        blob = dev[-1]
        d_pos_t, d_slots_t, d_rows32 = blob[:total], blob[total:2 * total], blob[2 * total:].to(torch.int32)
        d_ctx32 = (d_pos_t + 1).to(torch.int32)
        offs = np.cumsum([0] + sizes)

        def dec(j: int) -> tuple[torch.Tensor, AttentionMetadata]:
            a, b = int(offs[j]), int(offs[j + 1])
            return d_pos_t[a:b], AttentionMetadata(
                slot_mapping=d_slots_t[a:b], prefill_query_lens=[], prefill_context_lens=[],
                num_decode_tokens=b - a, decode_context_lens=d_ctx32[a:b],
                max_decode_context_len=int(d_pos[j].max()) + 1, block_table=table.device_table,
                decode_rows=d_rows32[a:b])
        return hidden, last_t, dec

    def _to_device(self, ints: list[np.ndarray]) -> list[torch.Tensor]:
        """The arrays as views of one int64 tensor on the device (one host -> device copy)."""
        flat = torch.from_numpy(np.concatenate(ints))
        if self.device.type != "cpu":
            flat = flat.to(self.device)
        out, off = [], 0
        for a in ints:
            out.append(flat[off:off + a.size])
            off += a.size
        return out


class SelfDraft(Drafter):
    """The target's first `num_layers` layers + its final norm + its LM head, over the target's cache."""
    name = "self_draft"

    def __init__(self, runner, num_layers: int, config: EngineConfig):
        super().__init__(runner, runner.model, config)
        self.num_layers = num_layers
        self.kv_caches = runner.kv_caches[:num_layers]

    def _forward(self, ids, positions, meta):
        return self.model.forward_first_layers(ids, positions, meta, self.kv_caches, self.num_layers)


class DraftModel(Drafter):
    """A separate model with the target's vocabulary and its own KV caches over the target's block ids."""
    name = "draft_model"

    def __init__(self, runner, draft, config: EngineConfig):
        target = runner.model_config
        dc = draft.config
        if dc.vocab_size != target.vocab_size:
            raise ValueError(f"draft model {draft.name!r} has a vocabulary of {dc.vocab_size} tokens and the target "
                             f"{getattr(runner.loaded, 'name', 'model')!r} {target.vocab_size}: a draft must "
                             f"share the target's tokenizer")
        super().__init__(runner, draft.model, config)
        self.loaded = draft
        if draft.model is not runner.model and self.device.type == "cpu":
            draft.model.relayout_for_cpu()
            if runner.model.fused_cpu_ops and runner.dtype == torch.float32:   # the kernels are loaded
                draft.model.use_cpu_kernels(True)
                if config.block_weights and draft.gguf_path:
                    from workers.engine.block_weights import attach_block_weights
                    attach_block_weights(draft.model, draft.gguf_path, config.block_weights_max_rows)
        shape = (runner.num_blocks, runner.block_size, dc.num_key_value_heads, dc.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=runner.dtype, device=runner.device),
                           torch.zeros(shape, dtype=runner.dtype, device=runner.device))
                          for _ in range(dc.num_hidden_layers)]
        # row -> (the seq seated there, its true tokens fed, the drafts fed after them). The seq
        # itself is kept so that a row reused by another request is recognised without forget().
        self._state: dict[int, tuple[SeqSlot, int, list[int]]] = {}

    def _forward(self, ids, positions, meta):
        return self.model(ids, positions, meta, self.kv_caches)

    def _start(self, st: SeqSlot, known: int) -> int:
        ent = self._state.get(st.row)
        if ent is None or ent[0] is not st:
            return 0
        _, c, fed = ent
        toks = st.token_ids
        for d in fed:                  # drafts that became the request's tokens left valid KV
            if c < len(toks) and toks[c] == d:
                c += 1
            else:
                break
        # past the target's computed count the blocks may have been returned (rollback)
        return min(c, st.num_computed, known - 1)

    def _commit(self, st: SeqSlot, known: int, fed: list[int]) -> None:
        self._state[st.row] = (st, known, fed)

    def forget(self, st: SeqSlot) -> None:
        ent = self._state.get(st.row)
        if ent is not None and ent[0] is st:
            del self._state[st.row]

    def reset(self) -> None:
        self._state.clear()
