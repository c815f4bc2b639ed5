"""Delivery: after the search, the Pareto front gets its final fine-tune, is re-measured (validation and test
accuracy, every cost of the fine-tuned module) and its weights are stored; what the front then reports is the
delivered model, the one `Result.model(n)` returns.

Fine-tuning changes accuracies, so the front can change: delivery repeats on the new front until every model on
it is delivered. The final fine-tune usually lifts a model by a point or two, so a candidate not yet delivered
competes with its search accuracy plus `slack`, both for the front and for an accuracy budget's floor; a
delivered one competes with what it measures. (Without the lift, a candidate one validation image behind a
delivered model was never delivered, whatever fine-tuning would have made of it.)
With the study's `measure` attribute (`--measure`), each delivered model is also timed on this machine
(`measured_latency_ms`, at the profile's thread count, beside the cost model's `latency_ms`).
Each model is delivered once per study (a `delivered:N` study attribute, so every worker and report sees it) and
fails alone: its error is recorded and the others go on.
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np
import optuna

from .budgets import METRICS, violations
from .compress import apply
from .cost.measure import DEFAULT_THREADS, measure_latency_ms
from .cost.model import estimate
from .cost.runtimes import keep_ranges
from .result import DELIVERED, pareto_front, trials_frame
from .search import Problem, TrialRecord, constraints
from .space import Policy

SLACK = 0.05  # accuracy a candidate may lack at search time and still be delivered toward an accuracy budget


def deliver_front(study: optuna.Study, problem: Problem, epochs: int, say: Callable[[str], None] = print,
                  slack: float = SLACK) -> int:
    """Deliver every model on the front (see the module docstring); returns how many were delivered now."""
    if problem.evaluator is None or not problem.evaluator.delivers:
        return 0
    count = 0
    while True:
        todo = [n for n in candidates(study, problem, slack) if DELIVERED + str(n) not in study.user_attrs]
        if not todo:
            return count
        for number in todo:
            say(f"delivering trial {number}: {epochs} epoch(s) of fine-tuning, then validation and test accuracy")
            study.set_user_attr(DELIVERED + str(number), _delivered(study, problem, number, epochs))
            count += 1


def candidates(study: optuna.Study, problem: Problem, slack: float) -> list[int]:
    """The front over judged trials within the cost budgets and the accuracy floor, a trial not yet delivered
    counting `slack` more accurate than its search accuracy."""
    judged = _lifted(study, slack)
    if judged.empty:
        return []
    fits = judged.apply(lambda row: all(v <= 0 for v in violations(row, problem.limits)), axis=1)
    floor = -math.inf if problem.floor is None else problem.floor
    open_ = judged[fits & (judged["accuracy"] >= floor)].assign(feasible=True)
    return [int(n) for n in pareto_front(open_, problem.objectives).index]


def _lifted(study: optuna.Study, slack: float):
    """Judged trials, the accuracy of those not yet delivered raised by `slack`."""
    frame = trials_frame(study)
    judged = frame[(frame["state"] == "COMPLETE") & frame["accuracy"].notna()].copy()
    judged.loc[~judged["delivered"], "accuracy"] += slack
    return judged


def _delivered(study: optuna.Study, problem: Problem, number: int, epochs: int) -> dict:
    """Fine-tune and re-measure one trial's model from its judged weights; the delivery record (or its error)."""
    record = TrialRecord.of(study.trials[number])
    try:
        model = apply(problem.model, Policy.from_json(record.policy), problem.example_input)
        state = problem.store.get(number)
        if state is None:
            raise RuntimeError(f"the judged weights of trial {number} are not in {problem.store!r}")
        keep_ranges(model, state)
        model.load_state_dict(state)
        outcome = problem.evaluator.deliver(model, epochs)
        metrics = {**estimate(model, problem.example_input, problem.profile).as_dict(), **outcome}
        if study.user_attrs.get("measure"):
            metrics["measured_latency_ms"] = timed(model, problem)
        metrics["constraints"] = constraints(metrics, problem)
        metrics["feasible"] = all(v <= 0 for v in metrics["constraints"])
        problem.store.put(number, model, final=True)  # before the record: a reader never finds one without it
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # this model keeps its search numbers; the others are delivered
        return {"error": f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"}
    return {**metrics, "search_accuracy": record.accuracy, "final_epochs": epochs}


def timed(model, problem: Problem) -> float:
    """`model`'s latency measured here, in the runtime and at the thread count the profile's latencies are for."""
    return measure_latency_ms(model, problem.example_input, threads=problem.profile.threads or DEFAULT_THREADS,
                              runtime=problem.profile.runtime)


def dominated_by_delivered(study: optuna.Study, objectives, slack: float = SLACK) -> list[int]:
    """Judged trials, not delivered, that a delivered feasible model dominates even with their `slack`: delivered
    numbers never change, so no later delivery can pick them and their stored weights can go."""
    judged = _lifted(study, slack)
    signs = np.array([-1.0 if METRICS[o] == "maximize" else 1.0 for o in objectives])
    best = judged[judged["delivered"] & judged["feasible"]][list(objectives)].to_numpy(dtype=float) * signs
    out = []
    for number, row in judged[~judged["delivered"]].iterrows():
        mine = row[list(objectives)].to_numpy(dtype=float) * signs
        if (np.all(best <= mine, axis=1) & np.any(best < mine, axis=1)).any():
            out.append(int(number))
    return out
