"""``report.html``: the run report as one self-contained page a person reads (plots as embedded
PNGs, drawn with matplotlib): summary, evaluation, stages, relative output error by block, the
bit allocation by block and module type, bits per weight by module type, and the layer table."""
from __future__ import annotations

import base64
import html
import io
import re
from collections import defaultdict

_BLOCK = re.compile(r"^(.*?)\.(\d+)\.(.+)$")     # <prefix>.<block>.<module path inside the block>


def module_kind(name: str) -> tuple[int | None, str]:
    """(block index, module type) of a linear's full name: ``model.layers.3.mlp.experts.7.up_proj``
    -> (3, ``mlp.experts.*.up_proj``); a name outside numbered blocks -> (None, name)."""
    m = _BLOCK.match(name)
    if not m:
        return None, name
    return int(m.group(2)), re.sub(r"\.\d+\.", ".*.", m.group(3))


def by_block(layers: dict, key: str) -> tuple[list[int], list[str], dict]:
    """Blocks, module types and {(block, type): mean of ``key``} over the report's layers."""
    acc = defaultdict(list)
    for name, li in layers.items():
        b, kind = module_kind(name)
        if b is not None and key in li:
            acc[(b, kind)].append(float(li[key]))
    blocks = sorted({b for b, _ in acc})
    present = {k for _, k in acc}
    kinds = [k for k in dict.fromkeys(module_kind(n)[1] for n in layers) if k in present]   # report order
    return blocks, kinds, {k: sum(v) / len(v) for k, v in acc.items()}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt
    plt.close(fig)
    return f'<img alt="" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _plots(report: dict) -> list[tuple[str, str]]:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    layers, out = report.get("layers", {}), []
    blocks, kinds, err = by_block(layers, "rel_error")
    if blocks:
        fig, ax = plt.subplots(figsize=(8, 3.6))
        for k in kinds:
            xs = [b for b in blocks if (b, k) in err]
            ax.plot(xs, [max(err[(b, k)], 1e-12) for b in xs], marker=".", label=k)
        ax.set_yscale("log")
        ax.set_xlabel("block")
        ax.set_ylabel("||(W - W^) X||^2 / ||W X||^2")
        ax.legend(fontsize=7, ncol=2)
        out.append(("Relative output error by block", _png(fig)))
    blocks, kinds, bpw = by_block(layers, "bpw")
    if blocks:
        import numpy as np
        grid = np.array([[bpw.get((b, k), np.nan) for k in kinds] for b in blocks])
        fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(kinds), 1.2 + 0.22 * len(blocks)))
        lo = float(np.floor(np.nanmin(grid)))                            # whole bits: a uniform plan is one colour
        im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=lo, vmax=max(float(np.ceil(np.nanmax(grid))), lo + 1))
        if len(blocks) * len(kinds) <= 400:
            for (r, c), v in np.ndenumerate(grid):
                if v == v:
                    ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=5, color="w")
        ax.set_xticks(range(len(kinds)), kinds, rotation=40, ha="right", fontsize=7)
        ax.set_yticks(range(len(blocks)), [str(b) for b in blocks], fontsize=6)
        ax.set_ylabel("block")
        fig.colorbar(im, ax=ax, label="bits per weight")
        out.append(("Bit allocation (bits per weight of each module)", _png(fig)))
        tot, cnt = defaultdict(float), defaultdict(float)
        for name, li in layers.items():
            kind = module_kind(name)[1]
            shape = li.get("shape") or (1, 1)
            w = float(shape[0] * shape[1])                                # weighted by the module's weights
            tot[kind] += li["bpw"] * w
            cnt[kind] += w
        fig, ax = plt.subplots(figsize=(7, 2.8))
        ks = [k for k in kinds if cnt[k]]
        ax.bar(range(len(ks)), [tot[k] / cnt[k] for k in ks])
        ax.set_xticks(range(len(ks)), ks, rotation=30, ha="right", fontsize=7)
        ax.set_ylabel("bits per weight")
        out.append(("Bits per weight by module type", _png(fig)))
    return out


def _table(header: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "" if v is None else str(v)


def html_report(report: dict) -> str:
    s = report.get("summary", {})
    parts = [f"<h1>onecomp report: {html.escape(str(s.get('model', '')))}</h1>"]
    keys = ("format", "projector", "planner", "bits", "group_size", "symmetric", "bpw", "stage", "checkpoint_mb",
            "source_mb", "size_ratio", "wall_seconds", "peak_rss_mb", "peak_gpu_mb", "device")
    parts.append(_table(["", ""], [[k, s[k]] for k in keys if k in s]))
    if report.get("evaluation"):
        parts += ["<h2>Evaluation</h2>", _table(["metric", "value"], list(report["evaluation"].items()))]
    if report.get("lm_eval"):
        from .report import lm_eval_rows
        parts += ["<h2>lm-eval</h2>", _table(["task", "metric", "this model", "reference"], lm_eval_rows(report))]
    if report.get("refine"):
        rows = [[r["name"], r.get("modules"), r.get("before"), r.get("after"),
                 "skipped" if r.get("skipped") else ("kept" if r.get("kept") else "discarded"),
                 r.get("seconds"), r.get("peak_rss_mb")] for r in report["refine"]]
        parts += ["<h2>Stages after the pivot</h2>",
                  _table(["refiner", "modules", "held-out KL before", "after", "verdict", "seconds", "peak RSS MB"], rows)]
    if report.get("stages"):
        parts += ["<h2>Run stages</h2>", _table(["stage", "seconds"], [[k, float(v)] for k, v in report["stages"].items()])]
    try:
        plots = _plots(report)
    except ImportError:
        plots = []
        parts.append("<p>Plots need matplotlib: <code>pip install matplotlib</code>.</p>")
    for title, img in plots:
        parts += [f"<h2>{html.escape(title)}</h2>", img]
    layers = report.get("layers", {})
    if layers:
        rows = [[n, li.get("bits"), li.get("group_size"), li.get("projector"), li.get("bpw"), li.get("rel_error"),
                 li.get("seconds")] for n, li in layers.items()]
        parts += ["<details><summary>Every module</summary>",
                  _table(["module", "bits", "group", "projector", "bpw", "relative output error", "seconds"], rows),
                  "</details>"]
    style = ("body{font-family:sans-serif;max-width:1000px;margin:2em auto;color:#222}"
             "table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 8px;"
             "font-size:13px;text-align:left}img{max-width:100%}")
    return (f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>onecomp report</title>"
            f"<style>{style}</style></head><body>{''.join(parts)}</body></html>\n")
