"""Speculative decoding in the batcher: which requests speculate this step, with how many drafts.

(Contract part, filled in by the speculative-decoding work; see docs/architecture.md.)
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class SpecCounters:
    """Cumulative per method since the engine started: drafts verified, accepted, verification rows
    (a request's speculative decode in one step), and tokens those rows emitted."""
    proposed: int = 0
    accepted: int = 0
    verify_rows: int = 0
    emitted: int = 0
