"""The bad-input matrix: each row is a command a user might type with one thing wrong. Every one
exits with code 2 and one line on stderr that names what to change (no traceback), leaves no
output or partial folder behind, and (rows marked early) fails before calibration is read."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from onecomp_core.cli import main


class Inputs:
    """Files the rows refer to, each made on first use in the test's temporary folder."""

    def __init__(self, tmp: Path, tiny_models):
        self.tmp, self._tiny = tmp, tiny_models

    @property
    def model(self) -> str:
        return str(self._tiny("llama"))

    def file(self, name: str, data: bytes | str) -> str:
        p = self.tmp / name
        p.write_bytes(data if isinstance(data, bytes) else data.encode())
        return str(p)

    def broken_model(self, how: str) -> str:
        bad = self.tmp / f"bad-{how}"
        shutil.copytree(self._tiny("llama"), bad)
        st = bad / "model.safetensors"
        if how == "corrupt":
            st.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
        elif how in ("nan", "inf"):
            from safetensors.torch import load_file, save_file
            t = load_file(str(st))
            t["model.layers.1.mlp.up_proj.weight"][3, :16] = float(how)
            save_file(t, str(st), metadata={"format": "pt"})
        elif how == "noconfig":
            (bad / "config.json").unlink()
        return str(bad)

    @property
    def checkpoint(self) -> str:
        """A finished onecomp checkpoint of the tiny model (made once per session)."""
        if "ckpt" not in _MADE:
            root = Path(self._tiny("llama")).parent / "ckpt"
            if not root.exists():
                assert main(["quantize", self.model, "--projector", "rtn", "--num-samples", "2", "--seq-len", "32",
                             "--out", str(root)]) == 0
            _MADE["ckpt"] = root
        return str(_MADE["ckpt"])

    @property
    def damaged_checkpoint(self) -> str:
        """A copy of the checkpoint with a block file cut short (a disk that filled, a copy killed)."""
        import shutil
        copy = self.tmp / "damaged"
        shutil.copytree(self.checkpoint, copy)
        block = sorted(copy.glob("*block-00000*.safetensors"))[0]
        block.write_bytes(block.read_bytes()[:5000])
        return str(copy)

    def dir(self, name: str) -> str:
        (self.tmp / name).mkdir(exist_ok=True)
        return str(self.tmp / name)

    @property
    def never_read(self) -> str:
        """A calibration file that does not exist: a row that fails with its own message did not
        get as far as reading calibration."""
        return str(self.tmp / "calibration-never-read.txt")


_MADE: dict = {}
TEXT = "The quick brown fox jumps over the lazy dog. " * 400
Q = ["quantize"]
RTN = ["--projector", "rtn"]

