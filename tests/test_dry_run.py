"""A dry run (``--dry-run``): the run up to its plan and the refiners' choice, reported, with
nothing written in or beside ``--out``; its plan and bits per weight are the real run's."""
import json
import re

import pytest

import onecomp_core
from onecomp_core.cli import main
from onecomp_core.errors import OnecompError
from onecomp_core.hookspecs import hookimpl
from onecomp_core.testing import installed, quick


def files_under(folder):
    return {p.relative_to(folder): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_dry_run_writes_nothing_and_plans_what_the_run_does(tiny_llama, tmp_path):
    out = tmp_path / "q"
    dry = onecomp_core.quantize(tiny_llama, out, dry_run=True, **quick(bits=3, projector="gptq", num_samples=4))
    assert list(tmp_path.iterdir()) == []                       # no output, no work folder
    s = dry["summary"]
    assert dry["dry_run"] and s["outlook"] == "new" and dry["outlook"] == "a new run"
    assert s["modules"] == 14 and s["blocks"] == 2 and s["resumes_after_block"] == 0
    assert dry["plan_counts"] == {"gptq uniform 3-bit g32": 14}
    assert 0 < s["predicted_layerwise_peak_mb"] < s["max_memory_mb"] and not s["max_memory_explicit"]
    assert s["timed_block_seconds"] > 0                         # block 0, run and thrown away
    assert s["predicted_layerwise_seconds"] == pytest.approx(2 * s["timed_block_seconds"], abs=0.1)
    real = onecomp_core.quantize(tiny_llama, out, **quick(bits=3, projector="gptq", num_samples=4))
    assert dry["plan"] == real["plan"]
    assert s["bpw"] == real["summary"]["bpw"] and s["quantized_params"] == real["summary"]["quantized_params"]


@pytest.mark.skipif(not installed("planner", "autobit"), reason="needs the autobit distribution")
def test_a_dry_runs_mixed_precision_plan_is_the_real_runs(tiny_llama, tmp_path):
    kw = quick(planner="autobit", target_bpw=3.5, num_samples=4, bits=None, group_size=None)
    dry = onecomp_core.quantize(tiny_llama, tmp_path / "q", dry_run=True, **kw)
    real = onecomp_core.quantize(tiny_llama, tmp_path / "q", **kw)
    assert dry["plan"] == real["plan"] and len(dry["plan_counts"]) > 1
    assert dry["summary"]["bpw"] == real["summary"]["bpw"] <= 3.5


def test_a_dry_run_says_what_happens_to_an_existing_output_and_leaves_it(tiny_llama, tmp_path):
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick())
    before = files_under(tmp_path)
    with pytest.raises(OnecompError, match="already exists.*--overwrite"):      # as the real run refuses
        onecomp_core.quantize(tiny_llama, out, dry_run=True, **quick())
    dry = onecomp_core.quantize(tiny_llama, out, dry_run=True, overwrite=True, **quick(bits=3))
    assert dry["outlook"] == f"a new run; replaces {out} when it finishes (--overwrite)"
    assert files_under(tmp_path) == before


class StopAfterBlock:
    @hookimpl
    def onecomp_block_done(self, index, total, info):
        raise RuntimeError("stopped")


def test_a_dry_run_names_the_block_a_rerun_resumes_after_and_keeps_the_work_folder(tiny_llama, tmp_path):
    out = tmp_path / "q"
    with pytest.raises(RuntimeError, match="stopped"):
        onecomp_core.quantize(tiny_llama, out, plugins=[StopAfterBlock()], **quick())
    partial = tmp_path / "q.onecomp-partial"
    before = files_under(partial)
    dry = onecomp_core.quantize(tiny_llama, out, dry_run=True, **quick())
    assert dry["summary"]["outlook"] == "resume" and dry["summary"]["resumes_after_block"] == 1
    assert dry["summary"]["timed_block_seconds"] is None        # the streams it would resume from are not its to read
    assert dry["outlook"] == f"resumes after block 1 (finished in {partial})"
    # another config: refused without --overwrite, as the real run; with it, the dry run says the
    # unfinished run would be discarded, and discards nothing
    with pytest.raises(OnecompError, match="unfinished run with a different config"):
        onecomp_core.quantize(tiny_llama, out, dry_run=True, **quick(bits=3))
    dry = onecomp_core.quantize(tiny_llama, out, dry_run=True, overwrite=True, **quick(bits=3))
    assert dry["summary"]["outlook"] == "start over" and dry["summary"]["resumes_after_block"] == 0
    assert files_under(partial) == before and not out.exists()
    rep = onecomp_core.quantize(tiny_llama, out, **quick())                     # the rerun does what it said
    assert rep["summary"]["resumed_from_block"] == 1


