"""A run killed after a block resumes from the last finished block and gives the same result."""
import os
import subprocess
import sys
import textwrap

import torch
from safetensors.torch import load_file

import onecomp_core

KILLER = textwrap.dedent("""
    import os, signal, sys
    sys.path.insert(0, {tests!r})
    import onecomp_core
    from onecomp_core.hookspecs import hookimpl

    class KillAfterBlock:
        @hookimpl
        def onecomp_block_done(self, index, total, info):
            if index == {after}:
                os.kill(os.getpid(), signal.SIGKILL)     # no cleanup, like a crash or the OOM killer

    onecomp_core.quantize({model!r}, {out!r}, plugins=[KillAfterBlock()], bits=3, group_size=16,
                          projector="gptq", num_samples=3, seq_len=32)
""")


def test_kill_then_resume_matches_uninterrupted_run(tiny_models, tmp_path):
    from onecomp_core.testing import make_model
    model = tiny_models("llama")
    out = tmp_path / "killed"
    script = KILLER.format(tests=os.path.dirname(__file__), after=0, model=str(model), out=str(out))
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          env={**os.environ, "ONECOMP_PROGRESS": "0"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    assert not out.exists()                                   # nothing half-written at the destination
    partial = tmp_path / "killed.onecomp-partial"
    assert (partial / "blocks" / "block-00000.safetensors").is_file()
    assert not (partial / "blocks" / "block-00001.safetensors").exists()

    rep = onecomp_core.quantize(model, out, bits=3, group_size=16, projector="gptq", num_samples=3, seq_len=32)
    assert rep["summary"]["resumed_from_block"] == 1
    assert not partial.exists()
    ref = tmp_path / "straight"
    onecomp_core.quantize(model, ref, bits=3, group_size=16, projector="gptq", num_samples=3, seq_len=32)
    for f in sorted(p.name for p in ref.glob("*.safetensors")):
        a, b = load_file(out / f), load_file(ref / f)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (f, k)


def test_existing_output_needs_overwrite(tiny_llama, tmp_path):
    import pytest
    from onecomp_core.testing import quick
    from onecomp_core.errors import OnecompError
    out = tmp_path / "q"
    onecomp_core.quantize(tiny_llama, out, **quick())
    with pytest.raises(OnecompError, match="already exists.*--overwrite"):
        onecomp_core.quantize(tiny_llama, out, **quick())
    before = (out / "onecomp.json").read_text()
    onecomp_core.quantize(tiny_llama, out, overwrite=True, **quick(bits=3))
    assert (out / "onecomp.json").read_text() != before


def test_changed_config_does_not_resume_silently(tiny_llama, tmp_path):
    import pytest
    from onecomp_core.testing import quick
    from onecomp_core.errors import OnecompError
    from onecomp_core.store import RunStore
    out = tmp_path / "q"
    RunStore(out, "fingerprint-of-another-config", False).commit_block(0, {"x": torch.zeros(1)}, {}, {})
    with pytest.raises(OnecompError, match="unfinished run with a different config"):
        onecomp_core.quantize(tiny_llama, out, **quick())


def test_a_kept_refiner_result_survives_a_crash_between_the_record_and_the_move(tmp_path):
    """RefineStore.record writes the state (kept, pending) before the candidate replaces
    ``current``: a crash in between leaves the move to the next open, and ``out`` is untouched
    until publish."""
    from onecomp_core.refine_stage import RefineStore
    out = tmp_path / "q"
    out.mkdir()
    (out / "a.bin").write_bytes(b"pivot")
    st = RefineStore(out, "fp")
    assert st.open() == [] and (st.current / "a.bin").read_bytes() == b"pivot"
    st.next.mkdir()
    (st.next / "a.bin").write_bytes(b"refined")
    st._write(records=[{"name": "r", "kept": True}], pending=True)       # recorded, then a crash
    again = RefineStore(out, "fp")
    assert again.open() == [{"name": "r", "kept": True}]
    assert (again.current / "a.bin").read_bytes() == b"refined" and not again.next.exists()
    assert (out / "a.bin").read_bytes() == b"pivot"
    again.next.mkdir()
    (again.next / "a.bin").write_bytes(b"worse")
    again.record({"name": "s", "kept": False})                          # discarded: the candidate goes
    assert not again.next.exists() and (again.current / "a.bin").read_bytes() == b"refined"
    again.publish()
    assert (out / "a.bin").read_bytes() == b"refined" and not again.work.exists()
    assert RefineStore(out, "other").open() == []                        # another config starts over


BETWEEN = textwrap.dedent("""
    import os, signal
    import onecomp_core
    from onecomp_core import store

    real = store.RunStore._write_state

    def write_state(self, **fields):
        if fields.get("finished_blocks") == {block} + 1:      # block's tensors and streams written, state not yet
            os.kill(os.getpid(), signal.SIGKILL)
        real(self, **fields)
    store.RunStore._write_state = write_state
    onecomp_core.quantize({model!r}, {out!r}, bits=3, group_size=16, projector="gptq", num_samples=3, seq_len=32)
""")


def test_a_kill_between_the_streams_and_the_state_resumes_from_the_right_streams(tiny_models, tmp_path):
    """The streams leaving block 1 are on disk but the state still says one block is finished:
    the re-run must redo block 1 from the streams entering it, and match an uninterrupted run."""
    model = tiny_models("llama")
    out = tmp_path / "killed"
    proc = subprocess.run([sys.executable, "-c", BETWEEN.format(block=1, model=str(model), out=str(out))],
                          capture_output=True, text=True, env={**os.environ, "ONECOMP_PROGRESS": "0"})
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = tmp_path / "killed.onecomp-partial"
    assert (partial / "streams-00002.pt").is_file() and (partial / "streams-00001.pt").is_file()
    rep = onecomp_core.quantize(model, out, bits=3, group_size=16, projector="gptq", num_samples=3, seq_len=32)
    assert rep["summary"]["resumed_from_block"] == 1
    ref = tmp_path / "straight"
    onecomp_core.quantize(model, ref, bits=3, group_size=16, projector="gptq", num_samples=3, seq_len=32)
    for f in sorted(p.name for p in ref.glob("*.safetensors")):
        a, b = load_file(out / f), load_file(ref / f)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), f


def test_streams_that_do_not_enter_the_next_block_are_refused(tiny_llama, tmp_path):
    import pytest
    from onecomp_core.errors import OnecompError
    from onecomp_core.store import RunStore
    st = RunStore(tmp_path / "q", "fp", False)
    st.commit_block(0, {"w": torch.zeros(1)}, {"fp": torch.zeros(1), "q": torch.zeros(1)}, {})
    assert st.streams()["entering"] == 1
    torch.save({"entering": 5, "fp": torch.zeros(1), "q": torch.zeros(1)}, st.streams_file(1))
    with pytest.raises(OnecompError, match="says 1 blocks are finished but holds no streams entering block 1"):
        st.streams()
