"""Tokenizer lookup for the router and batcher (they need the tokenizer, not the weights)."""
from __future__ import annotations


def load_tokenizer(name: str):
    """The engine loader's tokenizer for `name` (built-in name, .gguf or HF folder)."""
    from common.catalog import source_of
    from workers.engine import loader
    name = source_of(name)   # a model pool's served name (<model>@<version>) -> its source
    fn = getattr(loader, "load_tokenizer", None)
    if fn is not None:
        return fn(name)
    # Older loader without load_tokenizer: the built-in SmolLM2 tokenizer (random:* models share it).
    return loader.smollm2_tokenizer()
