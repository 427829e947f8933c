"""What every run_<tool>.py shares (each runs in its tool's own venv, beside this file): the
command line and the peak-memory reading."""
import argparse
import json
import resource
import time


def args():
    """MODEL_DIR TOKENS.pt OUT --bits N --group-size N [--sym]."""
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("tokens")
    ap.add_argument("out")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--group-size", type=int, default=128)
    ap.add_argument("--sym", action="store_true")
    return ap.parse_args()


def peak_rss_mb() -> float:
    """This process's own peak (VmHWM): ru_maxrss would also count the harness's resident size
    at the fork that started it."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def measured(tool: str, quantize, save, dump, out: str) -> None:
    """model = quantize() timed, save(model) after it, this process's peak then, dump(out) last
    with the model released (its dense weights cost memory the tool's run did not need); prints
    the row's one JSON line."""
    t0 = time.time()
    model = quantize()
    secs = time.time() - t0
    save(model)
    peak = peak_rss_mb()
    del model
    dump(out)
    print(json.dumps({"tool": tool, "seconds": round(secs, 1), "peak_rss_mb": peak}))
