"""LoRA adapters on a shared base model: PEFT-layout loading, GPU/CPU slots, batched multi-adapter deltas.

An adapter is a PEFT folder (adapter_config.json + adapter_model.safetensors) with rank r, alpha and
target modules among q/k/v/o/gate/up/down_proj. `AdapterManager` keeps a fixed number of slots on
the model's device: per layer and per fused projection ("qkv", "o", "gate_up", "down") one stacked A
`[slots, in, n_sub * r_max]` (the sub-projections' A^T side by side) and, per sub-projection, one
stacked B `[slots, r_max, out_sub]` with the scaling folded in (zero-padded to r_max) - stored
as the matmuls read them. Slot 0 is reserved and all zeros: "no adapter".
Behind the slots sits an LRU of host-memory copies, already in the slots' layout in one flat buffer
(pinned when the slots are on CUDA), so a swap is one host->device copy and two fused multi-tensor
ops (copy, zero), not a disk read; on CUDA they run on a side stream and the next step that uses
the slot waits on its event (the host does not wait).

Per step the runner hands `LoraBatch.build` each token's slot; every projection then adds
`B[slot] @ (A[slot] @ x)` per token, either

* Triton ("triton", workers/engine/triton_lora.py): a segmented batched kernel pair (Punica SGMV
  style): one shrink and one expand launch per projection for all adapters in the batch, over a
  tile table (row range, slot, rank, targeted sub-projections) copied to the device once per step;
  the default on CUDA when triton is installed (on CPU only explicitly, under TRITON_INTERPRET=1), or
* segmented ("sgmv"): the runner orders tokens by slot, so each adapter present covers at most a
  couple of contiguous row ranges; one shrink matmul and one expand addmm per sub-projection per
  range (a loop over the distinct adapters in the batch, never over tokens), or
* padded ("bmm"): tokens grouped by slot into an [adapters, L] grid (pads masked to zero), one
  batched shrink and one batched expand per sub-projection over a view of the slot stacks, and an
  `index_add_` back into the rows: a handful of ops per projection whatever the adapter count, or
* gathered ("bgmv"): per-token A/B gathered by slot index and `torch.bmm` over tokens.

`mode="auto"` picks "triton" on CUDA; elsewhere segmented for a few long runs and padded for many
short ones (see `LoraBatch.build`); bench/lora_bench.py measures them. A batch with no adapter builds
no LoraBatch at all (zero cost).
"""
from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch

from workers.engine.config import LORA_MODES, ModelConfig
from workers.engine.errors import InvalidRequestError, UnknownAdapterError

log = logging.getLogger("switchyard.engine.lora")

# fused projection -> its sub-projections, in the order their outputs are concatenated
KINDS: dict[str, tuple[str, ...]] = {
    "qkv": ("q_proj", "k_proj", "v_proj"),
    "o": ("o_proj",),
    "gate_up": ("gate_proj", "up_proj"),
    "down": ("down_proj",),
}
KIND_INDEX = {k: i for i, k in enumerate(KINDS)}
SUPPORTED_TARGETS = tuple(m for subs in KINDS.values() for m in subs)
_SUB_KIND = {m: (k, i) for k, subs in KINDS.items() for i, m in enumerate(subs)}
_KEY_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([AB])(?:\.[\w-]+)?\.weight$")


class InvalidAdapterError(InvalidRequestError):
    """An adapter this engine cannot serve (DoRA, unsupported target, rank too high, other base)."""

    def __init__(self, name: str, message: str):
        super().__init__("adapter_id", f"adapter {name!r}: {message}")
        self.adapter = name


