import sys
import textwrap

import pytest

from onecomp_core.errors import OnecompError, UnknownNameError
from onecomp_core.hookspecs import hookimpl
from onecomp_core.plugins import load_plugins
from onecomp_core.projectors import RTN
from onecomp_core.registry import Registry


def test_core_and_installed_plugins_register_by_name():
    ps = load_plugins()
    reg = ps.registry
    assert "rtn" in reg.names("projector") and "gptq" in reg.names("projector")
    assert reg.source("projector", "gptq") == "gptq"
    assert reg.source("projector", "rtn") == "core"
    assert "uniform" in reg.names("format") and "uniform" in reg.names("planner")
    assert "decoder" in reg.names("model_adapter")
    names = {p.name for p in ps.plugins}
    assert {"core", "gptq", "example"} <= names


def test_unknown_name_lists_known_ones():
    reg = load_plugins().registry
    with pytest.raises(UnknownNameError, match=r"unknown projector 'nope'; known: .*gptq.*jointq.*rtn"):
        reg.get("projector", "nope")


def test_a_name_registered_twice_is_used_by_neither_and_the_rest_still_loads(capsys):
    class Dup:
        @hookimpl
        def onecomp_register_projectors(self, registry):
            registry.add_projector(type("Other", (RTN,), {"name": "rtn"}))
            registry.add_projector(type("Mine", (RTN,), {"name": "mine"}))
    ps = load_plugins(extra=[Dup()])
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if "'rtn'" in ln]
    assert len(lines) == 1 and "'core'" in lines[0] and "'Dup-0'" in lines[0]
    with pytest.raises(UnknownNameError, match="projector 'rtn' is registered by plugins 'core' and 'Dup-0'; uninstall one"):
        ps.registry.get("projector", "rtn")
    assert ps.registry.get("projector", "mine").name == "mine"           # its other components still work
    assert "gptq" in ps.registry.names("projector") and "uniform" in ps.registry.names("format")


def test_a_misspelt_hook_is_one_line_naming_the_plugin(capsys):
    class Typo:
        @hookimpl
        def onecomp_register_projector(self, registry):      # no such hook: the spec is ..._projectors
            registry.add_projector(type("T", (RTN,), {"name": "typo"}))

        @hookimpl
        def onecomp_register_formats(self, registry):
            raise AssertionError("a plugin that failed validation must not be called")
    ps = load_plugins(extra=[Typo()])
    err = [ln for ln in capsys.readouterr().err.splitlines() if "Typo" in ln]
    assert len(err) == 1 and "'onecomp_register_projector', which is not an onecomp hook" in err[0]
    assert [p.name for p in ps.failed] == ["Typo-0"]
    assert "typo" not in ps.registry.names("projector") and "gptq" in ps.registry.names("projector")


def test_a_hook_with_wrong_arguments_is_refused():
    class Wrong:
        @hookimpl
        def onecomp_register_projectors(self, reg):           # the argument is called registry
            pass
    ps = load_plugins(extra=[Wrong()])
    assert ps.failed and "reg" in ps.failed[0].error
    assert "rtn" in ps.registry.names("projector")


def test_a_plugin_that_raises_while_registering_contributes_nothing(capsys):
    class Half:
        @hookimpl
        def onecomp_register_projectors(self, registry):
            registry.add_projector(type("H", (RTN,), {"name": "half"}))
            raise RuntimeError("needs a GPU library")

        @hookimpl
        def onecomp_stage_start(self, stage, info):
            raise AssertionError("a plugin that failed to register must not observe the run")
    ps = load_plugins(extra=[Half()])
    assert "raised while registering: RuntimeError: needs a GPU library" in ps.failed[0].error
    assert "half" not in ps.registry.names("projector")
    ps.hook.onecomp_stage_start(stage="x", info={})                  # its observation hook is gone too


def test_registration_goes_through_pluggy_hook_callers():
    """pluggy's call monitoring sees every registration hook call (one per plugin and kind)."""
    import pluggy
    from onecomp_core import plugins as mod
    calls = []
    real = pluggy.PluginManager.subset_hook_caller

    def spy(self, name, remove_plugins):
        caller = real(self, name, remove_plugins)
        calls.append((name, [i.plugin_name for i in caller.get_hookimpls()]))
        return caller
    pluggy.PluginManager.subset_hook_caller = spy
    try:
        mod.load_plugins()
    finally:
        pluggy.PluginManager.subset_hook_caller = real
    assert ("onecomp_register_projectors", ["gptq"]) in calls
    assert all(len(impls) <= 1 for _, impls in calls)                  # one plugin at a time


