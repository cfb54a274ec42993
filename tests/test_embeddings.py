"""all-MiniLM-L6-v2: our packed BERT encoder against transformers, the loader, the batcher's packing."""
from __future__ import annotations

import subprocess
import sys
import zipfile
from collections import deque

import numpy as np
import pytest
import torch

from batcher.embedding_batcher import EmbedJob, take_texts
from protos.switchyard.v1 import worker_pb2
from workers.embedding_service import check_batch
from workers.engine.bert import plan_buckets
from workers.engine.embedding_loader import (
    MINILM,
    canonical_name,
    embedding_info,
    load_embedding_model,
    load_embedding_tokenizer,
    model_zip_path,
)

TEXTS = ["a cat sat on the mat", "hello", "x", "The quick brown fox jumps over the lazy dog. " * 5,
         "embedding models are fun to build", "hello world", "Zürich, naïve café — ünïcödé and emoji 🚂",
         "word " * 254]   # 256 tokens with [CLS] and [SEP]: the longest text the model takes


@pytest.fixture(scope="module")
def model():
    return load_embedding_model(MINILM, num_threads=2)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """transformers' BertModel on the same weights, mean pooling over the attention mask, L2 normalised
    (what sentence-transformers does for this model)."""
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    d = tmp_path_factory.mktemp("minilm")
    zipfile.ZipFile(model_zip_path()).extractall(d)
    tok = transformers.AutoTokenizer.from_pretrained(str(d))
    ref = transformers.AutoModel.from_pretrained(str(d)).eval()

    def embed(texts: list[str]) -> np.ndarray:
        b = tok(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.no_grad():
            h = ref(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).float()
        return torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1).numpy()
    return embed


def test_vectors_match_transformers_to_cosine_0999(model, reference):
    ids = model.tokenize(TEXTS)
    assert len(ids[-1]) == 256
    ours = model.embed(ids)
    want = reference(TEXTS)
    cos = (ours * want).sum(axis=1)
    assert ours.shape == (len(TEXTS), 384) and ours.dtype == np.float32
    assert cos.min() >= 0.999, cos


def test_a_packed_batch_equals_each_text_alone_in_any_order(model):
    rng = np.random.default_rng(0)
    words = "red green blue train track switch signal yard engine car freight night".split()
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 60))) for _ in range(64)]
    ids = model.tokenize(texts)
    together = model.embed(ids)
    alone = np.concatenate([model.embed([t]) for t in ids[:8]])
    np.testing.assert_allclose(together[:8], alone, atol=2e-5)
    perm = rng.permutation(len(ids))
    np.testing.assert_allclose(model.embed([ids[i] for i in perm]), together[perm], atol=2e-5)


def test_the_tokenizer_never_truncates(model):
    ids = load_embedding_tokenizer().encode_batch(["word " * 300])[0]
    assert len(ids) == 302 and ids[0] == 101 and ids[-1] == 102   # [CLS] 300 words [SEP]: the caller refuses it
    assert model.tokenize(["word " * 300]) == [ids]


def test_the_model_info_comes_from_the_zip():
    info = embedding_info()
    assert (info.hidden_size, info.num_layers, info.num_heads, info.max_tokens) == (384, 6, 12, 256)
    assert info.pooling.mean and info.pooling.normalize and not info.pooling.cls
    assert canonical_name("sentence-transformers/all-MiniLM-L6-v2") == MINILM and canonical_name("gpt2") is None


def test_the_wheel_is_read_without_importing_its_package():
    code = ("import sys; from workers.engine.embedding_loader import load_embedding_tokenizer, model_zip_path;"
            "model_zip_path(); load_embedding_tokenizer(); print('all_minilm_l6_v2' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False"


def test_buckets_pad_only_within_similar_lengths():
    lens = np.array([3, 3, 4, 5, 12, 12, 13, 40, 41, 200])
    buckets = plan_buckets(lens)
    assert [(b.n, b.max_len, b.uniform) for b in buckets] == [(4, 5, False), (3, 13, False), (2, 41, False),
                                                              (1, 200, True)]
    # laid end to end, each padded to its own longest: 4x5 + 3x13 + 2x41 + 200 rows (not 10 x 200)
    assert buckets[0].start == 0 and buckets[-1].end == 20 + 39 + 82 + 200
    assert all(a.end == b.start for a, b in zip(buckets, buckets[1:]))


def _job(rid: str, lengths: list[int]) -> EmbedJob:
    cum = np.concatenate(([0], np.cumsum(lengths)))
    return EmbedJob(rid, f"reply.{rid}", np.arange(cum[-1], dtype=np.uint32), cum, 0)


def test_take_texts_packs_requests_up_to_the_token_budget():
    big, small, low = _job("big", [10] * 5), _job("small", [4, 4]), _job("low", [3])
    interactive, batch = deque([big, small]), deque([low])
    first = take_texts([interactive, batch], 32)           # 3 texts of big fit (30), the 4th would not
    assert [(j.request_id, i, k) for j, i, k in first] == [("big", 0, 3)]
    second = take_texts([interactive, batch], 32)          # big's last 2 (20), small (8), low (3)
    assert [(j.request_id, i, k) for j, i, k in second] == [("big", 3, 5), ("small", 0, 2), ("low", 0, 1)]
    assert not interactive and not batch


def test_a_text_over_the_budget_runs_alone():
    long, short = _job("long", [100]), _job("short", [5])
    q = deque([long, short])
    assert [(j.request_id, i, k) for j, i, k in take_texts([q], 64)] == [("long", 0, 1)]
    assert [(j.request_id, i, k) for j, i, k in take_texts([q], 64)] == [("short", 0, 1)]


@pytest.mark.parametrize("ids, lengths, problem", [
    ([], [], "no texts"),
    ([101, 102], [3], "lengths add up to 3"),
    ([101] * 300, [300], "1..256 tokens"),
    ([101, 99999], [2], "vocabulary size"),
])
def test_the_worker_refuses_a_malformed_batch(ids, lengths, problem):
    assert problem in check_batch(worker_pb2.EmbedBatchRequest(token_ids=ids, lengths=lengths), 256, 30522)
    assert check_batch(worker_pb2.EmbedBatchRequest(token_ids=[101, 7, 102], lengths=[3]), 256, 30522) == ""
