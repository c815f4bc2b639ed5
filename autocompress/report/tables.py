"""The Pareto front as a terminal table (with the baseline, the budgets and which budget binds each model), CSV
and JSON; where no candidate met the budgets, the closest ones and how much each misses by.

Every function here reads a `Result` (result.py), passed in, never imported.
"""
from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd

from . import plots
from .hypervolume import hypervolume_history, reference_point

SHOWN = ["accuracy", "test_accuracy", "latency_ms", "measured_latency_ms", "energy_mj", "size_kb", "macs", "params"]


def binding(row, limits: dict) -> str:
    """The budget a model is closest to (the largest share of its limit used), e.g. 'latency_ms 93%'."""
    used = {m: row[m] / lim for m, lim in limits.items() if pd.notna(row.get(m))}
    if not used:
        return "-"
    metric = max(used, key=used.get)
    return f"{metric} {used[metric]:.0%}"


def pareto_table(result) -> pd.DataFrame:
    """The baseline, the budgets and the Pareto rows, with ratios to the baseline and the binding budget."""
    front = result.pareto.reindex(columns=SHOWN).astype(float)
    front.index = [f"trial {n}" for n in front.index]
    base = pd.DataFrame([{c: result.baseline.get(c) for c in SHOWN}], index=["baseline"], dtype=float)
    limits = {**result.limits, **_accuracy_budget(result)}
    budget = pd.DataFrame([{c: limits.get(c, math.nan) for c in SHOWN}], index=["budget"], dtype=float)
    parts = [base] + ([budget] if limits else []) + ([front] if not front.empty else [])
    table = pd.concat(parts)
    for metric in ("latency_ms", "size_kb"):
        if result.baseline.get(metric):
            table[f"{metric.split('_')[0]} x"] = table[metric] / result.baseline[metric]
    table["binds"] = [binding(row, result.limits) if str(name).startswith("trial") else ""
                      for name, row in table.iterrows()]
    return _counts_as_int(table.dropna(axis=1, how="all"))


def _accuracy_budget(result) -> dict:
    """{"accuracy": floor} when the run has an accuracy budget (a lower limit, shown in the budget row)."""
    return {} if result.min_accuracy is None else {"accuracy": result.min_accuracy}


def budget_line(result) -> str:
    """'budgets: accuracy >= 0.98, latency_ms <= 2.6, ...', or '' without budgets."""
    parts = [f"accuracy >= {result.min_accuracy:.4g}"] if result.min_accuracy is not None else []
    parts += [f"{k} <= {v:.4g}" for k, v in sorted(result.limits.items())]
    return ("budgets: " + ", ".join(parts)) if parts else ""


def closest(result, k: int = 5) -> pd.DataFrame:
    """Completed candidates ranked by their largest relative excess over a budget, with how much each misses."""
    done = result.trials[result.trials["state"] == "COMPLETE"]
    if done.empty:
        return pd.DataFrame(columns=[*SHOWN, "misses by"])
    excess = pd.DataFrame({m: done[m].astype(float) / lim - 1 for m, lim in result.limits.items()}, index=done.index)
    worst = excess.max(axis=1) if result.limits else pd.Series(0.0, index=done.index)
    rows = done.loc[worst.sort_values(kind="stable").index[:k]].reindex(columns=SHOWN).astype(float)
    rows = rows.dropna(axis=1, how="all")
    rows["misses by"] = [_misses(excess.loc[n], result.limits, done.loc[n]) for n in rows.index]
    rows.index = [f"trial {n}" for n in rows.index]
    return _counts_as_int(rows)


def _counts_as_int(table: pd.DataFrame) -> pd.DataFrame:
    """MACs and parameters are counts: integers (nullable where a row has none), never 1.05e+08."""
    for c in ("macs", "params"):
        if c in table:
            table[c] = table[c].round().astype("Int64")
    return table


