"""A step's inputs, laid out at a cost that does not depend on the model's context length.

Two things live here, in the style of vLLM V1's InputBatch and BlockTable:

* `BlockTable`: one persistent int32 table `[rows, max_blocks_per_seq]`, a row per running
  request. A row is written once when the request arrives and one entry per block it gains
  afterwards; it is never rebuilt or padded per step. On CUDA the host copy is pinned and the
  device copy is patched with only the entries written since the last step.
* `StepInputs.prepare`: token ids, positions, slot mapping, context lengths, rows, the prefill
  segments' offsets, the rows to sample and the per-row sampling settings, computed with numpy
  over the batch and, on CUDA, packed into one pinned buffer that goes to the device in ONE
  non-blocking copy. The device reads the block table through each segment's row, so nothing
  per step grows with `max_model_len` or with the context held - only with the batch and the
  blocks that changed (`last_bytes` counts what a step wrote, for the test that says so).

Rows also hold each request's sampling settings (temperature, top-k, ...), set at admission, so a
step gathers them with one numpy take instead of rebuilding them from Python objects.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from workers.engine.attention import AttentionMetadata
from workers.engine.sampler import SamplingTensors
from workers.engine.sampling_params import SamplingParams

_I64 = np.int64


class BlockTable:
    """Persistent block table: row r holds the block ids of the request seated in row r."""

    def __init__(self, max_rows: int, max_cols: int, device: torch.device, mirror: bool | None = None):
        self.device = device
        self.max_cols = max(1, max_cols)
        self._pin = device.type == "cuda"
        # mirror: a separate device copy patched with the changed entries (always off the CPU; on
        # the CPU only in tests of that path)
        self.mirror = device.type != "cpu" if mirror is None else mirror
        self._alloc(max(1, max_rows))
        self.num_blocks = np.zeros(self.rows, dtype=_I64)
        self._free = list(range(self.rows - 1, -1, -1))
        self._dirty: list[tuple[int, int, int]] = []      # (row, first col, count) written since take_updates
        self.generation = 0                               # bumped when the tensors are reallocated

    def _alloc(self, rows: int) -> None:
        self.rows = rows
        self.host = torch.zeros((rows, self.max_cols), dtype=torch.int32, pin_memory=self._pin)
        self.np = self.host.numpy()
        self.device_table = torch.zeros((rows, self.max_cols), dtype=torch.int32, device=self.device) \
            if self.mirror else self.host

    def _grow(self) -> None:
        """More requests than rows (the batcher's max_num_seqs exceeds ours): double, keep contents."""
        old_host, old_dev, old = self.host, self.device_table, self.rows
        self._alloc(2 * old)
        self.host[:old].copy_(old_host)
        if self.mirror:
            self.device_table[:old].copy_(old_dev)
        self.num_blocks = np.concatenate([self.num_blocks, np.zeros(old, dtype=_I64)])
        self._free = list(range(self.rows - 1, old - 1, -1)) + self._free
        self.generation += 1

    def add(self, block_ids: list[int]) -> int:
        """Seat a request; returns its row."""
        if not self._free:
            self._grow()
        row = self._free.pop()
        self.num_blocks[row] = 0
        self.append(row, block_ids)
        return row

    def append(self, row: int, block_ids: list[int]) -> None:
        n0, k = int(self.num_blocks[row]), len(block_ids)
        if k == 0:
            return
        if n0 + k > self.max_cols:
            raise ValueError(f"block table of {n0 + k} blocks exceeds max_blocks_per_seq={self.max_cols} "
                             f"(the batcher's max_model_len is larger than the worker's)")
        self.np[row, n0:n0 + k] = block_ids
        self.num_blocks[row] = n0 + k
        if self.mirror:
            self._dirty.append((row, n0, k))

    def truncate(self, row: int, num_blocks: int) -> None:
        """Keep the row's first num_blocks entries (a speculative step rolled back). The entries past
        them go stale - nothing reads past a row's context length - and the next append overwrites them."""
        if num_blocks < self.num_blocks[row]:
            self.num_blocks[row] = max(0, num_blocks)

    def remove(self, row: int) -> None:
        """Free a row. Its stale entries stay: nothing reads past a row's context length."""
        self.num_blocks[row] = 0
        self._free.append(row)

    def take_updates(self) -> tuple[np.ndarray, np.ndarray]:
        """Flat indices and values of the entries written since the last call (for the device copy)."""
        if not self._dirty:
            return np.empty(0, dtype=_I64), np.empty(0, dtype=_I64)
        idx = np.concatenate([r * self.max_cols + np.arange(c, c + k, dtype=_I64) for r, c, k in self._dirty])
        self._dirty.clear()
        return idx, self.np.reshape(-1)[idx].astype(_I64)


@dataclass
class SeqSlot:
    """The runner's view of one running request (its tokens and its row in the BlockTable)."""
    token_ids: list[int]
    num_prompt_tokens: int
    num_computed: int
    row: int
    sampling: SamplingParams
    seed: int
    adapter_id: str | None = None
    slot: int = 0                       # LoRA slot (0: the bare base model)
    pending: int = 0                    # tokens a launched step is sampling (not in token_ids yet)
    pending_src: int = 0                # that token's index in the launching step's sampled ids

    @property
    def needs_history(self) -> bool:
        """Penalties read the token history on the host."""
        return self.sampling.repetition_penalty != 1.0 or self.sampling.presence_penalty != 0.0


@dataclass
class VerifyRows:
    """The step's verification segments: request i (of seqs) computed its decode token then its
    draft_lens[i] drafts, and the target's distribution is wanted at each of those 1 + m positions.
    Laid out `width` (1 + the longest draft) positions per request: position j of request i is
    sample row i * width + j (after the plain sample rows); positions past 1 + m repeat the last."""
    seqs: list[tuple[str, SeqSlot]]
    draft_lens: list[int]               # host: m per request
    width: int
    draft_ids: torch.Tensor             # [N, width - 1] int64 (0 past draft_lens)
    draft_lens_t: torch.Tensor          # [N] int64
    sampling: SamplingTensors           # [N * width] rows: the request's settings, steps of each position


@dataclass
class PreparedStep:
    input_ids: torch.Tensor             # [T] int64
    positions: torch.Tensor             # [T] int64
    meta: AttentionMetadata
    sample_idx: torch.Tensor            # [S + N * width] int64: rows of the hidden states to sample from
    sample_seqs: list[tuple[str, SeqSlot]]
    sampling: SamplingTensors | None    # the S plain sample rows
    num_tokens: int
    verify: VerifyRows | None = None    # speculating requests (their rows follow the S plain ones)


class StepInputs:
    """Lays out one step's inputs; owns the BlockTable and the per-row sampling settings."""

    def __init__(self, max_rows: int, max_blocks_per_seq: int, block_size: int, device: torch.device,
                 vocab_size: int, pack: bool | None = None):
        self.device = device
        self.block_size = block_size
        self.vocab_size = vocab_size
        # pack: one staging buffer and one host->device copy per step (off the CPU; on the CPU only
        # to test that path: there the arrays are used in place)
        self._pack = device.type != "cpu" if pack is None else pack
        self.table = BlockTable(max_rows, max_blocks_per_seq, device, mirror=self._pack)
        self._stage: list[torch.Tensor] = []     # two pinned int64 buffers, used in turn
        self._copied: list = [None, None]        # per buffer: the CUDA event of its last copy
        self._turn = 0
        self._row_params = self._new_row_params(self.table.rows)
        self.last_bytes = 0                      # bytes a step wrote into its input buffers

    # ---- per-row sampling settings --------------------------------------------------------
    @staticmethod
    def _new_row_params(rows: int) -> dict[str, np.ndarray]:
        f = lambda: np.zeros(rows, dtype=np.float32)   # noqa: E731
        return {"temp": f(), "top_p": f(), "min_p": f(), "rep": f(), "pres": f(),
                "top_k": np.zeros(rows, dtype=_I64), "seed": np.zeros(rows, dtype=_I64)}

    def seat(self, block_ids: list[int], sampling: SamplingParams, seed: int) -> int:
        row = self.table.add(block_ids)
        p = self._row_params
        if p["temp"].shape[0] < self.table.rows:       # the table grew
            grown = self._new_row_params(self.table.rows)
            for k, v in p.items():
                grown[k][:v.shape[0]] = v
            self._row_params = p = grown
        p["temp"][row] = sampling.temperature
        p["top_k"][row] = sampling.top_k if 0 < sampling.top_k < self.vocab_size else 0
        p["top_p"][row] = sampling.top_p
        p["min_p"][row] = sampling.min_p
        p["rep"][row] = sampling.repetition_penalty
        p["pres"][row] = sampling.presence_penalty
        p["seed"][row] = int(seed) & ((1 << 63) - 1)
        return row

    def release(self, row: int) -> None:
        self.table.remove(row)

    # ---- the step ---------------------------------------------------------------------------
    def prepare(self, work: list[tuple[str, SeqSlot, int]], prev_tokens: torch.Tensor | None = None,
                drafts: dict[str, list[int]] | None = None) -> PreparedStep:
        """work: (request id, seq, tokens to compute) with prefill segments (n > 1) first, then
        decodes (n == 1). Advances each seq's num_computed.

        A token still being sampled by the previous launched step (seq.pending) is not on the host
        yet: its input slot is filled on the device from `prev_tokens[seq.pending_src]`.

        drafts: request id -> draft tokens to verify (m >= 1). Such a request computes its last
        known token then the drafts (n == 1 + m; it must lie with the decodes in `work`), laid out
        as 1 + m decode tokens of its row with context lengths c+1 .. c+1+m: the KV of every token
        is written before attention reads it, so each position sees exactly the ones before it,
        and the step keeps the decode path (fused kernels, no per-segment prefill attention: on
        CPU a prefill-shaped verification segment cost about twice its decode-shaped layout).
        Every one of its 1 + m positions is sampled (PreparedStep.verify)."""
        bs = self.block_size
        rows_l, starts_l, lens_l, ids = [], [], [], []
        sample_seg: list[int] = []
        sample_seqs: list[tuple[str, SeqSlot]] = []
        steps_l: list[int] = []
        late_dst: list[int] = []                 # input slots whose token is still on the device
        late_src: list[int] = []
        ver_seg: list[int] = []                  # verification segments
        ver_seqs: list[tuple[str, SeqSlot]] = []
        ver_drafts: list[list[int]] = []
        ver_steps: list[int] = []
        num_prefill = 0
        for rid, st, n in work:
            c = st.num_computed
            known = len(st.token_ids)
            d = drafts.get(rid) if drafts else None
            if d:
                if n != 1 + len(d) or c + 1 != known or st.pending:
                    raise ValueError(f"request {rid}: drafts verify only on a resolved decode "
                                     f"(n={n}, {len(d)} drafts, computed {c} of {known}, pending {st.pending})")
                if st.needs_history:
                    raise ValueError(f"request {rid}: penalties are not combined with speculation")
                ver_seg.append(len(rows_l))      # its first decode token
                rows_l.extend([st.row] * n)
                starts_l.extend(range(c, c + n))
                lens_l.extend([1] * n)
                ids.append(st.token_ids[c])
                ids.extend(d)
                st.num_computed = c + n
                ver_seqs.append((rid, st))
                ver_drafts.append(d)
                ver_steps.append(c + 1 - st.num_prompt_tokens)    # the output index of position c's sample
                continue
            rows_l.append(st.row)
            starts_l.append(c)
            lens_l.append(n)
            if n != 1:
                if num_prefill != len(rows_l) - 1:
                    raise ValueError("prefill segments must come before decodes and verifications in a step")
                num_prefill += 1
            if c + n > known:                    # the last input is the previous step's sample
                ids.extend(st.token_ids[c:known])
                late_dst.append(len(ids))
                late_src.append(st.pending_src)
                ids.append(0)
            elif n == 1:
                ids.append(st.token_ids[c])
            else:
                ids.extend(st.token_ids[c:c + n])
            c += n
            st.num_computed = c
            if c == known + st.pending:
                sample_seg.append(len(rows_l) - 1)
                sample_seqs.append((rid, st))
                steps_l.append(c - st.num_prompt_tokens)
        rows = np.array(rows_l, dtype=_I64)
        starts = np.array(starts_l, dtype=_I64)
        lens = np.array(lens_l, dtype=_I64)
        ctx = starts + lens
        T = len(ids)
        B = len(rows_l)                              # segments (a verification: one per position)
        if T == B:                                   # every segment is one token (pure decode)
            positions, tok_rows = starts, rows
        else:
            seg_start = np.cumsum(lens) - lens
            positions = np.arange(T, dtype=_I64) + np.repeat(starts - seg_start, lens)
            tok_rows = np.repeat(rows, lens)
        slots = self.table.np[tok_rows, positions // bs].astype(_I64) * bs + positions % bs
        qsl = np.zeros(num_prefill + 1, dtype=_I64)
        np.cumsum(lens[:num_prefill], out=qsl[1:])
        sample_idx = (np.cumsum(lens) - 1)[sample_seg] if sample_seg else np.empty(0, dtype=_I64)
        srows = rows[sample_seg] if sample_seg else np.empty(0, dtype=_I64)
        steps = np.array(steps_l, dtype=_I64)
        S0 = len(sample_seg)
        ver_ints: list[np.ndarray] = []
        width = 0
        if ver_seg:
            # Every position of each verification segment, `width` per request (short ones repeat
            # their last position), appended to the plain sample rows.
            vlens = np.array([len(d) for d in ver_drafts], dtype=_I64)
            width = 1 + int(vlens.max())
            col = np.arange(width, dtype=_I64)
            vstart = (np.cumsum(lens) - lens)[ver_seg]
            vidx = vstart[:, None] + np.minimum(col[None, :], vlens[:, None])
            sample_idx = np.concatenate([sample_idx, vidx.reshape(-1)])
            srows = np.concatenate([srows, np.repeat(rows[ver_seg], width)])
            steps = np.concatenate([steps, (np.array(ver_steps, dtype=_I64)[:, None] + col[None, :]).reshape(-1)])
            vdrafts = np.zeros((len(ver_seg), width - 1), dtype=_I64)
            for i, d in enumerate(ver_drafts):
                vdrafts[i, :len(d)] = d
            ver_ints = [vdrafts.reshape(-1), vlens]
        upd_idx, upd_val = self.table.take_updates() if self._pack else (None, None)

        ints = [np.array(ids, dtype=_I64), positions, slots, ctx, rows, qsl, sample_idx]
        floats: list[np.ndarray] = []
        sp = None
        if srows.size:
            p = self._row_params
            sp = {k: v[srows] for k, v in p.items()}
            ints += [sp["top_k"], sp["seed"], steps]
            floats = [sp["temp"], sp["top_p"], sp["min_p"], sp["rep"], sp["pres"]]
        if upd_idx is not None and upd_idx.size:
            ints += [upd_idx, upd_val]
        if late_dst:
            if prev_tokens is None:
                raise RuntimeError("a step needs a token no launched step is sampling")
            ints += [np.array(late_dst, dtype=_I64), np.array(late_src, dtype=_I64)]
        ints += ver_ints
        dev = self._to_device(ints, floats)
        it = iter(dev)
        ids_t, pos_t, slots_t, ctx_t, rows_t, qsl_t, sidx_t = (next(it) for _ in range(7))
        if sp is not None:
            topk_t, seed_t, steps_t = next(it), next(it), next(it)
        if upd_idx is not None and upd_idx.size:          # patch the device table before anything reads it
            idx_t, val_t = next(it), next(it)
            self.table.device_table.view(-1).index_copy_(0, idx_t, val_t.to(torch.int32))
        if late_dst:
            dst_t, src_t = next(it), next(it)
            ids_t.index_copy_(0, dst_t, prev_tokens.index_select(0, src_t))
        if ver_ints:
            vdrafts_t, vlens_t = next(it), next(it)
        samp = verify = None
        if sp is not None:                                # the floats come last in the packed buffer
            temp_t, topp_t, minp_t, rep_t, pres_t = (next(it) for _ in range(5))
            tensors = dict(temperatures=temp_t, top_ks=topk_t, top_ps=topp_t, min_ps=minp_t,
                           repetition_penalties=rep_t, presence_penalties=pres_t, seeds=seed_t, steps=steps_t)
            # one flag for both parts: the step's logprobs cover every token it emits or none
            want_lp = any(st.sampling.logprobs for _, st in sample_seqs) or any(
                st.sampling.logprobs for _, st in ver_seqs)
            part = lambda a, b: ({k: v[a:b] for k, v in sp.items()},           # noqa: E731
                                 {k: v[a:b] for k, v in tensors.items()})
            if S0:
                samp = self._sampling_tensors(*part(0, S0), sample_seqs, want_lp)
            if ver_seg:
                verify = VerifyRows(ver_seqs, [len(d) for d in ver_drafts], width,
                                    vdrafts_t.view(len(ver_seg), width - 1), vlens_t,
                                    self._sampling_tensors(*part(S0, srows.size), ver_seqs, want_lp))
        # what this step wrote: its own arrays plus the table entries that changed
        self.last_bytes = sum(a.nbytes for a in ints) + sum(a.nbytes for a in floats)

        P = num_prefill
        D = B - P
        ctx32 = ctx_t.to(torch.int32)
        rows32 = rows_t.to(torch.int32)
        max_dec = int(ctx[P:].max()) if D else 0
        meta = AttentionMetadata(
            slot_mapping=slots_t,
            prefill_query_lens=lens_l[:P], prefill_context_lens=ctx[:P].tolist(),
            num_decode_tokens=D,
            decode_context_lens=ctx32[P:] if D else None,
            max_decode_context_len=max_dec,
            block_table=self.table.device_table,
            prefill_rows=rows_l[:P], prefill_rows_t=rows32[:P], prefill_query_start_loc=qsl_t.to(torch.int32),
            prefill_seq_lens=ctx32[:P], max_prefill_query_len=max(lens_l[:P], default=0),
            decode_rows=rows32[P:] if D else None,
        )
        if D and not self._pack:
            # The CPU decode kernels take a [D, W] table of just the columns this batch needs.
            W = -(-max_dec // bs)
            meta.decode_block_tables = torch.from_numpy(self.table.np[rows[P:], :W])
        return PreparedStep(ids_t, pos_t, meta, sidx_t, sample_seqs, samp, T, verify)

    def _to_device(self, ints: list[np.ndarray], floats: list[np.ndarray]) -> list[torch.Tensor]:
        """CPU: zero-copy tensors over the arrays. CUDA: one pinned int64 buffer (floats as raw
        float32 pairs), one non-blocking copy, then views of the device copy."""
        if not self._pack:
            return [torch.from_numpy(a) for a in ints] + [torch.from_numpy(a) for a in floats]
        sizes = [a.size for a in ints] + [-(-a.size // 2) for a in floats]   # floats packed 2 per int64
        total = sum(sizes)
        if not self._stage or self._stage[0].numel() < total:
            n = max(1024, 1 << (total - 1).bit_length())
            pin = self.device.type == "cuda"
            self._stage = [torch.empty(n, dtype=torch.int64, pin_memory=pin) for _ in range(2)]
            self._copied = [None, None]
        self._turn ^= 1
        stage = self._stage[self._turn]
        if self._copied[self._turn] is not None:
            # This buffer fed the step before last: its copy is almost surely done (that step's
            # tokens were read), but a caller that launches further ahead must not overwrite it early.
            self._copied[self._turn].synchronize()
        buf = stage.numpy()
        off = 0
        for a in ints:
            buf[off:off + a.size] = a
            off += a.size
        for a in floats:
            w = -(-a.size // 2)
            buf[off:off + w].view(np.float32)[:a.size] = a
            off += w
        if self.device.type == "cuda":
            dev = stage[:total].to(self.device, non_blocking=True)
            ev = self._copied[self._turn] = torch.cuda.Event()
            ev.record()
        else:
            dev = stage[:total].clone()
        out, off = [], 0
        for a, w in zip(ints, sizes):
            out.append(dev[off:off + w])
            off += w
        for a, w in zip(floats, sizes[len(ints):]):
            out.append(dev[off:off + w].view(torch.float32)[:a.size])
            off += w
        return out

    def _sampling_tensors(self, sp: dict[str, np.ndarray], tensors: dict[str, torch.Tensor],
                          seqs: list[tuple[str, SeqSlot]], want_logprobs: bool) -> SamplingTensors:
        need_hist = bool((sp["rep"] != 1.0).any())
        need_out = bool((sp["pres"] != 0.0).any())
        history = output_history = None
        if need_hist or need_out:
            # Penalties need each request's token history: O(context), built only when asked for.
            # (Only plain sample rows get here: one row per request, in seqs' order.)
            from workers.engine.sampler import pad_histories
            if need_hist:
                history = pad_histories([st.token_ids for _, st in seqs], self.vocab_size, self.device)
            if need_out:
                output_history = pad_histories([st.token_ids[st.num_prompt_tokens:] for _, st in seqs],
                                               self.vocab_size, self.device)
        return SamplingTensors.from_arrays(
            temps=sp["temp"], top_ks=sp["top_k"], top_ps=sp["top_p"], min_ps=sp["min_p"],
            want_logprobs=want_logprobs, tensors=tensors, history=history, output_history=output_history)
