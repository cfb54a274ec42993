"""Tests for workers/engine/sampler.py (CPU)."""
from __future__ import annotations

import math

import pytest
import torch

from workers.engine.sampler import (
    Sampler,
    SamplingTensors,
    apply_penalties,
    apply_truncation,
    hash_bits,
    uniforms,
)
from workers.engine.sampling_params import SamplingParams

V = 50
sampler = Sampler()


def build(params, seeds=None, steps=None, hist=None, out_hist=None, vocab=V):
    n = len(params)
    seeds = seeds if seeds is not None else [1000 + i for i in range(n)]
    steps = steps if steps is not None else [0] * n
    hist = hist if hist is not None else [[] for _ in range(n)]
    out_hist = out_hist if out_hist is not None else [[] for _ in range(n)]
    return SamplingTensors.build(params, seeds, steps, hist, out_hist, vocab, "cpu")


def rand_logits(n, vocab=V, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale


# ----------------------------------------------------------------------------- RNG

M64 = (1 << 64) - 1


def _ref_mix(z):
    z &= M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _ref_bits(seed, step, v):
    g = 0x9E3779B97F4A7C15
    k = _ref_mix(seed + g)
    key = _ref_mix(k ^ _ref_mix(step * 0xD1B54A32D192ED03 + g))
    return _ref_mix(key + (v + 1) * g)


def test_hash_matches_unsigned_reference():
    seeds = [0, 1, 12345, 2**63 - 1, 2**40 + 7]
    steps = [0, 5, 1, 2**31, 999]
    bits = hash_bits(torch.tensor(seeds), torch.tensor(steps), 16)
    for r, (s, st) in enumerate(zip(seeds, steps)):
        for v in range(16):
            ref = _ref_bits(s, st, v)
            assert bits[r, v].item() & M64 == ref


def test_uniforms_in_open_interval_and_well_spread():
    u = uniforms(torch.arange(64), torch.zeros(64, dtype=torch.int64), 4096)
    assert u.dtype == torch.float32
    assert (u > 0).all() and (u < 1).all()
    assert abs(u.mean().item() - 0.5) < 0.005
    assert abs(u.var().item() - 1 / 12) < 0.002
    # 16 equal bins roughly uniform
    hist = torch.histc(u, bins=16, min=0, max=1)
    exp = u.numel() / 16
    assert ((hist - exp).abs() / exp).max() < 0.05
    # bits well spread: every one of the 64 bits set about half the time
    bits = hash_bits(torch.arange(64), torch.zeros(64, dtype=torch.int64), 1024)
    frac = ((bits[..., None] >> torch.arange(64)) & 1).float().mean(dim=(0, 1))
    assert ((frac > 0.48) & (frac < 0.52)).all(), frac
    # not degenerate across rows / steps / vocab
    # 23-bit uniforms: distinct values match the birthday-problem expectation
    m, n = 2.0 ** 23, u.numel()
    expected_unique = m * (1 - math.exp(-n / m))
    assert abs(u.unique().numel() - expected_unique) < 0.002 * n
    u_step = uniforms(torch.zeros(4, dtype=torch.int64), torch.arange(4), 1024)
    assert not torch.equal(u_step[0], u_step[1])
    corr = torch.corrcoef(u_step)
    assert (corr - torch.eye(4)).abs().max() < 0.15


# --------------------------------------------------------------------------- greedy

def test_greedy_is_argmax_fast_path():
    logits = rand_logits(7)
    t = build([SamplingParams(temperature=0.0) for _ in range(7)])
    assert t.all_greedy and t.history is None and t.output_history is None
    out = sampler(logits, t)
    assert torch.equal(out.token_ids, logits.argmax(-1))
    assert out.logprobs is None


def test_greedy_rows_in_mixed_batch_and_logprobs():
    logits = rand_logits(6, seed=3)
    params = [SamplingParams(temperature=0.0 if i % 2 == 0 else 0.8, logprobs=True) for i in range(6)]
    out = sampler(logits, build(params))
    assert torch.equal(out.token_ids[::2], logits[::2].argmax(-1))
    # greedy rows: logprob at temperature 1
    lp_greedy = logits[::2].log_softmax(-1).gather(1, out.token_ids[::2, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs[::2], lp_greedy)
    lp_sampled = (logits[1::2] / 0.8).log_softmax(-1).gather(1, out.token_ids[1::2, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs[1::2], lp_sampled)


def test_all_greedy_logprobs_fast_path():
    logits = rand_logits(3, seed=4)
    out = sampler(logits, build([SamplingParams(temperature=0, logprobs=True)] * 3))
    ref = logits.log_softmax(-1).gather(1, logits.argmax(-1)[:, None]).squeeze(1)
    torch.testing.assert_close(out.logprobs, ref)


def test_top_k_1_equals_greedy():
    logits = rand_logits(16, seed=5)
    params = [SamplingParams(temperature=1.3, top_k=1) for _ in range(16)]
    out = sampler(logits, build(params, seeds=list(range(16))))
    assert torch.equal(out.token_ids, logits.argmax(-1))


def test_greedy_applies_penalties():
    logits = torch.tensor([[5.0, 4.0, 1.0, -1.0]])
    p = SamplingParams(temperature=0.0, repetition_penalty=2.0)
    out = sampler(logits, build([p], hist=[[0]], vocab=4))
    assert out.token_ids.tolist() == [1]          # 5/2 = 2.5 < 4
    p = SamplingParams(temperature=0.0, presence_penalty=1.5)
    out = sampler(logits, build([p], out_hist=[[0, 0]], vocab=4))
    assert out.token_ids.tolist() == [1]          # 5-1.5 = 3.5 < 4


# ---------------------------------------------------------------- reproducibility

def test_seeded_reproducible_and_batch_independent():
    n = 64
    logits = rand_logits(n, seed=11, scale=1.0)
    params = [SamplingParams(temperature=1.0, top_p=0.95 if i % 3 == 0 else 1.0,
                             top_k=20 if i % 4 == 0 else 0) for i in range(n)]
    seeds = [7 * i + 1 for i in range(n)]
    steps = [i % 5 for i in range(n)]
    full = sampler(logits, build(params, seeds, steps)).token_ids
    again = sampler(logits, build(params, seeds, steps)).token_ids
    assert torch.equal(full, again)
    # each row alone
    for i in range(0, n, 9):
        alone = sampler(logits[i:i + 1], build([params[i]], [seeds[i]], [steps[i]])).token_ids
        assert alone.item() == full[i].item()
    # reversed batch order, and mixed with greedy rows / other settings
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0)).tolist()
    shuffled = sampler(logits[perm], build([params[i] for i in perm], [seeds[i] for i in perm],
                                           [steps[i] for i in perm])).token_ids
    assert torch.equal(shuffled, full[perm])
    extra = [SamplingParams(temperature=0.0, repetition_penalty=1.0, min_p=0.1)] * 3
    mixed = sampler(torch.cat([logits[:3], logits]),
                    build(extra + params, [0, 0, 0] + seeds, [0, 0, 0] + steps)).token_ids
    assert torch.equal(mixed[3:], full)


def test_different_seeds_and_steps_differ():
    logits = torch.zeros(200, V)  # uniform distribution
    p = [SamplingParams(temperature=1.0)] * 200
    a = sampler(logits, build(p, seeds=list(range(200)))).token_ids
    b = sampler(logits, build(p, seeds=list(range(200, 400)))).token_ids
    c = sampler(logits, build(p, seeds=list(range(200)), steps=[1] * 200)).token_ids
    assert (a != b).float().mean() > 0.9
    assert (a != c).float().mean() > 0.9
    assert a.unique().numel() > 40


@pytest.mark.parametrize("temperature,top_k,seed_base,use_steps", [
    (1.0, 0, 0, False), (0.7, 0, 10**6, False), (1.0, 4, 0, True)])
def test_empirical_distribution_matches_softmax(temperature, top_k, seed_base, use_steps):
    vocab, n = 8, 20000
    base = torch.tensor([1.0, 0.5, 0.0, -0.5, 2.0, -1.0, 0.3, 1.2])
    logits = base.expand(n, vocab).contiguous()
    params = [SamplingParams(temperature=temperature, top_k=top_k)] * n
    if use_steps:   # one request, many steps
        t = build(params, seeds=[42] * n, steps=list(range(n)), vocab=vocab)
    else:
        t = build(params, seeds=[seed_base + i for i in range(n)], vocab=vocab)
    tokens = sampler(logits, t).token_ids
    counts = torch.bincount(tokens, minlength=vocab).double()
    scaled = base.double() / temperature
    if top_k:
        kth = scaled.topk(top_k).values[-1]
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(-1)
    allowed = probs > 0
    assert counts[~allowed].sum() == 0
    expected = probs[allowed] * n
    chi2 = (((counts[allowed] - expected) ** 2) / expected).sum().item()
    df = int(allowed.sum()) - 1
    assert chi2 < df + 6 * math.sqrt(2 * df), (chi2, counts.tolist(), expected.tolist())


# ---------------------------------------------------------------- truncation

def _hf_reference_mask(scaled, top_k, top_p, min_p):
    """Per-row reference of HF's TopK -> TopP -> MinP warpers; True = kept."""
    row = scaled.clone()
    if top_k:
        kth = torch.topk(row, top_k).values[-1]
        row = row.masked_fill(row < kth, float("-inf"))
    if top_p < 1.0:
        s, idx = torch.sort(row, descending=False)
        cum = s.softmax(-1).cumsum(-1)
        remove = cum <= (1 - top_p)
        remove[-1] = False
        row = row.masked_fill(remove.scatter(0, idx, remove), float("-inf"))
    if min_p > 0:
        probs = row.softmax(-1)
        row = row.masked_fill(probs < min_p * probs.max(), float("-inf"))
    return torch.isfinite(row)


def test_truncation_masks_match_reference_and_never_sampled():
    n = 48
    logits = rand_logits(n, seed=21, scale=2.0)
    params = []
    for i in range(n):
        params.append(SamplingParams(
            temperature=[0.5, 1.0, 1.7][i % 3],
            top_k=[0, 1, 5, 17][i % 4],
            top_p=[1.0, 0.9, 0.5, 0.2, 0.73][i % 5],
            min_p=[0.0, 0.05, 0.3][(i // 2) % 3],
        ))
    t = build(params)
    scaled = logits / t.temperatures[:, None]
    mask = torch.isfinite(apply_truncation(scaled, t))
    for i, p in enumerate(params):
        ref = _hf_reference_mask(scaled[i], p.top_k, p.top_p, p.min_p)
        assert torch.equal(mask[i], ref), i
        assert mask[i].any()
    # sampling over many seeds/steps never picks a masked token
    for step in range(30):
        out = sampler(logits, build(params, seeds=[i * 31 + 5 for i in range(n)], steps=[step] * n))
        assert mask.gather(1, out.token_ids[:, None]).all()


def test_top_p_hand_example():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    t = build([SamplingParams(top_p=0.75)], vocab=4)
    kept = torch.isfinite(apply_truncation(probs.log(), t))
    assert kept.tolist() == [[True, True, False, False]]
    t = build([SamplingParams(top_p=0.1)], vocab=4)
    kept = torch.isfinite(apply_truncation(probs.log(), t))
    assert kept.tolist() == [[True, False, False, False]]   # keeps at least one


def test_min_p_hand_example():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05]])
    t = build([SamplingParams(min_p=0.35)], vocab=4)   # threshold 0.175
    kept = torch.isfinite(apply_truncation(probs.log(), t))
    assert kept.tolist() == [[True, True, False, False]]


