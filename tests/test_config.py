import json

import pytest

from onecomp_core.api import Resolved, make_config
from onecomp_core.cli import main
from onecomp_core.config import from_dict, read_file
from onecomp_core.errors import OnecompError


@pytest.mark.parametrize("bits", [0, 17, -1])
def test_bits_out_of_range(bits):
    with pytest.raises(OnecompError, match=r"config field 'bits': must be between 1 and 16"):
        from_dict({"model": "m", "bits": bits})


@pytest.mark.parametrize("g", [0, -2, "abc", 1.5, True])
def test_bad_group_size(g):
    with pytest.raises(OnecompError, match="config field 'group_size': must be a positive integer or 'channel'"):
        from_dict({"model": "m", "group_size": g})


@pytest.mark.parametrize("g,expected", [("channel", -1), ("-1", -1), (-1, -1), ("64", 64), (128, 128)])
def test_group_size_spellings(g, expected):
    assert from_dict({"model": "m", "group_size": g}).group_size == expected


def test_unknown_field_and_nested_errors():
    with pytest.raises(OnecompError, match="unknown config field.*'bitz'.*known:.*bits"):
        from_dict({"model": "m", "bitz": 3})
    with pytest.raises(OnecompError, match="config field 'num_samples': must be >= 1"):
        from_dict({"model": "m", "calibration": {"num_samples": 0}})
    with pytest.raises(OnecompError, match="config field 'strategy': must be one of concat_chunk"):
        from_dict({"model": "m", "calibration": {"strategy": "random"}})
    with pytest.raises(OnecompError, match="'model' is required"):
        from_dict({"bits": 4})


def test_component_options_are_validated_by_their_own_class():
    with pytest.raises(OnecompError, match="projector 'gptq' has no option.*'dampp'.*options:.*damp"):
        Resolved(make_config("m", {"options": {"gptq": {"dampp": 1}}}))
    with pytest.raises(OnecompError, match="projector 'gptq' options: option 'damp' must be in"):
        Resolved(make_config("m", {"options": {"gptq": {"damp": -1}}}))
    with pytest.raises(OnecompError, match=r"unknown projector 'gtpq'; known: (\w+, )*gptq, jointq, (\w+, )*rtn\b"):
        Resolved(make_config("m", {"projector": "gtpq"}))
    with pytest.raises(OnecompError, match="unknown refiner 'qepp'"):
        Resolved(make_config("m", {"corrections": ["qepp"]}))
    r = Resolved(make_config("m", {"options": {"gptq": {"damp": 0.05}}}))
    assert r.projectors["gptq"].options.damp == 0.05


@pytest.mark.parametrize("suffix,text", [
    (".yaml", "model: m\nbits: 3\ngroup_size: channel\ncorrections: [rescale]\ncalibration:\n  num_samples: 8\n"),
    (".toml", 'model = "m"\nbits = 3\ngroup_size = "channel"\ncorrections = ["rescale"]\n[calibration]\nnum_samples = 8\n'),
    (".json", json.dumps({"model": "m", "bits": 3, "group_size": "channel", "corrections": ["rescale"],
                          "calibration": {"num_samples": 8}})),
])
def test_config_files(tmp_path, suffix, text):
    p = tmp_path / f"c{suffix}"
    p.write_text(text)
    run = from_dict(read_file(p))
    assert (run.bits, run.group_size, run.refiners, run.calibration.num_samples) == (3, -1, ("rescale",), 8)


def test_flags_override_file_and_config_show(tmp_path, capsys):
    p = tmp_path / "c.yaml"
    p.write_text("model: m\nbits: 3\noptions:\n  gptq: {damp: 0.02}\n")
    assert main(["config", "--show", "--config", str(p), "--bits", "2", "--option", "gptq.act_order=false",
                 "--json"]) == 0
    d = json.loads(capsys.readouterr().out)
    assert d["bits"] == 2 and d["model"] == "m"
    assert d["resolved_options"]["projector:gptq"]["damp"] == 0.02
    assert d["resolved_options"]["projector:gptq"]["act_order"] is False
    assert d["resolved_options"]["projector:gptq"]["block_size"] == 128


