"""Intent classification: a prompt (and the request's `intent` hint) -> a required capability.

Pluggable: anything with `classify(text, hint) -> (capability | None, reason)` will do; the
catalogue's `[pool] intent_classifier = "module:factory"` names a factory called with the Catalog.
The shipped one, RuleClassifier, applies the catalogue's [[intents]] rules in order: a hint that
names a known capability wins; else the first rule with a matching keyword (whole word, any case)
or regex (searched, any case). No match: None, and the router falls back to the default model.
"""
from __future__ import annotations

import importlib
import re
from typing import Protocol

from common.catalog import Catalog, IntentRule


class IntentClassifier(Protocol):
    def classify(self, text: str, hint: str = "") -> tuple[str | None, str]: ...


class RuleClassifier:
    def __init__(self, rules: list[IntentRule], capabilities: set[str] | None = None):
        self.capabilities = set(capabilities or ()) | {r.capability for r in rules}
        self._rules = []
        for r in rules:
            kw = [(k, re.compile(r"(?<!\w)" + re.escape(k) + r"(?!\w)", re.IGNORECASE)) for k in r.keywords]
            rx = [(x, re.compile(x, re.IGNORECASE)) for x in r.regex]
            self._rules.append((r.capability, kw, rx))

    @classmethod
    def from_catalog(cls, catalog: Catalog) -> RuleClassifier:
        caps = {c for m in [*catalog.models, *catalog.adapters] for c in m.capabilities}
        return cls(catalog.intents, caps)

    def classify(self, text: str, hint: str = "") -> tuple[str | None, str]:
        h = (hint or "").strip().lower()
        if h == "auto":   # "let the router decide" (switchyard generate without --model)
            hint, h = "", ""
        if h and h in self.capabilities:
            return h, f"intent {h!r} names a capability"
        probe = f"{hint}\n{text}" if hint else text
        for cap, kws, rxs in self._rules:
            for word, pat in kws:
                if pat.search(probe):
                    return cap, f"keyword {word!r} -> {cap}"
            for src, pat in rxs:
                if pat.search(probe):
                    return cap, f"regex {src!r} -> {cap}"
        return None, "no intent rule matched"


def load_classifier(catalog: Catalog) -> IntentClassifier:
    spec = catalog.pool.intent_classifier
    if not spec:
        return RuleClassifier.from_catalog(catalog)
    mod, _, attr = spec.partition(":")
    factory = getattr(importlib.import_module(mod), attr or "make_classifier")
    return factory(catalog)