def test_against_transformers_warpers():
    lp = pytest.importorskip("transformers.generation.logits_process")
    logits = rand_logits(1, seed=9, scale=2.5)
    p = SamplingParams(temperature=0.8, top_k=12, top_p=0.8, min_p=0.02, repetition_penalty=1.3)
    hist = [3, 7, 7, 11, 40]
    t = build([p], hist=[hist])
    ours = apply_truncation(apply_penalties(logits, t) / 0.8, t)
    ids = torch.tensor([hist])
    x = lp.RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())
    x = lp.TemperatureLogitsWarper(0.8)(ids, x)
    x = lp.TopKLogitsWarper(12)(ids, x)
    x = lp.TopPLogitsWarper(0.8)(ids, x)
    x = lp.MinPLogitsWarper(0.02)(ids, x)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(x))
    torch.testing.assert_close(ours[torch.isfinite(ours)], x[torch.isfinite(x)])


# ---------------------------------------------------------------- penalties

def test_repetition_penalty_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 0.0, 3.0, -1.0],
                           [2.0, -2.0, 0.0, 3.0, -1.0]])
    params = [SamplingParams(repetition_penalty=2.0), SamplingParams(repetition_penalty=1.0)]
    t = build(params, hist=[[0, 1, 2, 0], [0, 1]], vocab=5)
    assert t.history.shape == (2, 4) and t.history[1, 2:].tolist() == [5, 5]
    out = apply_penalties(logits, t)
    assert out[0].tolist() == [1.0, -4.0, 0.0, 3.0, -1.0]
    assert out[1].tolist() == logits[1].tolist()


