"""The worker side of a step: owns the KV tensors, mirrors running requests, executes StepPlans.

Per step: forget finished ids, register new requests, lay the scheduled tokens out as one flat
batch (prefill chunks first, then one token per decoding request), run one forward, and sample
one token for every request whose chunk reached its last known token.

Speculation: a speculating request's segment is its decode token then its m draft tokens (the
batcher's, or the draft model's), laid out as 1 + m decode tokens of its row. The target's
distribution at each of the 1 + m positions verifies the drafts (rejection_sampler.verify_logits);
the request emits the accepted drafts plus one token, and its KV rolls back to them: num_computed
drops to the accepted tokens and its block table row to the blocks they need (the KV written for
rejected drafts lies past the context length, where nothing reads it).
"""
from __future__ import annotations

import os
import time

import torch

from workers.engine.attention import AttentionMetadata, _triton
from workers.engine.config import EngineConfig
from workers.engine.plan import StepPlan, StepResult
from workers.engine.rejection_sampler import verify_logits
from workers.engine.sampler import Sampler
from workers.engine.step_inputs import PreparedStep, SeqSlot, StepInputs, VerifyRows

# Methods whose drafts the worker proposes (workers/engine/draft_model.py); the others come in the plan.
DRAFT_MODEL_METHODS = ("self_draft", "draft_model")


def cpu_kernels_enabled() -> bool:
    """SWITCHYARD_CPU_KERNELS=0 keeps every engine on plain torch ops (A/B benchmarks, debugging)."""
    return os.environ.get("SWITCHYARD_CPU_KERNELS", "1").lower() not in ("0", "false", "no", "off")


def resolve_dtype(config: EngineConfig) -> torch.dtype:
    if config.dtype == "auto":
        return torch.bfloat16 if config.device.startswith("cuda") else torch.float32
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[config.dtype]


