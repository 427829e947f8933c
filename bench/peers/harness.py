"""The layer-wise path against the peers, one machine, one session, the same tokens: each tool
quantizes SmolLM2-135M from the same calibration token tensor (32 x 512 of enwiki_calib, made
here with onecomp's sampler and handed to every tool), its saved artifact is read back by its
own loader into dense weights, and one evaluator measures all of them on the same evaluation
tokens (the first 16,384 of enwiki_eval, 512-token windows): perplexity, mean KL to the FP model
per token, top-1 agreement with the FP model. One JSON line per run, then one JSON table.

    OMP_NUM_THREADS=2 python bench/peers/harness.py [--tools onecomp,llmcompressor] [--cells 4b-g128-sym,...]

Each peer runs in its own virtual environment under --peers (made by bench/peers/setup.sh) with
run_<tool>.py; a tool that fails a cell gets its error line in the table instead of numbers.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
CALIB, EVAL = ROOT / "data" / "enwiki_calib.txt", ROOT / "data" / "enwiki_eval.txt"
CELLS = {"4b-g128-sym": (4, 128, True), "4b-g128-asym": (4, 128, False), "3b-g128-sym": (3, 128, True),
         "3b-g128-asym": (3, 128, False), "4b-channel-sym": (4, -1, True), "4b-channel-asym": (4, -1, False)}


def onecomp_run(model: str, tokens: Path, out: Path, bits: int, group: int, sym: bool, qep: bool,
                extra: list[str] = ()) -> dict:
    """onecomp in this environment (its calibration is the same sampler on the same text: the
    harness checks the ids are the ones handed to the peers)."""
    flags = ["--bits", str(bits), "--group-size", str(group), "--sym" if sym else "--asym", "--projector", "gptq",
             "--calibration", str(CALIB), "--num-samples", "32", "--seq-len", "512"]
    if qep:
        flags += ["--correction", "qep"]
    flags += list(extra)
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "onecomp_core.cli", "quantize", model, "--out", str(out), *flags],
                          capture_output=True, text=True, env={**os.environ, "ONECOMP_PROGRESS": "0"}, cwd=out.parent)
    if proc.returncode:
        return {"error": proc.stderr.strip().splitlines()[-1:]}
    rep = json.loads((out / "report.json").read_text())
    import onecomp_core
    q = onecomp_core.load_quantized(out, "cpu")
    dense = {f"{n}.weight": m.weight_dequantized().detach().float() for n, m in q.named_modules()
             if hasattr(m, "weight_dequantized")}
    from safetensors.torch import save_file
    save_file({k: v.contiguous() for k, v in dense.items()}, str(out / "dense.safetensors"))
    return {"seconds": round(rep["stages"]["layerwise"], 1), "wall_s": round(time.time() - t0, 1),
            "peak_rss_mb": rep["summary"]["peak_rss_mb"]}


def peer_run(tool: str, peers: Path, model: str, tokens: Path, out: Path, bits: int, group: int, sym: bool) -> dict:
    py = peers / tool / "bin" / "python"
    if not py.is_file():
        return {"error": [f"{py} missing: run bench/peers/setup.sh {tool}"]}
    # in the work folder: a tool that writes files where it runs (GPTQModel's logs/) leaves them there
    proc = subprocess.run([str(py), str(HERE / f"run_{tool}.py"), model, str(tokens.resolve()), str(out.resolve()),
                           "--bits", str(bits), "--group-size", str(group), *(["--sym"] if sym else [])],
                          capture_output=True, text=True, cwd=out.resolve().parent,
                          env={**os.environ, "PYTHONNOUSERSITE": "1",       # GPTQModel sizes its pools from this
                               "GPTQMODEL_CPU_WORKERS": str(max(2, int(os.environ.get("OMP_NUM_THREADS", "2"))))})
    if proc.returncode:
        lines = (proc.stderr.strip() or proc.stdout.strip()).splitlines()
        said = [ln for ln in lines if "Error" in ln or "error" in ln][-1:]          # the tool's own error line
        return {"error": said + lines[-1:] if said and said[-1] != lines[-1] else lines[-1:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def evaluate_dense(fp_model, dense_file: Path, eval_ids: torch.Tensor, seq_len: int = 512) -> dict:
    """ppl, mean KL(P_fp || P_q) per token and top-1 agreement of the FP model with the dense
    weights put in, on non-overlapping windows of ``seq_len`` (every token after the first of
    each window scored)."""
    import copy
    from safetensors.torch import load_file
    q = copy.deepcopy(fp_model)
    state = load_file(str(dense_file))
    missing = [k for k in state if k not in dict(q.named_parameters())]
    if missing:
        raise SystemExit(f"{dense_file}: {missing[0]} is not a parameter of the model")
    with torch.no_grad():
        for k, v in state.items():
            q.get_parameter(k).copy_(v)
    nll = kl = agree = 0.0
    n = 0
    with torch.no_grad():
        for s in range(0, eval_ids.numel() - 1, seq_len):
            x = eval_ids[s:s + seq_len][None]
            if x.shape[1] < 2:
                break
            lq = torch.log_softmax(q(input_ids=x).logits[0, :-1].float(), -1)
            lf = torch.log_softmax(fp_model(input_ids=x).logits[0, :-1].float(), -1)
            y = x[0, 1:]
            nll -= float(lq.gather(1, y[:, None]).sum())
            kl += float((lf.exp() * (lf - lq)).sum())
            agree += float((lq.argmax(-1) == lf.argmax(-1)).sum())
            n += y.numel()
    return {"ppl": round(math.exp(nll / n), 3), "kl": round(kl / n, 4), "top1_agreement": round(agree / n, 4),
            "eval_tokens": n}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--tools", default="onecomp,onecomp+qep,llmcompressor,gptqmodel,onecomp14")
    ap.add_argument("--cells", default=",".join(CELLS))
    ap.add_argument("--peers", type=Path, default=Path.home() / ".cache" / "onecomp" / "peers")
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--work", type=Path, default=None,
                    help="keep the artifacts here, with each run's row (CELL-TOOL.row.json): a rerun with the same "
                         "--work reuses the rows it finds instead of running again")
    ap.add_argument("--onecomp-flags", default="", help="extra flags for onecomp's runs (one string, e.g. "
                                                         "'--forward-dtype off'); use another --work for each")
    a = ap.parse_args()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from onecomp_core.calibration import calibration_samples
    from onecomp_core.evaluate import text_tokens
    from onecomp_core.model_source import resolve_model
    model = str(resolve_model("smollm2-135m"))
    tok = AutoTokenizer.from_pretrained(model)
    ids = calibration_samples(str(CALIB), tok, 32, 512)
    eval_ids = text_tokens(tok, str(EVAL), a.eval_tokens)
    fp = AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32).eval()
    work = a.work or Path(tempfile.mkdtemp(prefix="peers-"))
    work.mkdir(parents=True, exist_ok=True)
    tokens = work / "calibration_tokens.pt"
    torch.save(ids, tokens)
    rows = []
    for cell in a.cells.split(","):
        bits, group, sym = CELLS[cell]
        for tool in a.tools.split(","):
            out = work / f"{cell}-{tool}"
            saved = out.with_name(out.name + ".row.json")
            if saved.is_file():                         # measured by an earlier, interrupted run of the harness
                rows.append(json.loads(saved.read_text()))
                print(json.dumps(rows[-1]), flush=True)
                continue
            if tool.startswith("onecomp") and tool != "onecomp14":
                r = onecomp_run(model, tokens, out, bits, group, sym, qep=tool.endswith("+qep"),
                                extra=a.onecomp_flags.split())
            else:
                r = peer_run(tool, a.peers, model, tokens, out, bits, group, sym)
            if "error" not in r:
                r.update(evaluate_dense(fp, out / "dense.safetensors", eval_ids))
            r.update({"cell": cell, "tool": tool})
            if a.work is not None and "error" not in r:
                saved.write_text(json.dumps(r))
            rows.append(r)
            print(json.dumps(r), flush=True)
    print(json.dumps({"bench": "peers", "calibration": "32 x 512 enwiki_calib (the same token tensor for every tool)",
                      "eval_tokens": a.eval_tokens, "rows": rows}))


if __name__ == "__main__":
    main()
