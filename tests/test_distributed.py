"""Data-parallel runs over torch.distributed (gloo, CPU): ranks spawned here as torchrun would
start them (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) give the codes of one process; a lost
rank ends every rank with a clear error, and a re-run resumes."""
import json
import os
import socket
import subprocess
import sys
import textwrap

import pytest
import torch
from hypothesis import given, strategies as st
from safetensors.torch import load_file

import onecomp_core
from onecomp_core.distributed import Ranks, assign_owners, shard_bounds
from onecomp_core.errors import OnecompError
from onecomp_core.testing import ARCHS, requires

SETTINGS = dict(bits=3, group_size=16, projector="gptq", refiners=["qep"], num_samples=5, seq_len=32,
                stats_dtype="float64")

WORKER = textwrap.dedent("""
    import json, os, signal, sys
    import onecomp_core
    from onecomp_core.hookspecs import hookimpl

    class KillAfterBlock:
        @hookimpl
        def onecomp_block_done(self, index, total, info):
            if index == {kill_after}:
                os.kill(os.getpid(), signal.SIGKILL)     # a lost rank: no cleanup, no goodbye

        @hookimpl
        def onecomp_stage_start(self, stage, info):
            if stage == {kill_stage!r}:
                os.kill(os.getpid(), signal.SIGKILL)

    killer = [KillAfterBlock()] if os.environ["RANK"] == "{kill_rank}" else []
    for model, out in {jobs!r}:
        rep = onecomp_core.quantize(model, out, plugins=killer, **{settings!r})
        print(json.dumps({{"rank": rep.get("rank", 0), "resumed": rep["summary"]["resumed_from_block"],
                          "ranks": rep["summary"].get("ranks")}}), flush=True)
""")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(jobs, logs, world=2, kill_rank=-1, kill_after=-1, timeout=600, settings=SETTINGS, kill_stage=None):
    """Run ``jobs`` [(model, out), ...] in ``world`` ranks, their output in files under ``logs``
    (pipes could fill and stall a rank inside a collective); -> [(returncode, stdout, stderr)]."""
    script = WORKER.format(jobs=[(str(m), str(o)) for m, o in jobs], settings=settings,
                           kill_rank=kill_rank, kill_after=kill_after, kill_stage=kill_stage)
    port = free_port()
    logs.mkdir(parents=True, exist_ok=True)
    procs = []
    for r in range(world):
        env = {**os.environ, "RANK": str(r), "LOCAL_RANK": str(r), "WORLD_SIZE": str(world),
               "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "ONECOMP_PROGRESS": "0",
               "OMP_NUM_THREADS": "1", "ONECOMP_DIST_TIMEOUT": "120"}
        with open(logs / f"{r}.out", "w") as out, open(logs / f"{r}.err", "w") as err:
            procs.append(subprocess.Popen([sys.executable, "-c", script], env=env, stdout=out, stderr=err))
    for p in procs:
        p.wait(timeout=timeout)
    return [(p.returncode, (logs / f"{r}.out").read_text(), (logs / f"{r}.err").read_text())
            for r, p in enumerate(procs)]


def same_tensors(a, b) -> None:
    files = sorted(p.name for p in a.glob("*.safetensors"))
    assert files == sorted(p.name for p in b.glob("*.safetensors"))
    for f in files:
        x, y = load_file(a / f), load_file(b / f)
        assert x.keys() == y.keys()
        for k in x:
            assert torch.equal(x[k], y[k]), (f, k)


def test_two_ranks_give_the_codes_of_one_process_on_every_architecture(tiny_models, tmp_path):
    jobs = [(tiny_models(arch), tmp_path / f"{arch}-2") for arch in ARCHS]
    results = spawn(jobs, tmp_path / "logs")
    for r, (rc, out, err) in enumerate(results):
        assert rc == 0, (r, err[-3000:])
        lines = [json.loads(x) for x in out.splitlines() if x.startswith("{")]
        assert [x["rank"] for x in lines] == [r] * len(ARCHS)
    # the one-process runs with the same threads per process (thread counts change float sums' last bits)
    (rc, _, err), = spawn([(tiny_models(arch), tmp_path / f"{arch}-1") for arch in ARCHS], tmp_path / "one", world=1)
    assert rc == 0, err[-3000:]
    for arch in ARCHS:
        one = json.loads((tmp_path / f"{arch}-1" / "report.json").read_text())
        two = json.loads((tmp_path / f"{arch}-2" / "report.json").read_text())
        assert (one["summary"]["ranks"], two["summary"]["ranks"]) == (1, 2)
        same_tensors(tmp_path / f"{arch}-1", tmp_path / f"{arch}-2")
        assert not list(tmp_path.glob(f".{arch}-2.onecomp-rank*"))        # no rank left files behind


