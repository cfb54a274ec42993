"""The LoRA adapters the router knows, whoever declared them: the catalogue's [[adapters]], the stack
config's lora_adapters, or Admin/LoadAdapter at run time.

An entry names its base model (a catalogue name or a served model name; a served name
`<name>@<version>` matches its catalogue name) and the PEFT folder the workers read. Workers
advertise the adapters they hold in their heartbeats; the router pushes registered adapters to the
workers of their base that lack them (router/adapter_control.py), so replicas started later serve
them too. Routing reads this registry for adapter names, capabilities and intents.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from common.catalog import split_served


@dataclass
class AdapterEntry:
    name: str
    base: str                                   # base model: catalogue or served name
    path: str                                   # PEFT folder (adapter_config.json + adapter_model.safetensors)
    capabilities: list[str] = field(default_factory=list)
    origin: str = "admin"                       # catalogue | config | admin

    def serves_on(self, model: str) -> bool:
        """Whether a worker serving `model` (a served name) is a base for this adapter."""
        return model == self.base or split_served(model)[0] == split_served(self.base)[0]


class AdapterRegistry:
    def __init__(self) -> None:
        self._entries: dict[str, AdapterEntry] = {}

    def add(self, entry: AdapterEntry) -> None:
        self._entries[entry.name] = entry

    def remove(self, name: str) -> AdapterEntry | None:
        return self._entries.pop(name, None)

    def get(self, name: str) -> AdapterEntry | None:
        return self._entries.get(name)

    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def all(self) -> list[AdapterEntry]:
        return sorted(self._entries.values(), key=lambda e: e.name)
