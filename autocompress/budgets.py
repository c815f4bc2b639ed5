"""Objectives and budgets: which metrics exist, which way each is better, which points no other beats (the
Pareto front), and limits on them."""
from __future__ import annotations

import math
import warnings

import numpy as np

from .errors import AutocompressError, one_of

# metric -> direction; accuracy is measured, the rest come from the cost model
# (peak_mem_kb: the largest set of feature maps alive at once, see cost/memory.py)
METRICS = {"accuracy": "maximize", "latency_ms": "minimize", "energy_mj": "minimize", "size_kb": "minimize",
           "peak_mem_kb": "minimize", "macs": "minimize", "params": "minimize"}
COST_METRICS = tuple(m for m in METRICS if m != "accuracy")
RELATIVE = {"latency": "latency_ms", "energy": "energy_mj", "size": "size_kb", "peak_mem": "peak_mem_kb",
            "macs": "macs", "params": "params"}
# accuracy budgets are floors: `accuracy=0.98` (absolute) or `accuracy_drop=1` (points below the baseline)
ACCURACY_BUDGETS = ("accuracy", "accuracy_drop")


def check_objectives(objectives, have_accuracy: bool) -> tuple[str, ...]:
    if isinstance(objectives, str) or not hasattr(objectives, "__iter__"):
        raise AutocompressError(f"objectives={objectives!r} is not allowed; give a list of metric names such as "
                                f"('accuracy', 'latency_ms'), from: {', '.join(METRICS)}")
    objectives = tuple(objectives)
    if not objectives:
        raise AutocompressError("objectives must name at least one metric; allowed: " + ", ".join(METRICS))
    for o in objectives:
        if o not in METRICS:
            raise one_of("objective", o, METRICS)
    if len(set(objectives)) != len(objectives):
        raise AutocompressError(f"objectives {objectives!r} repeat a metric; name each once")
    if "accuracy" in objectives and not have_accuracy:
        raise AutocompressError("objective 'accuracy' needs data or an evaluator; with data=None use cost metrics: "
                                + ", ".join(COST_METRICS))
    return objectives


