"""The ``onecomp`` command: quantize, refine, eval, plugins, config."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .errors import OnecompError


def _add_run_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", help="model folder, .gguf file or hub id")
    p.add_argument("--config", help="YAML/TOML/JSON file with any of the fields below")
    p.add_argument("--out", help="output folder (appears complete or not at all)")
    p.add_argument("--bits", type=int, help="bits per weight of the uniform grid (default 4; the format says which it holds)")
    p.add_argument("--group-size", help="positive integer, or -1 / channel for per-channel")
    sym = p.add_mutually_exclusive_group()
    sym.add_argument("--sym", dest="symmetric", action="store_const", const=True,
                     help="symmetric grid (zero point fixed at the middle; loads in plain transformers)")
    sym.add_argument("--asym", dest="symmetric", action="store_const", const=False,
                     help="asymmetric grid with a stored zero point per group (the default)")
    p.add_argument("--projector", help="projector name (rtn, gptq, ...; default gptq where installed, else rtn)")
    p.add_argument("--preprocessor", action="append", dest="preprocessors", metavar="NAME",
                   help="function-preserving transform before quantization (repeatable, applied in order)")
    p.add_argument("--refiner", "--correction", action="append", dest="refiners", metavar="NAME",
                   help="refiner (repeatable, in order): corrections such as qep, lpcd; block refiners such as "
                        "blockcomp, blockptq; model refiners such as globalptq")
    _add_budget_flags(p)
    p.add_argument("--spill-streams", choices=["auto", "always", "never"],
                   help="keep the layer-wise pass's hidden-state streams in files on disk: auto (default) when "
                        "--max-memory says they do not fit")
    p.add_argument("--planner", help="planner name (uniform, autobit, ...)")
    p.add_argument("--target-bpw", type=float, help="budget: average bits per weight of the quantized linears")
    p.add_argument("--budget-bytes", help="budget: size of the quantized linears, e.g. 60MB")
    p.add_argument("--fit-memory", help="budget: device memory to fit, e.g. 6GiB (minus KV cache and activations)")
    p.add_argument("--context", type=int, help="context length for --fit-memory (default 4096)")
    p.add_argument("--batch", type=int, help="batch size for --fit-memory (default 1)")
    p.add_argument("--format", help="format name (uniform, ...)")
    p.add_argument("--export", action="append", dest="exports", metavar="NAME",
                   help="an extra exporter writing beside the compressed-tensors checkpoint (repeatable)")
    p.add_argument("--calibration", help="calibration text: .txt/.jsonl/.parquet, dataset folder or hub id")
    p.add_argument("--num-samples", type=int, help="calibration samples (default 32)")
    p.add_argument("--seq-len", type=int, help="tokens per calibration sample (default 512)")
    p.add_argument("--strategy", help="concat_chunk, drop_head or drop_rand")
    p.add_argument("--seed", type=int, help="seed of the calibration sampling (default 0)")
    p.add_argument("--batch-size", type=int, help="calibration samples per block forward (default: 1 on a CPU, 8 on CUDA)")
    p.add_argument("--stats-dtype", choices=["float32", "float64"],
                   help="dtype the calibration statistics are summed in (float64: the same sums whatever the "
                        "order, e.g. across data-parallel ranks)")
    p.add_argument("--forward-dtype", choices=["auto", "bfloat16", "statistics", "off"],
                   help="precision of the layer-wise pass's block forwards (auto: bfloat16 autocast on a CPU with "
                        "native bfloat16 matmuls and a float32 model; off: the compute dtype; statistics and "
                        "solves stay float32 either way)")
    _add_refine_sample_flags(p)
    p.add_argument("--exclude", action="append", help="module name pattern to keep in full precision")
    p.add_argument("--option", action="append", default=[], metavar="COMPONENT.KEY=VALUE",
                   help="a component option, e.g. gptq.damp=0.02 (value parsed as JSON when it can be)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--dtype", help="auto or a torch dtype name")
    p.add_argument("--store-dtype", choices=["auto", "float16", "bfloat16", "float32"],
                   help="dtype of the tensors left unquantized (embeddings, norms, scales) in the checkpoint: "
                        "auto keeps a 16-bit source's and writes float16 for a float32 source (default)")
    p.add_argument("--eval-text", help="after quantizing, measure perplexity and KL on this text")
    p.add_argument("--bos", choices=["auto", "yes", "no"],
                   help="calibration and evaluation sequences start with BOS: auto, as the tokenizer does (default)")
    p.add_argument("--overwrite", action="store_const", const=True,
                   help="replace an existing output folder (and start an unfinished run of another config over)")


def _add_budget_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refine", choices=["manual", "auto"],
                   help="auto: add the refiners (blockptq, globalptq) that fit --max-memory and --time-budget")
    p.add_argument("--max-memory", help="memory the run may use, e.g. 8GB or 8GiB (default: the machine's; the GPU's on CUDA); "
                        "given, it also stops a named --refiner that would need more, before it starts")
    p.add_argument("--time-budget", help="time the whole run may take, e.g. 45m or 2h (--refine auto skips what would not fit)")


def _add_refine_sample_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--refine-samples", type=int,
                   help="calibration samples model refiners train on (default: 4x --num-samples, at most 128, "
                        "as far as the calibration text gives them)")
    p.add_argument("--heldout", type=int, help="further samples judging model refiners (default: 10%% of those)")


def _options(items) -> dict:
    opts: dict = {}
    for item in items:
        key, eq, value = item.partition("=")
        comp, dot, field = key.partition(".")
        if not eq or not dot or not comp or not field:
            raise OnecompError(f"--option {item!r}: write COMPONENT.KEY=VALUE, e.g. gptq.damp=0.02")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            v = value
        opts.setdefault(comp, {})[field] = v
    return opts


def _run_config(a):
    from .config import make_config
    return make_config(a.model, a.config, options=_options(a.option), out=a.out, bits=a.bits,
                       group_size=a.group_size, symmetric=a.symmetric, projector=a.projector,
                       preprocessors=a.preprocessors, refiners=a.refiners, planner=a.planner,
                       target_bpw=a.target_bpw, budget_bytes=a.budget_bytes, fit_memory=a.fit_memory,
                       context=a.context, batch=a.batch, format=a.format, exports=a.exports,
                       calibration=a.calibration, num_samples=a.num_samples, seq_len=a.seq_len,
                       strategy=a.strategy, seed=a.seed, batch_size=a.batch_size, stats_dtype=a.stats_dtype,
                       forward_dtype=a.forward_dtype,
                       exclude=a.exclude,
                       refine_samples=a.refine_samples, heldout=a.heldout, refine=a.refine,
                       max_memory=a.max_memory, time_budget=a.time_budget, spill_streams=a.spill_streams,
                       device=a.device, dtype=a.dtype, store_dtype=a.store_dtype, eval_text=a.eval_text,
                       overwrite=a.overwrite, bos=a.bos)


def cmd_quantize(a) -> int:
    from .plugins import load_plugins
    from .resolve import Resolved
    from .runner import Runner
    _json_needs_dry_run(a)
    run = _run_config(a)
    if not run.out:
        raise OnecompError("no output folder: pass --out DIR")
    report = Runner(Resolved(run, load_plugins()), dry_run=a.dry_run).run()
    if report.get("rank"):                           # a data-parallel rank other than 0: rank 0 reports
        return 0
    if a.dry_run:
        return _print_dry_run(report, a.json)
    s, ev = report["summary"], report.get("evaluation")
    line = f"wrote {report['out']}: {s['bpw']} bits per weight, {s['wall_seconds']} s, peak RSS {s['peak_rss_mb']} MiB"
    if ev:
        line += f", ppl {ev['ppl']:.3f}" + (f" (FP {ev['ppl_ref']:.3f}), KL {ev['kl']:.4f}" if "kl" in ev else "")
    print(line)
    if ev:
        print(json.dumps(ev))
    return 0


def _json_needs_dry_run(a) -> None:
    if a.json and not a.dry_run:
        raise OnecompError("--json prints a dry run's report: add --dry-run (a run writes its report to "
                           "report.json in the output folder)")


def _print_dry_run(report: dict, as_json: bool) -> int:
    from .dry_run import dry_run_lines
    print(json.dumps(report) if as_json else "\n".join(dry_run_lines(report)))
    return 0


def cmd_refine(a) -> int:
    from .api import refine
    _json_needs_dry_run(a)
    old = Path(a.dir) / "report.json"
    earlier = len(json.loads(old.read_text()).get("refine", [])) if old.is_file() else 0
    report = refine(a.dir, refiners=a.refiners or [], options=_options(a.option), eval_text=a.eval_text,
                    refine_samples=a.refine_samples, heldout=a.heldout, device=a.device, dtype=a.dtype,
                    refine=a.refine, max_memory=a.max_memory, time_budget=a.time_budget, dry_run=a.dry_run)
    if report.get("rank"):                           # a data-parallel rank other than 0: rank 0 reports
        return 0
    if a.dry_run:
        return _print_dry_run(report, a.json)
    for rec in report["refine"][earlier:]:
        what = rec["name"] + (" (its blocks)" if rec.get("scope") == "block" else "")
        if rec.get("skipped"):
            why = f" ({rec['why']})" if rec.get("why") else ""
            print(f"{what}: skipped{why}, held-out KL stays {rec['before']:.4f}")
            continue
        verdict = "kept" if rec["kept"] else "discarded"
        print(f"{what}: held-out KL {rec['before']:.4f} -> {rec['after']:.4f}, {verdict} ({rec['seconds']} s)")
    print(f"{report['out']}: {report['summary'].get('stage')}")
    if report.get("evaluation"):
        print(json.dumps(report["evaluation"]))
    return 0


def cmd_eval(a) -> int:
    from .checkpoint import read_meta
    if not a.text and not a.tasks:
        raise OnecompError("nothing to measure: pass --text FILE (perplexity, KL) and/or --tasks NAMES (lm-eval)")
    read_meta(a.dir)
    result = _perplexity(a) if a.text else {}
    if a.tasks:
        result["tasks"] = _tasks(a)
        _add_to_report(Path(a.dir), result["tasks"])
    if a.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k}: {v}")
    return 0


def _perplexity(a) -> dict:
    from transformers import AutoTokenizer
    from .checkpoint import load_quantized
    from .calibration import bos_id
    from .evaluate import evaluate, text_tokens
    from .reference_pass import measure_reference
    from .resources import release_memory
    tok = AutoTokenizer.from_pretrained(a.dir)
    ids = text_tokens(tok, a.text, a.max_tokens)
    bos = bos_id(tok, a.bos)
    del tok                 # (~100 MB for a 49k vocabulary) not needed once the text is tokens
    release_memory()
    ref = None
    if a.ref:      # the reference's pass first (block by block), then only what KL needs of it stays resident
        ref = measure_reference(a.ref, ids, a.seq_len, a.stride, bos, a.device, a.dtype)
        release_memory()
    model = load_quantized(a.dir, a.device, a.dtype)
    return evaluate(model, ids, ref=ref, seq_len=a.seq_len, stride=a.stride, bos=bos)


def _tasks(a) -> dict:
    """lm-eval scores of the quantized model and, with --ref, of the reference (one model resident at a time)."""
    from transformers import AutoTokenizer
    from .checkpoint import load_quantized
    from .evaluate import load_reference
    from .harness import run_tasks, task_names
    from .resources import release_memory
    specs = [t for arg in a.tasks for t in arg.split(",") if t]
    task_names(specs)                                  # a bad task file fails before any model loads
    tok = AutoTokenizer.from_pretrained(a.dir)
    kw = dict(limit=a.limit, num_fewshot=a.num_fewshot)
    out = {}
    if a.ref:
        ref = load_reference(a.ref, a.device, a.dtype)[0]
        out["reference"] = run_tasks(ref, tok, specs, **kw)
        del ref
        release_memory()
    out["model"] = run_tasks(load_quantized(a.dir, a.device, a.dtype), tok, specs, **kw)
    return out


def _add_to_report(folder: Path, tasks: dict) -> None:
    """The lm-eval scores into the folder's report (json, md, html) and model card."""
    from .report import write_reports
    path = folder / "report.json"
    if path.is_file():
        report = json.loads(path.read_text())
        report["lm_eval"] = tasks
        write_reports(folder, report)


