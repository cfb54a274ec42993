"""Vectorised token sampling over a batch of requests.

Pipeline per row (matches HF ``generate`` logits processors where they overlap):

1. repetition penalty (HF): for tokens in prompt+output history, positive logits are
   divided by the penalty, negative ones multiplied;
2. presence penalty (OpenAI): subtract the penalty once for each distinct token that
   appeared in the output;
3. greedy rows (temperature 0) take the argmax of these penalised logits;
4. temperature scaling, then top-k, top-p (nucleus, keeps at least one token) and
   min-p (drops tokens with prob < min_p * max prob), in HF's warper order;
5. an inverse-CDF draw: one uniform ``u`` per row, the token where the cumulative
   probability (in vocab-id order) first reaches ``u``. When every sampled row has a
   top_k, the draw runs over each row's top candidates only (put back in vocab-id order)
   instead of the whole vocabulary: the same token.

Logprobs are of the sampled token under the penalised, temperature-scaled distribution
before top-k/top-p/min-p truncation (temperature 1 for greedy rows).

The uniform ``u`` comes from a counter-based RNG: it is a pure function of
``(seeds[row], steps[row])`` (splitmix64 finaliser computed with int64 tensor ops), so a request samples the same token whether it is alone or in a batch
of any size or order, on CPU or CUDA, on any run.

All the math is tensor ops over the whole batch; the only Python loops are in
``SamplingTensors.build`` (once per step, over the request list).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from workers.engine.sampling_params import SamplingParams

__all__ = [
    "SamplingTensors", "SamplerOutput", "Sampler",
    "apply_penalties", "apply_truncation", "hash_bits", "uniforms", "pad_histories",
]


# --------------------------------------------------------------------------- RNG

def _s64(c: int) -> int:
    """An unsigned 64-bit constant as the signed int64 with the same bits."""
    c &= (1 << 64) - 1
    return c - (1 << 64) if c >= (1 << 63) else c


_GAMMA = _s64(0x9E3779B97F4A7C15)   # golden-ratio increment of splitmix64
_MUL1 = _s64(0xBF58476D1CE4E5B9)
_MUL2 = _s64(0x94D049BB133111EB)
_STEP_SALT = _s64(0xD1B54A32D192ED03)


def _srl(x: Tensor, s: int) -> Tensor:
    """Logical right shift of int64 bits (torch's >> is arithmetic, so mask the sign fill)."""
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix64(z: Tensor) -> Tensor:
    """splitmix64 finaliser on int64 tensors; int64 multiply wraps mod 2**64 like uint64."""
    z = (z ^ _srl(z, 30)) * _MUL1
    z = (z ^ _srl(z, 27)) * _MUL2
    return z ^ _srl(z, 31)


def _row_keys(seeds: Tensor, steps: Tensor) -> Tensor:
    """[N] int64 stream key per (seed, step)."""
    k = _mix64(seeds.to(torch.int64) + _GAMMA)
    return _mix64(k ^ _mix64(steps.to(torch.int64) * _STEP_SALT + _GAMMA))


def hash_bits(seeds: Tensor, steps: Tensor, vocab: int | Tensor) -> Tensor:
    """int64 random bits; element (r, v) depends only on (seeds[r], steps[r], v).

    ``vocab`` is the vocabulary size (result [N, V], v = column index) or an int64
    tensor [N, W] of vocab ids (result [N, W], the bits of those ids).
    """
    keys = _row_keys(seeds, steps)
    if isinstance(vocab, Tensor):
        z = (vocab.to(torch.int64) + 1) * _GAMMA
        z += keys[:, None]
    else:
        offs = torch.arange(1, vocab + 1, dtype=torch.int64, device=seeds.device) * _GAMMA
        z = keys[:, None] + offs[None, :]
    # in-place finaliser to limit [N, V] temporaries
    z ^= _srl(z, 30)
    z *= _MUL1
    z ^= _srl(z, 27)
    z *= _MUL2
    z ^= _srl(z, 31)
    return z


def uniforms(seeds: Tensor, steps: Tensor, vocab: int | Tensor) -> Tensor:
    """float32 uniforms in (0, 1) (shape as ``hash_bits``): top 23 hash bits k -> (2k+1) / 2**24.

    With 23 bits, 2k+1 < 2**24 is exact in float32, so u is never 0 or 1 and the
    distribution is symmetric about 0.5.
    """
    k = _srl(hash_bits(seeds, steps, vocab), 41)
    return (k * 2 + 1).to(torch.float32) * (2.0 ** -24)


# --------------------------------------------------------------------------- inputs

@dataclass
class SamplingTensors:
    temperatures: Tensor            # [N] float32 (0 -> greedy row)
    top_ks: Tensor                  # [N] int64 (0 -> disabled)
    top_ps: Tensor                  # [N] float32
    min_ps: Tensor                  # [N] float32
    repetition_penalties: Tensor    # [N] float32
    presence_penalties: Tensor      # [N] float32
    seeds: Tensor                   # [N] int64
    steps: Tensor                   # [N] int64 index of the output token being sampled
    history: Tensor | None          # [N, L] int64 prompt+output ids, padded with vocab_size
    output_history: Tensor | None   # [N, L2] int64 output ids, padded with vocab_size
    all_greedy: bool
    any_top_k: bool
    any_top_p: bool
    any_min_p: bool
    want_logprobs: bool
    # Extras derived in build() (not needed when constructing by hand):
    # sort_width: how many top candidates top-k/top-p must look at, i.e. the max top_k when
    #   every truncating sampled row has a top_k (a cheap topk replaces the full sort);
    #   None: sort the whole vocabulary.
    # candidates_only: every sampled row has a top_k, so sampling (and the RNG) only needs
    #   each row's top sort_width candidates instead of the whole vocabulary.
    sort_width: int | None = None
    candidates_only: bool = False

    # max_top_k: the largest top_k among the rows (host int; decides the nucleus shortcut without a sync)
    max_top_k: int = 0

    @classmethod
    def from_arrays(cls, *, temps: np.ndarray, top_ks: np.ndarray, top_ps: np.ndarray, min_ps: np.ndarray,
                    want_logprobs: bool, tensors: dict[str, Tensor], history: Tensor | None = None,
                    output_history: Tensor | None = None) -> "SamplingTensors":
        """Host flags from numpy copies of the settings; `tensors` already on the device (the
        runner's one copy per step). Nothing here reads the device."""
        sampled = temps != 0.0
        all_greedy = not bool(sampled.any())
        # truncation only matters for sampled rows
        any_top_k = bool((sampled & (top_ks > 0)).any())
        any_top_p = bool((sampled & (top_ps < 1.0)).any())
        any_min_p = bool((sampled & (min_ps > 0.0)).any())
        sort_width, candidates_only = None, False
        if any_top_k or any_top_p:
            k_s, p_s = top_ks[sampled], top_ps[sampled]
            if not bool(((k_s == 0) & (p_s < 1.0)).any()):
                sort_width = int(k_s.max())
                candidates_only = bool((k_s > 0).all())
        return cls(**tensors, history=history, output_history=output_history, all_greedy=all_greedy,
                   any_top_k=any_top_k, any_top_p=any_top_p, any_min_p=any_min_p, want_logprobs=want_logprobs,
                   sort_width=sort_width, candidates_only=candidates_only,
                   max_top_k=int(top_ks.max()) if top_ks.size else 0)

    @classmethod
    def build(
        cls,
        params: list[SamplingParams],
        seeds: list[int],
        steps: list[int],
        token_histories: list[list[int]],
        output_histories: list[list[int]],
        vocab_size: int,
        device,
    ) -> "SamplingTensors":
        """From Python lists (tests, simple callers); the runner uses StepInputs' packed copy instead."""
        arrays = dict(
            temps=np.array([float(p.temperature) for p in params], dtype=np.float32),
            top_ks=np.array([int(p.top_k) if 0 < p.top_k < vocab_size else 0 for p in params], dtype=np.int64),
            top_ps=np.array([float(p.top_p) for p in params], dtype=np.float32),
            min_ps=np.array([float(p.min_p) for p in params], dtype=np.float32),
        )
        reps = np.array([float(p.repetition_penalty) for p in params], dtype=np.float32)
        pres = np.array([float(p.presence_penalty) for p in params], dtype=np.float32)
        t = lambda a: torch.from_numpy(a).to(device)   # noqa: E731
        tensors = dict(
            temperatures=t(arrays["temps"]), top_ks=t(arrays["top_ks"]), top_ps=t(arrays["top_ps"]),
            min_ps=t(arrays["min_ps"]), repetition_penalties=t(reps), presence_penalties=t(pres),
            seeds=torch.tensor([int(s) & ((1 << 63) - 1) for s in seeds], dtype=torch.int64, device=device),
            steps=torch.tensor([int(s) for s in steps], dtype=torch.int64, device=device))
        history = pad_histories(token_histories, vocab_size, device, len(params)) if (reps != 1.0).any() else None
        output_history = (pad_histories(output_histories, vocab_size, device, len(params))
                          if (pres != 0.0).any() else None)
        return cls.from_arrays(**arrays, want_logprobs=any(p.logprobs for p in params), tensors=tensors,
                               history=history, output_history=output_history)


def pad_histories(rows: list[list[int]], vocab_size: int, device, n: int | None = None) -> Tensor:
    """[N, L] int64 token histories padded with vocab_size (an id no logit has)."""
    n = len(rows) if n is None else n
    width = max(1, max((len(r) for r in rows), default=0))
    buf = np.full((n, width), vocab_size, dtype=np.int64)
    for i, r in enumerate(rows):
        buf[i, :len(r)] = r
    return torch.from_numpy(buf).to(device)


@dataclass
class SamplerOutput:
    token_ids: Tensor            # [N] int64
    logprobs: Tensor | None      # [N] float32


# --------------------------------------------------------------------------- sampler

def _token_mask(ids: Tensor, vocab_size: int) -> Tensor:
    """[N, V] bool: which vocab ids occur in each row of ids (padding id == vocab_size)."""
    mask = torch.zeros(ids.shape[0], vocab_size + 1, dtype=torch.bool, device=ids.device)
    mask.scatter_(1, ids.clamp(0, vocab_size), True)
    return mask[:, :vocab_size]


def apply_penalties(logits: Tensor, t: SamplingTensors) -> Tensor:
    """Repetition (HF) then presence (OpenAI) penalties; returns a new tensor."""
    vocab = logits.shape[-1]
    out = logits
    if t.history is not None:
        seen = _token_mask(t.history, vocab)
        rp = t.repetition_penalties[:, None]
        penalised = torch.where(out < 0, out * rp, out / rp)
        out = torch.where(seen, penalised, out)
    if t.output_history is not None:
        seen = _token_mask(t.output_history, vocab)
        out = out - t.presence_penalties[:, None] * seen.to(out.dtype)
    return out


def _width(t: SamplingTensors, vocab: int) -> int:
    return vocab if t.sort_width is None else max(1, min(t.sort_width, vocab))


def _sorted_candidates(scaled: Tensor, width: int, with_indices: bool):
    if width < scaled.shape[-1]:
        r = scaled.topk(width, dim=-1, sorted=True)
    else:
        r = scaled.sort(dim=-1, descending=True)
    return (r.values, r.indices) if with_indices else (r.values, None)


def _keep_counts(sorted_logits: Tensor, t: SamplingTensors, vocab: int,
                 full_lse: Tensor | None = None) -> Tensor:
    """[N] how many leading sorted candidates survive top-k then top-p (>= 1).

    ``full_lse`` [N]: log-normaliser over the whole vocabulary, for rows without top_k when
    ``sorted_logits`` holds only the leading candidates (the caller checks coverage)."""
    width = sorted_logits.shape[-1]
    ks = torch.where(t.top_ks > 0, t.top_ks, vocab).clamp(1, vocab)
    keep = ks
    if t.any_top_p:
        pos = torch.arange(width, device=sorted_logits.device)[None, :]
        masked = sorted_logits.masked_fill(pos >= ks[:, None], float("-inf"))
        lse = masked.logsumexp(dim=-1)
        if full_lse is not None:
            lse = torch.where(t.top_ks > 0, lse, full_lse)
        probs = (masked - lse[:, None]).exp()
        # HF removes a token when the ascending mass up to and including it is
        # <= 1 - top_p, i.e. when the mass strictly ahead of it is >= top_p.
        ahead = probs.cumsum(dim=-1) - probs
        removed = (ahead >= t.top_ps[:, None]) & (t.top_ps < 1.0)[:, None]
        keep = torch.minimum(ks, (~removed).sum(dim=-1).clamp_min(1))   # a prefix
    return keep.clamp(max=width)


def _apply_min_p(x: Tensor, t: SamplingTensors) -> Tensor:
    probs = x.softmax(dim=-1)
    top = probs.max(dim=-1, keepdim=True).values
    return x.masked_fill(probs < t.min_ps[:, None] * top, float("-inf"))


_NUCLEUS_WIDTH = 256


def _nucleus_from_candidates(scaled: Tensor, t: SamplingTensors, vocab: int):
    """Top-p over the leading _NUCLEUS_WIDTH candidates instead of sorting the vocabulary.

    A full sort of [N, 49k] dominates a CPU step; LLM nuclei are almost always far smaller.
    Exact whenever every row's cut falls inside the candidates; returns (None, None) when a
    row's nucleus (or top_k) is wider, and the caller sorts everything."""
    if t.max_top_k > _NUCLEUS_WIDTH or scaled.is_cuda:
        # On CUDA the full sort is cheap and the check below would stall the host on the device.
        return None, None
    vals = scaled.topk(_NUCLEUS_WIDTH, dim=-1, sorted=True).values
    keep = _keep_counts(vals, t, vocab, full_lse=scaled.logsumexp(dim=-1))
    cut_inside = (keep < _NUCLEUS_WIDTH) | (t.top_ps >= 1.0) | (t.top_ks > 0)
    if not bool(cut_inside.all()):
        return None, None
    return vals, keep


def apply_truncation(scaled: Tensor, t: SamplingTensors) -> Tensor:
    """Top-k, top-p, min-p masking (to -inf) of temperature-scaled logits [N, V].

    Candidates tied with the last kept one are kept too (a value cutoff)."""
    vocab = scaled.shape[-1]
    if t.any_top_k or t.any_top_p:
        sorted_logits = keep = None
        if _width(t, vocab) == vocab and vocab > _NUCLEUS_WIDTH:
            sorted_logits, keep = _nucleus_from_candidates(scaled, t, vocab)
        if keep is None:
            sorted_logits, _ = _sorted_candidates(scaled, vocab, with_indices=False)
            keep = _keep_counts(sorted_logits, t, vocab)
        cutoff = sorted_logits.gather(1, (keep - 1)[:, None])                 # [N, 1]
        no_trunc = ((t.top_ks == 0) & (t.top_ps >= 1.0))[:, None]
        cutoff = cutoff.masked_fill(no_trunc, float("-inf"))
        scaled = scaled.masked_fill(scaled < cutoff, float("-inf"))
    if t.any_min_p:
        scaled = _apply_min_p(scaled, t)
    return scaled


def _draw(x: Tensor, seeds: Tensor, steps: Tensor, ids: Tensor | None = None) -> Tensor:
    """Inverse-CDF draw from softmax(x) (-inf = masked), in vocab-id order: one uniform per row.

    One counter-based uniform per (seed, step) keeps the draw reproducible and independent of
    the batch, and costs a cumsum over the vocabulary instead of hashing every vocab entry.
    ``ids`` [N, W]: x holds only those vocab ids (top-k candidates); they are put back in
    vocab-id order so the draw equals the full-vocabulary one. Returns vocab ids [N].
    """
    if ids is not None:
        order = ids.argsort(dim=-1)
        ids = ids.gather(1, order)
        x = x.gather(1, order)
    weights = (x - x.max(dim=-1, keepdim=True).values).exp_()
    cdf = weights.cumsum_(dim=-1)
    u = uniforms(seeds, steps, torch.zeros((x.shape[0], 1), dtype=torch.int64, device=x.device))
    pos = torch.searchsorted(cdf, u * cdf[:, -1:]).clamp_(max=x.shape[-1] - 1).squeeze(1)
    return pos if ids is None else ids.gather(1, pos[:, None]).squeeze(1)


def temperature_scaled(logits: Tensor, t: SamplingTensors) -> tuple[Tensor, Tensor]:
    """(greedy rows [N] bool, logits / temperature; greedy rows stay at temperature 1)."""
    is_greedy = t.temperatures == 0
    temps = torch.where(is_greedy, torch.ones_like(t.temperatures), t.temperatures)
    return is_greedy, logits / temps[:, None]


def token_logprobs(x: Tensor, tokens: Tensor, t: SamplingTensors) -> Tensor | None:
    """log_softmax(x) at each row's token ([N]; None when t wants no logprobs)."""
    if not t.want_logprobs:
        return None
    return x.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)


