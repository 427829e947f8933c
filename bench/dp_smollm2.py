"""Data-parallel against one process on SmolLM2-135M: the same GPTQ 4b/g128 run (standard
protocol: 32 x 512 calibration samples of enwiki_calib, ppl/KL on the first 16,384 tokens of
enwiki_eval) once as one process with all the threads and once as ``--ranks`` torchrun processes
on the gloo backend. By default every process gets the same threads (--threads divided by the
ranks) and the statistics are summed in float64, so the only difference is the number of
processes: the two checkpoints should hold the same tensors (thread counts and float32 sums
change the last bits of the statistics, and GPTQ's choices with them). Prints one JSON line per
run and one summary line: ppl/KL of both, both wall times, whether the tensors are the same.

    python bench/dp_smollm2.py [--ranks 2] [--threads 2] [--one-threads N] [--stats-dtype float64]
"""
from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import quantize_and_measure  # noqa: E402


def same_tensors(a: Path, b: Path) -> tuple[bool, list[str]]:
    import torch
    from safetensors.torch import load_file
    differ = []
    for f in sorted(p.name for p in a.glob("*.safetensors")):
        x, y = load_file(a / f), load_file(b / f)
        differ += [k for k in x if k not in y or not torch.equal(x[k], y[k])]
    return not differ, differ[:5]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--threads", type=int, default=2, help="threads of the machine, split between the ranks")
    ap.add_argument("--one-threads", type=int, default=0,
                    help="threads of the one-process run (default: a rank's share, --threads / --ranks)")
    ap.add_argument("--stats-dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--flags", default="--bits 4 --group-size 128 --projector gptq")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    a = ap.parse_args()
    flags = [*shlex.split(a.flags), "--stats-dtype", a.stats_dtype]
    per_rank = max(1, a.threads // a.ranks)
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs = {"one": (None, a.one_threads or per_rank),
                "ranks": ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.ranks}",
                           "-m", "onecomp_core"], per_rank)}
        for name, (launcher, threads) in runs.items():
            r = quantize_and_measure(a.model, flags, a.eval_tokens, keep_out=Path(tmp) / name, launcher=launcher,
                                     env={"OMP_NUM_THREADS": str(threads)})
            r.update(run=name, processes=1 if launcher is None else a.ranks, threads_per_process=threads)
            print(json.dumps(r), flush=True)
            rows[name] = r
        same, differ = same_tensors(Path(tmp) / "one", Path(tmp) / "ranks")
    one, dp = rows["one"], rows["ranks"]
    print(json.dumps({"bench": "dp_smollm2", "flags": " ".join(flags), "ranks": a.ranks,
                      "threads_per_process": [one.get("threads_per_process"), dp.get("threads_per_process")],
                      "ppl": [one.get("ppl"), dp.get("ppl")], "kl": [one.get("kl"), dp.get("kl")],
                      "wall_s": [one.get("wall_s"), dp.get("wall_s")],
                      "layerwise_s": [one.get("layerwise_s"), dp.get("layerwise_s")],
                      "peak_rss_mb_rank0": [one.get("peak_rss_mb"), dp.get("peak_rss_mb")],
                      "same_ppl_3_decimals": one.get("ppl") == dp.get("ppl"),
                      "identical_tensors": same, "first_differing": differ}))


if __name__ == "__main__":
    main()