def test_presence_penalty_hand_computed():
    logits = torch.tensor([[2.0, -2.0, 0.0, 3.0, -1.0],
                           [2.0, -2.0, 0.0, 3.0, -1.0]])
    params = [SamplingParams(presence_penalty=0.5), SamplingParams(presence_penalty=-1.0)]
    t = build(params, out_hist=[[3, 3, 3, 1], []], vocab=5)
    assert t.history is None
    out = apply_penalties(logits, t)
    assert out[0].tolist() == [2.0, -2.5, 0.0, 2.5, -1.0]   # once per token, not per count
    assert out[1].tolist() == logits[1].tolist()


def test_both_penalties_then_sampling_logprobs():
    logits = rand_logits(4, seed=13)
    params = [SamplingParams(temperature=0.9, repetition_penalty=1.2, presence_penalty=0.7, logprobs=True)] * 4
    hist = [[1, 2, 3], [4, 5], [], [6, 6, 6]]
    out_hist = [[3], [5, 4], [], [6]]
    t = build(params, hist=hist, out_hist=out_hist)
    res = sampler(logits, t)
    pen = logits.clone()
    for r in range(4):
        for tok in set(hist[r]):
            pen[r, tok] = pen[r, tok] / 1.2 if pen[r, tok] > 0 else pen[r, tok] * 1.2
        for tok in set(out_hist[r]):
            pen[r, tok] -= 0.7
    ref = (pen / 0.9).log_softmax(-1).gather(1, res.token_ids[:, None]).squeeze(1)
    torch.testing.assert_close(res.logprobs, ref)


