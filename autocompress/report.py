"""Reports of a Result: the Pareto front as a terminal table (with the baseline, the budgets and which budget
binds each model), CSV, JSON, and one self-contained HTML file with inline SVG figures.

The HTML report needs nothing but a browser: no script, no stylesheet or font from the network.
Hypervolume is measured on normalized objectives (see `normalized`), so its reference point is the
same sentence for every run: accuracy 0 and, for each cost, its budget (or the uncompressed model's
value when that cost has no budget).

Every function here reads a `Result` (result.py), which renders itself with `render` (`Result.report`): the
result is passed in, never imported.
"""
from __future__ import annotations

import datetime
import json
import math
from html import escape
from importlib import resources
from string import Template

import numpy as np
import pandas as pd

from . import plots
from .budgets import METRICS, pareto_mask
from .cost.model import estimate
from .cost.profiles import HardwareProfile
from .errors import AutocompressError, one_of
from .versions import __version__, package_versions

SHOWN = ["accuracy", "test_accuracy", "latency_ms", "measured_latency_ms", "energy_mj", "size_kb", "macs", "params"]
FORMATS = ("table", "csv", "json", "html")
FIELD_TITLES = {("prune", "keep"): "kept fraction of channels, per channel group",
                ("quantize", "weight_bits"): "weight bits, per layer",
                ("quantize", "act_bits"): "activation bits, per layer",
                ("lowrank", "rank"): "kept fraction of rank, per layer",
                ("sparsity", "density"): "fraction of weights kept (unstructured sparsity), per layer",
                ("share", "bits"): "bits per shared-weight index, per layer"}


# ---------------------------------------------------------------------------------------- tables

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


def _number(v) -> str:
    """Counts with thousands separators, other numbers to four significant digits, missing as '-'."""
    if pd.isna(v):
        return "-"
    if isinstance(v, (int, np.integer)) or (float(v).is_integer() and abs(v) >= 1e4):
        return f"{int(v):,}"
    return plots.fmt(float(v))


def _text(table: pd.DataFrame) -> str:
    """A table as aligned terminal text."""
    return table.map(lambda v: _number(v) if _is_number(v) else v).to_string()


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
        lines.append(_none_met(result))
        table = closest_table(result)
        if not table.empty:
            lines.append(_text(table))
        return "\n".join(lines)
    table = pareto_table(result)
    lines.append(f"Pareto front ({len(result.pareto)} models; 'binds' = the budget each is closest to, share used):")
    lines.append(_text(table))
    return "\n".join(lines)


def _none_met(result) -> str:
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


def render(result, fmt: str = "table", trial: int | None = None) -> str:
    """The report in one of FORMATS; `trial` picks the model whose per-layer costs the HTML report shows."""
    if fmt not in FORMATS:
        raise one_of("report format", fmt, FORMATS)
    if fmt == "html":
        return to_html(result, trial)
    return {"table": format_table, "csv": to_csv, "json": to_json}[fmt](result)


# ---------------------------------------------------------------------------------------- hypervolume

def hypervolume(points, reference) -> float:
    """Exact volume dominated by `points` (all objectives minimized) up to `reference`, in any dimension.

    Slices along the last objective and recurses on the rest; exact and fast for the fronts a search
    produces (tens of points). Points not strictly better than the reference in every objective add nothing.
    """
    pts = np.asarray(points, dtype=float).reshape(-1, len(reference))
    ref = np.asarray(reference, dtype=float)
    pts = pts[np.all(pts < ref, axis=1)]
    if len(pts) == 0:
        return 0.0
    return _slice_volume(np.unique(pts[pareto_mask(pts)], axis=0), ref)


