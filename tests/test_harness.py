"""`onecomp eval DIR --tasks`: lm-eval's harness on the quantized model and the reference, from a
local task file (nothing downloaded); the scores go into the JSON and the folder's report."""
import json
import shutil
from pathlib import Path

import pytest

import onecomp_core
from onecomp_core.cli import main
from onecomp_core.errors import OnecompError
from onecomp_core.harness import task_names
from onecomp_core.testing import quick

pytest.importorskip("lm_eval")
TASK = Path(__file__).parent / "data" / "lm_eval"


def test_tasks_run_on_model_and_reference_and_land_in_the_report(tiny_llama, tmp_path, monkeypatch, capsys):
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick())
    work = tmp_path / "task"
    shutil.copytree(TASK, work)
    monkeypatch.chdir(work)                                # the task's data_files are relative to it
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert main(["eval", str(out), "--tasks", "tiny_choice.yaml", "--ref", str(tiny_llama), "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["tasks"]
    for who in ("model", "reference"):
        acc = res[who]["onecomp_tiny_choice"]["acc"]
        assert 0.0 <= acc <= 1.0 and acc * 8 == round(acc * 8)      # 8 examples
    report = json.loads((out / "report.json").read_text())
    assert report["lm_eval"] == res
    assert "onecomp_tiny_choice" in (out / "report.md").read_text()
    assert "onecomp_tiny_choice" in (out / "report.html").read_text()
    assert "onecomp_tiny_choice" in (out / "README.md").read_text()


def test_bad_task_files_fail_with_one_line(tmp_path):
    with pytest.raises(OnecompError, match="does not exist"):
        task_names([str(tmp_path / "nope.yaml")])
    bad = tmp_path / "bad.yaml"
    bad.write_text("dataset_path: json\n")
    with pytest.raises(OnecompError, match="no `task: NAME` key"):
        task_names([str(bad)])
    assert task_names(["hellaswag", str(TASK / "tiny_choice.yaml")]) == (["hellaswag", "onecomp_tiny_choice"],
                                                                         [str(TASK.resolve())])


def test_eval_needs_text_or_tasks(tiny_llama, tmp_path, capsys):
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick())
    assert main(["eval", str(out)]) == 2
    assert "pass --text FILE" in capsys.readouterr().err
