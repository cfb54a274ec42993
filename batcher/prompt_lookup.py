"""Prompt lookup: draft tokens copied from the request's own context (model-free speculation).

When the last n tokens of a sequence (prompt + output so far) occurred earlier in it, the tokens
that followed that earlier occurrence are a good guess for what comes next: code edits, RAG answers
quoting their context and structured output repeat long spans. Longest n first (``max_ngram`` down
to ``min_ngram``); among matches of one length the most recent wins (it is the likeliest to
continue the current copy). Costs one vectorised scan of the context per request per step.
"""
from __future__ import annotations

import numpy as np

__all__ = ["propose_from_context"]


def propose_from_context(tokens: np.ndarray, k: int, *, max_ngram: int = 4, min_ngram: int = 2) -> np.ndarray:
    """Up to k draft tokens following the latest earlier occurrence of the context's suffix.

    tokens: the sequence so far (int array). Returns an int64 array of 0..k tokens (empty: no match).
    """
    n_tokens = len(tokens)
    if k <= 0 or n_tokens < min_ngram + 1:
        return np.empty(0, dtype=np.int64)
    tokens = np.asarray(tokens, dtype=np.int64)
    for n in range(min(max_ngram, n_tokens - 1), min_ngram - 1, -1):
        pattern = tokens[n_tokens - n:]
        # windows starting at 0 .. n_tokens-n-1: every earlier occurrence (the suffix itself excluded)
        windows = np.lib.stride_tricks.sliding_window_view(tokens[:n_tokens - 1], n)
        hits = np.flatnonzero((windows == pattern).all(axis=1))
        if hits.size:
            start = int(hits[-1]) + n
            return tokens[start:start + k].copy()
    return np.empty(0, dtype=np.int64)