# (id, argv from Inputs, pattern the one line must match, fails before calibration)
CASES = [
    # -- the model -------------------------------------------------------------------------
    ("model-missing", lambda f: Q + ["./no/such/model"], "does not exist", True),
    ("model-mistyped-local", lambda f: Q + [f.dir("models") + "/tinyy"], "does not exist", True),
    ("model-no-config", lambda f: Q + [f.broken_model("noconfig")], "no config.json", True),
    ("model-neither", lambda f: Q + [f.file("w.bin", b"x")], "neither a model folder nor a .gguf", True),
    ("model-corrupt-safetensors", lambda f: Q + [f.broken_model("corrupt"), *RTN], "corrupt safetensors file", True),
    ("model-nan-weights", lambda f: Q + [f.broken_model("nan"), *RTN],
     r"model.layers.1.mlp.up_proj.weight has 16 non-finite values \(16 NaN, 0 inf\).*--exclude", False),
    ("model-inf-weights", lambda f: Q + [f.broken_model("inf"), *RTN], r"\(0 NaN, 16 inf\)", False),
    ("offline-hub-id", lambda f: ["--offline"] + Q + ["someorg/somemodel"], "offline mode .* forbids fetching it", True),
    # -- bits, groups, formats ---------------------------------------------------------------
    ("bits-0", lambda f: Q + [f.model, "--bits", "0"], "'bits': must be between 1 and 16", True),
    ("bits-17", lambda f: Q + [f.model, "--bits", "17"], "'bits': must be between 1 and 16", True),
    ("bits-12-uniform", lambda f: Q + [f.model, "--bits", "12"], "holds 2 to 8 bits", True),
    ("bits-1-uniform", lambda f: Q + [f.model, "--bits", "1"], "holds 2 to 8 bits", True),
    ("bits-not-a-number", lambda f: Q + [f.model, "--bits", "four"],
     r"argument --bits: invalid int value: 'four'; see `onecomp quantize --help`", True),
    ("command-unknown", lambda f: ["quantise", f.model], r"invalid choice: 'quantise'", True),
    ("group-0", lambda f: Q + [f.model, "--group-size=0"], "group_size", True),
    ("group-abc", lambda f: Q + [f.model, "--group-size=abc"], "group_size", True),
    ("group-negative", lambda f: Q + [f.model, "--group-size=-5"], "group_size", True),
    ("format-unknown", lambda f: Q + [f.model, "--format", "nf4"], "unknown format 'nf4'", True),
    ("gptq-writes-no-dbf", lambda f: Q + [f.model, "--projector", "gptq", "--format", "dbf", "--target-bpw", "2"],
     "projector 'gptq' writes format 'uniform', not 'dbf': pass --format uniform", True),
    ("rtn-writes-no-mdbf", lambda f: Q + [f.model, *RTN, "--format", "mdbf", "--target-bpw", "2"],
     "projector 'rtn' writes format 'uniform', not 'mdbf'", True),
    ("mdbf-writes-no-uniform", lambda f: Q + [f.model, "--projector", "mdbf", "--format", "uniform"],
     "projector 'mdbf' writes format 'mdbf' or 'dbf', not 'uniform': pass --format mdbf", True),
    ("jointq-act-order-groups", lambda f: Q + [f.model, "--projector", "jointq", "--option", "jointq.static_groups=false",
                                              "--group-size", "32"],
     "jointq: act_order needs static_groups=true with group size 32", True),
    # -- calibration -------------------------------------------------------------------------
    ("calib-missing", lambda f: Q + [f.model, *RTN, "--calibration", f.tmp.as_posix() + "/data/calb.txt"], "does not exist", False),
    ("calib-empty", lambda f: Q + [f.model, *RTN, "--calibration", f.file("e.txt", "\n\n")], "is empty", False),
    ("calib-too-short", lambda f: Q + [f.model, *RTN, "--calibration", f.file("s.txt", "A few words only."),
                                       "--seq-len", "64"], "shorter than one sample", False),
    ("calib-binary", lambda f: Q + [f.model, *RTN, "--calibration", f.file("b.txt", bytes(range(256)) * 40)],
     "is not text", False),
    ("calib-latin1", lambda f: Q + [f.model, *RTN, "--calibration", f.file("l.txt", "caf\xe9 ".encode("latin-1") * 200)],
     "is not UTF-8 text", False),
    ("calib-jsonl-no-field", lambda f: Q + [f.model, *RTN, "--calibration", f.file("c.jsonl", '{"content": "x"}\n')],
     "has no 'text' field", False),
    ("calib-jsonl-garbage", lambda f: Q + [f.model, *RTN, "--calibration", f.file("g.jsonl", "{not json\n")],
     "is not a JSON line", False),
    ("calib-unknown-type", lambda f: Q + [f.model, *RTN, "--calibration", f.file("c.csv", "a,b\n")], "unknown type", False),
    ("calib-offline-dataset", lambda f: ["--offline"] + Q + [f.model, *RTN, "--calibration", "someorg/somedata"],
     "offline mode .* forbids fetching it", False),
    ("num-samples-0", lambda f: Q + [f.model, "--num-samples", "0"], "num_samples", True),
    ("seq-len-0", lambda f: Q + [f.model, "--seq-len", "0"], "seq_len", True),
    ("seq-len-beyond-positions", lambda f: Q + [f.model, *RTN, "--seq-len", "100000"],
     "--seq-len 100000 is longer than the 1024 positions the model handles", True),
    # -- evaluation text ---------------------------------------------------------------------
    ("eval-text-missing", lambda f: Q + [f.model, *RTN, "--eval-text", f.tmp.as_posix() + "/eval.txt"], "evaluation text .* does not exist", True),
    ("eval-text-empty", lambda f: Q + [f.model, *RTN, "--eval-text", f.file("ev.txt", "")], "evaluation text .* is empty", True),
    # -- components and their options ----------------------------------------------------------
    ("projector-unknown", lambda f: Q + [f.model, "--projector", "gptqq"],
     r"unknown projector 'gptqq'; known: (\w+, )*gptq, jointq, (\w+, )*rtn\b", True),
    ("correction-unknown", lambda f: Q + [f.model, "--correction", "nope"], "unknown refiner 'nope'", True),
    ("refiner-unknown", lambda f: Q + [f.model, "--refiner", "globalptqq"], "unknown refiner 'globalptqq'", True),
    ("planner-unknown", lambda f: Q + [f.model, "--planner", "autobits"], "unknown planner 'autobits'", True),
    ("preprocessor-unknown", lambda f: Q + [f.model, "--preprocessor", "rotate"], "unknown preprocessor 'rotate'", True),
    ("exporter-unknown", lambda f: Q + [f.model, "--export", "awq"], "unknown exporter 'awq'", True),
    ("option-unknown-key", lambda f: Q + [f.model, "--option", "gptq.dampp=0.1"], "dampp", True),
    ("option-malformed", lambda f: Q + [f.model, "--option", "gptq"], "COMPONENT.KEY=VALUE", True),
    ("option-bad-value", lambda f: Q + [f.model, "--option", "gptq.damp=abc"], "damp", True),
    ("config-missing", lambda f: Q + [f.model, "--config", f.tmp.as_posix() + "/c.yaml"], "config file .* does not exist", True),
    ("config-unknown-field", lambda f: Q + [f.model, "--config", f.file("c.json", '{"bitz": 3}')], "unknown config field", True),
    # -- budgets and resources -----------------------------------------------------------------
    ("bpw-below-reach", lambda f: Q + [f.model, "--planner", "autobit", "--target-bpw", "0.5"],
     "bpw", True),
    ("max-memory-below-pivot", lambda f: Q + [f.model, *RTN, "--max-memory", "10MB"],
     r"--max-memory 10 MiB is below what the layer-wise pass needs", True),
    ("max-memory-garbage", lambda f: Q + [f.model, "--max-memory", "12 parsecs"], "'max_memory': must be a size", True),
    ("time-budget-garbage", lambda f: Q + [f.model, "--time-budget", "later"], "duration", True),
    ("refine-mode-unknown", lambda f: Q + [f.model, "--refine", "sometimes"], "invalid choice: 'sometimes'", True),
    # -- output and other commands ------------------------------------------------------------
    ("out-under-a-file", lambda f: Q + [f.model, *RTN, "--out", f.file("afile", "x") + "/q"],
     "output", True),
    ("refine-not-a-checkpoint", lambda f: ["refine", f.dir("notckpt"), "--refiner", "globalptq"],
     r"notckpt is not an onecomp checkpoint \(no onecomp.json\); quantize a model first", True),
    ("refine-unknown-refiner", lambda f: ["refine", f.checkpoint, "--refiner", "nope"], "unknown refiner 'nope'", True),
    ("refine-a-layer-refiner", lambda f: ["refine", f.checkpoint, "--refiner", "qep"],
     "refiner 'qep' works inside the layer-wise pass, not on a finished checkpoint: quantize again with --refiner qep",
     True),
    ("refine-named-over-max-memory", lambda f: ["refine", f.checkpoint, "--refiner", "globalptq", "--max-memory", "1MB"],
     r"^onecomp: error: globalptq needs ~[\d.]+ [MG]iB, over --max-memory 1 MiB: raise --max-memory or drop --refiner "
     r"globalptq$", True),
    ("quantize-json-without-dry-run", lambda f: ["quantize", f.model, "--json"],
     r"--json prints a dry run's report: add --dry-run", True),
    ("refine-json-without-dry-run", lambda f: ["refine", f.checkpoint, "--refiner", "blockptq", "--json"],
     r"--json prints a dry run's report: add --dry-run", True),
    ("refine-damaged-checkpoint", lambda f: ["refine", f.damaged_checkpoint, "--refiner", "blockptq"],
     r"corrupt safetensors file .*damaged/model-block-00000.safetensors: tensor .* lies outside the file", True),
    ("refine-bad-option", lambda f: ["refine", f.checkpoint, "--refiner", "globalptq", "--option", "globalptq.epochs=-1"],
     "epochs", True),
    ("eval-missing-dir", lambda f: ["eval", f.tmp.as_posix() + "/nockpt", "--text", f.file("t.txt", TEXT)],
     "checkpoint folder .*nockpt does not exist", True),
    ("eval-missing-text", lambda f: ["eval", f.checkpoint, "--text", f.tmp.as_posix() + "/none.txt"],
     "evaluation text .*none.txt does not exist", True),
]