def _slice_volume(pts: np.ndarray, ref: np.ndarray) -> float:
    if pts.shape[1] == 1:
        return float(ref[0] - pts[:, 0].min())
    pts = pts[np.argsort(pts[:, -1], kind="stable")]
    total = 0.0
    for i in range(len(pts)):
        upper = pts[i + 1, -1] if i + 1 < len(pts) else ref[-1]
        if upper > pts[i, -1]:
            rest = pts[: i + 1, :-1]
            total += (upper - pts[i, -1]) * _slice_volume(rest[pareto_mask(rest)], ref[:-1])
    return total


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


# ---------------------------------------------------------------------------------------- HTML

def to_html(result, trial: int | None = None) -> str:
    """One self-contained HTML page: front, hypervolume, policy heatmaps, per-layer costs, run metadata."""
    base_layers = _layers(result, None)
    chosen = _chosen(result, trial)
    plots_row = _front_section(result) + _hypervolume_section(result)
    if len(result.objectives) == 2:  # one front panel: it and the hypervolume side by side
        plots_row = f'<div class="row">{plots_row}</div>'
    sections = [_summary(result, chosen), plots_row, _measured_section(result),
                _heatmap_section(result, list(base_layers.index) if base_layers is not None else None),
                _breakdown_section(result, chosen, base_layers), _metadata_section(result)]
    page = Template((resources.files("autocompress") / "templates" / "report.html").read_text())
    model = result.config.get("model_spec") or (type(result._base_model).__name__ if result._base_model is not None
                                                 else f"model {result.config.get('model', '?')}")
    return page.substitute(title=escape(f"autocompress report: {model}"), heading=escape(str(model)),
                           subtitle=escape(_subtitle(result)), body="\n".join(s for s in sections if s),
                           generated=escape(f"autocompress {__version__}, "
                                            f"{datetime.datetime.now():%Y-%m-%d %H:%M}"))


def _subtitle(result) -> str:
    hw = result.config.get("hardware", {}).get("name", "?")
    floor = [f"accuracy >= {plots.fmt(result.min_accuracy)}"] if result.min_accuracy is not None else []
    budgets = ", ".join(floor + [f"{k} <= {plots.fmt(v)}" for k, v in sorted(result.limits.items())]) or "no budgets"
    return f"on {hw} · objectives {', '.join(result.objectives)} · {budgets}"


def _section(title: str, body: str, note: str = "") -> str:
    note_html = f'<p class="note">{note}</p>' if note else ""
    return f'<section><h2>{escape(title)}</h2>{note_html}{body}</section>'


def _frame_html(frame: pd.DataFrame, highlight: str | None = None) -> str:
    head = "".join(f"<th>{escape(str(c))}</th>" for c in ["", *frame.columns])
    body = []
    for name, row in frame.iterrows():
        cls = ' class="hl"' if highlight and name == highlight else ""
        cells = "".join(f"<td>{escape(_number(v) if _is_number(v) else str(v))}</td>" for v in row.to_numpy())
        body.append(f"<tr{cls}><th>{escape(str(name))}</th>{cells}</tr>")
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


def _is_number(v) -> bool:
    return v is pd.NA or (isinstance(v, (int, float, np.number)) and not isinstance(v, bool))


def _summary(result, chosen: int | None) -> str:
    t = result.trials
    history = hypervolume_history(result)
    cards = [("trials finished", len(t)), ("within budget", int(t["feasible"].sum())),
             ("over budget", int(((t["state"] == "COMPLETE") & ~t["feasible"]).sum())),
             ("failed", int((t["state"] == "FAIL").sum())), ("on the Pareto front", len(result.pareto)),
             ("hypervolume", f"{history.iloc[-1]:.4f}" if len(history) else "-")]
    html = '<div class="cards">' + "".join(f'<div class="card"><div class="v">{v}</div><div class="k">{escape(k)}'
                                           f"</div></div>" for k, v in cards) + "</div>"
    if result.pareto.empty:
        html += (f'<div class="alert"><strong>{escape(_none_met(result))}</strong>'
                 f'{_frame_html(closest_table(result))}</div>')
    else:
        html += _frame_html(pareto_table(result), highlight=f"trial {chosen}")
        html += ('<p class="note">binds: the budget each model is closest to, with the share of it used; '
                 'highlighted: the model broken down per layer below.</p>')
    return f'<section>{html}</section>'