class ModelRunner:
    def __init__(self, loaded, config: EngineConfig):
        self.loaded = loaded
        self.model = loaded.model
        self.model_config = mc = loaded.config
        self.config = config
        self.device = torch.device(config.device)
        if config.num_threads:
            torch.set_num_threads(config.num_threads)
        self.dtype = next(self.model.parameters()).dtype
        if self.device.type == "cpu":
            self.model.relayout_for_cpu()
            if config.cpu_kernels and self.dtype == torch.float32 and cpu_kernels_enabled():
                self._use_cpu_kernels(getattr(loaded, "gguf_path", None))
        self.block_size = config.block_size
        # A separate draft model is loaded before sizing: its KV cache has the target's num_blocks,
        # so each block costs its bytes too (workers/engine/draft_model.py).
        self._draft = None
        if config.speculative_method == "draft_model":
            from workers.engine.draft_model import load_draft
            self._draft = load_draft(config, self.device, self.dtype)
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        ctx = config.max_model_len or mc.max_position_embeddings
        self.max_model_len = min(ctx, self.num_blocks * self.block_size)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        shape = (self.num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(mc.num_hidden_layers)]
        self.sampler = Sampler()
        self.seqs: dict[str, SeqSlot] = {}
        self.inputs = StepInputs(config.max_num_seqs, self.max_blocks_per_seq, self.block_size, self.device,
                                 mc.vocab_size)
        self.last_step_input_bytes = 0
        self._last: InFlightStep | None = None     # the latest launched step that samples
        self.overlap_steps = self.device.type == "cuda"
        self.lora = None                # AdapterManager, when adapters can be served (max_loras > 0)
        if config.max_loras > 0:
            from workers.engine.lora import AdapterManager
            self.lora = AdapterManager(mc, max_loras=config.max_loras, max_lora_rank=config.max_lora_rank,
                                       device=self.device, dtype=self.dtype, max_cpu_loras=config.max_cpu_loras,
                                       mode=config.lora_mode)
            for name, path in (config.lora_adapters or {}).items():
                self.lora.register(name, path)
            self.lora.native = self.model.fused_cpu_ops   # set only for float32 on CPU
        self.decode_graphs: DecodeGraphs | None = None
        if (config.use_cuda_graphs and self.device.type == "cuda" and _triton() is not None):
            self.decode_graphs = DecodeGraphs(self, graph_batch_sizes(config.max_num_seqs))
            self.decode_graphs.capture()
        self.drafter = None             # proposes drafts when a speculating plan row brings none
        if config.speculative_method in DRAFT_MODEL_METHODS:
            from workers.engine.draft_model import build_drafter
            self.drafter = build_drafter(self, config, draft=self._draft)

    # ---- sizing ----------------------------------------------------------------------------
    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        elem = torch.empty((), dtype=self.dtype).element_size()
        return 2 * mc.num_hidden_layers * self.block_size * mc.num_key_value_heads * mc.head_dim * elem

    def _use_cpu_kernels(self, gguf_path: str | None) -> None:
        """Native float32 CPU kernels (workers/engine/kernels/): fused decode ops, and the GGUF blocks
        for small matmuls when the weights came from a GGUF file. Without a compiler: plain torch."""
        from workers.engine.kernels.build import load
        if not load():
            return
        self.model.use_cpu_kernels(True)
        if self.config.block_weights and gguf_path:
            from workers.engine.block_weights import attach_block_weights
            attach_block_weights(self.model, gguf_path, self.config.block_weights_max_rows)

    def _blocks_from_memory(self) -> int:
        per_block = self.kv_bytes_per_block()
        if self._draft is not None:
            from workers.engine.draft_model import draft_kv_bytes_per_block
            per_block += draft_kv_bytes_per_block(self._draft.config, self.block_size, self.dtype)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            free, total = torch.cuda.mem_get_info(self.device)
            # Leave (1 - utilization) of the card, plus headroom for activations and graphs.
            budget = free - total * (1.0 - self.config.gpu_memory_utilization) - 1.5 * 2**30
        else:
            budget = self.config.kv_cache_memory_gb * 2**30
        n = int(budget // per_block)
        if n < 2:
            raise MemoryError(f"no room for a KV cache: {budget / 2**30:.2f} GiB available, "
                              f"{per_block / 2**20:.1f} MiB per block")
        return n

    # ---- the step --------------------------------------------------------------------------
    @property
    def overlaps(self) -> bool:
        """Whether callers should prepare and launch step N+1 before reading step N's tokens: on
        CUDA, where launch() only enqueues work. On the CPU launch() computes everything, so
        launching ahead would only delay N's tokens (tests turn it on there to check the logic)."""
        return self.overlap_steps

    def execute(self, plan: StepPlan) -> StepResult:
        return self.launch(plan).result()

    def reset(self) -> None:
        """Forget every request (a new batcher session)."""
        if self._last is not None:
            self._last.result()
        for st in self.seqs.values():
            self._release(st)
        self.seqs.clear()

    def _release(self, st: SeqSlot) -> None:
        """A request's row (and its draft model's state) back for reuse."""
        self.inputs.release(st.row)
        if self.drafter is not None:
            self.drafter.forget(st)

    @torch.inference_mode()
    def launch(self, plan: StepPlan) -> "InFlightStep":
        """Start a step: forget, seat, lay out the inputs, run the forward and the sampler. On CUDA
        this only enqueues work: the sampled ids are read by InFlightStep.result(). A decode whose
        input is the token the previous launched step is still sampling reads it on the device."""
        t0 = time.perf_counter()
        for rid in plan.finished_ids:
            st = self.seqs.pop(rid, None)
            if st is not None:
                self._release(st)
        work: list[tuple[str, SeqSlot, int]] = []
        for nr in plan.new_requests:
            row = self.inputs.seat(nr.block_ids, nr.sampling, nr.seed)
            st = SeqSlot(list(nr.token_ids), nr.num_prompt_tokens, nr.num_computed_tokens, row,
                         nr.sampling, nr.seed, nr.adapter_id)
            self.seqs[nr.request_id] = st
            if nr.adapter_id:
                st.slot = self._adapter_slot(nr.adapter_id)
            work.append((nr.request_id, st, nr.num_new_tokens))
        last = self._last
        if last is not None and not last.resolved and last.trim:
            # The batcher never plans a request again while its speculative step is in flight; if it
            # did, that request's tokens, KV length and blocks are only known once the step resolves.
            ids = {rid for rid, _ in last.trim}
            if any(rr.request_id in ids for rr in plan.running):
                last.result()
        trim: list[tuple[str, SeqSlot]] = []
        drafts: dict[str, list[int]] = {}
        to_draft: list[tuple[str, SeqSlot, int]] = []
        for rr in plan.running:
            st = self.seqs[rr.request_id]
            if rr.new_block_ids:
                self.inputs.table.append(st.row, rr.new_block_ids)
            n = rr.num_new_tokens
            if rr.num_spec_tokens > 0:
                trim.append((rr.request_id, st))
                # Drafts only on a resolved decode, and never with penalties (they would need the
                # drafts in the history): anything else runs as the plain step it also is.
                if (n == 1 and not st.pending and st.num_computed + 1 == len(st.token_ids)
                        and not st.needs_history):
                    if rr.draft_token_ids:
                        drafts[rr.request_id] = list(rr.draft_token_ids[:rr.num_spec_tokens])
                    elif self.drafter is not None:
                        to_draft.append((rr.request_id, st, rr.num_spec_tokens))
            work.append((rr.request_id, st, n))
        draft_ms = 0.0
        if to_draft:
            td = time.perf_counter()
            proposed = self.drafter.propose([st for _, st, _ in to_draft], [k for _, _, k in to_draft])
            for (rid, _, k), d in zip(to_draft, proposed):
                if d:
                    drafts[rid] = list(d[:k])
            draft_ms = 1000 * (time.perf_counter() - td)
        if drafts:
            work = [(rid, st, n + len(drafts[rid])) if rid in drafts else (rid, st, n) for rid, st, n in work]
        if not work:
            return InFlightStep(self, plan.step_id, t0, [], None, None)
        last = self._last
        if last is not None and not last.resolved and any(st.needs_history for _, st, _ in work):
            last.result()           # penalties read the token history on the host: it must be complete

        # Prefill segments first, then single-token (decode) segments: the attention layout.
        # Within each, rows of one LoRA slot lie together (one segment per adapter).
        # A verification (1 + m tokens) lies with the decodes: it is laid out as 1 + m decode tokens.
        lora = any(w[1].slot for w in work)
        if lora or any(w[2] != 1 for w in work):
            work.sort(key=lambda w: (w[2] == 1 or w[0] in drafts, w[1].slot))
        step = self.inputs.prepare(work, prev_tokens=last.tokens if last is not None else None,
                                   drafts=drafts or None)
        self.last_step_input_bytes = self.inputs.last_bytes
        lora_batch = None
        if lora:
            from workers.engine.lora import LoraBatch
            lora_rows = [st.slot for _, st, n in work for _ in range(n)]
            lora_batch = LoraBatch.build(self.lora, lora_rows, device=self.device)
        D = step.meta.num_decode_tokens
        if (lora_batch is None and D == step.num_tokens and self.decode_graphs is not None
                and step.verify is None and self.decode_graphs.fits(D)):
            hidden = self.decode_graphs.run(step)
        elif lora_batch is None:
            hidden = self.model(step.input_ids, step.positions, step.meta, self.kv_caches)
        else:
            hidden = self.model(step.input_ids, step.positions, step.meta, self.kv_caches, lora=lora_batch)
        tokens = logprobs = None
        ver = step.verify
        if step.sample_seqs or ver is not None:
            logits = self.model.compute_logits(hidden.index_select(0, step.sample_idx))
            S = len(step.sample_seqs)
            if S:
                out = self.sampler(logits[:S], step.sampling)
                tokens, logprobs = out.token_ids, out.logprobs
                for i, (_, st) in enumerate(step.sample_seqs):
                    st.pending += 1
                    st.pending_src = i          # where the next step finds this token on the device
            if ver is not None:
                # After the S plain tokens (so pending_src above stays valid for the next step):
                # each request's `width` verified tokens (-1 past its own), then the counts.
                v, v_lp = verify_logits(logits[S:], ver.sampling, ver.draft_ids, ver.draft_lens_t, ver.width)
                parts = [v.tokens.reshape(-1), v.num_emitted]
                tokens = torch.cat(parts if tokens is None else [tokens] + parts)
                if v_lp is not None:
                    v_lp = v_lp.reshape(-1)
                    logprobs = v_lp if logprobs is None else torch.cat([logprobs, v_lp])
                for _, st in ver.seqs:
                    st.pending += 1
        inflight = InFlightStep(self, plan.step_id, t0, step.sample_seqs, tokens, logprobs,
                                verify=ver, trim=trim, draft_ms=draft_ms)
        self._last = inflight if tokens is not None else None
        return inflight

    # ---- LoRA --------------------------------------------------------------------------------
    def _pinned_slots(self) -> set[int]:
        return {st.slot for st in self.seqs.values() if st.slot}

    def _adapter_slot(self, name: str) -> int:
        """The slot of adapter `name`, swapping it in now if needed (evicting an LRU slot no running
        request uses). Costs this one step a host->device copy (a disk read if not host-cached)."""
        if self.lora is None:
            from workers.engine.errors import UnknownAdapterError
            raise UnknownAdapterError(f"adapter {name!r}: this engine serves no adapters (max_loras=0)")
        return self.lora.acquire(name, pinned=self._pinned_slots())

    def load_adapter(self, name: str, path: str | None = None) -> int:
        """Register (when path is given), validate and bring into a slot; returns the slot."""
        if self.lora is None:
            raise ValueError("this engine serves no adapters: set max_loras > 0")
        return self.lora.load(name, path, pinned=self._pinned_slots())

    def unload_adapter(self, name: str) -> bool:
        return self.lora.unregister(name, pinned=self._pinned_slots()) if self.lora is not None else False

    def adapter_names(self) -> list[str]:
        return self.lora.names() if self.lora is not None else []


class InFlightStep:
    """A launched step. result() reads its sampled ids - the step's one device -> host read,
    through a pinned buffer and an event, so it waits for this step only and not for a step
    launched after it - and appends them to each request's tokens. Idempotent.

    tokens: the plain rows' sampled ids, then (speculating requests) each one's `width` verified
    tokens and the count it emits; logprobs: per plain row, then per verified token."""

    def __init__(self, runner: ModelRunner, step_id: int, t0: float, sample_seqs: list[tuple[str, SeqSlot]],
                 tokens: torch.Tensor | None, logprobs: torch.Tensor | None, *, verify: VerifyRows | None = None,
                 trim: list[tuple[str, SeqSlot]] | None = None, draft_ms: float = 0.0):
        self.runner = runner
        self.step_id = step_id
        self.t0 = t0
        self.sample_seqs = sample_seqs
        self.tokens = tokens                   # [S (+ N * width + N)] int64 on the device
        self._logprobs = logprobs
        self.verify = verify
        self.trim = trim or []                 # rows whose plan speculated: their table rows shrink
        self.draft_ms = draft_ms
        self._result: StepResult | None = None
        self._event = None
        if tokens is not None and tokens.is_cuda:
            self._host_tokens = torch.empty(tokens.shape, dtype=tokens.dtype, pin_memory=True)
            self._host_tokens.copy_(tokens, non_blocking=True)
            self._host_logprobs = None
            if logprobs is not None:
                self._host_logprobs = torch.empty(logprobs.shape, dtype=logprobs.dtype, pin_memory=True)
                self._host_logprobs.copy_(logprobs, non_blocking=True)
            self._event = torch.cuda.Event()
            self._event.record()
        else:
            self._host_tokens, self._host_logprobs = tokens, logprobs

    @property
    def resolved(self) -> bool:
        return self._result is not None

    def result(self) -> StepResult:
        if self._result is not None:
            return self._result
        result = StepResult(step_id=self.step_id, draft_ms=self.draft_ms)
        S = len(self.sample_seqs)
        if self.tokens is not None:
            if self._event is not None:
                self._event.synchronize()
            toks = self._host_tokens.tolist()
            lps = self._host_logprobs.tolist() if self._host_logprobs is not None else None
            for (_, st), tok in zip(self.sample_seqs, toks):
                st.token_ids.append(tok)
                st.pending -= 1
            result.request_ids = [rid for rid, _ in self.sample_seqs]
            result.token_ids = toks[:S]
            if lps is not None:
                result.logprobs = lps[:S]
            if self.verify is not None:
                self._verified(result, toks[S:], lps[S:] if lps is not None else None)
        if self.trim:                          # some plan row had num_spec_tokens > 0
            if self.verify is None:
                result.num_emitted = [1] * S
                result.num_drafted = [0] * S
            bs, seated = self.runner.block_size, self.runner.seqs
            for rid, st in self.trim:
                # The KV is valid for every known token but the last: keep the blocks those need.
                # (A request forgotten meanwhile may have passed its row on: leave that alone.)
                if seated.get(rid) is st:
                    self.runner.inputs.table.truncate(st.row, -(-st.num_computed // bs))
        result.execute_ms = 1000 * (time.perf_counter() - self.t0)
        self._result = result
        if self.runner._last is self:
            self.runner._last = None
        return result

    def _verified(self, result: StepResult, toks: list[int], lps: list[float] | None) -> None:
        """Append each speculating request's emitted tokens, roll its KV length back to them."""
        ver = self.verify
        n, w = len(ver.seqs), ver.width
        emitted = toks[n * w:]
        result.num_emitted = [1] * len(result.request_ids) + emitted
        result.num_drafted = [0] * len(result.request_ids) + ver.draft_lens
        for i, ((rid, st), e) in enumerate(zip(ver.seqs, emitted)):
            got = toks[i * w:i * w + e]
            st.token_ids.extend(got)
            st.num_computed = len(st.token_ids) - 1      # the last emitted token is the next decode input
            st.pending -= 1
            result.request_ids.append(rid)
            result.token_ids.extend(got)
            if lps is not None:
                result.logprobs.extend(lps[i * w:i * w + e])


def graph_batch_sizes(max_num_seqs: int) -> list[int]:
    """Decode batch sizes to capture: 1, 2, 4, 8, then every 8 up to max_num_seqs."""
    sizes = [b for b in (1, 2, 4, 8) if b <= max_num_seqs]
    sizes += list(range(16, max_num_seqs + 1, 8))
    if max_num_seqs not in sizes:
        sizes.append(max_num_seqs)
    return sorted(set(sizes))


class DecodeGraphs:
    """Decode-only steps replayed from captured CUDA graphs (in the style of gpt-fast/nano-vllm).

    The batch is padded to the next captured size: padding rows write to slot -1 (skipped) and
    have context length 0 (the attention kernel returns zeros). Everything the graph reads lives
    in static buffers filled before replay - ids, positions, slots, context lengths and each row's
    seat in the persistent block table, which the graph reads in place (no per-step table copy;
    the kernel walks only the columns a sequence's context needs). With `capture_graphs=False` the
    same padded static path runs eagerly, which is how it is tested on CPU.
    """

    def __init__(self, runner: "ModelRunner", sizes: list[int], capture_graphs: bool = True):
        self.runner = runner
        self.sizes = sorted(sizes)
        self.capture_graphs = capture_graphs
        n, dev = self.sizes[-1], runner.device
        self.input_ids = torch.zeros(n, dtype=torch.long, device=dev)
        self.positions = torch.zeros(n, dtype=torch.long, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.long, device=dev)
        self.context_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        self.rows = torch.zeros(n, dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}
        self._table_generation = runner.inputs.table.generation

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _meta(self, bs: int, max_ctx: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:bs], prefill_query_lens=[], prefill_context_lens=[],
            num_decode_tokens=bs, decode_context_lens=self.context_lens[:bs], max_decode_context_len=max_ctx,
            block_table=self.runner.inputs.table.device_table, decode_rows=self.rows[:bs])

    def _forward(self, bs: int, max_ctx: int) -> torch.Tensor:
        return self.runner.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs, max_ctx),
                                 self.runner.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
        self.graphs.clear()
        self._table_generation = self.runner.inputs.table.generation
        max_ctx = self.runner.max_model_len
        for bs in reversed(self.sizes):        # largest first, so smaller graphs reuse its pool
            self._forward(bs, max_ctx)          # warm up kernels/autotuning outside capture
            torch.cuda.synchronize()
            g = torch.cuda.CUDAGraph()
            with torch.cuda.graph(g, pool=pool):
                out = self._forward(bs, max_ctx)
            pool = g.pool() if pool is None else pool
            self.graphs[bs] = (g, out)
        torch.cuda.synchronize()

    def run(self, step: PreparedStep) -> torch.Tensor:
        n = step.num_tokens
        bs = next(b for b in self.sizes if b >= n)
        if self.capture_graphs and self._table_generation != self.runner.inputs.table.generation:
            self.capture()              # the block table was reallocated (grew): graphs hold its old address
        # Device-to-device copies of the step's inputs into the static buffers; rows n..bs are
        # padding (slot -1, context length 0).
        meta = step.meta
        self.input_ids[:n].copy_(step.input_ids, non_blocking=True)
        self.positions[:n].copy_(step.positions, non_blocking=True)
        self.slots[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(meta.decode_context_lens, non_blocking=True)
        self.rows[:n].copy_(meta.decode_rows, non_blocking=True)
        self.slots[n:bs].fill_(-1)
        self.context_lens[n:bs].zero_()
        if self.capture_graphs:
            g, out = self.graphs[bs]
            g.replay()
        else:
            out = self._forward(bs, meta.max_decode_context_len)
        return out[:n]
