"""Shared session fixtures: the SmolLM2 model (ours and transformers'), converted once into the default cache."""
from __future__ import annotations

import os

import torch

# Without a GPU, Triton kernels can only run in Triton's interpreter, and triton decides interpreter
# vs compiler when a kernel module is imported: set it before any test imports one, so every kernel
# (attention, prefill, LoRA) is interpreted whichever test imports it first. On a GPU machine the
# kernels stay compiled (tests that want the interpreter there run it in a subprocess or a fixture).
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from workers.engine.attention import build_attention_metadata  # noqa: E402


@pytest.fixture(scope="session")
def smollm2():
    """load_model("smollm2-135m"): float32, CPU (the first run on a machine converts the GGUF)."""
    from workers.engine.loader import load_model
    return load_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_dir(smollm2) -> str:
    """The HF-layout cache folder SmolLM2 was converted into."""
    return smollm2.path


@pytest.fixture(scope="session")
def hf_smollm2(smollm2_dir):
    """transformers' LlamaForCausalLM on the same cached folder (float32, eval), loaded once per session."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32)
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_smollm2_bf16(smollm2_dir):
    """transformers' model on the same folder in bfloat16 (eval): the reference for our bf16 paths."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    model = transformers.AutoModelForCausalLM.from_pretrained(smollm2_dir, dtype=torch.bfloat16)
    model.eval()
    return model


@pytest.fixture(scope="session")
def hf_tokenizer(smollm2_dir):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(smollm2_dir)


class PagedKV:
    """A tiny KV-cache owner for tests: per-layer (k, v) block tensors and a block allocator."""

    def __init__(self, cfg, num_blocks: int = 128, block_size: int = 16, dtype=torch.float32, device="cpu"):
        shape = (num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
        self.caches = [(torch.zeros(shape, dtype=dtype, device=device), torch.zeros(shape, dtype=dtype, device=device))
                       for _ in range(cfg.num_hidden_layers)]
        self.block_size = block_size
        self.device = device
        self.free = list(range(num_blocks))

    def alloc(self, n_tokens: int, table: list[int] | None = None) -> list[int]:
        """Grow `table` (a new one if None) to hold n_tokens; blocks handed out from the end (not in order)."""
        table = [] if table is None else table
        while len(table) * self.block_size < n_tokens:
            table.append(self.free.pop())
        return table

    def meta(self, prefills, decodes):
        return build_attention_metadata(prefills, decodes, self.block_size, self.device)


@pytest.fixture
def paged_kv():
    return PagedKV