def _front_section(result) -> str:
    objectives = list(result.objectives)
    if len(objectives) < 2:
        return ""
    pairs = [(a, b) for i, a in enumerate(objectives) for b in objectives[i + 1:]]
    size = (620, 420) if len(pairs) == 1 else (380, 320)
    panels = "".join(f'<figure class="plot front">{_panel(result, *_orient(a, b), size)}</figure>' for a, b in pairs)
    legend = ('<div class="legend"><span><i class="dot blue"></i>Pareto front</span><span><i class="dot grey"></i>'
              'other trials within budget</span><span><i class="x"></i>over budget (never evaluated: under the axis '
              'when accuracy is plotted)</span><span><i class="star"></i>uncompressed model</span>'
              '<span><i class="dash"></i>budget</span></div>')
    title = "Pareto front" if len(pairs) == 1 else "Pareto front, pairwise"
    return _section(title, f'<div class="panels">{panels}</div>{legend}',
                    "Every finished trial; hover a point for its trial number and metrics.")


def _orient(a: str, b: str) -> tuple[str, str]:
    """(x, y) for a panel: accuracy goes up the y axis, a cost along x."""
    return (b, a) if METRICS[a] == "maximize" and METRICS[b] != "maximize" else (a, b)


def _panel(result, xo: str, yo: str, size: tuple[int, int]) -> str:
    t = result.trials[result.trials["state"] == "COMPLETE"]
    front = result.pareto
    base = result.baseline
    has_y = t[yo].notna()
    xs = list(t[xo].astype(float)) + [base.get(xo)] + [result.limits.get(xo)]
    ys = list(t.loc[has_y, yo].astype(float)) + [base.get(yo)] + [result.limits.get(yo)]
    ax = plots.Axes(plots.padded(*_span(xs)), plots.padded(*_span(ys)), _axis_name(xo), _axis_name(yo), *size)
    if xo in result.limits:
        ax.vline(result.limits[xo], "budget")
    if yo in result.limits:
        ax.hline(result.limits[yo], "budget")
    rest = t[has_y & t["feasible"] & ~t.index.isin(front.index)]
    ax.points(rest[xo], rest[yo], [_tip(n, r, result) for n, r in rest.iterrows()], css="trial")
    over = t[~t["feasible"]]
    plotted = over[over[yo].notna()]
    ax.points(plotted[xo], plotted[yo], [_tip(n, r, result) for n, r in plotted.iterrows()], shape="cross",
              color="#d93025", css="infeasible")
    unplaced = over[over[yo].isna()]
    if not unplaced.empty:
        ax.strip_points(unplaced[xo], ax.strip("over budget"), [_tip(n, r, result) for n, r in unplaced.iterrows()])
    if not front.empty:
        ordered = front.sort_values(xo)
        if len(result.objectives) == 2:
            ax.line(list(ordered[xo]), list(ordered[yo]), "#1a73e8", step=True)
        ax.points(ordered[xo], ordered[yo], [_tip(n, r, result) for n, r in ordered.iterrows()], color="#1a73e8",
                  size=5.5, css="pareto")
        for n, r in ordered.iterrows():
            ax.label(r[xo], r[yo], f"#{n}")
    if base.get(xo) is not None and base.get(yo) is not None:
        ax.points([base[xo]], [base[yo]], [_tip("baseline", base, result)], shape="star", color="#fbbc04",
                  css="baseline")
    return ax.svg()


def _span(values) -> tuple[float, float]:
    finite = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    return (min(finite), max(finite)) if finite else (0.0, 1.0)


def _axis_name(metric: str) -> str:
    better = "higher is better" if METRICS[metric] == "maximize" else "lower is better"
    return f"{metric} ({better})"


