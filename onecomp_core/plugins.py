"""Plugin discovery: entry-point group ``onecomp``, guarded loading, the component registry.

Every registration goes through pluggy's hook callers (so ``pm.trace`` and call monitoring see
it), one plugin at a time, so that what a plugin registers is attributed to it. A plugin that
fails to import, implements a hook that does not exist (a misspelt name), implements one with
wrong arguments or raises while registering is reported in one line naming it, and contributes
nothing; the others load as usual.

Environment switches:
  ONECOMP_DISABLE_PLUGIN_AUTOLOAD=1   load only the core's built-ins (and plugins passed in code)
  ONECOMP_PLUGINS=a,b                 load only the named entry points (plus the core)
"""
from __future__ import annotations

import os
import re
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
    warnings: list = field(default_factory=list)
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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def _warn(info: PluginInfo, what: str) -> None:
    print(f"onecomp: warning: plugin {info.name!r} {what}", file=sys.stderr)


def _register(pm: pluggy.PluginManager, obj, info: PluginInfo) -> bool:
    """Add one plugin object to the manager; False (and ``info.error``) when it does not validate:
    a hook implemented with wrong argument names (refused by ``register``) or a hook that is not
    a hookspec, e.g. a misspelt name (pluggy's ``check_pending``, run after each plugin so that
    only this one can be at fault)."""
    try:
        pm.register(obj, name=info.name)
        pm.check_pending()
    except Exception as exc:               # pluggy.PluginValidationError
        if pm.get_plugin(info.name) is not None:
            pm.unregister(name=info.name)
        unknown = re.match(r"unknown hook '(\w+)'", str(exc))
        info.error = (f"implements {unknown.group(1)!r}, which is not an onecomp hook (misspelt? see "
                      f"onecomp_core.hookspecs)" if unknown else _first_line(exc))
        return False
    return True


def load_plugins(extra: list | tuple = (), autoload: bool | None = None) -> PluginSet:
    """Load the core and every ``onecomp`` entry point, then collect their components. ``extra``
    are plugin objects (modules or instances with hookimpls) registered in code, e.g. by tests."""
    pm = pluggy.PluginManager(hookspecs.PROJECT)
    pm.add_hookspecs(hookspecs)
    infos: list[PluginInfo] = []
    if autoload is None:
        autoload = os.environ.get("ONECOMP_DISABLE_PLUGIN_AUTOLOAD", "") not in ("1", "true", "yes")
    only = {n.strip() for n in os.environ.get("ONECOMP_PLUGINS", "").split(",") if n.strip()}

    from . import builtin
    core = PluginInfo(CORE, builtin.__name__, "onecomp-core", _version("onecomp-core"))
    infos.append(core)
    _register(pm, builtin, core)

    if autoload:
        for ep in sorted(_entry_points(), key=lambda e: e.name):
            if ep.name == CORE or (only and ep.name not in only):
                continue
            dist = getattr(ep, "dist", None)
            info = PluginInfo(ep.name, ep.value, getattr(dist, "name", "") or "", getattr(dist, "version", "") or "")
            infos.append(info)
            if pm.has_plugin(ep.name):
                info.error = "another plugin with this entry-point name is already loaded"
            else:
                try:
                    obj = ep.load()
                except Exception as exc:  # a broken plugin must not stop the others
                    info.error = _first_line(exc)
                else:
                    _register(pm, obj, info)
            if info.error:
                _warn(info, f"failed to load: {info.error}")
    for i, obj in enumerate(extra):
        name = getattr(obj, "__name__", None) or f"{type(obj).__name__}-{i}"
        info = PluginInfo(name, getattr(obj, "__module__", "") or str(name))
        infos.append(info)
        if not _register(pm, obj, info):
            _warn(info, f"failed to load: {info.error}")

    registry = _collect(pm, infos)
    return PluginSet(pm, registry, infos)


def _collect(pm: pluggy.PluginManager, infos: list[PluginInfo]) -> Registry:
    """Call every registration hook through pluggy, one plugin at a time (in name order, the
    core first), each plugin's registrations taken or dropped as a unit."""
    registry = Registry()
    loaded = [i for i in infos if not i.error]
    plugins = {i.name: pm.get_plugin(i.name) for i in loaded}
    for info in loaded:
        others = [p for n, p in plugins.items() if n != info.name]
        registry.begin(info.name)
        try:
            for kind in KINDS:
                caller = pm.subset_hook_caller(f"onecomp_register_{kind}s", remove_plugins=others)
                caller(registry=registry)
        except Exception as exc:
            registry.rollback()
            pm.unregister(name=info.name)            # its observation hooks go too
            info.error = f"raised while registering: {_first_line(exc)}"
            _warn(info, f"failed to load: {info.error}")
            continue
        for line in registry.commit():
            info.warnings.append(line)
            print(f"onecomp: warning: {line}", file=sys.stderr)
    for info in infos:
        info.registers = registry.by_plugin.get(info.name, [])
    return registry


def _version(dist: str) -> str:
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return ""