class Budgets:
    """Upper limits on cost metrics, absolute (`latency_ms=2`) or relative to the uncompressed model (`latency=0.5`),
    and a floor on accuracy (`accuracy=0.98`, or `accuracy_drop=1`: at most one point below the uncompressed model):
    Intel Neural Compressor's "tolerable loss"."""

    def __init__(self, budgets: dict | None = None):
        self.absolute: dict[str, float] = {}
        self.relative: dict[str, float] = {}
        self.accuracy: dict[str, float] = {}
        if budgets is not None and not isinstance(budgets, dict):
            raise AutocompressError(f"budgets={budgets!r} is not allowed; give a mapping such as "
                                    f"{{'latency_ms': 2, 'size': 0.3}} (or Budgets.parse(['latency=50%']))")
        for key, value in (budgets or {}).items():
            self._add(key, value)

    def _add(self, key: str, value) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise AutocompressError(f"budget {key}={value!r} is not allowed; a budget must be a number")
        if key == "accuracy" and not 0 < value <= 1:
            raise AutocompressError(f"budget accuracy={value!r} is not allowed; it is a fraction in (0, 1], "
                                    f"e.g. accuracy=0.98")
        if key == "accuracy_drop" and not 0 <= value < 100:
            raise AutocompressError(f"budget accuracy_drop={value!r} is not allowed; it is accuracy points below "
                                    f"the uncompressed model, in [0, 100), e.g. accuracy_drop=1")
        if key not in ACCURACY_BUDGETS and value <= 0:
            raise AutocompressError(f"budget {key}={value!r} is not allowed; a budget must be a positive number")
        if key in ACCURACY_BUDGETS:
            self.accuracy[key] = float(value)
        elif key in COST_METRICS:
            self.absolute[key] = float(value)
        elif key in RELATIVE:
            self.relative[RELATIVE[key]] = float(value)
        else:
            raise one_of("budget", key, list(COST_METRICS) + list(RELATIVE) + list(ACCURACY_BUDGETS))

    @classmethod
    def parse(cls, items: list[str]) -> "Budgets":
        """CLI form: `latency_ms=2`, `size_kb=300`, `latency=50%`, `size=0.3`."""
        out = cls()
        for item in items:
            key, sep, text = item.partition("=")
            if not sep:
                raise AutocompressError(f"budget {item!r} must look like KEY=VALUE, e.g. latency_ms=2 or latency=50%")
            text = text.strip()
            try:
                value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
            except ValueError:
                raise AutocompressError(f"budget {item!r} has a value that is not a number") from None
            if text.endswith("%") and key.strip() not in RELATIVE:
                raise AutocompressError(f"budget {item!r}: percentages are for relative budgets ({', '.join(RELATIVE)})")
            out._add(key.strip(), value)
        return out

    def to_dict(self) -> dict:
        rel = {k: v for k, v in RELATIVE.items()}
        inverse = {v: k for k, v in rel.items()}
        return {**self.absolute, **{inverse[m]: v for m, v in self.relative.items()}, **self.accuracy}

    def limits(self, baseline: dict) -> dict[str, float]:
        """Absolute limit per metric (the tighter one where both kinds are given). A limit the uncompressed
        model already meets cannot bind (compressing only lowers a cost): warned about, kept."""
        limits = dict(self.absolute)
        for metric, fraction in self.relative.items():
            value = fraction * baseline[metric]
            limits[metric] = min(limits.get(metric, math.inf), value)
        for metric, limit in sorted(limits.items()):
            if limit >= baseline[metric]:
                warnings.warn(f"budget {self._named(metric)} ({metric} {limit:.4g}) is no tighter than the uncompressed "
                              f"model ({baseline[metric]:.4g}), so it cannot bind; a budget that constrains is below "
                              f"the model's value (a relative one below 100%)", stacklevel=2)
        return limits

    def accuracy_floor(self, baseline_accuracy: float | None) -> float | None:
        """The lowest accuracy a model may deliver (the tighter of both forms), None without an accuracy budget."""
        if not self.accuracy:
            return None
        if baseline_accuracy is None:
            raise AutocompressError("an accuracy budget needs data or an evaluator to measure accuracy with")
        floors = [self.accuracy.get("accuracy", -math.inf)]
        if "accuracy_drop" in self.accuracy:
            floors.append(baseline_accuracy - self.accuracy["accuracy_drop"] / 100)
        return max(floors)

    def cost_metrics(self) -> tuple[str, ...]:
        """The cost metrics these budgets limit, in METRICS order."""
        return tuple(m for m in COST_METRICS if m in self.absolute or m in self.relative)

    def _named(self, metric: str) -> str:
        """The budget on `metric` as it was given: latency=150% or latency_ms=9."""
        if metric in self.relative:
            return f"{next(k for k, m in RELATIVE.items() if m == metric)}={self.relative[metric]:.0%}"
        return f"{metric}={self.absolute[metric]:g}"

    def __bool__(self) -> bool:
        return bool(self.absolute or self.relative or self.accuracy)


def violations(metrics: dict, limits: dict) -> list[float]:
    """Relative excess over each limit, in a fixed order; <= 0 means within budget (Optuna's convention)."""
    return [metrics[m] / limit - 1.0 for m, limit in sorted(limits.items())]


def accuracy_violation(accuracy: float | None, floor: float | None) -> list[float]:
    """The accuracy budget as an Optuna constraint ([] without one): points below the floor, <= 0 when met; an
    accuracy never measured (a candidate over a cost budget) counts as missing it."""
    if floor is None:
        return []
    return [1.0 if accuracy is None else floor - accuracy]


def exceeded(metrics: dict, limits: dict) -> list[str]:
    """The metrics over their limit (by the same test as `violations`, which a trial's feasibility uses)."""
    return [m for m, excess in zip(sorted(limits), violations(metrics, limits)) if excess > 0]


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Rows of `values` (all to be minimized) that no other row dominates."""
    n = len(values)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(values <= values[i], axis=1) & np.any(values < values[i], axis=1)
        keep[i] = not dominated.any()
    return keep
