"""The HTML report: one self-contained page with inline SVG figures (plots.py): the front, the hypervolume over
trials, predicted against measured latency, per-layer policy heatmaps, one model's per-layer costs, the run's
metadata. It needs nothing but a browser: no script, no stylesheet or font from the network.

Every function here reads a `Result` (result.py), passed in, never imported.
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

from ..budgets import METRICS
from ..compress import TECHNIQUES
from ..cost.model import estimate
from ..cost.profiles import HardwareProfile
from ..errors import AutocompressError
from ..versions import __version__, package_versions
from . import plots
from .hypervolume import hypervolume_history, reference_point
from .tables import SHOWN, closest, closest_table, is_number, none_met, number, pareto_table

def field_title(technique: str, field: str) -> str:
    """How the report names a technique's knob: its own title, else the technique and field names."""
    known = TECHNIQUES.get(technique)
    return (known.titles.get(field) if known else None) or f"{technique} {field}, per target"


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
    model = result.config.get("model_spec") or (type(result.base_model).__name__ if result.base_model is not None
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
        cells = "".join(f"<td>{escape(number(v) if is_number(v) else str(v))}</td>" for v in row.to_numpy())
        body.append(f"<tr{cls}><th>{escape(str(name))}</th>{cells}</tr>")
    return f'<div class="table"><table><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table></div>'


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
        html += (f'<div class="alert"><strong>{escape(none_met(result))}</strong>'
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
        title = field_title(technique, field)
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
    if result.base_model is None or result.example_input is None or "hardware" not in result.config:
        return None
    profile = HardwareProfile.from_dict(result.config["hardware"], "in the run's config")
    model = result.base_model if trial is None else result.compressed(trial)
    return estimate(model, result.example_input, profile).layers


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
        ("uncompressed model", ", ".join(f"{k} {number(v)}" for k, v in result.baseline.items() if v is not None)),
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
