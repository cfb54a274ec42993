"""A BERT encoder (all-MiniLM-L6-v2) over packed variable-length batches, with sentence pooling.

Many texts go through one forward without padding to the longest. The texts are sorted by length
and cut into buckets of similar length (a bucket's lengths differ by at most BUCKET_SLACK_*), each
padded only to its own longest; the buckets are laid end to end as one flat [rows, hidden] tensor,
so every linear layer - nearly all of the work for short texts - runs once over all texts with a
few padding rows at most, and attention is one SDPA per bucket on a plain view of its rows (a key
mask only where its lengths differ). Measured on CPU against the alternatives (profile in
docs/architecture.md, "Embeddings"): padding to the longest wastes most of a short-text batch; a
block-diagonal mask over the whole batch costs T^2 per head; scattering the rows into a padded
copy per layer spent a third of the forward in index/fill/copy; exact-length groups alone need one
SDPA call per distinct length.

Pooling follows the model's sentence-transformers config: mean over each text's tokens ([CLS] and
[SEP] included, as sentence-transformers does with an all-ones attention mask) or the [CLS] token,
then L2 normalisation when its modules list a Normalize.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

# A text joins the current bucket while its length is within this much of the bucket's shortest:
# padding waste stays small and the number of attention calls per layer stays low.
BUCKET_SLACK_MIN = 4
BUCKET_SLACK_FRAC = 0.15


class _Layer(nn.Module):
    def __init__(self, h: int, inter: int, eps: float):
        super().__init__()
        self.qkv = nn.Linear(h, 3 * h)          # query, key, value fused: one matmul
        self.attn_out = nn.Linear(h, h)
        self.ln1 = nn.LayerNorm(h, eps=eps)
        self.up = nn.Linear(h, inter)
        self.down = nn.Linear(inter, h)
        self.ln2 = nn.LayerNorm(h, eps=eps)


class _Bucket:
    """n texts of similar length, padded to `max_len`: rows [start, end) of the bucketed layout."""

    def __init__(self, start: int, lens: np.ndarray):
        self.n = len(lens)
        self.max_len = int(lens.max())
        self.start, self.end = start, start + self.n * self.max_len
        self.uniform = bool((lens == self.max_len).all())
        # key mask for a bucket with padding: [n, 1, 1, L], True = attend
        self.mask = None if self.uniform else torch.from_numpy(
            np.arange(self.max_len)[None, :] < lens[:, None])[:, None, None, :]


def plan_buckets(sorted_lens: np.ndarray) -> list[_Bucket]:
    """Cut lengths sorted ascending into buckets of similar length (see BUCKET_SLACK_*)."""
    buckets, i, row = [], 0, 0
    n = len(sorted_lens)
    while i < n:
        lo = int(sorted_lens[i])
        limit = lo + max(BUCKET_SLACK_MIN, int(lo * BUCKET_SLACK_FRAC))
        j = max(int(np.searchsorted(sorted_lens, limit, side="right")), i + 1)
        b = _Bucket(row, sorted_lens[i:j])
        buckets.append(b)
        row = b.end
        i = j
    return buckets


class BertEncoder(nn.Module):
    """Embeddings + N post-LayerNorm transformer layers + pooling; float32 on CPU."""

    def __init__(self, info):
        super().__init__()
        h = info.hidden_size
        self.info = info
        self.hidden = h
        self.heads = info.num_heads
        self.head_dim = h // info.num_heads
        self.word = nn.Embedding(info.vocab_size, h)
        self.pos = nn.Embedding(info.max_position, h)
        self.type0 = nn.Parameter(torch.zeros(h))   # token type 0: every text is one segment
        self.ln = nn.LayerNorm(h, eps=info.layer_norm_eps)
        self.layers = nn.ModuleList(_Layer(h, info.intermediate_size, info.layer_norm_eps)
                                    for _ in range(info.num_layers))
        self.requires_grad_(False)

    def load_weights(self, w: dict[str, torch.Tensor]) -> None:
        """HF BertModel names (with or without a `bert.` prefix); the pooler is not used."""
        w = {k.removeprefix("bert."): v for k, v in w.items()}
        with torch.no_grad():
            self.word.weight.copy_(w["embeddings.word_embeddings.weight"])
            self.pos.weight.copy_(w["embeddings.position_embeddings.weight"])
            self.type0.copy_(w["embeddings.token_type_embeddings.weight"][0])
            self.ln.weight.copy_(w["embeddings.LayerNorm.weight"])
            self.ln.bias.copy_(w["embeddings.LayerNorm.bias"])
            for i, layer in enumerate(self.layers):
                p = f"encoder.layer.{i}."
                a = p + "attention.self."
                layer.qkv.weight.copy_(torch.cat([w[a + n + ".weight"] for n in ("query", "key", "value")]))
                layer.qkv.bias.copy_(torch.cat([w[a + n + ".bias"] for n in ("query", "key", "value")]))
                layer.attn_out.weight.copy_(w[p + "attention.output.dense.weight"])
                layer.attn_out.bias.copy_(w[p + "attention.output.dense.bias"])
                layer.ln1.weight.copy_(w[p + "attention.output.LayerNorm.weight"])
                layer.ln1.bias.copy_(w[p + "attention.output.LayerNorm.bias"])
                layer.up.weight.copy_(w[p + "intermediate.dense.weight"])
                layer.up.bias.copy_(w[p + "intermediate.dense.bias"])
                layer.down.weight.copy_(w[p + "output.dense.weight"])
                layer.down.bias.copy_(w[p + "output.dense.bias"])
                layer.ln2.weight.copy_(w[p + "output.LayerNorm.weight"])
                layer.ln2.bias.copy_(w[p + "output.LayerNorm.bias"])

    def _attention(self, qkv: torch.Tensor, buckets: list[_Bucket]) -> torch.Tensor:
        h, nh, d = self.hidden, self.heads, self.head_dim
        outs = []
        for b in buckets:   # each bucket is a view of its rows: no copy in, one cat out
            q, k, v = qkv[b.start:b.end].view(b.n, b.max_len, 3, nh, d).permute(2, 0, 3, 1, 4)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=b.mask)
            outs.append(o.transpose(1, 2).reshape(b.end - b.start, h))
        return outs[0] if len(outs) == 1 else torch.cat(outs)

    def forward(self, flat_ids: torch.Tensor, lengths: list[int] | np.ndarray) -> torch.Tensor:
        """flat_ids: int64 [T], the texts' token ids concatenated; lengths: tokens per text (sum T).
        Returns float32 [len(lengths), hidden], in the order of `lengths`."""
        lens = np.asarray(lengths, dtype=np.int64)
        if len(lens) == 0:
            return torch.zeros(0, self.hidden)
        if lens.min() < 1 or lens.max() > self.info.max_position:
            raise ValueError(f"text lengths must be in [1, {self.info.max_position}] tokens")
        starts = np.concatenate(([0], np.cumsum(lens)[:-1]))
        order = np.argsort(lens, kind="stable")
        slens = lens[order]
        buckets = plan_buckets(slens)
        # The bucketed layout: text k of the sorted order sits at row0[k] .. row0[k] + len - 1.
        width = np.repeat([b.max_len for b in buckets], [b.n for b in buckets])
        row0 = np.concatenate(([0], np.cumsum(width)[:-1]))
        total = int(slens.sum())
        within = np.arange(total) - np.repeat(np.cumsum(slens) - slens, slens)
        rows = torch.from_numpy(np.repeat(row0, slens) + within)            # real token -> its row
        source = torch.from_numpy(np.repeat(starts[order], slens) + within)  # real token -> flat_ids index
        ids = flat_ids.new_zeros(buckets[-1].end, dtype=torch.int64)          # padding rows: token 0, masked
        ids[rows] = flat_ids.to(torch.int64)[source]
        positions = torch.from_numpy(np.arange(buckets[-1].end) - np.repeat(row0, width))

        x = self.word(ids) + self.pos(positions) + self.type0
        x = self.ln(x)
        for layer in self.layers:
            a = self._attention(layer.qkv(x), buckets)
            x = layer.ln1(layer.attn_out(a) + x)
            x = layer.ln2(layer.down(F.gelu(layer.up(x))) + x)
        x = x if len(rows) == len(x) else x[rows]   # the real tokens, in sorted order
        sstarts = np.cumsum(slens) - slens

        pool = self.info.pooling
        if pool.cls:
            pooled = x[torch.from_numpy(sstarts)]
        else:
            seg = torch.from_numpy(np.repeat(np.arange(len(slens)), slens))
            pooled = x.new_zeros(len(slens), self.hidden).index_add_(0, seg, x)
            pooled /= torch.from_numpy(slens).to(x.dtype)[:, None]
        if pool.normalize:
            pooled = F.normalize(pooled, p=2.0, dim=-1)
        out = torch.empty_like(pooled)
        out[torch.from_numpy(order)] = pooled
        return out