@pytest.mark.parametrize("argv, says, early", [pytest.param(a, s, e, id=i) for i, a, s, e in CASES])
def test_bad_input(tmp_path, tiny_models, capsys, argv, says, early):
    f = Inputs(tmp_path, tiny_models)
    args = argv(f)
    out = tmp_path / "out"
    if "quantize" in args[:2]:
        args += [] if "--out" in args else ["--out", str(out)]
        if early and "--calibration" not in args:     # reaching calibration would fail on this instead
            args += ["--calibration", f.never_read]
    before = _snapshot(Path(args[1])) if args[0] == "refine" else None
    capsys.readouterr()                     # what making the inputs printed
    code = main(args)
    err = capsys.readouterr().err.strip().splitlines()
    err = [line for line in err if not line.startswith("onecomp: warning:")]
    assert code == 2, err
    assert len(err) == 1 and err[0].startswith("onecomp: error: "), err
    assert re.search(says, err[0]), err[0]
    assert not out.exists() and not out.with_name(out.name + ".onecomp-partial").exists()
    if before is not None:                  # the checkpoint a refine was asked of is untouched
        assert _snapshot(Path(args[1])) == before
        assert not Path(args[1] + ".onecomp-refine").exists()


def _snapshot(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} if folder.is_dir() else {}