@pytest.mark.whole_suite
def test_a_lost_rank_ends_every_rank_with_a_clear_error_and_a_rerun_resumes(tiny_llama, tmp_path):
    out = tmp_path / "dp"
    (rc0, _, err0), (rc1, _, _) = spawn([(tiny_llama, out)], tmp_path / "logs1", kill_rank=1, kill_after=0)
    assert rc1 == -9
    assert rc0 == 1 and "OnecompError" in err0, err0[-3000:]
    last = err0.strip().splitlines()[-1]
    assert "rank 0 of 2 lost the other ranks during block 1" in last and "run the same command again" in last, last
    assert not out.exists()                                   # the destination is never half-written
    assert (tmp_path / "dp.onecomp-partial" / "blocks" / "block-00000.safetensors").is_file()

    results = spawn([(tiny_llama, out)], tmp_path / "logs2")                       # the same command again
    assert all(rc == 0 for rc, _, _ in results), [e[-2000:] for _, _, e in results]
    assert json.loads(results[0][1].splitlines()[-1])["resumed"] == 1
    ref = tmp_path / "one"
    assert spawn([(tiny_llama, ref)], tmp_path / "logs3", world=1)[0][0] == 0
    same_tensors(ref, out)


def test_block_refiners_refuse_to_run_data_parallel(tiny_llama, tmp_path, monkeypatch):
    import onecomp_core.runner as runner
    monkeypatch.setattr(runner, "start_ranks", lambda device: Ranks(rank=0, world=2))
    with pytest.raises(OnecompError, match="lpcd refines blocks inside the layer-wise pass and does not run "
                                           "data-parallel.*without torchrun"):
        onecomp_core.quantize(tiny_llama, tmp_path / "q", **{**SETTINGS, "refiners": ["lpcd"]})
    assert not (tmp_path / "q").exists() and not (tmp_path / "q.onecomp-partial").exists()


@requires("refiner", "blockptq")
def test_blockptq_trains_data_parallel_and_the_ranks_stay_identical(tiny_llama, tmp_path):
    """Two ranks, shards of 3 and 2 samples: gradients averaged, held-out errors reduced over the
    ranks, as many steps on each; the core's checksum after every block finds the ranks equal."""
    settings = {**SETTINGS, "refiners": ["blockptq"], "options": {"blockptq": {"epochs": 2}},
                "spill_streams": "always"}          # and every rank's streams in files of its own
    out = tmp_path / "dp"
    results = spawn([(tiny_llama, out)], tmp_path / "logs", settings=settings)
    assert all(rc == 0 for rc, _, _ in results), [e[-2000:] for _, _, e in results]
    layers = json.loads((out / "report.json").read_text())["layers"]
    records = [li["blockptq"] for li in layers.values()]
    assert len(records) == len(layers)
    for rec in records:
        assert len(rec["train_loss"]) == 2
        assert rec["kept"] == (rec["heldout_after"] < rec["heldout_before"])
    assert json.loads((out / "report.json").read_text())["summary"]["streams_on_disk"]
    assert not list(tmp_path.glob(".dp.onecomp-rank*")) and not (tmp_path / "dp.onecomp-partial").exists()


