"""The worker side of a step: owns the KV tensors, mirrors running requests, executes StepPlans.

Per step: forget finished ids, register new requests, lay the scheduled tokens out as one flat
batch (prefill chunks first, then one token per decoding request), run one forward, and sample
one token for every request whose chunk reached its last known token.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass

import torch

from workers.engine.attention import AttentionMetadata, _triton, build_attention_metadata
from workers.engine.config import EngineConfig
from workers.engine.plan import StepPlan, StepResult
from workers.engine.sampler import Sampler, SamplingTensors
from workers.engine.sampling_params import SamplingParams


@dataclass
class _SeqState:
    token_ids: list[int]
    num_prompt_tokens: int
    block_table: list[int]
    num_computed: int
    sampling: SamplingParams
    seed: int
    adapter_id: str | None = None
    slot: int = 0                       # LoRA slot (0: the bare base model)


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
        self.num_blocks = config.num_kv_blocks or self._blocks_from_memory()
        ctx = config.max_model_len or mc.max_position_embeddings
        self.max_model_len = min(ctx, self.num_blocks * self.block_size)
        self.max_blocks_per_seq = -(-self.max_model_len // self.block_size)
        shape = (self.num_blocks, self.block_size, mc.num_key_value_heads, mc.head_dim)
        self.kv_caches = [(torch.zeros(shape, dtype=self.dtype, device=self.device),
                           torch.zeros(shape, dtype=self.dtype, device=self.device))
                          for _ in range(mc.num_hidden_layers)]
        self.sampler = Sampler()
        self.seqs: dict[str, _SeqState] = {}
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
    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> StepResult:
        t0 = time.perf_counter()
        for rid in plan.finished_ids:
            self.seqs.pop(rid, None)
        work: list[tuple[str, _SeqState, int]] = []
        for nr in plan.new_requests:
            st = _SeqState(list(nr.token_ids), nr.num_prompt_tokens, list(nr.block_ids),
                           nr.num_computed_tokens, nr.sampling, nr.seed, nr.adapter_id)
            if nr.adapter_id:
                st.slot = self._adapter_slot(nr.adapter_id)
            self.seqs[nr.request_id] = st
            work.append((nr.request_id, st, nr.num_new_tokens))
        for rr in plan.running:
            st = self.seqs[rr.request_id]
            if rr.new_block_ids:
                st.block_table.extend(rr.new_block_ids)
            work.append((rr.request_id, st, rr.num_new_tokens))
        if not work:
            return StepResult(step_id=plan.step_id, execute_ms=1000 * (time.perf_counter() - t0))

        # Prefill segments first, then single-token (decode) segments: the attention layout.
        # Within each, rows of one LoRA slot lie together (one segment per adapter).
        work.sort(key=lambda w: (w[2] == 1, w[1].slot))
        lora_rows: list[int] | None = [] if any(w[1].slot for w in work) else None
        input_ids: list[int] = []
        positions: list[int] = []
        prefills, decodes = [], []
        sample_rows: list[int] = []
        sample_seqs: list[tuple[str, _SeqState]] = []
        for rid, st, n in work:
            c = st.num_computed
            input_ids.extend(st.token_ids[c:c + n])
            positions.extend(range(c, c + n))
            if lora_rows is not None:
                lora_rows.extend([st.slot] * n)
            if n == 1:
                decodes.append((c + 1, st.block_table))
            else:
                prefills.append((n, c + n, st.block_table))
            if c + n == len(st.token_ids):
                sample_rows.append(len(input_ids) - 1)
                sample_seqs.append((rid, st))
            st.num_computed = c + n

        dev = self.device
        lora_batch = None
        if lora_rows is not None:
            from workers.engine.lora import LoraBatch
            lora_batch = LoraBatch.build(self.lora, lora_rows, device=dev)
        if (lora_batch is None and not prefills and self.decode_graphs is not None
                and self.decode_graphs.fits(len(decodes))):
            hidden = self.decode_graphs.run(input_ids, positions, decodes)
        else:
            ids_t = torch.tensor(input_ids, dtype=torch.long, device=dev)
            pos_t = torch.tensor(positions, dtype=torch.long, device=dev)
            meta = build_attention_metadata(prefills, decodes, self.block_size, dev,
                                            max_blocks_per_seq=self.max_blocks_per_seq)
            if lora_batch is None:
                hidden = self.model(ids_t, pos_t, meta, self.kv_caches)
            else:
                hidden = self.model(ids_t, pos_t, meta, self.kv_caches, lora=lora_batch)
        result = StepResult(step_id=plan.step_id)
        if sample_rows:
            rows = torch.tensor(sample_rows, dtype=torch.long, device=dev)
            logits = self.model.compute_logits(hidden.index_select(0, rows))
            tensors = self._sampling_tensors(sample_seqs)
            out = self.sampler(logits, tensors)
            toks = out.token_ids.tolist()
            for (rid, st), tok in zip(sample_seqs, toks):
                st.token_ids.append(tok)
            result.request_ids = [rid for rid, _ in sample_seqs]
            result.token_ids = toks
            if out.logprobs is not None:
                result.logprobs = out.logprobs.tolist()
        result.execute_ms = 1000 * (time.perf_counter() - t0)
        return result

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

    def _sampling_tensors(self, seqs: list[tuple[str, _SeqState]]) -> SamplingTensors:
        params = [st.sampling for _, st in seqs]
        need_hist = any(p.repetition_penalty != 1.0 for p in params)
        need_out = any(p.presence_penalty != 0.0 for p in params)
        return SamplingTensors.build(
            params=params,
            seeds=[st.seed for _, st in seqs],
            steps=[len(st.token_ids) - st.num_prompt_tokens for _, st in seqs],
            token_histories=[st.token_ids for _, st in seqs] if need_hist else [],
            output_histories=[st.token_ids[st.num_prompt_tokens:] for _, st in seqs] if need_out else [],
            vocab_size=self.model_config.vocab_size, device=self.device)


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
    in static buffers filled before replay. With `capture_graphs=False` the same padded static
    path runs eagerly, which is how it is tested on CPU.
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
        self.block_tables = torch.zeros((n, runner.max_blocks_per_seq), dtype=torch.int32, device=dev)
        self.graphs: dict[int, tuple[object, torch.Tensor]] = {}

    def fits(self, batch: int) -> bool:
        return batch <= self.sizes[-1]

    def _meta(self, bs: int, max_ctx: int) -> AttentionMetadata:
        return AttentionMetadata(
            slot_mapping=self.slots[:bs], prefill_query_lens=[], prefill_context_lens=[],
            prefill_block_tables=[], num_decode_tokens=bs, decode_context_lens=self.context_lens[:bs],
            decode_block_tables=self.block_tables[:bs], max_decode_context_len=max_ctx)

    def _forward(self, bs: int, max_ctx: int) -> torch.Tensor:
        return self.runner.model(self.input_ids[:bs], self.positions[:bs], self._meta(bs, max_ctx),
                                 self.runner.kv_caches)

    @torch.inference_mode()
    def capture(self) -> None:
        pool = None
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

    def run(self, input_ids: list[int], positions: list[int], decodes: list[tuple[int, list[int]]]) -> torch.Tensor:
        n = len(input_ids)
        bs = next(b for b in self.sizes if b >= n)
        # Same slots/tables as the eager path, built on the host, then copied into the static
        # buffers; rows n..bs are padding (slot -1, context length 0).
        meta = build_attention_metadata([], decodes, self.runner.block_size, "cpu",
                                        max_blocks_per_seq=self.block_tables.shape[1])
        self.input_ids[:n].copy_(torch.tensor(input_ids), non_blocking=True)
        self.positions[:n].copy_(torch.tensor(positions), non_blocking=True)
        self.slots[:n].copy_(meta.slot_mapping, non_blocking=True)
        self.context_lens[:n].copy_(meta.decode_context_lens, non_blocking=True)
        self.block_tables[:n].copy_(meta.decode_block_tables, non_blocking=True)
        self.slots[n:bs].fill_(-1)
        self.context_lens[n:bs].zero_()
        if self.capture_graphs:
            g, out = self.graphs[bs]
            g.replay()
        else:
            out = self._forward(bs, meta.max_decode_context_len)
        return out[:n]