def closest_table(result) -> pd.DataFrame:
    """The closest candidates under the baseline and budget rows, for runs where none met the budgets."""
    near = closest(result)
    if near.empty:
        return near
    head = pareto_table(result).reindex(columns=[c for c in near.columns if c != "misses by"])
    return pd.concat([head, near])


def _misses(excess: pd.Series, limits: dict, row) -> str:
    over = [f"{m} +{e:.1%} ({plots.fmt(row[m])} > {plots.fmt(limits[m])})" for m, e in excess.items() if e > 0]
    return ", ".join(over) or "nothing (within budget)"


def number(v) -> str:
    """Counts with thousands separators, other numbers to four significant digits, missing as '-'."""
    if pd.isna(v):
        return "-"
    if isinstance(v, (int, np.integer)) or (float(v).is_integer() and abs(v) >= 1e4):
        return f"{int(v):,}"
    return plots.fmt(float(v))


def _text(table: pd.DataFrame) -> str:
    """A table as aligned terminal text."""
    return table.map(lambda v: number(v) if is_number(v) else v).to_string()


def format_table(result) -> str:
    """The terminal view of a run: budgets, the Pareto front against the baseline, or why it is empty."""
    lines = [f"objectives: {', '.join(result.objectives)}"]
    if budget_line(result):
        lines.append(budget_line(result))
    n, feasible = len(result.trials), int(result.trials["feasible"].sum())
    failed = int((result.trials["state"] == "FAIL").sum())
    lines.append(f"trials: {n} finished, {feasible} within budget, {failed} failed")
    if "test_accuracy" in result.trials and result.pareto["delivered"].any():
        lines.append("accuracy: on the validation data the search selected on; test_accuracy: on held-out test data; "
                     "front models are delivered (fine-tuned after the search, then measured)")
    if result.pareto.empty:
        lines.append(none_met(result))
        table = closest_table(result)
        if not table.empty:
            lines.append(_text(table))
        return "\n".join(lines)
    table = pareto_table(result)
    lines.append(f"Pareto front ({len(result.pareto)} models; 'binds' = the budget each is closest to, share used):")
    lines.append(_text(table))
    return "\n".join(lines)


def none_met(result) -> str:
    completed = int((result.trials["state"] == "COMPLETE").sum())
    if result.trials.empty:
        return "no candidate yet: the run has no finished trials"
    if not completed:
        return "no candidate met the budgets: no trial completed (see the failed trials' error column)"
    return f"no candidate met the budgets: all {completed} completed candidates are over budget; the closest ones:"


def to_csv(result) -> str:
    """The table's rows (baseline, budget, Pareto models or the closest candidates) with each trial's policy."""
    table = pareto_table(result) if not result.pareto.empty else closest_table(result)
    policies = {f"trial {n}": p for n, p in result.trials["policy"].items()}
    table["policy"] = [policies.get(name, "") for name in table.index]
    return table.to_csv(index_label="row")


def to_json(result) -> str:
    """Objectives, budgets, baseline, the Pareto rows (or the closest candidates) and the hypervolume."""
    def rows(frame):
        return {name: {k: (None if pd.isna(v) else v) for k, v in row.items()} for name, row in frame.iterrows()}

    front = pareto_table(result)
    front = front[[i.startswith("trial") for i in front.index]]
    history = hypervolume_history(result)
    return json.dumps({"objectives": list(result.objectives), "budgets": result.config.get("budgets", {}),
                       "limits": result.limits, "baseline": result.baseline,
                       "trials": {"finished": len(result.trials), "feasible": int(result.trials["feasible"].sum())},
                       "pareto": rows(front), "closest": rows(closest(result)) if front.empty else {},
                       "hypervolume": {"value": float(history.iloc[-1]) if len(history) else 0.0,
                                       "reference": reference_point(result)}}, indent=2, default=_plain)


def _plain(v):
    return v.item() if hasattr(v, "item") else str(v)


def is_number(v) -> bool:
    return v is pd.NA or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))
