"""The resource-adaptive refine choice: units, the decision, the pivot's own needs."""
import types

import pytest
import torch

import onecomp_core
from onecomp_core.errors import OnecompError
from onecomp_core.fit import RefineChoice
from onecomp_core.resources import machine_memory, parse_duration, parse_size


def test_units():
    assert parse_size("6GiB") == 6 * 2**30 and parse_size("500MB") == 500 * 10**6 and parse_size(7) == 7
    assert parse_duration("45m") == 2700 and parse_duration("2h") == 7200 and parse_duration("1h30m") == 5400
    assert parse_duration("90s") == 90 and parse_duration(12) == 12 and parse_duration("10min") == 600
    for bad in ("soon", "5 parsecs", "", "1h 2x"):
        with pytest.raises(OnecompError, match="cannot read the duration"):
            parse_duration(bad)
    assert machine_memory(torch.device("cpu")) > 2**28


def _run(**kw):
    return types.SimpleNamespace(max_memory=kw.get("max_memory"), time_budget=kw.get("time_budget"))


class R:
    def __init__(self, name):
        self.name = name


def test_the_choice_skips_what_does_not_fit_and_says_why(capsys):
    c = RefineChoice(_run(max_memory="1GB"), ["a", "b", "c"], torch.device("cpu"), t_start=0.0)
    assert c.allow(R("mine"), {"memory_bytes": 9 * 10**8})       # named by the user: runs
    assert c.allow(R("a"), {"memory_bytes": 4 * 10**8, "seconds": 5}, base=5 * 10**8)
    assert not c.allow(R("b"), {"memory_bytes": 6 * 10**8}, base=5 * 10**8)
    assert c.allow(R("c"), None)                                 # no estimate: runs
    err = capsys.readouterr().err.splitlines()
    assert err == ["onecomp: mine runs: named in the config (~858 MiB)", "onecomp: a runs: ~858 MiB, ~5 s",
                   "onecomp: b skipped: needs ~1.0 GiB, max-memory 954 MiB", "onecomp: c runs: no estimate"]
    assert [d["run"] for d in c.decisions] == [True, True, False, True] and c.decisions[1]["predicted_peak_mb"] == 858.3
    # a peak already reached by work the step repeats (the held-out judgement) raises the predicted
    # peak, never the verdict: the refiner's own need is what must fit
    f = RefineChoice(_run(max_memory="1GB"), ["a"], torch.device("cpu"), t_start=0.0)
    assert f.allow(R("a"), {"memory_bytes": 4 * 10**8}, floor=2 * 10**9)
    assert f.decisions[0]["predicted_peak_mb"] == 1907.3 and f.decisions[0]["predicted_refiner_mb"] == 381.5
    assert f.allow(R("a"), {"memory_bytes": 4 * 10**8}, floor=10**8) and "predicted_refiner_mb" not in f.decisions[1]
    import time
    t = RefineChoice(_run(time_budget="10m"), ["a"], torch.device("cpu"), t_start=time.time() - 590)
    assert not t.allow(R("a"), {"memory_bytes": 1, "seconds": 60})
    assert "a skipped: needs ~60 s, 10 s left of the time budget" in capsys.readouterr().err


def test_a_named_refiner_over_an_explicit_max_memory_stops_with_one_line_and_the_machines_limit_does_not(capsys):
    c = RefineChoice(_run(max_memory="1GB"), [], torch.device("cpu"), t_start=0.0)
    with pytest.raises(OnecompError, match=r"^mine needs ~931.3 GiB, over --max-memory 954 MiB: raise --max-memory or "
                                           r"drop --refiner mine$"):
        c.allow(R("mine"), {"memory_bytes": 10**12, "seconds": 5})
    assert c.decisions == []
    # no --max-memory: the machine's memory is only the default, a named refiner runs (and is timed)
    m = RefineChoice(_run(), [], torch.device("cpu"), t_start=0.0)
    assert m.allow(R("mine"), {"memory_bytes": 10**15, "seconds": lambda: 7.0})
    assert m.decisions[0]["predicted_seconds"] == 7.0 and "named in the config" in capsys.readouterr().err


def test_a_callable_time_probe_runs_only_when_the_memory_fits(capsys):
    probed = []

    def probe():
        probed.append(1)
        return 60.0
    c = RefineChoice(_run(max_memory="1GB"), ["a", "b"], torch.device("cpu"), t_start=0.0)
    assert not c.allow(R("a"), {"memory_bytes": 2 * 10**9, "seconds": probe})
    assert probed == [] and c.decisions[0]["predicted_seconds"] is None
    assert c.allow(R("b"), {"memory_bytes": 10**8, "seconds": probe})
    assert probed == [1] and c.decisions[1]["predicted_seconds"] == 60.0
    assert capsys.readouterr().err.splitlines() == ["onecomp: a skipped: needs ~1.9 GiB, max-memory 954 MiB",
                                                    "onecomp: b runs: ~95 MiB, ~60 s"]


