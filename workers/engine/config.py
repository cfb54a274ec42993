"""Model shape and engine settings (plain data).

EngineConfig is the one set of engine defaults: the in-process `Engine`, a worker process and a stack
(`StackConfig.engine`, the `[engine]` table of `switchyard up --config`) all start from it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

DTYPES = ("auto", "float32", "fp32", "bfloat16", "bf16", "float16", "fp16")
LORA_MODES = ("auto", "triton", "sgmv", "bmm", "bgmv")
# Speculative decoding methods: model-free ones are proposed by the batcher (batcher/prompt_lookup.py,
# suffix_cache.py; "ngram" tries prompt lookup, then the suffix cache), model ones by the worker
# (workers/engine/draft_model.py). Verification is the worker's (workers/engine/rejection_sampler.py).
SPEC_METHODS = ("off", "prompt_lookup", "suffix", "ngram", "self_draft", "draft_model")
MODEL_FREE_SPEC_METHODS = ("prompt_lookup", "suffix", "ngram")


@dataclass
class ModelConfig:
    """Llama-family decoder shape, read from a HF config.json or GGUF metadata."""
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None          # HF form, e.g. {"rope_type": "llama3", "factor": 8.0, ...}
    max_position_embeddings: int = 2048
    tie_word_embeddings: bool = False
    attention_bias: bool = False              # Qwen2 has q/k/v biases
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)
    torch_dtype: str = "float32"              # dtype the checkpoint was stored in


@dataclass
class EngineConfig:
    """How the engine runs a model: device, KV cache size, batching limits."""
    device: str = "cpu"
    dtype: str = "auto"                 # auto: bfloat16 on CUDA, float32 on CPU
    block_size: int = 16
    num_kv_blocks: int | None = None    # None: size from kv_cache_memory_gb (CPU) or gpu_memory_utilization
    kv_cache_memory_gb: float = 1.0     # CPU KV budget when num_kv_blocks is None
    gpu_memory_utilization: float = 0.90
    max_num_seqs: int = 64              # running requests per step
    max_num_batched_tokens: int = 512   # token budget per step (decodes + prefill chunks)
    max_model_len: int | None = None    # None: the model's context length
    enable_prefix_caching: bool = True
    max_waiting: int = 1024             # admission bound; add_request beyond it raises QueueFullError
    use_cuda_graphs: bool = True
    seed: int = 0                       # engine seed: draws per-request seeds for unseeded requests
    num_threads: int | None = None      # torch intra-op threads (CPU); None: torch's default.
                                        # Oversubscribed cores make OpenMP spin: give each worker its share.
    # LoRA adapters (workers/engine/lora.py): name -> PEFT folder, served on this base model.
    lora_adapters: dict[str, str] = field(default_factory=dict)
    max_loras: int = 4                  # adapter slots on the device (distinct adapters in one batch)
    max_lora_rank: int = 16             # slot capacity; adapters of a higher rank are refused
    max_cpu_loras: int | None = None    # host-memory LRU of adapters behind the slots (None: 4 x max_loras, >= 16)
    # float32 on CPU: native kernels (workers/engine/kernels/, built by `make install`) for fused decode ops;
    # GGUF models also run matmuls of up to block_weights_max_rows rows on the file's Q4_1 / Q8_0 blocks
    # (workers/engine/block_weights.py) instead of the float32 copy.
    cpu_kernels: bool = True
    block_weights: bool = True
    block_weights_max_rows: int = 16
    lora_mode: str = "auto"             # auto | sgmv (segment per adapter) | bmm (padded per adapter) | bgmv (gather per token)
    # Speculative decoding (docs/architecture.md "Speculative decoding"): SPEC_METHODS above.
    speculative_method: str = "off"
    num_speculative_tokens: int = 4     # k: the most draft tokens per request per step
    speculative_adaptive: bool = True   # k and on/off per request per step from measured acceptance and
                                        # step times (batcher/spec_policy.py); False: always k when drafts exist
    self_draft_layers: int = 0          # self_draft: the target's first N layers + its head (0: a quarter)
    draft_model: str | None = None      # draft_model: built-in name, HF folder or GGUF (the target's tokenizer)
    draft_random_weights: str | None = None   # draft_model with random weights of a named shape (GPU speed runs)

    def __post_init__(self) -> None:
        if self.lora_adapters is None:   # a config file's `lora_adapters = null`
            self.lora_adapters = {}
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        if self.lora_mode not in LORA_MODES:
            raise ValueError(f"lora_mode {self.lora_mode!r}: choose one of {', '.join(LORA_MODES)}")
        if self.speculative_method not in SPEC_METHODS:
            raise ValueError(f"speculative_method {self.speculative_method!r}: choose one of {', '.join(SPEC_METHODS)}")
        if not 1 <= self.num_speculative_tokens <= 16:
            raise ValueError(f"num_speculative_tokens {self.num_speculative_tokens}: between 1 and 16")
        if self.speculative_method == "draft_model" and not (self.draft_model or self.draft_random_weights):
            raise ValueError("speculative_method = \"draft_model\" needs draft_model (a model name or path)")
