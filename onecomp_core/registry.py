"""Named components, by kind. Duplicate or unknown names are errors that list the known ones."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from .errors import OnecompError, UnknownNameError

KINDS = ("planner", "preprocessor", "projector", "refiner", "format", "model_adapter")


class Registry:
    def __init__(self) -> None:
        self._items: dict[str, dict[str, type]] = {k: {} for k in KINDS}
        self._source: dict[tuple[str, str], str] = {}
        self.by_plugin: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.current_plugin = "<direct>"

    def add(self, kind: str, cls: type) -> None:
        if kind not in self._items:
            raise OnecompError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise OnecompError(f"{cls.__qualname__} (plugin {self.current_plugin!r}) has no `name` string")
        if name in self._items[kind]:
            first = self._source[(kind, name)]
            raise OnecompError(
                f"duplicate {kind} name {name!r}: registered by plugin {first!r} and again by "
                f"{self.current_plugin!r}; uninstall one of them or rename the component"
            )
        self._items[kind][name] = cls
        self._source[(kind, name)] = self.current_plugin
        self.by_plugin[self.current_plugin].append((kind, name))

    # thin helpers so plugins read naturally: registry.add_projector(GPTQ)
    def add_planner(self, cls): self.add("planner", cls)
    def add_preprocessor(self, cls): self.add("preprocessor", cls)
    def add_projector(self, cls): self.add("projector", cls)
    def add_refiner(self, cls): self.add("refiner", cls)
    def add_format(self, cls): self.add("format", cls)
    def add_model_adapter(self, cls): self.add("model_adapter", cls)

    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def get(self, kind: str, name: str) -> type:
        try:
            return self._items[kind][name]
        except KeyError:
            known = ", ".join(self.names(kind)) or "none installed"
            hint = " (install the plugin that provides it, see `onecomp plugins`)"
            raise UnknownNameError(f"unknown {kind} {name!r}; known: {known}{hint}") from None

    def source(self, kind: str, name: str) -> str:
        return self._source[(kind, name)]

    def items(self, kind: str) -> dict[str, Any]:
        return dict(self._items[kind])
