"""Named components, by kind. Each plugin's registrations are taken as one unit: a plugin whose
registration fails leaves nothing behind. A name registered by two plugins is kept by neither:
asking for it is an error naming both. An unknown name is an error listing the known ones and,
for the algorithms this project ships, the distribution that provides it."""
from __future__ import annotations

from collections import defaultdict
from typing import Any

from .errors import OnecompError, UnknownNameError

KINDS = ("planner", "preprocessor", "projector", "refiner", "format", "model_adapter", "exporter")

# components shipped as separate distributions of this project: (kind, name) -> distribution
CATALOG = {
    ("projector", "gptq"): "onecomp-plugins-gptq",
    ("projector", "jointq"): "onecomp-plugin-jointq",
    ("projector", "dbf"): "onecomp-plugins-dbf",
    ("format", "dbf"): "onecomp-plugins-dbf",
    ("projector", "mdbf"): "onecomp-plugin-mdbf",
    ("format", "mdbf"): "onecomp-plugin-mdbf",
    ("refiner", "qep"): "onecomp-plugin-qep",
    ("refiner", "lpcd"): "onecomp-plugin-lpcd",
    ("refiner", "blockcomp"): "onecomp-plugin-blockcomp",
    ("refiner", "blockptq"): "onecomp-plugin-blockptq",
    ("refiner", "globalptq"): "onecomp-plugin-globalptq",
    ("refiner", "rescale"): "onecomp-plugin-example",
    ("preprocessor", "colscale"): "onecomp-plugin-example",
    ("planner", "autobit"): "onecomp-plugin-autobit",
}


class Registry:
    def __init__(self) -> None:
        self._items: dict[str, dict[str, type]] = {k: {} for k in KINDS}
        self._source: dict[tuple[str, str], str] = {}
        self.conflicts: dict[tuple[str, str], list[str]] = {}
        self.by_plugin: dict[str, list[tuple[str, str]]] = defaultdict(list)
        self.current_plugin = "<direct>"
        self._staged: list[tuple[str, str, type]] | None = None

    # -- one plugin at a time ---------------------------------------------------------------
    def begin(self, plugin: str) -> None:
        """Start collecting ``plugin``'s registrations; ``commit`` adds them, ``rollback`` drops them."""
        self.current_plugin, self._staged = plugin, []

    def commit(self) -> list[str]:
        """Add the staged registrations; -> one warning line per name another plugin already holds."""
        warnings = []
        for kind, name, cls in self._staged or []:
            key = (kind, name)
            if key in self.conflicts:
                self.conflicts[key].append(self.current_plugin)
            elif name in self._items[kind]:
                first = self._source.pop(key)
                del self._items[kind][name]
                self.conflicts[key] = [first, self.current_plugin]
            else:
                self._items[kind][name] = cls
                self._source[key] = self.current_plugin
            if key in self.conflicts:
                warnings.append(f"{kind} {name!r} is registered by plugins {' and '.join(map(repr, self.conflicts[key]))}; "
                                f"neither is used: uninstall one of them or rename the component")
            self.by_plugin[self.current_plugin].append(key)
        self._staged, self.current_plugin = None, "<direct>"
        return warnings

    def rollback(self) -> None:
        self._staged, self.current_plugin = None, "<direct>"

    # -- adding ------------------------------------------------------------------------------
    def add(self, kind: str, cls: type) -> None:
        if kind not in self._items:
            raise OnecompError(f"unknown component kind {kind!r}; kinds: {', '.join(KINDS)}")
        name = getattr(cls, "name", None)
        if not isinstance(name, str) or not name:
            raise OnecompError(f"{cls.__qualname__} (plugin {self.current_plugin!r}) has no `name` string")
        if kind == "refiner" and not getattr(cls, "scopes", lambda: ())():
            raise OnecompError(f"refiner {name!r} (plugin {self.current_plugin!r}) subclasses none of Correction, "
                               f"BlockRefiner, ModelRefiner")
        if self._staged is not None:
            if any(k == kind and n == name for k, n, _ in self._staged):
                raise OnecompError(f"{kind} {name!r} is registered twice by plugin {self.current_plugin!r}")
            self._staged.append((kind, name, cls))
            return
        key = (kind, name)                       # outside a plugin (code that fills a registry itself)
        if name in self._items[kind] or key in self.conflicts:
            raise OnecompError(f"{kind} {name!r} is already registered (by {self._source.get(key, 'two plugins')!r}); "
                               f"rename the component")
        self._items[kind][name] = cls
        self._source[key] = self.current_plugin
        self.by_plugin[self.current_plugin].append(key)

    # thin helpers so plugins read naturally: registry.add_projector(GPTQ)
    def add_planner(self, cls): self.add("planner", cls)
    def add_preprocessor(self, cls): self.add("preprocessor", cls)
    def add_projector(self, cls): self.add("projector", cls)
    def add_refiner(self, cls): self.add("refiner", cls)
    def add_format(self, cls): self.add("format", cls)
    def add_model_adapter(self, cls): self.add("model_adapter", cls)
    def add_exporter(self, cls): self.add("exporter", cls)

    # -- lookup ------------------------------------------------------------------------------
    def names(self, kind: str) -> list[str]:
        return sorted(self._items[kind])

    def get(self, kind: str, name: str) -> type:
        try:
            return self._items[kind][name]
        except KeyError:
            pass
        if (kind, name) in self.conflicts:
            who = " and ".join(map(repr, self.conflicts[(kind, name)]))
            raise UnknownNameError(f"{kind} {name!r} is registered by plugins {who}; uninstall one of them "
                                   f"(see `onecomp plugins`)")
        known = ", ".join(self.names(kind)) or "none installed"
        dist = CATALOG.get((kind, name))
        hint = f"; it is provided by {dist}: pip install {dist}" if dist else \
            " (install the plugin that provides it, see `onecomp plugins`)"
        raise UnknownNameError(f"unknown {kind} {name!r}; known: {known}{hint}")

    def source(self, kind: str, name: str) -> str:
        return self._source[(kind, name)]

    def items(self, kind: str) -> dict[str, Any]:
        return dict(self._items[kind])
