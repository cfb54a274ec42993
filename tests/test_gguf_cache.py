"""The GGUF conversion cache is keyed by the file's content: copies of one GGUF (another clone,
another virtualenv) share one conversion and one CPU block cache. The conversion itself is replaced
by a stand-in here (tests/test_loader.py converts the real SmolLM2 file)."""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from workers.engine import block_weights, gguf_convert


@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv(gguf_convert.CACHE_ENV, str(root))
    return root


@pytest.fixture
def conversions(monkeypatch):
    """Every conversion made (GGUF path), each writing a minimal HF folder."""
    made = []

    def fake_convert(path, out):
        made.append(Path(path))
        (Path(out) / "config.json").write_text("{}")
        return Path(out)

    monkeypatch.setattr(gguf_convert, "convert_gguf", fake_convert)
    return made


@pytest.fixture
def hashes(monkeypatch):
    """Every file hashed in full."""
    hashed = []
    real = gguf_convert._hash_file

    def counting(path):
        hashed.append(Path(path))
        return real(path)

    monkeypatch.setattr(gguf_convert, "_hash_file", counting)
    return hashed


def two_copies(tmp_path, content=b"GGUF" + bytes(range(256)) * 64):
    a, b = tmp_path / "clone-a" / "model.gguf", tmp_path / "venv-b" / "other-name.gguf"
    for p in (a, b):
        p.parent.mkdir(parents=True)
    a.write_bytes(content)
    shutil.copy(a, b)
    return a, b


def test_copies_of_one_gguf_convert_once(tmp_path, cache, conversions):
    a, b = two_copies(tmp_path)
    assert gguf_convert.ensure_converted(a) == gguf_convert.ensure_converted(b)
    assert conversions == [a]


def test_different_content_converts_again(tmp_path, cache, conversions):
    a, b = two_copies(tmp_path)
    b.write_bytes(a.read_bytes() + b"changed")
    assert gguf_convert.ensure_converted(a) != gguf_convert.ensure_converted(b)
    assert conversions == [a, b]


def test_a_file_is_hashed_once_until_it_changes(tmp_path, cache, hashes):
    a, _ = two_copies(tmp_path)
    folder = gguf_convert.cache_dir_for(a)
    assert gguf_convert.cache_dir_for(a) == folder and hashes == [a]   # remembered in the side file
    assert (cache / gguf_convert.HASHES_FILE).exists()
    st = a.stat()
    os.utime(a, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))   # touched: hash again, same content
    assert gguf_convert.cache_dir_for(a) == folder and hashes == [a, a]


def test_cpu_block_cache_is_shared_by_copies(tmp_path, cache, conversions, monkeypatch):
    """block_weights keeps gguf_blocks.safetensors in the conversion folder: a copy finds it."""
    blocks = {"model.layers.0.mlp.up_proj.weight": ("q8_0", np.arange(2 * 34, dtype=np.uint8).reshape(2, 34))}
    parsed = []

    def fake_parse(path, n_head, n_kv_heads):
        parsed.append(Path(path))
        return blocks

    monkeypatch.setattr(block_weights, "_parse_gguf_blocks", fake_parse)
    a, b = two_copies(tmp_path)
    folder = gguf_convert.ensure_converted(a)
    block_weights.read_gguf_blocks(str(a), 9, 3)
    assert (folder / "gguf_blocks.safetensors").exists()
    got = block_weights.read_gguf_blocks(str(b), 9, 3)
    assert parsed == [a]
    (fmt, data), = got.values()
    assert fmt == "q8_0" and np.array_equal(data, blocks["model.layers.0.mlp.up_proj.weight"][1])


def test_a_conversion_under_the_old_path_key_is_moved_not_redone(tmp_path, cache, conversions):
    a, _ = two_copies(tmp_path)
    legacy = gguf_convert._legacy_cache_dir(a)
    legacy.mkdir(parents=True)
    (legacy / "config.json").write_text('{"old": true}')
    folder = gguf_convert.ensure_converted(a)
    assert conversions == [] and not legacy.exists()
    assert (folder / "config.json").read_text() == '{"old": true}'