def _tip(name, row, result) -> str:
    label = f"trial {name}" if name != "baseline" else "uncompressed model"
    values = ", ".join(f"{m} {plots.fmt(row.get(m))}" for m in SHOWN if row.get(m) is not None and pd.notna(row.get(m)))
    return f"{label}: {values}"


def _hypervolume_section(result) -> str:
    history = hypervolume_history(result)
    if history.empty:
        return ""
    ref = ", ".join(f"{o} {plots.fmt(v)}" + ("" if METRICS[o] == "maximize" else
                                              " (its budget)" if o in result.limits else " (uncompressed, no budget)")
                    for o, v in reference_point(result).items())
    ideal = "accuracy 1, zero cost" if "accuracy" in result.objectives else "zero cost"
    note = (f"Hypervolume of the feasible trials finished so far: the share of the box between the ideal point "
            f"({ideal}) and the reference point ({escape(ref)}) that they dominate.")
    if not history.max() > 0:
        return _section("Hypervolume over trials", "<p>0 after every trial: no trial within budget beats the "
                                                   "reference point.</p>", note)
    xs = [float(i) for i in history.index]
    ax = plots.Axes(plots.padded(min(xs), max(xs) + (1 if len(xs) == 1 else 0), 0.02),
                    (0.0, float(history.max()) * 1.1), "trial number", "hypervolume (share of the box)",
                    *((460, 420) if len(result.objectives) == 2 else (620, 300)))
    ax.line(xs, list(history), "#1a73e8", width=2.0, step=True)
    ax.points(xs, list(history), [f"after trial {int(x)}: {v:.4f}" for x, v in zip(xs, history)], color="#1a73e8",
              size=2.5)
    return _section("Hypervolume over trials", f'<figure class="plot hv">{ax.svg()}</figure>', note)


def _measured_section(result) -> str:
    """Predicted against measured latency of the front (a run with --measure): how far the cost model's numbers
    are from this machine's clock, model by model, with the line where they agree."""
    front = result.pareto
    if "measured_latency_ms" not in front or not front["measured_latency_ms"].notna().any():
        return ""
    timed = front[front["measured_latency_ms"].notna() & front["latency_ms"].notna()]
    names = [f"trial {n}" for n in timed.index]
    xs, ys = list(timed["latency_ms"].astype(float)), list(timed["measured_latency_ms"].astype(float))
    base = result.baseline
    if pd.notna(base.get("measured_latency_ms")) and pd.notna(base.get("latency_ms")):
        names, xs, ys = names + ["uncompressed"], xs + [float(base["latency_ms"])], \
            ys + [float(base["measured_latency_ms"])]
    lo, hi = plots.padded(min(xs + ys), max(xs + ys))
    ax = plots.Axes((lo, hi), (lo, hi), "predicted latency (ms)", "measured latency (ms)", 460, 420)
    ax.line([lo, hi], [lo, hi], "#9aa0a6", width=1.0)
    ax.points(xs, ys, [f"{n}: predicted {plots.fmt(x)} ms, measured {plots.fmt(y)} ms"
                       for n, x, y in zip(names, xs, ys)], color="#1a73e8")
    ratio = np.median(np.array(ys) / np.array(xs))
    return _section("Predicted against measured latency", f'<figure class="plot measured">{ax.svg()}</figure>',
                    f"Each delivered front model (and the uncompressed one) timed on this machine at the profile's "
                    f"thread count; on the grey line the cost model is exact. Median measured / predicted: "
                    f"{ratio:.2f}.")


