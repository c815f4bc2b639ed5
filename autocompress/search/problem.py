"""One trial's work: the Problem every trial shares, and a policy applied, priced and judged.

Per trial: apply the policy, price the compressed module; a candidate over budget is infeasible without an
accuracy evaluation; the rest are judged by the evaluator (the built-in one over multi-fidelity rungs, whose
accuracies `RungLog` shares with the other trials of the study).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import optuna
import torch
from optuna.trial import TrialState

from ..budgets import accuracy_violation, violations
from ..compress import apply
from ..cost.model import estimate
from ..cost.profiles import HardwareProfile
from ..errors import AutocompressError
from ..evaluate import Judge
from ..judged import WeightStore
from ..repair import levers
from ..space import BoundSpace
from .record import TrialRecord, write


@dataclass
class Problem:
    """Everything a trial needs: the model, how to price and judge it, and what is asked."""

    model: torch.nn.Module
    example_input: torch.Tensor
    bound: BoundSpace
    profile: HardwareProfile
    objectives: tuple[str, ...]
    limits: dict[str, float]
    evaluator: Judge | None  # None: a cost-only search
    repair: bool = True  # scale over-budget samples toward the budget before evaluating them (repair.py)
    floor: float | None = None  # the accuracy budget: the lowest accuracy a delivered model may have
    store: WeightStore = field(default_factory=WeightStore)  # judged weights, what Result.model(n) loads
    levers: dict | None = None  # per budgeted metric, the techniques that lower it (repair.levers, found once)
    prices: dict = field(default_factory=dict, repr=False)  # policy JSON -> its cost metrics

    def price(self, values: dict) -> dict:
        """The cost metrics of the policy these knob values make (no accuracy evaluation). Each policy is priced
        once: the bisections of repairs and of the warm start meet the same policies again."""
        policy = self.bound.policy(values)
        key = policy.to_json()
        if key not in self.prices:
            model = apply(self.model, policy, self.example_input)
            self.prices[key] = estimate(model, self.example_input, self.profile).as_dict()
        return self.prices[key]

    def budget_levers(self) -> dict:
        """Per budgeted metric, the techniques that lower it on this model and device (priced once)."""
        if self.levers is None and self.limits:
            self.levers = levers(self.bound, self.price, self.limits)
        return self.levers or {}


def evaluate_policy(problem: Problem, policy, rungs: "RungLog | None" = None) -> tuple[dict, torch.nn.Module]:
    """Apply, price and (when within budget) judge one policy; returns every metric of the trial and the model
    in the state it was judged in. `rungs` shares the fine-tuning rungs' accuracies with the other trials."""
    model = apply(problem.model, policy, problem.example_input)
    metrics = estimate(model, problem.example_input, problem.profile).as_dict()
    metrics["accuracy"] = None
    metrics["constraints"] = constraints(metrics, problem)
    metrics["feasible"] = _costs_fit(metrics, problem)
    if metrics["feasible"] and problem.evaluator is not None:
        outcome = _judge(problem, model, metrics, rungs)
        value = outcome.pop("accuracy")
        if value is None or not math.isfinite(float(value)):
            raise AutocompressError(f"the evaluator returned {value!r}, not a finite number")
        metrics.update(outcome, accuracy=float(value))
        # Judging may change what is stored (fine-tuning splices pruned weights back, moves shared values): the
        # trial reports the model as judged, and is feasible only if that model still is.
        metrics.update(estimate(model, problem.example_input, problem.profile).as_dict())
        metrics["constraints"] = constraints(metrics, problem)
        metrics["feasible"] = all(v <= 0 for v in metrics["constraints"])
    return metrics, model


def constraints(metrics: dict, problem: Problem) -> list[float]:
    """Optuna's constraint values (<= 0: met): each cost budget, then the accuracy budget if there is one."""
    return violations(metrics, problem.limits) + accuracy_violation(metrics.get("accuracy"), problem.floor)


def _costs_fit(metrics: dict, problem: Problem) -> bool:
    return all(v <= 0 for v in violations(metrics, problem.limits))


def _judge(problem: Problem, model, metrics: dict, rungs: "RungLog | None") -> dict:
    """The evaluator's verdict; the built-in one fine-tunes over rungs, competing on the study's objectives."""
    cost = tuple(metrics[o] for o in problem.objectives if o != "accuracy")
    if rungs is None:
        return problem.evaluator.judge(model, cost)
    rungs.cost = cost
    return problem.evaluator.judge(model, cost, rungs.peers, rungs.record)


@dataclass
class RungLog:
    """One trial's rung accuracies, written to the trial as they are reached (`rung_accuracy`, and the costs it
    competes with in `rung_cost`), and the other trials' ones at a rung, read from the study: how the workers
    of a study share one successive-halving schedule."""

    study: optuna.Study
    trial: optuna.Trial
    cost: tuple = ()
    reached: dict = field(default_factory=dict)

    def record(self, steps: int, accuracy: float) -> None:
        self.reached[str(steps)] = accuracy
        write(self.trial, rung_cost=list(self.cost), rung_accuracy=dict(self.reached))

    def peers(self, steps: int) -> list[tuple[float, tuple]]:
        key, out = str(steps), []
        for t in self.study.get_trials(deepcopy=False):
            record = TrialRecord.of(t)
            if t.number != self.trial.number and key in record.rung_accuracy and t.state != TrialState.FAIL:
                out.append((record.rung_accuracy[key], tuple(record.rung_cost)))
        return out


def objective_values(metrics: dict, objectives) -> list[float]:
    # An infeasible candidate's accuracy is never measured; Optuna needs a number, and the worst one
    # keeps it behind every feasible candidate (the constraint already does that for NSGA-II and TPE).
    return [(metrics[o] if metrics[o] is not None else 0.0) for o in objectives]