def test_unknown_name_of_a_shipped_algorithm_names_its_distribution():
    reg = load_plugins(autoload=False).registry                       # only the core
    with pytest.raises(UnknownNameError, match="unknown projector 'gptq'; known: rtn; it is provided by "
                                               "onecomp-plugins-gptq: pip install onecomp-plugins-gptq"):
        reg.get("projector", "gptq")
    with pytest.raises(UnknownNameError, match="pip install onecomp-plugin-lpcd"):
        reg.get("refiner", "lpcd")


def test_component_without_name_is_refused():
    reg = Registry()
    with pytest.raises(OnecompError, match="no `name`"):
        reg.add("projector", type("Nameless", (), {}))


@pytest.fixture
def broken_plugin(tmp_path, monkeypatch):
    """A distribution on sys.path whose entry point fails to import."""
    dist = tmp_path / "onecomp_broken-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: onecomp-broken\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[onecomp]\nbroken = onecomp_broken_mod\n")
    (tmp_path / "onecomp_broken_mod.py").write_text("raise ImportError('needs a library that is not installed')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib
    importlib.invalidate_caches()
    yield "broken"
    sys.modules.pop("onecomp_broken_mod", None)


def test_broken_plugin_is_reported_and_others_still_load(broken_plugin, capsys):
    ps = load_plugins()
    failed = {p.name: p.error for p in ps.failed}
    assert "broken" in failed and "needs a library" in failed["broken"]
    assert "gptq" in ps.registry.names("projector")
    assert "plugin 'broken' failed to load" in capsys.readouterr().err


def test_cli_plugins_lists_failure(broken_plugin, capsys):
    from onecomp_core.cli import main
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "gptq" in out and "projector gptq" in out and "FAILED" in out
    assert main(["plugins", "--strict"]) == 1


def test_environment_switches(monkeypatch):
    monkeypatch.setenv("ONECOMP_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert load_plugins().registry.names("projector") == ["rtn"]
    monkeypatch.delenv("ONECOMP_DISABLE_PLUGIN_AUTOLOAD")
    monkeypatch.setenv("ONECOMP_PLUGINS", "gptq")
    ps = load_plugins()
    assert "gptq" in ps.registry.names("projector") and "rescale" not in ps.registry.names("refiner")


class Recorder:
    def __init__(self):
        self.events = []

    @hookimpl
    def onecomp_stage_start(self, stage, info):
        self.events.append(("start", stage))

    @hookimpl
    def onecomp_stage_finish(self, stage, info):
        self.events.append(("finish", stage))

    @hookimpl
    def onecomp_block_done(self, index, total, info):
        self.events.append(("block", index, total))

    @hookimpl
    def onecomp_layer_done(self, block, name, info):
        self.events.append(("layer", name, info["rel_error"]))

    @hookimpl
    def onecomp_run_finish(self, report):
        self.events.append(("run", report["summary"]["bpw"]))


def test_observation_hooks_see_the_run(tiny_llama, tmp_path):
    import onecomp_core
    from onecomp_core.testing import quick
    rec = Recorder()
    onecomp_core.quantize(tiny_llama, tmp_path / "q", plugins=[rec], **quick())
    kinds = [e[0] for e in rec.events]
    assert ("start", "layerwise") in rec.events and ("finish", "layerwise") in rec.events
    assert [e for e in rec.events if e[0] == "block"] == [("block", 0, 2), ("block", 1, 2)]
    layers = [e for e in rec.events if e[0] == "layer"]
    assert len(layers) == 14 and all(0 < e[2] < 1 for e in layers)
    assert kinds[-1] == "run"


def test_a_registry_filled_directly_refuses_a_taken_name():
    reg = Registry()
    reg.add_projector(RTN)
    with pytest.raises(OnecompError, match="projector 'rtn' is already registered"):
        reg.add_projector(type("Other", (RTN,), {"name": "rtn"}))
    assert reg.get("projector", "rtn") is RTN