def _heatmap_section(result, order: list[str] | None) -> str:
    models = result.pareto if not result.pareto.empty else result.trials.loc[
        [int(i.split()[1]) for i in closest(result).index]]
    if models.empty:
        return ""
    policies = {n: json.loads(p) for n, p in models["policy"].items() if isinstance(p, str)}
    fields = _numeric_fields(policies)
    figures = []
    for (technique, field), targets in fields.items():
        cols = sorted(targets, key=lambda c: (order.index(c) if order and c in order else len(order or []), c))
        rows = [f"#{n} {_row_label(models.loc[n], result)}" for n in policies]
        values = [[_value(policies[n], technique, field, c) for c in cols] for n in policies]
        lo, hi, log = _field_range(result, technique, field, values)
        if hi <= lo:  # a knob the space does not turn
            continue
        scale = _scale(lo, hi, log)
        legend = (field, f"{plots.fmt(lo)} most compressed", f"{plots.fmt(hi)} uncompressed")
        title = FIELD_TITLES.get((technique, field), f"{technique} {field}, per target")
        figures.append(f'<figure class="plot heat"><figcaption>{escape(title)}</figcaption>'
                       f'{plots.heatmap(rows, cols, values, scale, legend)}</figure>')
    if not figures:
        return ""
    who = "Pareto models" if not result.pareto.empty else "closest candidates"
    return _section(f"Per-layer policy of the {who}", "".join(figures),
                    "One row per model, one column per layer (or channel group) in execution order; "
                    "darker is more compressed.")


def _numeric_fields(policies: dict) -> dict:
    """(technique, field) -> targets, for every per-target numeric field in the policies."""
    fields: dict = {}
    for policy in policies.values():
        for technique, section in policy.items():
            for field, value in section.items():
                if isinstance(value, dict) and all(isinstance(v, (int, float)) for v in value.values()):
                    fields.setdefault((technique, field), set()).update(value)
    return fields


def _value(policy: dict, technique: str, field: str, target: str):
    v = policy.get(technique, {}).get(field, {}).get(target)
    return float(v) if v is not None else None


def _row_label(row, result) -> str:
    return " · ".join(plots.fmt(row[o]) for o in result.objectives)


def _field_range(result, technique: str, field: str, values) -> tuple[float, float, bool]:
    """The knob's range from the run's search space (observed values when the space does not say)."""
    spec = result.config.get("space", {}).get("techniques", {}).get(technique, {}).get(field)
    if isinstance(spec, dict) and "low" in spec and "high" in spec:
        lo, hi = float(spec["low"]), float(spec["high"])
    elif isinstance(spec, list) and spec:
        lo, hi = float(min(spec)), float(max(spec))
    else:
        seen = [v for row in values for v in row if v is not None]
        lo, hi = min(seen), max(seen)
    return lo, hi, field.endswith("bits") and lo > 0


def _scale(lo: float, hi: float, log: bool):
    if hi <= lo:
        return lambda v: 1.0
    if log:
        return lambda v: (math.log2(v) - math.log2(lo)) / (math.log2(hi) - math.log2(lo))
    return lambda v: (v - lo) / (hi - lo)


def _chosen(result, trial: int | None) -> int | None:
    """The model whose costs are broken down: `trial`, else the first Pareto model, else the closest candidate."""
    if trial is not None:
        if trial not in result.trials.index:
            raise AutocompressError(f"no trial {trial!r} in this result; trials run from {result.trials.index.min()} "
                                    f"to {result.trials.index.max()}")
        return trial
    if not result.pareto.empty:
        return int(result.pareto.index[0])
    near = closest(result)
    return int(near.index[0].split()[1]) if not near.empty else None


def _layers(result, trial: int | None) -> pd.DataFrame | None:
    """The cost model's per-layer table of a trial's model (None: the uncompressed one), on the run's hardware."""
    if result._base_model is None or result._example_input is None or "hardware" not in result.config:
        return None
    profile = HardwareProfile.from_dict(result.config["hardware"], "in the run's config")
    model = result._base_model if trial is None else result.model(trial)
    return estimate(model, result._example_input, profile).layers


