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
    assert c.allow(R("mine"), {"memory_bytes": 10**12})          # named by the user: always runs
    assert c.allow(R("a"), {"memory_bytes": 4 * 10**8, "seconds": 5}, base=5 * 10**8)
    assert not c.allow(R("b"), {"memory_bytes": 6 * 10**8}, base=5 * 10**8)
    assert c.allow(R("c"), None)                                 # no estimate: runs
    err = capsys.readouterr().err.splitlines()
    assert err == ["onecomp: mine runs: named in the config (~931.3 GB)", "onecomp: a runs: ~858 MB, ~5 s",
                   "onecomp: b skipped: needs ~1.0 GB, max-memory 954 MB", "onecomp: c runs: no estimate"]
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


def test_max_memory_below_the_pivots_needs_stops_before_any_work(tiny_llama, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(OnecompError, match=r"^--max-memory 10 MB is below what the layer-wise pass needs \(~\d+ MB\)"):
        onecomp_core.quantize(tiny_llama, out, max_memory="10MB", projector="rtn", num_samples=2, seq_len=32)
    assert not out.exists() and not (tmp_path / "q.onecomp-partial" / "blocks").exists()


def test_config_refuses_bad_refine_fields(tiny_llama, tmp_path):
    for kw, msg in (({"refine": "sometimes"}, "'manual'"), ({"time_budget": "later"}, "duration"),
                    ({"max_memory": -3}, "size")):
        with pytest.raises(OnecompError, match=msg):
            onecomp_core.quantize(tiny_llama, tmp_path / "q", **kw)
