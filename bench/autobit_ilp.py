"""AutoBit's integer program at 7B size with synthetic errors: 32 layers x 7 modules x 16
candidates (bits {2,3,4,8} x groups {32,64,128,channel}), tied q/k/v and gate/up or untied.
Prints one JSON object with the solve times."""
from __future__ import annotations

import json
import random

from onecomp_core.formats.uniform import UniformFormat
from onecomp_core.spec import LayerSpec
from onecomp_plugin_autobit.ilp import solve

SHAPES = {"q": (4096, 4096), "k": (4096, 4096), "v": (4096, 4096), "o": (4096, 4096),
          "gate": (11008, 4096), "up": (11008, 4096), "down": (4096, 11008)}
CANDS = [(b, g) for b in (2, 3, 4, 8) for g in (32, 64, 128, -1)]


def instance(tied: bool, seed: int = 0):
    rng = random.Random(seed)
    fmt = UniformFormat()
    units = []
    for layer in range(32):
        sens = rng.lognormvariate(0, 1)
        mods = [["q", "k", "v"], ["o"], ["gate", "up"], ["down"]] if tied else [[m] for m in SHAPES]
        for unit in mods:
            E, M = [], []
            for b, g in CANDS:
                e = m = 0.0
                for name in unit:
                    out, cols = SHAPES[name]
                    gpen = {32: 1.0, 64: 1.15, 128: 1.3, -1: 1.8}[g]
                    e += sens * rng.uniform(0.8, 1.2) * out * cols * 4.0 ** (-b) * gpen
                    m += fmt.bits_per_weight(LayerSpec(name=name, bits=b, group_size=g), (out, cols)) * out * cols
                E.append(e)
                M.append(m)
            units.append((E, M))
    return [u[0] for u in units], [u[1] for u in units]


def main():
    total = 32 * sum(o * i for o, i in SHAPES.values())
    rows = []
    for tied in (False, True):
        E, M = instance(tied)
        for bpw in (2.5, 3.0, 4.0):
            choice, solver, secs = solve(E, M, bpw * total)
            used = sum(M[i][c] for i, c in enumerate(choice)) / total
            rows.append({"tied": tied, "units": len(E), "candidates": len(CANDS), "target_bpw": bpw,
                         "planned_bpw": round(used, 4), "solver": solver, "seconds": round(secs, 3)})
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({"bench": "autobit_ilp", "results": rows}))


if __name__ == "__main__":
    main()