def cmd_plugins(a) -> int:
    from .plugins import load_plugins
    ps = load_plugins()
    rows = []
    for p in ps.plugins:
        regs = ", ".join(f"{k} {n}" for k, n in p.registers) or "-"
        state = f"FAILED: {p.error}" if p.error else regs
        if p.warnings:
            state += "; WARNING: " + "; ".join(p.warnings)
        rows.append({"name": p.name, "distribution": p.distribution, "version": p.version,
                     "module": p.module, "registers": [list(r) for r in p.registers], "error": p.error,
                     "warnings": p.warnings})
        if not a.json:
            print(f"{p.name:<12} {p.distribution or '-':<28} {p.version or '-':<10} {state}")
    if a.json:
        print(json.dumps(rows, indent=2))
    return 1 if ps.failed and a.strict else 0


def cmd_config(a) -> int:
    from .plugins import load_plugins
    from .resolve import Resolved
    from .config import read_file
    given = a.model is not None or (a.config and "model" in read_file(a.config))
    if not given:            # the config a run would get, before a model is chosen
        a.model = ""
    run = _run_config(a)
    desc = Resolved(run, load_plugins()).describe()
    if not given:
        desc["model"] = None
        print("# no model given: pass MODEL or set `model:` in the config to run this", file=sys.stderr)
    if a.json:
        print(json.dumps(desc, indent=2))
    else:
        import yaml
        print(yaml.safe_dump(desc, sort_keys=False), end="")
    return 0


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="onecomp", description="Quantize Hugging Face causal LMs to low-bit checkpoints.")
    p.add_argument("--offline", action="store_true",
                   help="never reach the network (as HF_HUB_OFFLINE=1): a name that is not local is an error")
    sub = p.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="quantize a model into an output folder")
    _add_run_flags(q)
    q.add_argument("--dry-run", action="store_true",
                   help="stop after the plan: check the whole config, fit the preprocessors, make the plan, estimate "
                        "memory and the block refiners, time the first block (thrown away), print what the run "
                        "would do, and write nothing")
    q.add_argument("--json", action="store_true", help="with --dry-run: print its report as JSON")
    q.set_defaults(fn=cmd_quantize)
    r = sub.add_parser("refine", help="run refiners (model refiners, and block refiners such as blockptq over its "
                                      "blocks) on an onecomp checkpoint, replacing it if they help")
    r.add_argument("dir", help="an onecomp output folder (a pivot or an already refined checkpoint)")
    r.add_argument("--refiner", action="append", dest="refiners", metavar="NAME",
                   help="refiner (repeatable, in order), e.g. blockptq, globalptq; or --refine auto")
    r.add_argument("--option", action="append", default=[], metavar="COMPONENT.KEY=VALUE")
    _add_budget_flags(r)
    _add_refine_sample_flags(r)
    r.add_argument("--eval-text", help="afterwards, measure perplexity and KL on this text")
    r.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    r.add_argument("--dtype", help="auto or a torch dtype name")
    r.add_argument("--dry-run", action="store_true",
                   help="estimate each refiner on the checkpoint as it is (memory, time) and print which would run; "
                        "nothing is trained, judged or written")
    r.add_argument("--json", action="store_true", help="with --dry-run: print its report as JSON")
    r.set_defaults(fn=cmd_refine)
    e = sub.add_parser("eval", help="perplexity (and KL with --ref) of a quantized folder")
    e.add_argument("dir")
    e.add_argument("--text", help="text file to measure perplexity on")
    e.add_argument("--tasks", action="append", default=[],
                   help="lm-eval tasks: registered names or task YAML files, comma-separated or repeated "
                        "(needs lm-eval; the scores go into the folder's report)")
    e.add_argument("--limit", type=int, default=None, help="lm-eval: at most N examples per task")
    e.add_argument("--num-fewshot", type=int, default=None, help="lm-eval: few-shot examples per prompt")
    e.add_argument("--ref", help="full-precision model (folder, .gguf, hub id) for KL and its perplexity")
    e.add_argument("--seq-len", type=int, default=512, help="tokens per window (default 512)")
    e.add_argument("--stride", type=int, default=None,
                   help="tokens between window starts (default: seq-len, windows do not overlap)")
    e.add_argument("--max-tokens", type=int, default=16384, help="evaluate the first N tokens of the text")
    e.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    e.add_argument("--dtype", default="auto", help="auto or a torch dtype name")
    e.add_argument("--json", action="store_true", help="print one JSON object")
    e.add_argument("--bos", default="auto", choices=["auto", "yes", "no"],
                   help="start every window with the BOS token: auto, as the tokenizer does (default)")
    e.set_defaults(fn=cmd_eval)
    pl = sub.add_parser("plugins", help="installed plugins, versions and what each registers")
    pl.add_argument("--json", action="store_true")
    pl.add_argument("--strict", action="store_true", help="exit 1 when a plugin failed to load")
    pl.set_defaults(fn=cmd_plugins)
    c = sub.add_parser("config", help="print the resolved config")
    _add_run_flags(c)
    c.add_argument("--show", action="store_true", help="print the resolved config (the default)")
    c.add_argument("--json", action="store_true")
    c.set_defaults(fn=cmd_config)
    return p