@requires("refiner", "globalptq")
@pytest.mark.whole_suite
def test_globalptq_trains_data_parallel_and_a_lost_rank_resumes_at_the_refine_stage(tiny_llama, tmp_path):
    """Both ranks train globalptq on their shards of the refine samples (gradients averaged, the
    ranks' results compared by the core); rank 1 killed as the refine stage starts ends rank 0
    with the one-line error while DIR holds the published pivot; the same command resumes the
    refine stage on both ranks. The pivot's held-out KL is the one-process run's, exactly."""
    settings = {**SETTINGS, "num_samples": 8, "refiners": ["qep", "globalptq"],
                "options": {"globalptq": {"epochs": 2}}}
    out = tmp_path / "dp"
    (rc0, _, err0), (rc1, _, _) = spawn([(tiny_llama, out)], tmp_path / "logs1", kill_rank=1,
                                        kill_stage="refine", settings=settings)
    assert rc1 == -9
    last = err0.strip().splitlines()[-1]
    assert rc0 == 1 and "rank 0 of 2 lost the other ranks during refiner globalptq" in last, err0[-3000:]
    assert json.loads((out / "report.json").read_text())["refine"] == []       # DIR: the pivot, complete
    results = spawn([(tiny_llama, out)], tmp_path / "logs2", settings=settings)  # the same command again
    assert all(rc == 0 for rc, _, _ in results), [e[-2000:] for _, _, e in results]
    assert "[globalptq] epoch 2/2" in results[0][2] and "[globalptq]" not in results[1][2]   # rank 0 logs
    record, = json.loads((out / "report.json").read_text())["refine"]
    assert record["name"] == "globalptq" and record["ranks"] == 2 and record["modules"] > 0
    assert record["kept"] == (record["after"] < record["before"])
    one = tmp_path / "one"
    assert spawn([(tiny_llama, one)], tmp_path / "logs3", world=1, settings=settings)[0][0] == 0
    single, = json.loads((one / "report.json").read_text())["refine"]
    assert single["before"] == record["before"] and "ranks" not in single


def test_too_few_samples_for_the_ranks_is_a_one_line_error(tiny_llama, tmp_path, monkeypatch):
    import onecomp_core.runner as runner
    monkeypatch.setattr(runner, "start_ranks", lambda device: Ranks(rank=0, world=4))
    with pytest.raises(OnecompError, match="3 calibration samples cannot be shared by 4 ranks: raise --num-samples"):
        onecomp_core.quantize(tiny_llama, tmp_path / "q", **{**SETTINGS, "num_samples": 3})


def test_a_half_set_up_launch_names_what_is_missing(monkeypatch):
    from onecomp_core.distributed import start_ranks
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv("MASTER_ADDR", raising=False)
    with pytest.raises(OnecompError, match="MASTER_ADDR.*not set; launch with torchrun --nproc-per-node 2"):
        start_ranks("cpu")


@given(n=st.integers(0, 200), world=st.integers(1, 16))
def test_shards_cover_the_samples_once_in_order_and_differ_by_at_most_one(n, world):
    bounds = shard_bounds(n, world)
    assert len(bounds) == world and bounds[0][0] == 0 and bounds[-1][1] == n
    assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))
    sizes = [b - a for a, b in bounds]
    assert max(sizes) - min(sizes) <= 1


@given(costs=st.lists(st.floats(0.0, 1e6), min_size=1, max_size=30), world=st.integers(1, 8))
def test_owners_are_balanced_like_lpt_and_the_same_for_the_same_costs(costs, world):
    named = {f"m{i}": c for i, c in enumerate(costs)}
    load = [0.0] * world
    owners = assign_owners(named, load)
    assert owners == assign_owners(named, [0.0] * world)                 # every rank computes the same
    assert set(owners.values()) <= set(range(world))
    assert sum(load) == pytest.approx(sum(costs))
    # LPT's bound: no rank ends more than the largest item above the average
    assert max(load) <= sum(costs) / world + max(costs) + 1e-6


@given(n=st.integers(1, 40), batch=st.integers(1, 8), extra=st.integers(0, 5))
def test_going_round_fills_the_steps_other_ranks_take(n, batch, extra):
    from onecomp_core.sdk import go_round
    order = list(range(n))
    own = -(-n // batch)
    assert go_round(order, own, batch) == order                          # as many steps already: unchanged
    longer = go_round(order, own + extra, batch)
    assert -(-len(longer) // batch) == own + extra                       # exactly the steps asked for
    assert all(longer[i] == order[i % n] for i in range(len(longer)))    # the same order, round again
