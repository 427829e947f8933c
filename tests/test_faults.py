"""Fault injection: a run stopped at every write boundary in turn (every atomic rename the store,
the exporter and the refine stage make), by a real SIGKILL of a child process and by an
exception raised in-process, then run again, gives the same bytes as an uninterrupted run, or
stops with one line and leaves nothing half-written at the output."""
import os
import subprocess
import sys
import textwrap

import pytest

import onecomp_core
from onecomp_core.sdk import ModelRefiner, hookimpl

KW = dict(bits=3, group_size=16, projector="rtn", num_samples=2, seq_len=16, refiners=["halfscale"],
          cache=False)        # no calibration cache: every run makes the same writes


class HalfScale(ModelRefiner):
    """A model refiner that always helps a pivot whose down_proj scales were doubled... and does
    something deterministic either way: it halves and doubles nothing, it rescales block 1's
    down_proj scales by 0.999 (kept or not, the outcome is the same on every run)."""
    name = "halfscale"

    def refine(self, mctx):
        qt = mctx.quantized()["model.layers.1.mlp.down_proj"]
        qt.scale = qt.scale * 0.999
        return {"model.layers.1.mlp.down_proj": qt}


class Plugin:
    @hookimpl
    def onecomp_register_refiners(self, registry):
        registry.add_refiner(HalfScale)


CHILD = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import onecomp_core
    from test_faults import KW, Plugin
    k, mode, count = {k}, {mode!r}, [0]
    real = os.replace

    def replace(*a, **kw):
        count[0] += 1
        if count[0] == k:                      # stop before the k-th atomic rename
            if mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            raise SystemExit(7)
        return real(*a, **kw)

    os.replace = replace
    onecomp_core.quantize({model!r}, {out!r}, plugins=[Plugin()], **KW)
    print("renames", count[0])
""")


def child(model, out, k, mode):
    script = CHILD.format(tests=os.path.dirname(__file__), k=k, mode=mode, model=str(model), out=str(out))
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "ONECOMP_PROGRESS": "0"})


def files(folder):
    """Every file's bytes; onecomp.json without the output path it records."""
    import json
    out = {p.name: p.read_bytes() for p in sorted(folder.iterdir())
           if p.name not in ("report.json", "report.md", "report.html", "README.md")}      # reports: times, paths
    meta = json.loads(out.pop("onecomp.json"))
    meta["config"].pop("out")
    out["onecomp.json"] = json.dumps(meta, sort_keys=True).encode()
    return out


class Stop(BaseException):
    """An injected exit: nothing in onecomp catches it."""


def check_rerun(model, out, want, what):
    if out.exists():                                          # only ever a complete checkpoint there
        onecomp_core.load_quantized(out)
    rep = onecomp_core.quantize(model, out, plugins=[Plugin()], **KW)
    assert files(out) == want, what
    assert [r["name"] for r in rep["refine"]] == ["halfscale"], what
    for side in (".onecomp-partial", ".onecomp-refine"):
        assert not out.with_name(out.name + side).exists(), (what, side)


def test_a_run_stopped_at_any_write_boundary_resumes_to_the_same_bytes(tiny_models, tmp_path, monkeypatch):
    from concurrent.futures import ThreadPoolExecutor
    model = tiny_models("qwen3")
    straight = tmp_path / "straight"
    proc = child(model, straight, 0, "none")                  # counts the renames of a whole run
    assert proc.returncode == 0, proc.stderr[-2000:]
    total = int(proc.stdout.split()[-1])
    assert total >= 12
    want = files(straight)
    # a real SIGKILL before each rename, two child processes at a time
    with ThreadPoolExecutor(2) as pool:
        procs = list(pool.map(lambda k: child(model, tmp_path / f"kill-{k}", k, "kill"), range(1, total + 1)))
    for k, proc in enumerate(procs, 1):
        assert proc.returncode == -9, (k, proc.stderr[-1500:])
        check_rerun(model, tmp_path / f"kill-{k}", want, ("kill", k))
    # an exit raised in-process before each rename
    real = os.replace
    for k in range(1, total + 1):
        count = [0]

        def replace(*a, _k=k, **kw):
            count[0] += 1
            if count[0] == _k:
                raise Stop
            return real(*a, **kw)

        out = tmp_path / f"exit-{k}"
        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(Stop):
            onecomp_core.quantize(model, out, plugins=[Plugin()], **KW)
        monkeypatch.setattr(os, "replace", real)
        check_rerun(model, out, want, ("exit", k))