def test_max_memory_below_the_pivots_needs_stops_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(OnecompError, match=r"^--max-memory 10 MiB is below what the layer-wise pass needs \(~\d+ MiB\)"):
        onecomp_core.quantize(tiny_llama, out, max_memory="10MB", projector="rtn", num_samples=2, seq_len=32)
    assert not out.exists() and not (tmp_path / "q.onecomp-partial" / "blocks").exists()


def test_config_refuses_bad_refine_fields(tiny_llama, tmp_path):
    for kw, msg in (({"refine": "sometimes"}, "'manual'"), ({"time_budget": "later"}, "duration"),
                    ({"max_memory": -3}, "size")):
        with pytest.raises(OnecompError, match=msg):
            onecomp_core.quantize(tiny_llama, tmp_path / "q", **kw)


class _Hungry:
    """Refiners the config names whose estimate is far over any --max-memory the tests give."""
    from onecomp_core.sdk import BlockRefiner, ModelRefiner, hookimpl

    class Model(ModelRefiner):
        name = "hungry-model"

        def estimate(self, mctx):
            return {"memory_bytes": 10**13, "seconds": 1.0}

        def refine(self, mctx):
            raise AssertionError("a refused refiner must not start")

    class Block(BlockRefiner):
        name = "hungry-block"

        def estimate(self, ectx):
            return {"memory_bytes": 10**13}

        def refine_block(self, bctx):
            raise AssertionError("a refused refiner must not start")

    @hookimpl
    def onecomp_register_refiners(self, registry):
        registry.add_refiner(_Hungry.Model)
        registry.add_refiner(_Hungry.Block)


def test_a_named_block_refiner_over_max_memory_stops_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(OnecompError, match=r"^hungry-block needs ~93\d\d\.\d GiB, over --max-memory 64.0 GiB"):
        onecomp_core.quantize(tiny_llama, out, max_memory="64GiB", projector="rtn", num_samples=2, seq_len=32,
                              refiners=["hungry-block"], plugins=[_Hungry()])
    assert not out.exists() and not (tmp_path / "q.onecomp-partial" / "blocks").exists()


def test_a_named_model_refiner_over_max_memory_stops_after_the_pivot_is_saved(tiny_llama, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(OnecompError, match=r"^hungry-model needs ~9313.2 GiB, over --max-memory 64.0 GiB: raise "
                                           r"--max-memory or drop --refiner hungry-model$"):
        onecomp_core.quantize(tiny_llama, out, max_memory="64GiB", projector="rtn", num_samples=2, seq_len=32,
                              refiners=["hungry-model"], plugins=[_Hungry()])
    model = onecomp_core.load_quantized(out)                   # the pivot is there, complete
    assert model(torch.zeros(1, 4, dtype=torch.long)).logits.shape[:2] == (1, 4)
    files = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    with pytest.raises(OnecompError, match=r"^hungry-model needs"):          # refining it later: the same line,
        onecomp_core.refine(out, refiners=["hungry-model"], max_memory="64GiB", plugins=[_Hungry()])
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == files
    assert not (tmp_path / "q.onecomp-refine").exists()                # and nothing left to resume


class _Failing:
    """Model refiners that stop with one line: one before keeping any state, one after."""
    from onecomp_core.sdk import ModelRefiner, hookimpl

    class Early(ModelRefiner):
        name = "fails-early"

        def refine(self, mctx):
            raise OnecompError("fails-early cannot refine this checkpoint")

    class Late(ModelRefiner):
        name = "fails-late"

        def refine(self, mctx):
            mctx.scratch.mkdir(parents=True, exist_ok=True)
            (mctx.scratch / "epoch-1.pt").write_bytes(b"state")          # what a rerun would resume from
            raise OnecompError("fails-late stopped after its first epoch")

    @hookimpl
    def onecomp_register_refiners(self, registry):
        registry.add_refiner(_Failing.Early)
        registry.add_refiner(_Failing.Late)


def test_a_refine_that_stops_before_keeping_any_state_leaves_no_work_folder(tiny_llama, tmp_path):
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, projector="rtn", num_samples=2, seq_len=32)
    files = {p.name: p.read_bytes() for p in out.glob("*.safetensors")}
    with pytest.raises(OnecompError, match="^fails-early cannot refine"):
        onecomp_core.refine(out, refiners=["fails-early"], plugins=[_Failing()])
    assert not (tmp_path / "q.onecomp-refine").exists()                # nothing to resume: nothing left
    with pytest.raises(OnecompError, match="^fails-late stopped"):
        onecomp_core.refine(out, refiners=["fails-late"], plugins=[_Failing()])
    assert (tmp_path / "q.onecomp-refine" / "refiner-fails-late" / "epoch-1.pt").is_file()   # kept for the rerun
    assert {p.name: p.read_bytes() for p in out.glob("*.safetensors")} == files
