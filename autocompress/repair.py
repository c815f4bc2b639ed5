"""Budget-aware sampling: a sampled policy that the cost model prices over budget is repaired toward it.

As in AMC (He et al., ECCV 2018), which scales an agent's pruning ratios until the compressed model meets
its resource budget: every ordered knob (keep ratios, bit-widths, ranks, depths, student widths...) moves
toward its most compressed choice by one common factor, `BoundSpace.scaled(values, s)`, and a bisection on
s finds the least compression that fits. Only the cost model is consulted (no accuracy evaluation), so a
repair costs a few `apply` + `estimate` calls; a candidate that does not fit even at s = 0 is left as
sampled and recorded infeasible, as without repair. The sampler's parameters stay those it sampled: the
objective it learns is that of the repaired policy, a deterministic function of them.
"""
from __future__ import annotations

from typing import Callable

from .budgets import violations
from .space import BoundSpace

BISECTIONS = 6  # the factor is found within 1/64; each step is one apply + estimate


def repair(bound: BoundSpace, values: dict, price: Callable[[dict], dict], limits: dict) -> tuple[dict, float | None]:
    """(values, factor): the sampled knob values when they fit `limits` (factor 1.0), else the scaled values
    with the largest factor that fits; the values as sampled and factor None when nothing fits.
    `price(values)` returns the cost metrics of the policy those values make."""
    def fits(candidate: dict) -> bool:
        return all(v <= 0 for v in violations(price(candidate), limits))

    if not limits or fits(values):
        return values, 1.0
    if not fits(bound.scaled(values, 0.0)):
        return values, None
    low, high = 0.0, 1.0  # fits at low, not at high
    for _ in range(BISECTIONS):
        middle = (low + high) / 2
        if fits(bound.scaled(values, middle)):
            low = middle
        else:
            high = middle
    return bound.scaled(values, low), low
