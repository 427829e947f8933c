"""The AutoBit integer program (docs/algorithms.md):

    min  sum_{l,c} e_{l,c} x_{l,c}
    s.t. sum_{l,c} m_{l,c} x_{l,c} <= budget,   sum_c x_{l,c} = 1 for every l,   x binary

l ranges over decision units (a module, or modules tied to one choice), c over candidates,
e is the predicted error and m the stored bits. Solved with OR-Tools (SCIP; CP-SAT on integer-
scaled errors when SCIP is not available).
"""
from __future__ import annotations

import itertools
import math
import time

from onecomp_core.sdk import OnecompError


def smallest_budget(costs: list[list[float]]) -> float:
    return sum(min(c) for c in costs)


def budget_cap(budget: float) -> float:
    """The most bits every solver lets a plan store: costs are in bits, and a relative slack of
    1e-12 absorbs float rounding of a budget computed as a sum or a fraction."""
    return budget * (1 + 1e-12)


def within_budget(bits: float, budget: float) -> bool:
    return bits <= budget_cap(budget)


def solve(errors: list[list[float]], costs: list[list[float]], budget: float, time_limit_s: float = 60.0):
    """-> (choice index per unit, solver name, seconds). Raises when the budget is infeasible."""
    floor = smallest_budget(costs)
    if budget < floor:
        raise OnecompError(f"budget infeasible: {budget:.6g} bits is below the smallest feasible {floor:.6g} bits")
    t0 = time.time()
    scale = max((max(e) for e in errors if e), default=1.0) or 1.0
    try:
        choice, name = _scip(errors, costs, budget, scale, time_limit_s)
    except _NoSolver:
        choice, name = _cpsat(errors, costs, budget, scale, time_limit_s)
    return choice, name, time.time() - t0


class _NoSolver(Exception):
    pass


def _scip(errors, costs, budget, scale, time_limit_s):
    from ortools.linear_solver import pywraplp
    s = pywraplp.Solver.CreateSolver("SCIP")
    if s is None:
        raise _NoSolver
    s.SetTimeLimit(int(time_limit_s * 1000))
    x = [[s.BoolVar(f"x{l}_{c}") for c in range(len(errors[l]))] for l in range(len(errors))]
    for row in x:
        s.Add(sum(row) == 1)
    s.Add(sum(costs[l][c] * x[l][c] for l in range(len(x)) for c in range(len(x[l]))) <= budget_cap(budget))
    s.Minimize(sum(errors[l][c] / scale * x[l][c] for l in range(len(x)) for c in range(len(x[l]))))
    status = s.Solve()
    if status not in (pywraplp.Solver.OPTIMAL, pywraplp.Solver.FEASIBLE):
        raise OnecompError("the AutoBit integer program found no solution within its time limit; raise "
                           "autobit.time_limit_s or the budget")
    return [max(range(len(row)), key=lambda c: row[c].solution_value()) for row in x], "SCIP"


def _cpsat(errors, costs, budget, scale, time_limit_s):
    from ortools.sat.python import cp_model
    m = cp_model.CpModel()
    x = [[m.NewBoolVar(f"x{l}_{c}") for c in range(len(errors[l]))] for l in range(len(errors))]
    for row in x:
        m.AddExactlyOne(row)
    # CP-SAT takes integers: costs round up and the cap down, so whatever it picks is within
    # budget; exact for whole-bit costs, the usual case
    cap = math.floor(budget_cap(budget))
    m.Add(sum(math.ceil(costs[l][c]) * x[l][c] for l in range(len(x)) for c in range(len(x[l]))) <= cap)
    m.Minimize(sum(int(round(errors[l][c] / scale * 1e9)) * x[l][c] for l in range(len(x)) for c in range(len(x[l]))))
    solver = cp_model.CpSolver()
    solver.parameters.max_time_in_seconds = time_limit_s
    status = solver.Solve(m)
    if status not in (cp_model.OPTIMAL, cp_model.FEASIBLE):
        raise OnecompError("the AutoBit integer program found no solution within its time limit")
    return [max(range(len(row)), key=lambda c: solver.Value(row[c])) for row in x], "CP-SAT"


def brute_force(errors, costs, budget):
    """Exhaustive optimum for tiny instances (tests): -> (choice, objective) or (None, inf)."""
    best, best_obj = None, float("inf")
    for choice in itertools.product(*[range(len(e)) for e in errors]):
        if within_budget(sum(costs[l][c] for l, c in enumerate(choice)), budget):
            obj = sum(errors[l][c] for l, c in enumerate(choice))
            if obj < best_obj:
                best, best_obj = list(choice), obj
    return best, best_obj