def test_config_show_errors_are_one_line(tmp_path, capsys):
    assert main(["config", "m", "--bits", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "bits" in err


def test_budget_fields_are_grouped_and_may_be_given_flat():
    grouped = from_dict({"model": "m", "budget": {"target_bpw": 2.5, "context": 128}})
    flat = from_dict({"model": "m", "target_bpw": 2.5, "context": 128})
    assert grouped.budget == flat.budget and grouped.budget.given() == ["target_bpw"]
    assert make_config("m", {"budget": {"target_bpw": 3}}, target_bpw=2.0).budget.target_bpw == 2.0   # a flag wins
    assert make_config("m", {"target_bpw": 3, "num_samples": 4}, target_bpw=2.0, num_samples=8).calibration.num_samples == 8
    with pytest.raises(OnecompError, match="'target_bpw' is given twice"):
        from_dict({"model": "m", "target_bpw": 2.5, "budget": {"target_bpw": 3}})
    with pytest.raises(OnecompError, match="unknown budget field.*'bpw'"):
        from_dict({"model": "m", "budget": {"bpw": 3}})


def test_refiners_is_one_ordered_list_and_corrections_its_older_name():
    assert from_dict({"model": "m", "corrections": ["qep", "blockcomp"]}).refiners == ("qep", "blockcomp")
    with pytest.raises(OnecompError, match="'corrections' and 'refiners' name the same list"):
        from_dict({"model": "m", "corrections": ["qep"], "refiners": ["lpcd"]})
    # a keyword list replaces the file's, whichever name either uses
    assert make_config("m", {"corrections": ["qep"]}, refiners=["lpcd"]).refiners == ("lpcd",)
    with pytest.raises(OnecompError, match="refiner 'qep' is listed twice"):
        Resolved(make_config("m", refiners=["qep", "qep"]))


def test_projector_defaults_to_gptq_where_installed_else_rtn():
    assert Resolved(make_config("m")).run.projector == "gptq"
    from onecomp_core.plugins import load_plugins
    core_only = load_plugins(autoload=False)
    assert Resolved(make_config("m"), core_only).run.projector == "rtn"


def test_calibration_batch_size_is_validated():
    assert from_dict({"model": "m", "calibration": {"batch_size": 4}}).calibration.batch_size == 4
    assert from_dict({"model": "m"}).calibration.batch_size == 0          # by device: 1 on a CPU, 8 on CUDA
    with pytest.raises(OnecompError, match="'batch_size': must be between 0 and 4096"):
        from_dict({"model": "m", "calibration": {"batch_size": -1}})
    import torch
    from onecomp_core.runner import batch_size
    assert (batch_size(0, torch.device("cpu")), batch_size(0, torch.device("cuda")), batch_size(3, torch.device("cpu"))) == (1, 8, 3)


def test_threads_follow_the_cores_available(tmp_path, monkeypatch):
    import torch
    from onecomp_core.resources import available_cores, set_threads
    cpu_max = tmp_path / "cpu.max"
    cpu_max.write_text("max 100000\n")
    assert available_cores(str(cpu_max)) == len(__import__("os").sched_getaffinity(0))
    cpu_max.write_text("150000 100000\n")                      # a 1.5-core quota -> 2 threads at most
    assert available_cores(str(cpu_max)) == min(2, len(__import__("os").sched_getaffinity(0)))
    assert available_cores(str(tmp_path / "missing")) >= 1
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_threads() == 1                               # an explicit setting wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert set_threads() == available_cores()
    finally:
        torch.set_num_threads(before)


def test_api_options_take_tables_or_dotted_keys():
    from onecomp_core.config import make_config
    a = make_config("m", options={"gptq": {"damp": 0.05}})
    b = make_config("m", options={"gptq.damp": 0.05})
    assert a.options == b.options == {"gptq": {"damp": 0.05}}
    with pytest.raises(OnecompError, match=r"options\['gptq'\] must be a table"):
        make_config("m", options={"gptq": 0.05})


def test_forward_dtype_is_checked_and_resolved(monkeypatch):
    """calibration.forward_dtype: a bad value names the choices; auto autocasts to bfloat16 only on
    a CPU with a native bfloat16 path and a float32 model."""
    import torch
    from onecomp_core import skeleton
    with pytest.raises(OnecompError, match="config field 'forward_dtype': must be one of auto, bfloat16, statistics, off"):
        from_dict({"model": "m", "calibration": {"forward_dtype": "float16"}})
    assert make_config("m", forward_dtype="off").calibration.forward_dtype == "off"
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert skeleton.forward_autocast("off", cpu, torch.float32) is None
    assert skeleton.forward_autocast("bfloat16", cuda, torch.float32) is torch.bfloat16
    assert skeleton.forward_autocast("statistics", cpu, torch.float32) is torch.bfloat16
    for native, dev, dtype, want in [(True, cpu, torch.float32, torch.bfloat16), (False, cpu, torch.float32, None),
                                     (True, cpu, torch.bfloat16, None), (True, cuda, torch.float32, None)]:
        monkeypatch.setattr(skeleton, "_mkldnn_bf16", lambda native=native: native)
        assert skeleton.forward_autocast("auto", dev, dtype) is want, (native, dev, dtype)