def test_build_flags():
    t = build([SamplingParams(temperature=0.0, top_k=5, top_p=0.5), SamplingParams()])
    assert not t.all_greedy and not t.any_top_k and not t.any_top_p and not t.any_min_p
    t = build([SamplingParams(top_k=3, min_p=0.1)])
    assert t.any_top_k and t.any_min_p and not t.want_logprobs
    assert t.seeds.dtype == torch.int64 and t.top_ks.dtype == torch.int64
    assert t.temperatures.dtype == torch.float32


def test_topk_path_when_every_truncating_row_has_top_k():
    n = 24
    logits = rand_logits(n, seed=31, scale=2.0)
    params = [SamplingParams(temperature=[0.6, 1.0, 1.4][i % 3],
                             top_k=[0, 3, 9, 20][i % 4],
                             top_p=[1.0, 0.8, 0.4][i % 3] if i % 4 else 1.0,
                             min_p=0.1 if i % 5 == 0 else 0.0)
              for i in range(n)]
    params.append(SamplingParams(temperature=0.0, top_p=0.3))   # greedy rows don't force a sort
    logits = torch.cat([logits, rand_logits(1, seed=2)])
    t = build(params)
    assert t.sort_width == 20
    scaled = logits / torch.where(t.temperatures == 0, 1.0, t.temperatures)[:, None]
    mask = torch.isfinite(apply_truncation(scaled, t))
    for i, p in enumerate(params[:-1]):
        assert torch.equal(mask[i], _hf_reference_mask(scaled[i], p.top_k, p.top_p, p.min_p)), i
    # same tokens as with a full-vocab sort
    full = build(params)
    full.sort_width = None
    assert torch.equal(sampler(logits, t).token_ids, sampler(logits, full).token_ids)


def test_candidate_path_matches_full_vocab_draw():
    n = 40
    logits = rand_logits(n, seed=41, scale=1.5)
    params = [SamplingParams(temperature=[0.7, 1.0, 1.5][i % 3], top_k=[2, 5, 30, 45][i % 4],
                             top_p=[1.0, 0.9][i % 2], min_p=0.05 if i % 3 == 0 else 0.0)
              for i in range(n)]
    for step in range(10):
        t = build(params, seeds=[i * 13 for i in range(n)], steps=[step] * n)
        assert t.candidates_only and t.sort_width == 45
        full = build(params, seeds=[i * 13 for i in range(n)], steps=[step] * n)
        full.candidates_only, full.sort_width = False, None
        assert torch.equal(sampler(logits, t).token_ids, sampler(logits, full).token_ids)
    # the bits at given ids equal the full-vocab bits at those ids
    seeds, steps = torch.tensor([3, 9]), torch.tensor([0, 4])
    ids = torch.tensor([[0, 7, 49], [5, 5, 1]])
    assert torch.equal(hash_bits(seeds, steps, ids), hash_bits(seeds, steps, V).gather(1, ids))


def test_nucleus_from_candidates_equals_full_sort():
    """The top-p shortcut over the leading candidates masks exactly what a full sort masks."""
    from workers.engine import sampler as smp
    g = torch.Generator().manual_seed(7)
    vocab = 5000
    logits = torch.randn(6, vocab, generator=g) * 6.0     # peaked rows: small nuclei
    params = [SamplingParams(temperature=0.7, top_p=p) for p in (0.5, 0.8, 0.9, 0.95, 1.0, 0.99)]
    params[4] = SamplingParams(temperature=0.7, top_k=40, top_p=0.9)
    t = SamplingTensors.build(params, list(range(6)), [0] * 6, [], [], vocab, "cpu")
    fast_vals, keep = smp._nucleus_from_candidates(logits, t, vocab)
    assert keep is not None, "peaked rows should be covered by the candidates"
    sorted_logits, _ = smp._sorted_candidates(logits, vocab, with_indices=False)
    assert torch.equal(keep, smp._keep_counts(sorted_logits, t, vocab))
    flat = torch.zeros(1, vocab)                           # a uniform row: nucleus too wide
    t1 = SamplingTensors.build([SamplingParams(temperature=1.0, top_p=0.9)], [0], [0], [], [], vocab, "cpu")
    assert smp._nucleus_from_candidates(flat, t1, vocab) == (None, None)
