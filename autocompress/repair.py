"""Budget-aware sampling: a sampled policy that the cost model prices over budget is repaired toward it.

As in AMC (He et al., ECCV 2018), which scales an agent's pruning ratios until the compressed model meets
its resource budget: the ordered knobs (keep ratios, bit-widths, ranks, depths, student widths...) of the
techniques that lower an exceeded metric move toward their most compressed choice by one common factor,
`BoundSpace.scaled(values, s, techniques)`, and a bisection on s finds the least compression that fits.
Which techniques lower which metric depends on the model and the device (`levers`): on a CPU without int8
kernels, fewer weight bits lower the size but not the latency, so a latency repair leaves bit-widths as
sampled instead of spending accuracy for nothing. Only the cost model is consulted (no accuracy evaluation),
so a repair costs a few `apply` + `estimate` calls; a candidate that does not fit even at s = 0 is left as
sampled and recorded infeasible, as without repair. The sampler's parameters stay those it sampled: the
objective it learns is that of the repaired policy, a deterministic function of them.
"""
from __future__ import annotations

from typing import Callable

from .budgets import exceeded
from .compress import COMPRESSED
from .space import BoundSpace

BISECTIONS = 6  # the factor is found within 1/64; each step is one apply + estimate
Price = Callable[[dict], dict]


def levers(bound: BoundSpace, price: Price, metrics) -> dict[str, set[str]]:
    """Per metric, the techniques whose most compressed setting alone lowers it below the uncompressed model's.
    A technique that builds a new network (a student: Technique.kind) always counts: its knobs shape all of
    that network's costs."""
    techniques = set(bound.techniques)
    builders = {t for t in techniques if bound.kind_of(t) != COMPRESSED}
    base = price(bound.uniform(1.0))
    out = {m: set(builders) for m in metrics}
    for t in sorted(techniques - builders):
        low = price(bound.uniform(0.0, only=t))
        for m in metrics:
            if low[m] < base[m] * (1 - 1e-6):
                out[m].add(t)
    return out


def repair(bound: BoundSpace, values: dict, price: Price, limits: dict,
           movers: dict[str, set[str]] | None = None) -> tuple[dict, float | None]:
    """(values, factor): the sampled knob values when they fit `limits` (factor 1.0), else the values scaled
    with the largest factor that fits; the values as sampled and factor None when nothing fits.
    `price(values)` returns the cost metrics of the policy those values make; `movers` (from `levers`) names
    the techniques to scale for each metric (all of them when None, or when no technique lowers it)."""
    def fits(candidate: dict) -> bool:
        return not exceeded(price(candidate), limits)

    if not limits:
        return values, 1.0
    over = exceeded(price(values), limits)
    if not over:
        return values, 1.0
    techniques = set().union(*(movers.get(m, set()) for m in over)) if movers else set()

    def scale(factor: float) -> dict:
        return bound.scaled(values, factor, techniques or None)

    if not fits(scale(0.0)):
        return values, None
    low, high = 0.0, 1.0  # fits at low, not at high
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        if fits(scale(middle)):
            low = middle
        else:
            high = middle
    return scale(low), low