def _breakdown_section(result, trial: int | None, base: pd.DataFrame | None) -> str:
    if trial is None:
        return ""
    title = f"Per-layer cost of trial {trial}"
    if base is None:
        return _section(title, "<p>Not available: this result has no base model to rebuild the trial from "
                               "(pass the model to Result.load, or --model to the command).</p>")
    layers = _layers(result, trial)
    names = list(base.index) + [n for n in layers.index if n not in base.index]
    mine = layers["latency_ms"].reindex(names).fillna(0.0)
    chart = plots.bars(names, list(base["latency_ms"].reindex(names).fillna(0.0)), list(mine), "latency (ms)")
    row = result.trials.loc[trial]
    totals = pd.DataFrame({
        "this model (re-estimated)": [layers["latency_ms"].sum(), layers["energy_mj"].sum(), layers["macs"].sum(),
                                      layers["params"].sum()],
        "trial record": [row["latency_ms"], row["energy_mj"], row["macs"], row["params"]],
        "uncompressed": [base["latency_ms"].sum(), base["energy_mj"].sum(), base["macs"].sum(), base["params"].sum()]},
        index=["latency_ms", "energy_mj", "macs", "params"]).astype(float)
    table = layers.drop(columns=["out_shape"], errors="ignore").copy()
    table.insert(0, "out shape", ["x".join(map(str, s)) for s in layers["out_shape"]])
    table["share of latency"] = (layers["latency_ms"] / layers["latency_ms"].sum()).map(lambda v: f"{v:.1%}")
    hardware = result.config["hardware"].get("name", "?")
    body = (f'<div class="split"><div>{_frame_html(totals)}</div>'
            f'<figure class="plot bars">{chart}</figure></div>'
            f'<details><summary>every layer of trial {trial} ({len(table)} ops)</summary>{_frame_html(table)}</details>')
    note = (f"The cost model's estimate on {escape(hardware)} (ac.estimate(model, x, hardware).layers) of the model "
            f"rebuilt from trial {trial}'s policy; the chosen model is the first Pareto row unless one is named "
            f"(--trial N).")
    return _section(title, body, note)


def _metadata_section(result) -> str:
    import yaml

    c = result.config
    hw = c.get("hardware", {})
    versions = c.get("versions")
    where = "as recorded by the run"
    if not versions:
        versions, where = package_versions(), "of the environment that wrote this report; the run recorded none"
    items = [
        ("model", f"{c.get('model_spec') or 'given in Python'} (fingerprint {c.get('model', '?')})"
                  + (f", checkpoint {c['checkpoint']}" if c.get("checkpoint") else "")),
        ("input shape", " x ".join(map(str, c.get("input_shape", [])))),
        ("data", c.get("data") or ("given in Python" if result.baseline.get("accuracy") is not None
                                   else "none (cost-only search)")),
        ("hardware", f"{hw.get('name', '?')}: {hw.get('description', '')}"),
        ("objectives", ", ".join(result.objectives)),
        ("budgets", ", ".join(f"{k}={v:g}" for k, v in sorted(c.get("budgets", {}).items())) or "none"),
        ("limits", ", ".join(f"{k} <= {plots.fmt(v)}" for k, v in sorted(result.limits.items())) or "none"),
        ("uncompressed model", ", ".join(f"{k} {_number(v)}" for k, v in result.baseline.items() if v is not None)),
        ("search", f"space {c.get('space', {}).get('name', '?')}, sampler {c.get('sampler', '?')}, "
                   f"seed {c.get('seed', '?')}, {len(result.trials)} trials"),
        ("versions", ", ".join(f"{k} {v}" for k, v in versions.items()) + f" ({where})"),
    ]
    rows = "".join(f"<dt>{escape(k)}</dt><dd>{escape(str(v))}</dd>" for k, v in items)
    space = yaml.safe_dump(c.get("space", {}), sort_keys=False)
    profile = yaml.safe_dump(hw, sort_keys=False)
    return _section("Run", f'<dl class="meta">{rows}</dl>'
                           f'<details><summary>search space</summary><pre>{escape(space)}</pre></details>'
                           f'<details><summary>hardware profile</summary><pre>{escape(profile)}</pre></details>')
