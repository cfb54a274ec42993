"""Speculative verification keeps greedy output exact and sampled output distributed as the target's."""
import torch

from workers.engine.rejection_sampler import verify_drafts

V = 5


def _chi_square(counts: torch.Tensor, probs: torch.Tensor) -> float:
    expected = probs * counts.sum()
    return float(((counts - expected) ** 2 / expected).sum())


# chi-square, 4 degrees of freedom: P(X > 18.47) = 0.001, so a correct sampler fails 1 in 1000 seeds
# (the seeds are fixed, so the test is deterministic); a biased one lands far above.
CRITICAL = 18.47


def _first_tokens(p: torch.Tensor, drafts: torch.Tensor, q: torch.Tensor | None, n: int, k: int = 1):
    target = p.expand(n, k + 1, V).contiguous()
    out = verify_drafts(target, drafts, torch.full((n,), k), greedy=torch.zeros(n, dtype=torch.bool),
                        seeds=torch.arange(n) + 12345, steps=torch.zeros(n, dtype=torch.int64),
                        draft_probs=None if q is None else q.expand(n, k, V).contiguous())
    return out


def test_greedy_rows_accept_exactly_the_argmax_prefix_then_the_target_token():
    logits = torch.tensor([[[0., 5, 0, 0, 0], [0, 0, 5, 0, 0], [0, 0, 0, 5, 0], [5, 0, 0, 0, 0]]]).softmax(-1)
    out = verify_drafts(logits, torch.tensor([[1, 2, 4]]), torch.tensor([3]), greedy=torch.tensor([True]),
                        seeds=torch.tensor([0]), steps=torch.tensor([0]))
    # drafts 1, 2 match the argmax; 4 does not, so the target's 3 replaces it
    assert out.tokens.tolist() == [[1, 2, 3, -1]]
    assert out.num_accepted.tolist() == [2] and out.num_emitted.tolist() == [3]


def test_all_drafts_accepted_adds_the_bonus_token_and_short_drafts_are_padding():
    probs = torch.tensor([[0., 9, 0, 0, 0], [0, 0, 9, 0, 0], [0, 0, 0, 0, 9]]).softmax(-1)
    target = torch.stack([probs, probs])
    out = verify_drafts(target, torch.tensor([[1, 2], [1, 0]]), torch.tensor([2, 1]),
                        greedy=torch.tensor([True, True]), seeds=torch.tensor([0, 1]), steps=torch.tensor([0, 0]))
    assert out.tokens.tolist() == [[1, 2, 4], [1, 2, -1]]
    assert out.num_emitted.tolist() == [3, 2]


def test_no_drafts_is_plain_sampling():
    probs = torch.tensor([[[0.1, 0.2, 0.3, 0.2, 0.2]]]).expand(4, 1, V)
    out = verify_drafts(probs, torch.zeros((4, 0), dtype=torch.int64), torch.zeros(4, dtype=torch.int64),
                        greedy=torch.tensor([True, False, False, False]), seeds=torch.arange(4),
                        steps=torch.zeros(4, dtype=torch.int64))
    assert out.num_emitted.tolist() == [1, 1, 1, 1] and out.tokens[0, 0] == 2


def test_point_mass_drafts_keep_the_target_distribution():
    n = 40_000
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    out = _first_tokens(p, torch.full((n, 1), 3), None, n)       # the proposer always guesses token 3
    counts = torch.bincount(out.tokens[:, 0], minlength=V).float()
    assert _chi_square(counts, p) < CRITICAL
    # token 3 is accepted with probability p(3)
    assert abs(out.num_accepted.float().mean().item() - 0.3) < 0.01


def test_drafts_from_a_draft_model_keep_the_target_distribution():
    n = 40_000
    gen = torch.Generator().manual_seed(7)
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2])       # a poor draft model
    drafts = torch.multinomial(q, n, replacement=True, generator=gen)[:, None]
    out = _first_tokens(p, drafts, q, n)
    counts = torch.bincount(out.tokens[:, 0], minlength=V).float()
    assert _chi_square(counts, p) < CRITICAL
    # acceptance rate is sum_x min(p(x), q(x))
    assert abs(out.num_accepted.float().mean().item() - torch.minimum(p, q).sum().item()) < 0.01


def test_a_biased_sampler_would_fail_this_check():
    # The check has power: sampling q instead of p lands far above the critical value.
    n = 40_000
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.2])
    counts = torch.bincount(torch.multinomial(q, n, replacement=True, generator=torch.Generator().manual_seed(1)),
                            minlength=V).float()
    assert _chi_square(counts, p) > 100 * CRITICAL


def test_second_position_keeps_the_target_distribution_after_an_accepted_first_draft():
    n = 40_000
    p0 = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15])
    p1 = torch.tensor([0.2, 0.2, 0.4, 0.1, 0.1])
    target = torch.stack([p0, p1, p1]).expand(n, 3, V).contiguous()
    drafts = torch.tensor([1, 2]).expand(n, 2).contiguous()
    out = verify_drafts(target, drafts, torch.full((n,), 2), greedy=torch.zeros(n, dtype=torch.bool),
                        seeds=torch.arange(n) + 999, steps=torch.zeros(n, dtype=torch.int64))
    second = out.tokens[out.tokens[:, 0] == 1][:, 1]          # rows whose first token was 1
    counts = torch.bincount(second, minlength=V).float()
    assert _chi_square(counts, p1) < CRITICAL


def test_same_seed_and_position_give_the_same_tokens_in_any_batch():
    p = torch.tensor([0.05, 0.4, 0.1, 0.3, 0.15]).expand(1, 3, V)
    alone = verify_drafts(p, torch.tensor([[3, 1]]), torch.tensor([2]), greedy=torch.tensor([False]),
                          seeds=torch.tensor([42]), steps=torch.tensor([7]))
    batch = verify_drafts(p.expand(3, 3, V), torch.tensor([[0, 0], [3, 1], [2, 2]]), torch.tensor([1, 2, 2]),
                          greedy=torch.tensor([True, False, False]), seeds=torch.tensor([1, 42, 3]),
                          steps=torch.tensor([0, 7, 9]))
    assert batch.tokens[1].tolist() == alone.tokens[0].tolist()
