"""Incremental detokenisation with stop strings.

Uses the vLLM prefix_offset / read_offset scheme: each step decodes only a short window
of recent token ids (``ids[prefix_offset:]``) and the already-emitted part of that window
(``ids[prefix_offset:read_offset]``); the difference is the new text. Cost per token does
not grow with the output length. The window starts on the last few prompt tokens so the
first output token's leading space (SentencePiece-style decoders) comes out as in a full
decode.

Text is held back while

* the window decodes to something ending in U+FFFD (an incomplete UTF-8 character whose
  remaining bytes are in tokens still to come), and
* its tail could be the beginning of a stop string (only the longest such suffix, which
  is at most ``len(longest stop) - 1`` characters).
"""
from __future__ import annotations

from typing import Iterable, Protocol

__all__ = ["IncrementalDetokenizer"]

_PROMPT_CONTEXT = 5      # prompt tokens that seed the decode window
_TRIM_AT = 256           # drop consumed ids once this many sit before the window


class _Tokenizer(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...


class IncrementalDetokenizer:
    def __init__(
        self,
        tokenizer: _Tokenizer,
        prompt_token_ids: list[int],
        stop: Iterable[str] = (),
        skip_special_tokens: bool = True,
    ):
        self._tok = tokenizer
        self._skip = skip_special_tokens
        self._stops = [s for s in stop if s]
        ctx = list(prompt_token_ids[-_PROMPT_CONTEXT:])
        self._ids: list[int] = ctx            # window ids (older ones trimmed)
        self._prefix_offset = 0
        self._read_offset = len(ctx)
        self._pending = ""                    # decoded, not yet emitted (stop-prefix hold)
        self._chunks: list[str] = []
        self._text_cache: str | None = ""
        self._stopped = False
        self._finished = False

    # ------------------------------------------------------------------ public

    @property
    def output_text(self) -> str:
        if self._text_cache is None:
            self._text_cache = "".join(self._chunks)
            self._chunks = [self._text_cache]
        return self._text_cache

    @property
    def stopped(self) -> bool:
        return self._stopped

    def add_tokens(self, token_ids: list[int]) -> tuple[str, bool]:
        """Feed new output ids; returns (text safe to emit now, stop_hit)."""
        if self._stopped:
            return "", True
        if self._finished:
            return "", False
        for tid in token_ids:
            self._ids.append(int(tid))
            self._pending += self._decode_step(final=False)
        return self._release(final=False)

    def add_token(self, tid: int) -> tuple[str, bool]:
        """add_tokens([tid]) without the list: the per-request, per-step call of EngineCore.process."""
        if self._stopped:
            return "", True
        if self._finished:
            return "", False
        self._ids.append(tid)
        self._pending += self._decode_step(final=False)
        return self._release(final=False)

    def flush(self) -> str:
        """At finish without a stop hit: release held text (a trailing lone U+FFFD is dropped)."""
        if self._stopped or self._finished:
            return ""
        self._pending += self._decode_step(final=True)
        text, _ = self._release(final=True)
        self._finished = True
        return text

    # ------------------------------------------------------------------ internals

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=self._skip)

    def _decode_step(self, final: bool) -> str:
        """New complete text from the window, advancing the offsets when there is some."""
        if self._read_offset >= len(self._ids):
            return ""
        prefix_text = self._decode(self._ids[self._prefix_offset:self._read_offset])
        full_text = self._decode(self._ids[self._prefix_offset:])
        if final and full_text.endswith("\ufffd"):
            full_text = full_text[:-1]
        elif full_text.endswith("\ufffd"):
            return ""                         # incomplete character: wait for more bytes
        if len(full_text) <= len(prefix_text):
            return ""                         # e.g. skipped special tokens: nothing yet
        new_text = full_text[len(prefix_text):]
        self._prefix_offset = self._read_offset
        self._read_offset = len(self._ids)
        if self._prefix_offset >= _TRIM_AT:
            del self._ids[:self._prefix_offset]
            self._read_offset -= self._prefix_offset
            self._prefix_offset = 0
        return new_text

    def _held_suffix_len(self, text: str) -> int:
        """Length of the longest suffix of text that is a proper prefix of a stop string."""
        best = 0
        for s in self._stops:
            for k in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:k]):
                    best = k
                    break
        return best

    def _emit(self, text: str) -> str:
        if text:
            self._chunks.append(text)
            self._text_cache = None
        return text

    def _release(self, final: bool) -> tuple[str, bool]:
        pending = self._pending
        if not pending:
            return "", False
        if not self._stops:                 # nothing to match or hold back
            self._pending = ""
            return self._emit(pending), False
        # Any stop match starts inside pending: everything before it was emitted only
        # after ruling out that it could begin a stop string.
        hit = -1
        for s in self._stops:
            i = pending.find(s)
            if i != -1 and (hit == -1 or i < hit):
                hit = i
        if hit != -1:
            self._pending = ""
            self._stopped = True
            return self._emit(pending[:hit]), True
        hold = 0 if final else self._held_suffix_len(pending)
        cut = len(pending) - hold
        self._pending = pending[cut:]
        return self._emit(pending[:cut]), False