class Sampler:
    """Samples one token per row from ``logits`` [N, V] float32."""

    def __call__(self, logits: Tensor, t: SamplingTensors) -> SamplerOutput:
        logits = logits.to(torch.float32)
        no_penalties = t.history is None and t.output_history is None

        if t.all_greedy and no_penalties:
            tokens = logits.argmax(dim=-1)
            return SamplerOutput(tokens, token_logprobs(logits, tokens, t))

        logits = apply_penalties(logits, t)
        greedy_tokens = logits.argmax(dim=-1)
        if t.all_greedy:
            return SamplerOutput(greedy_tokens, token_logprobs(logits, greedy_tokens, t))

        vocab = logits.shape[-1]
        is_greedy, scaled = temperature_scaled(logits, t)
        if t.candidates_only:
            # every sampled row has a top_k: draw over each row's top candidates only
            # (same token as the full-vocabulary draw)
            vals, idx = _sorted_candidates(scaled, _width(t, vocab), with_indices=True)
            keep = _keep_counts(vals, t, vocab)
            pos = torch.arange(vals.shape[-1], device=vals.device)[None, :]
            vals = vals.masked_fill(pos >= keep[:, None], float("-inf"))
            if t.any_min_p:
                vals = _apply_min_p(vals, t)
            sampled = _draw(vals, t.seeds, t.steps, idx)
        else:
            sampled = _draw(apply_truncation(scaled, t), t.seeds, t.steps)
        tokens = torch.where(is_greedy, greedy_tokens, sampled)
        return SamplerOutput(tokens, token_logprobs(scaled, tokens, t))