def module_dims(cfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of every LoRA-able projection."""
    h, q, kv, i = cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim, \
        cfg.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


# ------------------------------------------------------------------------------------------------
# one adapter, in host memory

@dataclass
class LoraAdapter:
    name: str
    path: str
    rank: int
    alpha: float
    scaling: float
    targets: tuple[str, ...]                 # sub-projection names present in the weights
    # The weights already in the slots' layout, packed in one flat host buffer (pinned when the slots
    # are on CUDA): a swap is one host->device copy plus fused copies, with no transpose, padding or
    # scaling per swap. `pieces` names the chunks of `flat` in order: (layer, kind index, sub index,
    # shape) - sub -1 is the kind's A^T [in, n_sub * r_max] (zero where a rank or a sub is missing),
    # sub j >= 0 is B_j^T * scaling [r, out_j].
    flat: torch.Tensor
    pieces: list[tuple[int, int, int, tuple[int, int]]]
    # layer -> module -> (A [r, in], B*scaling [out, r]): views into `flat`, as PEFT stores them
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    base_model: str = ""

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def kinds(self) -> tuple[str, ...]:
        return tuple(k for k, subs in KINDS.items() if any(s in self.targets for s in subs))

    def chunks(self, flat: torch.Tensor | None = None) -> list[torch.Tensor]:
        """The pieces as views of `flat` (default: the host buffer; a device copy of it on CUDA)."""
        flat = self.flat if flat is None else flat
        return [c.view(shape) for c, (_, _, _, shape) in
                zip(flat.split([h * w for _, _, _, (h, w) in self.pieces]), self.pieces)]


def read_peft_config(path: Path, name: str) -> dict:
    f = path / "adapter_config.json"
    if not f.is_file():
        raise InvalidAdapterError(name, f"{path} has no adapter_config.json (expected a PEFT LoRA folder)")
    try:
        return json.loads(f.read_text())
    except OSError as e:
        raise InvalidAdapterError(name, f"cannot read {f}: {e}") from None
    except ValueError as e:
        raise InvalidAdapterError(name, f"{f} is not valid JSON: {e}") from None


def load_adapter(name: str, path: str | Path, model_config: ModelConfig, *, max_rank: int,
                 dtype: torch.dtype = torch.float32, pin: bool = False) -> LoraAdapter:
    """Read and validate a PEFT LoRA folder against the base model; raises InvalidAdapterError."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    p = Path(path)
    if not p.is_dir():
        raise InvalidAdapterError(name, f"adapter path {str(p)!r} is not a folder")
    cfg = read_peft_config(p, name)
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise InvalidAdapterError(name, f"peft_type {cfg.get('peft_type')!r} is not served (only LORA)")
    if cfg.get("use_dora"):
        raise InvalidAdapterError(name, "DoRA adapters (use_dora=true) are not served; merge or retrain as plain LoRA")
    if cfg.get("fan_in_fan_out"):
        raise InvalidAdapterError(name, "fan_in_fan_out=true (Conv1D layout) is not served for Llama-family models")
    if cfg.get("bias", "none") not in ("none", None):
        raise InvalidAdapterError(name, f"bias={cfg.get('bias')!r} is not served (only bias='none')")
    if cfg.get("modules_to_save"):
        raise InvalidAdapterError(name, f"modules_to_save={cfg['modules_to_save']} is not served (only LoRA deltas)")
    for k in ("rank_pattern", "alpha_pattern"):
        if cfg.get(k):
            raise InvalidAdapterError(name, f"{k} (per-module ranks/alphas) is not served")
    tm = cfg.get("target_modules")
    if isinstance(tm, (list, tuple)):
        bad = sorted({str(m).rsplit(".", 1)[-1] for m in tm} - set(SUPPORTED_TARGETS))
        if bad:
            raise InvalidAdapterError(name, f"target modules {bad} are not served; supported: {list(SUPPORTED_TARGETS)}")
    try:
        r = int(cfg.get("r", 8))
        alpha = float(cfg.get("lora_alpha", r))
    except (TypeError, ValueError):
        raise InvalidAdapterError(name, f"r={cfg.get('r')!r} / lora_alpha={cfg.get('lora_alpha')!r} "
                                        f"must be numbers") from None
    if r <= 0:
        raise InvalidAdapterError(name, f"rank r={r} must be positive")
    if r > max_rank:
        raise InvalidAdapterError(name, f"rank r={r} exceeds this engine's max_lora_rank={max_rank}")
    scaling = alpha / math.sqrt(r) if cfg.get("use_rslora") else alpha / r

    wf = p / "adapter_model.safetensors"
    if not wf.is_file():
        raise InvalidAdapterError(name, f"{p} has no adapter_model.safetensors")
    try:
        sd = load_file(str(wf))
    except (OSError, SafetensorError) as e:   # unreadable, truncated, not safetensors
        raise InvalidAdapterError(name, f"cannot read {wf}: {e}") from None
    dims = module_dims(model_config)
    raw: dict[int, dict[str, dict[str, torch.Tensor]]] = {}
    for key, t in sd.items():
        m = _KEY_RE.search(key)
        if not m:
            raise InvalidAdapterError(name, f"weight {key!r} is not a LoRA A/B matrix of a served target "
                                            f"(supported: {list(SUPPORTED_TARGETS)})")
        layer, mod, ab = int(m.group(1)), m.group(2), m.group(3)
        if mod not in dims:
            raise InvalidAdapterError(name, f"target module {mod!r} is not served; supported: {list(SUPPORTED_TARGETS)}")
        if layer >= model_config.num_hidden_layers:
            raise InvalidAdapterError(name, f"weight {key!r} is for layer {layer} but the base model has "
                                            f"{model_config.num_hidden_layers} layers (another base model?)")
        raw.setdefault(layer, {}).setdefault(mod, {})[ab] = t
    if not raw:
        raise InvalidAdapterError(name, "adapter_model.safetensors holds no LoRA weights")
    for layer, mods in raw.items():
        for mod, ab in mods.items():
            if set(ab) != {"A", "B"}:
                raise InvalidAdapterError(name, f"layer {layer} {mod}: needs both lora_A and lora_B")
            a, b = ab["A"], ab["B"]
            fin, fout = dims[mod]
            if a.dim() != 2 or b.dim() != 2 or a.shape[0] != r or b.shape[1] != r:
                raise InvalidAdapterError(name, f"layer {layer} {mod}: lora_A {tuple(a.shape)} / lora_B "
                                                f"{tuple(b.shape)} do not match rank r={r}")
            if a.shape[1] != fin or b.shape[0] != fout:
                raise InvalidAdapterError(
                    name, f"layer {layer} {mod}: adapter is {a.shape[1]} -> {b.shape[0]} but the base model's "
                          f"{mod} is {fin} -> {fout}; it was trained for another base model "
                          f"({cfg.get('base_model_name_or_path') or 'unknown'})")
    flat, pieces, weights = _pack_slot_layout(raw, dims, r, max_rank, scaling, dtype, pin)
    targets = {mod for mods in raw.values() for mod in mods}
    return LoraAdapter(name=name, path=str(p), rank=r, alpha=alpha, scaling=scaling,
                       targets=tuple(m for m in SUPPORTED_TARGETS if m in targets), flat=flat, pieces=pieces,
                       weights=weights, base_model=str(cfg.get("base_model_name_or_path") or ""))


def _pack_slot_layout(raw: dict[int, dict[str, dict[str, torch.Tensor]]], dims: dict[str, tuple[int, int]],
                      r: int, rmax: int, scaling: float, dtype: torch.dtype, pin: bool):
    """The adapter's weights in the slots' layout, in one flat (pinned) buffer: the re-layout (transpose,
    padding, scaling, dtype) happens here once per disk read, each tensor written once straight into
    the buffer, instead of per swap on the device; one buffer, not a pinned allocation per tensor."""
    pieces: list[tuple[int, int, int, tuple[int, int]]] = []
    for layer in sorted(raw):
        mods = raw[layer]
        for ki, subs in enumerate(KINDS.values()):
            if any(sb in mods for sb in subs):
                pieces.append((layer, ki, -1, (dims[subs[0]][0], len(subs) * rmax)))
                pieces += [(layer, ki, j, (r, dims[sb][1])) for j, sb in enumerate(subs) if sb in mods]
    flat = torch.empty(sum(h * w for _, _, _, (h, w) in pieces), dtype=dtype, pin_memory=pin)
    weights: dict[int, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    subs_of = list(KINDS.values())
    a_of: dict[tuple[int, str], torch.Tensor] = {}
    for (layer, ki, j, shape), chunk in zip(pieces, flat.split([h * w for _, _, _, (h, w) in pieces])):
        v = chunk.view(shape)
        mods = raw[layer]
        subs = subs_of[ki]
        if j < 0:
            if r < rmax or not all(sb in mods for sb in subs):
                v.zero_()
            for jj, sb in enumerate(subs):
                if sb in mods:
                    cols = v[:, jj * rmax:jj * rmax + r]
                    cols.copy_(mods[sb]["A"].t())
                    a_of[(layer, sb)] = cols.t()
        else:
            sb = subs[j]
            b = mods[sb]["B"]
            if b.dtype == dtype:      # exact copy, then one rounding of b * scaling (computed in float32)
                v.copy_(b.t()).mul_(scaling)
            else:                     # scaled in float32, rounded once to dtype
                torch.mul(b.t().to(torch.float32), scaling, out=v)
            weights.setdefault(layer, {})[sb] = (a_of[(layer, sb)], v.t())
    return flat, pieces, weights


# ------------------------------------------------------------------------------------------------
# slots on the device

def _copy_all(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    # fused multi-tensor copy on CUDA (all views are dense and dtype-matched); a loop elsewhere
    if dst:
        torch._foreach_copy_(dst, src)


def _zero_all(ts: list[torch.Tensor]) -> None:
    if ts:
        torch._foreach_zero_(ts)


class _LayerStacks:
    """One layer's stacked A/B per fused projection."""

    def __init__(self, cfg: ModelConfig, slots: int, rmax: int, device, dtype):
        dims = module_dims(cfg)
        # Stored already transposed, as the matmuls read them ([in, out] per slot): on CPU a batched
        # expand over a transposed view is ~2.5x slower than over contiguous [S, rmax, out].
        self.A: list[torch.Tensor] = []                # per kind: [S, in, n_sub * rmax]
        self.B: list[list[torch.Tensor]] = []          # per kind, per sub: [S, rmax, out_sub]
        self.out_offsets: list[list[tuple[int, int]]] = []
        for subs in KINDS.values():
            fin = dims[subs[0]][0]
            self.A.append(torch.zeros((slots, fin, len(subs) * rmax), device=device, dtype=dtype))
            self.B.append([torch.zeros((slots, rmax, dims[s][1]), device=device, dtype=dtype) for s in subs])
            offs, o = [], 0
            for s in subs:
                offs.append((o, o + dims[s][1]))
                o += dims[s][1]
            self.out_offsets.append(offs)


class AdapterManager:
    """Adapter registry (name -> path), host LRU cache, and `max_loras` device slots (+ reserved slot 0).

    Thread-safe for the worker's use: `prefetch` may run on another thread than `acquire`.
    """

    def __init__(self, model_config: ModelConfig, *, max_loras: int = 4, max_lora_rank: int = 16,
                 device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                 max_cpu_loras: int | None = None, mode: str = "auto"):
        if max_loras < 1:
            raise ValueError("max_loras must be >= 1 to serve adapters")
        if mode not in LORA_MODES:
            raise ValueError(f"lora_mode {mode!r} is not one of {list(LORA_MODES)}")
        if mode == "triton" and not _triton_available():
            raise ValueError("lora_mode 'triton' needs triton installed (pip install triton)")
        self.model_config = model_config
        self.max_loras = max_loras
        self.max_lora_rank = max_lora_rank
        self.device = torch.device(device)
        self.dtype = dtype
        self.max_cpu_loras = max_cpu_loras if max_cpu_loras is not None else max(4 * max_loras, 16)
        self.mode = mode
        self.native = False       # float32 CPU with the native kernels loaded (set by ModelRunner)
        self.registry: dict[str, str] = {}
        self._host: OrderedDict[str, LoraAdapter] = OrderedDict()
        self._slot_name: list[str | None] = [None] * (max_loras + 1)   # index 0 reserved
        self._slot_of: dict[str, int] = {}
        self._slot_adapter: list[LoraAdapter | None] = [None] * (max_loras + 1)
        self._slot_used: list[float] = [0.0] * (max_loras + 1)
        self._layers: list[_LayerStacks] | None = None   # allocated on first load
        self._copy_stream = None                          # CUDA side stream for slot writes
        self._slot_ready: list = [None] * (max_loras + 1)  # CUDA event of a slot's pending write
        self._lock = threading.RLock()
        self.num_swaps = 0
        self.last_load_ms = 0.0

    # ---- registry ------------------------------------------------------------------------------
    def register(self, name: str, path: str | Path) -> None:
        if not name:
            raise ValueError("adapter name must not be empty")
        with self._lock:
            old = self.registry.get(name)
            self.registry[name] = str(path)
            if old is not None and old != str(path):
                self._host.pop(name, None)
                self._drop_slot(name)

    def unregister(self, name: str, pinned: set[int] | frozenset = frozenset()) -> bool:
        """Forget an adapter: new requests for it fail; its slot is freed now unless a running request uses it."""
        with self._lock:
            if self.registry.pop(name, None) is None:
                return False
            self._host.pop(name, None)
            s = self._slot_of.get(name)
            if s is not None and s not in pinned:
                self._drop_slot(name)
            return True

    def names(self) -> list[str]:
        return sorted(self.registry)

    def check(self, name: str) -> None:
        if name not in self.registry:
            known = ", ".join(self.names()) or "none"
            raise UnknownAdapterError(f"adapter {name!r} is not loaded on this engine; known adapters: {known}")

    def slot_of(self, name: str) -> int | None:
        return self._slot_of.get(name)

    def slot_names(self) -> list[str | None]:
        return list(self._slot_name[1:])

    # ---- host cache ----------------------------------------------------------------------------
    def prefetch(self, name: str) -> LoraAdapter:
        """The adapter in host memory (read and validated from disk once; LRU-bounded)."""
        with self._lock:
            self.check(name)
            ad = self._host.get(name)
            if ad is not None:
                self._host.move_to_end(name)
                return ad
            path = self.registry[name]
        ad = load_adapter(name, path, self.model_config, max_rank=self.max_lora_rank, dtype=self.dtype,
                          pin=self.device.type == "cuda" and torch.cuda.is_available())
        with self._lock:
            if self.registry.get(name) != path:     # unregistered/re-registered meanwhile
                self.check(name)
                return self.prefetch(name)
            self._host[name] = ad
            self._host.move_to_end(name)
            while len(self._host) > self.max_cpu_loras:
                old = next(iter(self._host))
                if old == name:
                    break
                self._host.pop(old)
            return ad

    # ---- slots ---------------------------------------------------------------------------------
    def _ensure_stacks(self) -> list[_LayerStacks]:
        if self._layers is None:
            cfg = self.model_config
            self._layers = [_LayerStacks(cfg, self.max_loras + 1, self.max_lora_rank, self.device, self.dtype)
                            for _ in range(cfg.num_hidden_layers)]
        return self._layers

    def _drop_slot(self, name: str) -> None:
        s = self._slot_of.pop(name, None)
        if s is not None:
            self._slot_name[s] = None
            self._slot_adapter[s] = None

    def acquire(self, name: str, pinned: set[int] | frozenset = frozenset()) -> int:
        """The slot holding `name`, loading it into a free slot or the least-recently-used slot not in
        `pinned` (slots running requests use). Raises UnknownAdapterError / InvalidAdapterError, or
        RuntimeError when every slot is pinned (the scheduler's max_loras bound prevents that)."""
        with self._lock:
            s = self._slot_of.get(name)
            if s is not None:
                self._slot_used[s] = time.monotonic()
                return s
        t0 = time.perf_counter()
        ad = self.prefetch(name)
        with self._lock:
            free = [i for i in range(1, self.max_loras + 1) if self._slot_name[i] is None]
            if free:
                s = free[0]
            else:
                cands = [i for i in range(1, self.max_loras + 1) if i not in pinned]
                if not cands:
                    raise RuntimeError(f"all {self.max_loras} adapter slots are in use by running requests; "
                                       f"cannot load {name!r} (raise max_loras)")
                s = min(cands, key=lambda i: self._slot_used[i])
                self._drop_slot(self._slot_name[s])
                self.num_swaps += 1
            self._write_slot(s, ad)
            self._slot_name[s] = name
            self._slot_of[name] = s
            self._slot_adapter[s] = ad
            self._slot_used[s] = time.monotonic()
        self.last_load_ms = 1000 * (time.perf_counter() - t0)
        return s

    def load(self, name: str, path: str | Path | None = None,
             pinned: set[int] | frozenset = frozenset()) -> int:
        """Register (when path is given) and bring into a slot now; returns the slot."""
        if path is not None:
            self.register(name, path)
        return self.acquire(name, pinned)

    @torch.inference_mode()
    def _write_slot(self, s: int, ad: LoraAdapter) -> None:
        """Copy `ad` into slot s: every stack slice it covers is overwritten, the rest zeroed.

        On CUDA: one host->device copy of the packed buffer and fused multi-tensor copy/zero ops on a
        side stream (a handful of launches instead of ~30 ops per layer), recorded on an event that
        `wait_slots` makes the compute stream wait on before the first step reading the slot; the
        host never waits. On CPU the same copies run inline from the host buffer."""
        layers = self._ensure_stacks()
        r, R = ad.rank, self.max_lora_rank
        have = {(li, ki, j) for li, ki, j, _ in ad.pieces}
        zero: list[torch.Tensor] = []
        for li, st in enumerate(layers):
            for ki, subs in enumerate(KINDS.values()):
                if (li, ki, -1) not in have:
                    zero.append(st.A[ki][s])
                    zero += [B[s] for B in st.B[ki]]
                    continue
                for j, B in enumerate(st.B[ki]):
                    if (li, ki, j) not in have:
                        zero.append(B[s])
                    elif r < R:
                        zero.append(B[s, r:])
        dst = [layers[li].A[ki][s] if j < 0 else layers[li].B[ki][j][s, :r] for li, ki, j, _ in ad.pieces]
        if self.device.type != "cuda":
            _copy_all(dst, ad.chunks())
            _zero_all(zero)
            return
        compute = torch.cuda.current_stream(self.device)
        if self._copy_stream is None:
            self._copy_stream = torch.cuda.Stream(self.device)
        side = self._copy_stream
        side.wait_stream(compute)        # steps already queued may still read the slot's old adapter
        with torch.cuda.stream(side):
            # `staging` is allocated and used on the side stream only; the caching allocators keep it
            # and the pinned source alive until the queued copies have run
            staging = ad.flat.to(self.device, non_blocking=True)
            _copy_all(dst, ad.chunks(staging))
            _zero_all(zero)
            ev = torch.cuda.Event()
            ev.record(side)
        self._slot_ready[s] = ev

    def wait_slots(self, slots) -> None:
        """Make the current (compute) stream wait for pending writes of these slots (CUDA; no host wait)."""
        if not any(self._slot_ready[s] is not None for s in slots):
            return
        stream = torch.cuda.current_stream(self.device)
        with self._lock:
            for s in slots:
                ev, self._slot_ready[s] = self._slot_ready[s], None
                if ev is not None:
                    stream.wait_event(ev)

    # ---- per step ------------------------------------------------------------------------------
    def adapter_in_slot(self, s: int) -> LoraAdapter | None:
        return self._slot_adapter[s]

    def memory_bytes(self) -> dict:
        """Device bytes for all slots, per slot, and host bytes of the cached adapters."""
        layers = self._layers
        dev = 0
        if layers is not None:
            for st in layers:
                dev += sum(a.numel() * a.element_size() for a in st.A)
                dev += sum(b.numel() * b.element_size() for bs in st.B for b in bs)
        return {"device_bytes": dev, "device_bytes_per_slot": dev // (self.max_loras + 1),
                "host_bytes": sum(a.nbytes for a in self._host.values())}


# ------------------------------------------------------------------------------------------------
# the batched forward

_TRITON_OK: bool | None = None


def _triton_available() -> bool:
    """Whether the Triton kernels can be used (imported once, only when a CUDA batch asks)."""
    global _TRITON_OK
    if _TRITON_OK is None:
        try:
            from workers.engine import triton_lora
            _TRITON_OK = triton_lora.available()
        except (ImportError, RuntimeError) as e:   # no usable triton here: the torch modes
            log.debug("triton LoRA kernels unavailable: %r", e)
            _TRITON_OK = False
    return _TRITON_OK


class LoraBatch:
    """The LoRA work of one forward: which token rows use which slot. `apply` adds the deltas in place."""

    def __init__(self, mgr: AdapterManager, mode: str, slots_t: torch.Tensor | None,
                 segments: list[list[tuple[int, int, int, int]]]):
        self.mgr = mgr
        self.layers = mgr._ensure_stacks()
        self.R = mgr.max_lora_rank
        self.mode = mode
        self.slots_t = slots_t            # [T] long, bgmv
        self.segments = segments          # per kind: [(slot, start, end, rank)], sgmv
        self.active_kinds = [bool(s) for s in segments]
        self.subs_active = {}             # (slot, kind) -> tuple of bools per sub
        # padded bmm ("bmm"): slots [s0, s0 + n) as a view of the stacks, rows gathered to [n, L]
        self.s0 = 0
        self.n = 0
        self.gather_t: torch.Tensor | None = None   # [n * L] token row per padded position (pads -> 0)
        self.mask_t: torch.Tensor | None = None     # [n, L, 1] 1 for real rows, 0 for pads
        self.block: tuple[int, int] | None = None   # (first row, L) when the grid is rows [r0, r0 + n*L)
        self.native = mgr.native                    # the block case through kernels/decode_ops.cpp
        # Triton ("triton"): per kind a view of the step's device tile table, the shrink's split-K
        # (requested, written), and one float32 buffer for the shrink's partial sums (reused by every
        # projection: the same stream runs each expand before the next shrink)
        self.kernels = None
        self.tiles: list[torch.Tensor] = []
        self.split_k: list[int] = []
        self.splits: list[int] = []
        self.block_m = 16
        self.partial: torch.Tensor | None = None

    @classmethod
    def _build_padded(cls, mgr: AdapterManager, runs: list[tuple[int, int, int]], T: int, device) -> LoraBatch:
        """One [n, L] grid over the slot range present: row (i, l) is the l-th token of slot s0 + i.

        Pads gather token 0 and are masked to zero after the shrink, so their expand adds exactly
        zero wherever it lands. Slots in the range with no tokens are all pads (their weights are
        read but contribute nothing); slots never hold an adapter of another kind's shape, and the
        stacks are zero beyond each adapter's rank and outside its targets, so no per-slot case
        remains."""
        slots = {slot for slot, _, _ in runs}
        kinds = {k for slot in slots for k in (mgr.adapter_in_slot(slot).kinds() if mgr.adapter_in_slot(slot) else ())}
        b = cls(mgr, "bmm", None, [[(0, 0, 0, 0)] if k in kinds else [] for k in KINDS])
        s0, s1 = min(slots), max(slots)
        n = b.n = s1 - s0 + 1
        b.s0 = s0
        L = runs[0][2] - runs[0][1]
        if len(runs) == n and all(slot == s0 + i and e - s == L and s == runs[0][1] + i * L
                                  for i, (slot, s, e) in enumerate(runs)):
            # One run per slot s0..s1 in order, all of length L, back to back (decodes, the same
            # count per adapter): views of x and out replace the gather, mask and scatter.
            b.block = (runs[0][1], L)
            return b
        rows: dict[int, list[int]] = {}
        for slot, s, e in runs:
            rows.setdefault(slot, []).extend(range(s, e))
        L = max(len(r) for r in rows.values())
        gather = [0] * (n * L)
        mask = [0.0] * (n * L)
        for slot, rs in rows.items():
            base = (slot - s0) * L
            gather[base:base + len(rs)] = rs
            mask[base:base + len(rs)] = [1.0] * len(rs)
        b.gather_t = torch.tensor(gather, dtype=torch.long, device=device)
        b.mask_t = torch.tensor(mask, dtype=mgr.dtype, device=device).view(n, L, 1)
        return b

    @classmethod
    def _build_triton(cls, mgr: AdapterManager, segs: list[list[tuple[int, int, int, int]]], T: int,
                      device: torch.device) -> LoraBatch:
        """The tile table of every kind in one int32 tensor, copied to the device once (non-blocking
        from pinned memory on CUDA): each kind's rows (first row, end row, slot, rank, targeted subs)."""
        from workers.engine import triton_lora
        b = cls(mgr, "triton", None, segs)
        b.kernels = triton_lora
        b.block_m = triton_lora.pick_block_m(max((e - s for seg in segs for _, s, e, _ in seg), default=1))
        flat: list[int] = []
        bounds: list[tuple[int, int]] = []
        for ki, subs in enumerate(KINDS.values()):
            rows = triton_lora.tile_rows(
                ((s, e, slot, rank, sum(1 << j for j, sb in enumerate(subs) if sb in mgr.adapter_in_slot(slot).targets))
                 for slot, s, e, rank in segs[ki]), b.block_m)
            bounds.append((len(flat) // triton_lora.TILE_COLS, len(rows) // triton_lora.TILE_COLS))
            flat += rows
        table = torch.tensor(flat, dtype=torch.int32).view(-1, triton_lora.TILE_COLS)
        table = table.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else table.to(device)
        b.tiles = [table[o:o + n] for o, n in bounds]
        size = 0
        for ki, A in enumerate(b.layers[0].A):
            _, K, NR = A.shape
            b.split_k.append(triton_lora.pick_split_k(bounds[ki][1], NR, K))
            b.splits.append(triton_lora.effective_split_k(K, b.split_k[-1]))
            size = max(size, b.splits[-1] * T * NR)
        b.partial = torch.empty(size, dtype=torch.float32, device=device)
        return b

    @classmethod
    def build(cls, mgr: AdapterManager, token_slots: list[int], mode: str | None = None,
              device=None) -> LoraBatch | None:
        """token_slots: the slot per token row (0 = none). None when no row uses an adapter."""
        T = len(token_slots)
        runs: list[tuple[int, int, int]] = []      # (slot, start, end) of contiguous non-zero runs
        start = 0
        for i in range(1, T + 1):
            if i == T or token_slots[i] != token_slots[start]:
                if token_slots[start]:
                    runs.append((token_slots[start], start, i))
                start = i
        if not runs:
            return None
        dev = torch.device(device) if device is not None else mgr.device
        if dev.type == "cuda":
            mgr.wait_slots({slot for slot, _, _ in runs})
        mode = mode or mgr.mode
        if mode == "auto" and dev.type == "cuda" and _triton_available():
            mode = "triton"
        if mode == "auto":
            # One or two runs (a prefill under one adapter): a matmul per run is dense and cheap.
            # More: one padded bmm per projection instead of a Python loop launching ~11 small
            # matmuls per adapter per layer - unless padding to the largest group would more than
            # double the rows (one long prefill beside a few decodes).
            rows: dict[int, int] = {}
            for slot, s, e in runs:
                rows[slot] = rows.get(slot, 0) + e - s
            grid = (max(rows) - min(rows) + 1) * max(rows.values())
            mode = "bmm" if len(runs) > 2 and grid <= 2 * T else "sgmv"
        if mode == "bmm":
            return cls._build_padded(mgr, runs, T, dev)
        segs: list[list[tuple[int, int, int, int]]] = [[] for _ in KINDS]
        for slot, s, e in runs:
            ad = mgr.adapter_in_slot(slot)
            if ad is None:
                continue
            for k in ad.kinds():
                segs[KIND_INDEX[k]].append((slot, s, e, ad.rank))
        if mode == "triton":
            return cls._build_triton(mgr, segs, T, dev)
        slots_t = None
        if mode == "bgmv":
            slots_t = torch.tensor(token_slots, dtype=torch.long, device=dev)
        b = cls(mgr, mode, slots_t, segs)
        for slot, _, _, _ in (x for seg in segs for x in seg):
            ad = mgr.adapter_in_slot(slot)
            for ki, subs in enumerate(KINDS.values()):
                b.subs_active[(slot, ki)] = tuple(sb in ad.targets for sb in subs)
        return b

    def apply(self, layer: int, kind: int, x: torch.Tensor, out: torch.Tensor) -> None:
        """out[t] += sum over sub-projections of B[slot_t] @ (A[slot_t] @ x[t]) (scaling is in B)."""
        if not self.active_kinds[kind]:
            return
        st = self.layers[layer]
        A, Bs, offs = st.A[kind], st.B[kind], st.out_offsets[kind]
        R = self.R
        if self.mode == "triton":
            T, NR = x.shape[0], A.shape[2]
            n = self.splits[kind]
            partial = self.partial[:n * T * NR].view(n, T, NR)
            tiles = self.tiles[kind]
            self.kernels.sgmv_shrink(x if x.stride(1) == 1 else x.contiguous(), A, tiles, partial, r_max=R,
                                     block_m=self.block_m, split_k=self.split_k[kind])
            self.kernels.sgmv_expand(partial, Bs, out, tiles, r_max=R, block_m=self.block_m, splits=n)
            return
        if self.mode == "bmm" and self.block is not None:
            n, s0, (r0, L) = self.n, self.s0, self.block
            r1 = r0 + n * L
            # The native op (kernels/decode_ops.cpp) beat the batched matmuls below at every rows-per-adapter
            # measured (1-64, 1 and 2 threads): it reads each slot's weights once per 4 rows.
            if self.native:
                torch.ops.switchyard.lora_block_apply(x[r0:r1], out[r0:r1], A, Bs, [o0 for o0, _ in offs], s0, n, L, R)
                return
            xa = torch.bmm(x[r0:r1].view(n, L, x.shape[-1]), A[s0:s0 + n])      # [n, L, nR]
            for j, (o0, o1) in enumerate(offs):
                out[r0:r1, o0:o1].view(n, L, o1 - o0).baddbmm_(xa[:, :, j * R:(j + 1) * R], Bs[j][s0:s0 + n])
            return
        if self.mode == "bmm":
            n, s0, idx = self.n, self.s0, self.gather_t
            xg = x.index_select(0, idx).view(n, -1, x.shape[-1])                 # [n, L, in]
            xa = torch.bmm(xg, A[s0:s0 + n]).mul_(self.mask_t)                   # [n, L, nR]
            for j, (o0, o1) in enumerate(offs):
                d = torch.bmm(xa[:, :, j * R:(j + 1) * R], Bs[j][s0:s0 + n])      # [n, L, out_j]
                out[:, o0:o1].index_add_(0, idx, d.view(-1, o1 - o0))
            return
        if self.mode == "bgmv":
            idx = self.slots_t
            a = A.index_select(0, idx)                                # [T, in, nR]
            xa = torch.bmm(x.unsqueeze(1), a)                         # [T, 1, nR]
            for j, (o0, o1) in enumerate(offs):
                b = Bs[j].index_select(0, idx)                        # [T, R, out_j]
                out[:, o0:o1] += torch.bmm(xa[:, :, j * R:(j + 1) * R], b).squeeze(1)
            return
        nsub = len(offs)
        for slot, s, e, r in self.segments[kind]:
            active = self.subs_active[(slot, kind)]
            xs = x[s:e]
            if nsub == 1:
                xa = xs @ A[slot, :, :r]
                out[s:e].addmm_(xa, Bs[0][slot, :r])
                continue
            xa = xs @ A[slot]                                         # [n, nsub * R]
            for j, (o0, o1) in enumerate(offs):
                if active[j]:
                    out[s:e, o0:o1].addmm_(xa[:, j * R:j * R + r], Bs[j][slot, :r])
