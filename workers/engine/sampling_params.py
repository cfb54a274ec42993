"""Per-request sampling settings (plain data, no torch) and their validation."""
from __future__ import annotations

from dataclasses import dataclass, field

from workers.engine.errors import InvalidRequestError


@dataclass
class SamplingParams:
    max_tokens: int = 16
    temperature: float = 1.0          # 0 means greedy
    top_k: int = 0                    # 0 disables
    top_p: float = 1.0                # in (0, 1]
    min_p: float = 0.0                # in [0, 1]
    repetition_penalty: float = 1.0   # > 0; 1 disables (HF semantics, over prompt + output)
    presence_penalty: float = 0.0     # in [-2, 2]; over output tokens (OpenAI semantics)
    seed: int | None = None           # None: a random seed is drawn at admission
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: bool = False            # return the sampled token's logprob

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def validate(self) -> None:
        """Raise InvalidRequestError naming the first bad field."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 1:
            raise InvalidRequestError("max_tokens", f"must be an integer >= 1, got {self.max_tokens!r}")
        if self.temperature < 0:
            raise InvalidRequestError("temperature", f"must be >= 0 (0 is greedy), got {self.temperature}")
        if self.top_k < 0:
            raise InvalidRequestError("top_k", f"must be >= 0 (0 disables), got {self.top_k}")
        if not (0.0 < self.top_p <= 1.0):
            raise InvalidRequestError("top_p", f"must be in (0, 1], got {self.top_p}")
        if not (0.0 <= self.min_p <= 1.0):
            raise InvalidRequestError("min_p", f"must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise InvalidRequestError("repetition_penalty", f"must be > 0 (1 disables), got {self.repetition_penalty}")
        if not (-2.0 <= self.presence_penalty <= 2.0):
            raise InvalidRequestError("presence_penalty", f"must be in [-2, 2], got {self.presence_penalty}")
        if any((not isinstance(s, str)) or s == "" for s in self.stop):
            raise InvalidRequestError("stop", "stop strings must be non-empty strings")
        if self.seed is not None and not (0 <= self.seed < 2**63):
            raise InvalidRequestError("seed", f"must be in [0, 2**63), got {self.seed}")
