"""Plugin discovery: entry-point group ``onecomp``, guarded loading, the component registry.

Environment switches:
  ONECOMP_DISABLE_PLUGIN_AUTOLOAD=1   load only the core's built-ins (and plugins passed in code)
  ONECOMP_PLUGINS=a,b                 load only the named entry points (plus the core)
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass, field

import pluggy

from . import hookspecs
from .registry import KINDS, Registry

try:  # Python 3.10+ stdlib, with the backport as a fallback for older interpreters
    from importlib.metadata import entry_points
except ImportError:  # pragma: no cover
    from importlib_metadata import entry_points  # type: ignore

GROUP = "onecomp"
CORE = "core"


@dataclass
class PluginInfo:
    name: str
    module: str
    distribution: str = ""
    version: str = ""
    error: str = ""
    registers: list = field(default_factory=list)


@dataclass
class PluginSet:
    manager: pluggy.PluginManager
    registry: Registry
    plugins: list[PluginInfo]

    @property
    def hook(self):
        return self.manager.hook

    @property
    def failed(self) -> list[PluginInfo]:
        return [p for p in self.plugins if p.error]


def _entry_points():
    eps = entry_points()
    return list(eps.select(group=GROUP)) if hasattr(eps, "select") else list(eps.get(GROUP, []))


def load_plugins(extra: list | tuple = (), autoload: bool | None = None) -> PluginSet:
    """Load the core and every ``onecomp`` entry point; a plugin that fails to import is
    recorded with its error and the others still load. ``extra`` are plugin objects (modules
    or instances with hookimpls) registered in code, e.g. by tests."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    if autoload is None:
        autoload = os.environ.get("ONECOMP_DISABLE_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes")
    only = {n.strip() for n in os.environ.get("ONECOMP_PLUGINS", "").split(",") if n.strip()}

    from . import builtin
    pm.register(builtin, name=CORE)
    infos.append(PluginInfo(CORE, builtin.__name__, "onecomp-core", _version("onecomp-core")))

    if autoload:
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            if ep.name == CORE or (only and ep.name not in only):
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, ep.value, getattr(dist, "name", "") or "",
                              getattr(dist, "version", "") or "")
            infos.append(info)
            if pm.has_plugin(ep.name):
                info.error = "another plugin with this entry-point name is already loaded"
                continue
            try:
                pm.register(ep.load(), name=ep.name)
            except Exception as exc:  # a broken plugin must not stop the others
                info.error = f"{type(exc).__name__}: {exc}".splitlines()[0]
                print(f"onecomp: warning: plugin {ep.name!r} failed to load: {info.error}", file=sys.stderr)
    for i, obj in enumerate(extra):
        name = getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}"
        pm.register(obj, name=name)
        infos.append(PluginInfo(name, getattr(obj, "__module__", "") or str(name)))

    registry = Registry()
    for kind in KINDS:
        hook = getattr(pm.hook, f"onecomp_register_{kind}s")
        for impl in sorted(hook.get_hookimpls(), key=lambda i: i.plugin_name):
            registry.current_plugin = impl.plugin_name
            impl.function(registry=registry)
    registry.current_plugin = "<direct>"
    for info in infos:
        info.registers = registry.by_plugin.get(info.name, [])
    return PluginSet(pm, registry, infos)


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return ""
