"""Hypervolume of a run's feasible trials, on normalized objectives (see `normalized`), so its reference point
is the same sentence for every run: accuracy 0 and, for each cost, its budget (or the uncompressed model's
value when that cost has no budget). The volume itself is moocore's (the maintained reference implementation
that pymoo also uses).
"""
from __future__ import annotations

import moocore
import numpy as np
import pandas as pd

from ..budgets import METRICS, pareto_mask


def hypervolume(points, reference) -> float:
    """Exact volume dominated by `points` (all objectives minimized) up to `reference`, in any dimension.
    Points not strictly better than the reference in every objective add nothing."""
    pts = np.asarray(points, dtype=float).reshape(-1, len(reference))
    if len(pts) == 0:
        return 0.0
    return float(moocore.hypervolume(pts, ref=np.asarray(reference, dtype=float)))


def reference_point(result) -> dict:
    """The hypervolume's reference point in the objectives' own units: accuracy 0, each cost at its budget
    (at the uncompressed model's value where it has no budget)."""
    return {o: 0.0 if METRICS[o] == "maximize" else float(result.limits.get(o) or result.baseline.get(o) or 1.0)
            for o in result.objectives}


def normalized(result, frame: pd.DataFrame) -> np.ndarray:
    """Objectives of `frame` as minimization in units of the reference point (which becomes all ones):
    1 - accuracy for accuracy, value / (budget, else uncompressed value) for each cost."""
    cols, reference = [], reference_point(result)
    for o in result.objectives:
        values = frame[o].astype(float).to_numpy()
        cols.append(1.0 - values if METRICS[o] == "maximize" else values / reference[o])
    return np.stack(cols, axis=1) if cols else np.zeros((len(frame), 0))


def hypervolume_history(result) -> pd.Series:
    """Hypervolume of the feasible trials finished so far, after each trial (indexed by trial number)."""
    trials = result.trials.sort_index()
    ok = trials["feasible"] & (trials["state"] == "COMPLETE") & trials[list(result.objectives)].notna().all(axis=1)
    values = normalized(result, trials)
    reference = np.ones(len(result.objectives))
    front, out = np.zeros((0, len(reference))), []
    for i, good in enumerate(ok):
        if good:
            front = np.vstack([front, values[i]])
            front = front[pareto_mask(front)]
        out.append(hypervolume(front, reference))
    return pd.Series(out, index=trials.index, name="hypervolume", dtype=float)