@pytest.mark.skipif(not installed("refiner", "blockptq"), reason="needs the blockptq distribution")
def test_a_dry_run_estimates_the_block_refiners_and_stops_where_the_run_would(tiny_llama, tmp_path):
    dry = onecomp_core.quantize(tiny_llama, tmp_path / "q", dry_run=True, refiners=["blockptq"], max_memory="8GB",
                                **quick())
    (d,) = dry["refine_choice"]
    assert d["name"] == "blockptq" and d["run"] and d["predicted_peak_mb"] > 0 and d["predicted_seconds"] >= 0
    assert dry["summary"]["max_memory_explicit"] and dry["summary"]["max_memory_mb"] == pytest.approx(8e9 / 2**20, abs=0.1)
    with pytest.raises(OnecompError, match="--max-memory 1 MiB is below what the layer-wise pass needs"):
        onecomp_core.quantize(tiny_llama, tmp_path / "q", dry_run=True, refiners=["blockptq"], max_memory="1MiB",
                              **quick())
    assert list(tmp_path.iterdir()) == []


def test_the_dry_run_flag_prints_the_plan_in_words_or_json(tiny_llama, tmp_path, capsys):
    args = ["quantize", str(tiny_llama), "--out", str(tmp_path / "q"), "--bits", "4", "--group-size", "32",
            "--projector", "rtn", "--num-samples", "2", "--seq-len", "32", "--dry-run"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"dry run, nothing written: {tiny_llama} -> {tmp_path / 'q'}: a new run"
    assert lines[1] == "plan: 14 modules in 2 blocks at 4.625 bits per weight (14 x rtn uniform 4-bit g32)"
    assert lines[2].startswith("layer-wise pass: ~") and "fits this machine's memory" in lines[2]
    assert lines[3].startswith("layer-wise time: ~") and "for 2 blocks (block 0 run and thrown away: " in lines[3]
    assert main(args + ["--time-budget", "2h"]) == 0
    timed = capsys.readouterr().out.splitlines()[3]
    assert re.fullmatch(r"layer-wise time: ~\d+ s for 2 blocks \(block 0 run and thrown away: [\d.]+ s\), "
                        r"\d+% of --time-budget 120 min", timed), timed
    assert main(args + ["--json"]) == 0
    rep = json.loads(capsys.readouterr().out)
    assert rep["dry_run"] and rep["summary"]["bpw"] == 4.625
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(not (installed("refiner", "blockptq") and installed("refiner", "globalptq")),
                    reason="needs the blockptq and globalptq distributions")
def test_a_dry_run_of_the_refine_stage_estimates_each_step_and_touches_nothing(tiny_llama, tmp_path, capsys):
    q = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, q, **quick(bits=3))
    before = files_under(tmp_path)
    dry = onecomp_core.refine(q, refine="auto", dry_run=True, options={"globalptq": {"epochs": 1}})
    assert dry["summary"]["outlook"] == "refine" and "in place" in dry["outlook"]
    steps = {d["name"]: d for d in dry["refine_choice"]}
    assert set(steps) == {"blockptq", "globalptq"} and all(d["run"] for d in steps.values())
    assert all(d["predicted_peak_mb"] > 0 and d["predicted_seconds"] is not None for d in steps.values())
    assert dry["later_refiners"] == [] and dry["summary"]["predicted_layerwise_peak_mb"] is None
    assert files_under(tmp_path) == before                     # no work folder, the checkpoint as it was
    with pytest.raises(OnecompError, match="globalptq needs ~.* over --max-memory"):     # as the run refuses
        onecomp_core.refine(q, refiners=["globalptq"], max_memory="1MB", dry_run=True)
    assert files_under(tmp_path) == before
    capsys.readouterr()
    assert main(["refine", str(q), "--refiner", "blockptq", "--dry-run"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"dry run, nothing written: {tiny_llama} -> {q}: refines the checkpoint in {q} in place " \
                     f"(keeping only what lowers the held-out KL)"
    assert any(x.startswith("blockptq runs: named in the config (~") for x in out)


def test_a_dry_run_where_the_refine_stage_was_interrupted_says_it_resumes_there(tiny_llama, tmp_path, monkeypatch):
    q = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, q, **quick())
    monkeypatch.setattr(onecomp_core.runner, "refine_pending", lambda out, fp: True)
    dry = onecomp_core.quantize(tiny_llama, q, dry_run=True, **quick())
    assert dry["summary"]["outlook"] == "resume refine" and "resumes the unfinished refine stage" in dry["outlook"]
