"""Bad input exits non-zero with a one-line message and writes nothing."""
import subprocess
import sys

import pytest

from onecomp_core.cli import main


def run(args, capsys):
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    return code, err


@pytest.fixture
def out(tmp_path):
    return tmp_path / "out"


def check(code, err, out, pattern):
    import re
    assert code == 2
    assert len(err) == 1 and err[0].startswith("onecomp: error: "), err
    assert re.search(pattern, err[0]), err[0]
    assert not out.exists() and not out.with_name(out.name + ".onecomp-partial").exists()


def test_missing_model_path(out, capsys):
    code, err = run(["quantize", "./no/such/model", "--out", str(out)], capsys)
    check(code, err, out, "does not exist")


def test_corrupt_safetensors(tiny_llama, tmp_path, out, capsys):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    (bad / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    code, err = run(["quantize", str(bad), "--out", str(out), "--projector", "rtn"], capsys)
    check(code, err, out, "corrupt safetensors file")


@pytest.mark.parametrize("bits", ["0", "17"])
def test_bits_out_of_range(tiny_llama, out, capsys, bits):
    code, err = run(["quantize", str(tiny_llama), "--bits", bits, "--out", str(out)], capsys)
    check(code, err, out, "'bits': must be between 1 and 16")


def test_bits_the_format_cannot_hold(tiny_llama, out, capsys):
    code, err = run(["quantize", str(tiny_llama), "--bits", "12", "--out", str(out)], capsys)
    check(code, err, out, "holds 2 to 8 bits")


@pytest.mark.parametrize("g", ["0", "abc", "-5"])
def test_bad_group_size(tiny_llama, out, capsys, g):
    code, err = run(["quantize", str(tiny_llama), f"--group-size={g}", "--out", str(out)], capsys)
    check(code, err, out, "group_size")


def test_empty_calibration_file(tiny_llama, tmp_path, out, capsys):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    code, err = run(["quantize", str(tiny_llama), "--calibration", str(empty), "--out", str(out)], capsys)
    check(code, err, out, "is empty")


def test_calibration_shorter_than_one_sample(tiny_llama, tmp_path, out, capsys):
    short = tmp_path / "short.txt"
    short.write_text("A few words only.")
    code, err = run(["quantize", str(tiny_llama), "--calibration", str(short), "--seq-len", "64",
                     "--out", str(out)], capsys)
    check(code, err, out, "shorter than one sample")


@pytest.mark.parametrize("text, says", [(None, "does not exist"), ("", "is empty")])
def test_bad_evaluation_text(tiny_llama, tmp_path, out, capsys, text, says):
    # found before calibration, not after the whole quantization
    path = tmp_path / "eval.txt"
    if text is not None:
        path.write_text(text)
    code, err = run(["quantize", str(tiny_llama), "--projector", "rtn", "--eval-text", str(path), "--out", str(out)],
                    capsys)
    check(code, err, out, f"evaluation text {path} {says}")


def test_unknown_plugin_names(tiny_llama, out, capsys):
    code, err = run(["quantize", str(tiny_llama), "--projector", "gptqq", "--out", str(out)], capsys)
    check(code, err, out, r"unknown projector 'gptqq'; known: (\w+, )*gptq, jointq, (\w+, )*rtn\b")
    code, err = run(["quantize", str(tiny_llama), "--correction", "nope", "--out", str(out)], capsys)
    check(code, err, out, "unknown refiner 'nope'")
    code, err = run(["quantize", str(tiny_llama), "--format", "nf4", "--out", str(out)], capsys)
    check(code, err, out, "unknown format 'nf4'")


@pytest.mark.parametrize("projector, fmt, says", [
    ("gptq", "dbf", r"projector 'gptq' writes format 'uniform', not 'dbf': pass --format uniform"),
    ("rtn", "mdbf", r"projector 'rtn' writes format 'uniform', not 'mdbf'"),
    ("mdbf", "uniform", r"projector 'mdbf' writes format 'mdbf' or 'dbf', not 'uniform': pass --format mdbf"),
])
def test_projector_that_cannot_write_the_format(tiny_llama, out, capsys, projector, fmt, says):
    # caught when the plan is checked, before any block is quantized (it used to be a traceback
    # from inside the layer-wise pass)
    budget = ["--target-bpw", "2"] if fmt != "uniform" else []     # binary factors take a bpw target
    code, err = run(["quantize", str(tiny_llama), "--projector", projector, "--format", fmt, *budget,
                     "--out", str(out)], capsys)
    check(code, err, out, says)


def test_act_order_without_static_groups(tiny_llama, out, capsys):
    code, err = run(["quantize", str(tiny_llama), "--projector", "jointq", "--option", "jointq.static_groups=false",
                     "--group-size", "32", "--out", str(out)], capsys)
    check(code, err, out, r"jointq: act_order needs static_groups=true with group size 32; "
                          r"set jointq.static_groups=true or jointq.act_order=false")


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onecomp_core.cli", "quantize", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


@pytest.mark.parametrize("flags, says", [
    (["--bits", "12"], "holds 2 to 8 bits"),
    (["--seq-len", "100000"], "--seq-len 100000 is longer than the 1024 positions the model handles"),
    (["--format", "uniform", "--bits", "1"], "holds 2 to 8 bits"),
])
def test_spec_and_length_errors_come_before_calibration(tiny_llama, tmp_path, out, capsys, flags, says):
    """A missing calibration file would fail the calibration stage; these fail before it."""
    code, err = run(["quantize", str(tiny_llama), "--out", str(out), "--projector", "rtn",
                     "--calibration", str(tmp_path / "not-read.txt"), *flags], capsys)
    check(code, err, out, says)


def test_a_group_size_the_inputs_do_not_divide_says_what_is_stored(tiny_llama, out, capsys):
    code = main(["quantize", str(tiny_llama), "--out", str(out), "--projector", "rtn", "--group-size", "24",
                 "--num-samples", "2", "--seq-len", "32"])
    err = capsys.readouterr().err
    assert code == 0
    assert ("group size 24 does not divide the 64 inputs of model.layers.0.self_attn.q_proj: the checkpoint "
            "stores groups of 8 (each scale repeated 3 times)") in err


@pytest.mark.parametrize("value, says", [("nan", r"\(16 NaN, 0 inf\)"), ("inf", r"\(0 NaN, 16 inf\)")])
def test_non_finite_weights_are_named_before_any_block(tiny_llama, tmp_path, out, capsys, value, says):
    import shutil
    import torch
    from safetensors.torch import load_file, save_file
    bad = tmp_path / "bad"
    shutil.copytree(tiny_llama, bad)
    t = load_file(str(bad / "model.safetensors"))
    t["model.layers.1.mlp.up_proj.weight"][3, :16] = float(value)
    save_file(t, str(bad / "model.safetensors"), metadata={"format": "pt"})
    code, err = run(["quantize", str(bad), "--out", str(out), "--projector", "rtn", "--num-samples", "2",
                     "--seq-len", "32"], capsys)
    check(code, err, out, r"model.layers.1.mlp.up_proj.weight has 16 non-finite values " + says +
          r" of 6144: .*--exclude model.layers.1.mlp.up_proj")
    assert not (out.with_name(out.name + ".onecomp-partial") / "blocks").exists()