def test_the_matrix_has_at_least_forty_rows():
    assert len(CASES) >= 40 and len({c[0] for c in CASES}) == len(CASES)


def test_console_script_exit_code(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "onecomp_core.cli", "quantize", str(tmp_path / "nope"),
                           "--out", str(tmp_path / "o")], capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "does not exist" in proc.stderr


def test_a_group_size_the_inputs_do_not_divide_says_what_is_stored(tiny_llama, tmp_path, capsys):
    code = main(["quantize", str(tiny_llama), "--out", str(tmp_path / "out"), "--projector", "rtn", "--group-size", "24",
                 "--num-samples", "2", "--seq-len", "32"])
    err = capsys.readouterr().err
    assert code == 0
    assert ("group size 24 does not divide the 64 inputs of model.layers.0.self_attn.q_proj: the checkpoint "
            "stores groups of 8 (each scale repeated 3 times)") in err


def test_config_show_needs_no_model(capsys):
    import json
    assert main(["config", "--show", "--json", "--bits", "3"]) == 0
    out, err = capsys.readouterr()
    d = json.loads(out)
    assert d["model"] is None and d["bits"] == 3 and "no model given" in err


@pytest.mark.parametrize("exc", [
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                 "you tried to allocate 536870912 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
])
def test_running_out_of_memory_is_one_line_that_says_what_to_lower(tiny_llama, tmp_path, capsys, monkeypatch, exc):
    import onecomp_core.runner as runner
    from onecomp_core.cli import main

    def fail(self):
        raise exc
    monkeypatch.setattr(runner.Runner, "layerwise", fail)
    assert main(["quantize", str(tiny_llama), "--out", str(tmp_path / "q"), "--num-samples", "2", "--seq-len", "32"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) >= 1 and err[-1].startswith("onecomp: error: out of memory (")
    assert "lower --num-samples" in err[-1] and "--max-memory" in err[-1]
    if isinstance(exc, RuntimeError):
        assert "can't allocate memory: you tried to allocate 536870912 bytes" in err[-1]


def test_other_runtime_errors_are_not_called_out_of_memory(tiny_llama, tmp_path, monkeypatch):
    import onecomp_core.runner as runner
    from onecomp_core.cli import main

    def fail(self):
        raise RuntimeError("mat1 and mat2 shapes cannot be multiplied")
    monkeypatch.setattr(runner.Runner, "layerwise", fail)
    with pytest.raises(RuntimeError, match="shapes cannot be multiplied"):
        main(["quantize", str(tiny_llama), "--out", str(tmp_path / "q"), "--num-samples", "2", "--seq-len", "32"])
