"""Suffix speculation over recent outputs of one deployment (in the manner of SuffixDecoding).

Agentic and templated traffic repeats itself across requests: the same tool-call scaffolding, the
same JSON keys, the same refusals. This keeps the last ``capacity`` completions in a suffix trie
truncated at ``depth`` tokens (every window of ``depth`` tokens of every kept sequence is a path
from the root, each node counting the windows through it). A proposal matches the longest suffix of
the request's context (up to ``depth - 1`` tokens) and then follows the most frequent child while it
is frequent enough (``min_share`` of its parent's count), so long, well-trodden continuations give
long drafts and a fork stops the draft early.

Memory is bounded: at most capacity x average length x depth nodes; an evicted sequence's windows
are subtracted again, and nodes whose count drops to 0 are deleted.
"""
from __future__ import annotations

from collections import deque

__all__ = ["SuffixCache"]


class _Node:
    __slots__ = ("count", "children")

    def __init__(self) -> None:
        self.count = 0
        self.children: dict[int, _Node] = {}


class SuffixCache:
    def __init__(self, *, capacity: int = 256, depth: int = 24, min_share: float = 0.3) -> None:
        self.capacity = capacity
        self.depth = depth
        self.min_share = min_share
        self._root = _Node()
        self._kept: deque[list[int]] = deque()

    def __len__(self) -> int:
        return len(self._kept)

    def add(self, tokens: list[int]) -> None:
        """Remember one finished sequence (its output, or prompt + output), evicting the oldest."""
        tokens = list(tokens)
        if not tokens:
            return
        self._update(tokens, +1)
        self._kept.append(tokens)
        while len(self._kept) > self.capacity:
            self._update(self._kept.popleft(), -1)

    def _update(self, tokens: list[int], delta: int) -> None:
        for start in range(len(tokens)):
            node = self._root
            for tok in tokens[start:start + self.depth]:
                child = node.children.get(tok)
                if child is None:
                    child = node.children[tok] = _Node()
                child.count += delta
                if child.count <= 0:
                    del node.children[tok]
                    break
                node = child

    def propose(self, context: list[int], k: int, *, min_match: int = 2) -> list[int]:
        """Up to k draft tokens continuing the longest suffix of context seen before (>= min_match)."""
        if k <= 0 or not self._kept:
            return []
        longest = min(len(context), self.depth - 1)
        for n in range(longest, min_match - 1, -1):
            node = self._walk(context[len(context) - n:])
            if node is None:
                continue
            out: list[int] = []
            while len(out) < k and node.children and len(out) + n < self.depth:
                tok, child = max(node.children.items(), key=lambda kv: kv[1].count)
                if child.count < self.min_share * node.count:
                    break
                out.append(tok)
                node = child
            if out:
                return out
        return []

    def _walk(self, pattern: list[int]) -> _Node | None:
        node = self._root
        for tok in pattern:
            node = node.children.get(tok)
            if node is None:
                return None
        return node
