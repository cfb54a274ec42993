"""Verification of speculative draft tokens: which drafts the target model accepts, and the token after them.

One verification forward gives the target's distribution at every draft position plus one more
(the "bonus" position). Per row, draft j is accepted while every earlier one was:

- greedy rows: when it equals the target's argmax there, so the output is exactly the
  non-speculative greedy output;
- sampled rows (Leviathan et al. 2023, Chen et al. 2023): with probability min(1, p(x) / q(x)),
  p the target's and q the proposer's probability of the draft token x. At the first rejection the
  token is drawn from the residual norm(max(0, p - q)); when every draft is accepted, from p at the
  bonus position. The emitted tokens are distributed exactly as sampling the target alone.
  Model-free proposers (prompt lookup, suffix match) propose one token with certainty: q is a point
  mass, the draft is accepted with probability p(x) and the residual is p without x.

All randomness is counter-based (``uniforms`` of the sampler): a pure function of the row's seed and
the output position, so a request's tokens do not depend on the batch it ran in. Everything is
tensor ops over [N, K] / [N, K+1, V]; no Python loop over rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from workers.engine.sampler import SamplingTensors, apply_truncation, temperature_scaled, token_logprobs, uniforms

__all__ = ["VerifyOutput", "verify_drafts", "verify_logits"]

# Column ids for the acceptance uniforms: outside any vocabulary, so they never equal the ids
# the sampler's own draws use (column 0) and acceptance and draw stay independent.
_ACCEPT_COLUMN = 1 << 40


@dataclass
class VerifyOutput:
    tokens: Tensor          # [N, K+1] int64: accepted drafts then one more token; -1 past num_emitted
    num_emitted: Tensor     # [N] int64 in [1, draft_len + 1]
    num_accepted: Tensor    # [N] int64 drafts accepted (num_emitted - 1)


def _position_keys(seeds: Tensor, steps: Tensor, width: int) -> tuple[Tensor, Tensor]:
    """Seeds and output positions [N * width] for every (row, position)."""
    offs = torch.arange(width, device=steps.device, dtype=torch.int64)
    return (seeds.to(torch.int64)[:, None].expand(-1, width).reshape(-1),
            (steps.to(torch.int64)[:, None] + offs[None, :]).reshape(-1))


def _draw_from_probs(probs: Tensor, seeds: Tensor, steps: Tensor) -> Tensor:
    """Inverse-CDF draw from unnormalised probabilities [M, V] (vocab-id order), one uniform per row."""
    cdf = probs.cumsum(dim=-1)
    u = uniforms(seeds, steps, torch.zeros((probs.shape[0], 1), dtype=torch.int64, device=probs.device))
    pos = torch.searchsorted(cdf, u * cdf[:, -1:])
    return pos.clamp_(max=probs.shape[-1] - 1).squeeze(1)


def verify_drafts(target_probs: Tensor, draft_ids: Tensor, draft_lens: Tensor, *, greedy: Tensor,
                  seeds: Tensor, steps: Tensor, draft_probs: Tensor | None = None) -> VerifyOutput:
    """Accept a prefix of each row's drafts and pick the token after it.

    target_probs [N, K+1, V]: the target's (temperature-scaled, truncated) distribution at each draft
    position and at the bonus position; for greedy rows only its argmax matters. draft_ids [N, K]
    (any value past draft_lens), draft_lens [N] in [0, K], greedy [N] bool, seeds [N], steps [N]: the
    output index of the first position. draft_probs [N, K, V] the proposer's distributions, or None
    for point-mass proposals.
    """
    n, width, vocab = target_probs.shape
    k = width - 1
    device = target_probs.device
    pos = torch.arange(k, device=device)[None, :]
    in_draft = pos < draft_lens[:, None]                                        # [N, K]
    safe_drafts = torch.where(in_draft, draft_ids, torch.zeros_like(draft_ids)).to(torch.int64)

    argmax = target_probs.argmax(dim=-1)                                        # [N, K+1]
    p_draft = target_probs[:, :k].gather(2, safe_drafts[..., None]).squeeze(2)  # [N, K]
    if draft_probs is None:
        q_draft = torch.ones_like(p_draft)
    else:
        q_draft = draft_probs.gather(2, safe_drafts[..., None]).squeeze(2).clamp_min(1e-20)
    s, st = _position_keys(seeds, steps, k)
    u_accept = uniforms(s, st, torch.full((n * k, 1), _ACCEPT_COLUMN, dtype=torch.int64, device=device))
    sampled_ok = u_accept.view(n, k) < (p_draft / q_draft)
    accepted = torch.where(greedy[:, None], safe_drafts == argmax[:, :k], sampled_ok) & in_draft
    # drafts accepted = length of the all-true prefix
    num_accepted = accepted.to(torch.int64).cumprod(dim=1).sum(dim=1)           # [N]

    # The token at position num_accepted: the residual after a rejection, p itself at the bonus position.
    rows = torch.arange(n, device=device)
    p_last = target_probs[rows, num_accepted]                                   # [N, V]
    rejected = num_accepted < draft_lens
    at = num_accepted.clamp(max=max(k - 1, 0))              # the rejected draft's position (when rejected)
    if draft_probs is None:
        residual = p_last
        if k > 0:
            # zero the rejected draft's probability (a mask, not boolean indexing: no device sync)
            drop = torch.zeros_like(p_last, dtype=torch.bool).scatter_(1, safe_drafts[rows, at][:, None], True)
            residual = p_last.masked_fill(drop & rejected[:, None], 0.0)
    else:
        q_last = draft_probs[rows, at] if k > 0 else torch.zeros_like(p_last)
        residual = torch.where(rejected[:, None], (p_last - q_last).clamp_min(0.0), p_last)
    # A residual that is all zero (p == q up to rounding) falls back to p itself.
    empty = residual.sum(dim=-1, keepdim=True) <= 0
    residual = torch.where(empty, p_last, residual)
    drawn = _draw_from_probs(residual, seeds.to(torch.int64), steps.to(torch.int64) + num_accepted)
    last = torch.where(greedy, argmax[rows, num_accepted], drawn)

    tokens = torch.full((n, width), -1, dtype=torch.int64, device=device)
    tokens[:, :k] = torch.where(pos < num_accepted[:, None], safe_drafts, tokens[:, :k])
    tokens[rows, num_accepted] = last
    return VerifyOutput(tokens=tokens, num_emitted=num_accepted + 1, num_accepted=num_accepted)


def verify_logits(logits: Tensor, t: SamplingTensors, draft_ids: Tensor, draft_lens: Tensor,
                  width: int) -> tuple[VerifyOutput, Tensor | None]:
    """verify_drafts from the target's logits, through the Sampler's pipeline for each row.

    logits [N * width, V]: request i's position j at row i * width + j (position 0: its decode
    token, position j: after draft j); t: the sampler settings of those rows, steps the output index
    of each position. Greedy rows verify against the argmax of the logits (one-hot targets, so the
    accepted prefix and the token after it are the Sampler's greedy tokens); sampled rows against
    the temperature-scaled, top-k/top-p/min-p truncated distribution. Drafts are point masses.
    Returns the verification and, when t asks for logprobs, [N, width] logprobs of its tokens as the
    Sampler defines them (temperature-scaled, before truncation; meaningless past num_emitted).
    """
    if t.history is not None or t.output_history is not None:
        raise ValueError("penalties are not combined with speculation")
    logits = logits.to(torch.float32)
    n, vocab = draft_lens.shape[0], logits.shape[-1]
    is_greedy = t.temperatures == 0
    greedy_ids = logits.argmax(dim=-1)
    probs = torch.zeros_like(logits).scatter_(1, greedy_ids[:, None], 1.0)
    scaled = logits
    if not t.all_greedy:
        is_greedy, scaled = temperature_scaled(logits, t)
        probs = torch.where(is_greedy[:, None], probs, apply_truncation(scaled, t).softmax(dim=-1))
    first = torch.arange(n, device=logits.device) * width
    out = verify_drafts(probs.view(n, width, vocab), draft_ids, draft_lens, greedy=is_greedy[first],
                        seeds=t.seeds[first], steps=t.steps[first])
    logprobs = token_logprobs(scaled, out.tokens.clamp_min(0).reshape(-1), t)
    return out, None if logprobs is None else logprobs.view(n, width)