class _Parser(argparse.ArgumentParser):
    """argparse with its usage errors as one line naming the flag and where help is, exit code 2."""

    def error(self, message):
        raise _UsageError(f"{message}; see `{self.prog} --help`")


class _UsageError(Exception):
    pass


def main(argv=None) -> int:
    import os
    # tokenizers' thread pool leaves per-thread heap arenas behind: ~200 MB of a 1.1 GB evaluation
    # peak on SmolLM2 (measured); one long text tokenizes no slower without it
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    try:
        args = parser().parse_args(argv)
    except _UsageError as exc:
        print(f"onecomp: error: {exc}", file=sys.stderr)
        return 2
    if getattr(args, "offline", False):
        import os
        os.environ["HF_HUB_OFFLINE"] = "1"          # transformers, datasets and huggingface_hub read it too
    try:
        return args.fn(args)
    except OnecompError as exc:
        print(f"onecomp: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\nonecomp: interrupted; run the same command again to resume", file=sys.stderr)
        return 130
    except Exception as exc:
        from .disk import disk_full
        if disk_full(exc):
            print(f"onecomp: error: the disk is full ({first_line(exc)}); finished blocks are kept and the same "
                  f"command resumes once there is room: free some space, or choose --out on a larger disk",
                  file=sys.stderr)
            return 2
        if not out_of_memory(exc):
            raise
        print(f"onecomp: error: out of memory ({first_line(exc)}); finished blocks are kept and the same command "
              f"resumes: lower --num-samples, --seq-len or --batch-size, pass --max-memory (the streams then go "
              f"to disk when they do not fit), or free memory", file=sys.stderr)
        return 2


def out_of_memory(exc: BaseException) -> bool:
    """A failed allocation (host or GPU), as torch and Python report it."""
    import torch
    return isinstance(exc, (MemoryError, torch.OutOfMemoryError)) or "can't allocate memory" in str(exc)


def first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    line = text.splitlines()[0] if text else type(exc).__name__
    return line.split("DefaultCPUAllocator: ", 1)[-1]


if __name__ == "__main__":
    sys.exit(main())
