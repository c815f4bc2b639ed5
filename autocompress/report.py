"""Reports of a Result: the Pareto front as a terminal table (with the baseline and budgets), CSV, JSON."""
from __future__ import annotations

import json

import pandas as pd

from .result import Result

SHOWN = ["accuracy", "latency_ms", "energy_mj", "size_kb", "macs", "params"]


def pareto_table(result: Result) -> pd.DataFrame:
    """Pareto rows with the uncompressed baseline on top, and ratios to the baseline."""
    front = result.pareto[SHOWN].copy()
    front.index = [f"trial {n}" for n in front.index]
    base = pd.DataFrame([{c: result.baseline.get(c) for c in SHOWN}], index=["baseline"])
    table = pd.concat([base, front]) if not front.empty else base
    for metric in ("latency_ms", "size_kb"):
        if result.baseline.get(metric):
            table[f"{metric.split('_')[0]} x"] = table[metric] / result.baseline[metric]
    return table


def format_table(result: Result) -> str:
    """The terminal view of a run: budgets, the Pareto front against the baseline, or why it is empty."""
    lines = [f"objectives: {', '.join(result.objectives)}"]
    if result.limits:
        lines.append("budgets: " + ", ".join(f"{k} <= {v:.4g}" for k, v in sorted(result.limits.items())))
    n, feasible = len(result.trials), int(result.trials["feasible"].sum())
    failed = int((result.trials["state"] == "FAIL").sum())
    lines.append(f"trials: {n} finished, {feasible} within budget, {failed} failed")
    if result.pareto.empty:
        lines.append("no candidate met the budgets; the closest ones:")
        lines.append(_closest(result).to_string(float_format=lambda v: f"{v:.4g}"))
        return "\n".join(lines)
    table = pareto_table(result)
    lines.append(f"Pareto front ({len(result.pareto)} models):")
    lines.append(table.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-"))
    return "\n".join(lines)


def _closest(result: Result, k: int = 5) -> pd.DataFrame:
    """Completed candidates ranked by their largest relative excess over a budget."""
    done = result.trials[result.trials["state"] == "COMPLETE"].copy()
    if done.empty or not result.limits:
        return done[SHOWN].head(k)
    excess = pd.concat([(done[m] / lim - 1).rename(f"{m} over") for m, lim in result.limits.items()], axis=1)
    done["worst excess"] = excess.max(axis=1)
    done = pd.concat([done, excess], axis=1).sort_values("worst excess")
    return done[[*SHOWN, *excess.columns]].head(k)


def to_csv(result: Result) -> str:
    return result.pareto.to_csv()


def to_json(result: Result) -> str:
    front = json.loads(result.pareto.to_json(orient="index"))
    return json.dumps({"objectives": list(result.objectives), "limits": result.limits, "baseline": result.baseline,
                       "pareto": front}, indent=2)
