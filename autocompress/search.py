"""The Optuna study: sampler, budgets as constraints, storage and resume, progress, fault tolerance.

Per trial: sample a policy, apply it, price the compressed module with the cost model; a candidate
over budget is recorded as infeasible without spending an accuracy evaluation; the rest are judged
by the evaluator. Every metric is stored as a trial user attribute, so the study alone is enough to
rebuild results (and every model, from its policy).
"""
from __future__ import annotations

import json
import logging
import math
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import optuna
import torch
from optuna.trial import TrialState

from .budgets import METRICS, violations
from .compress import apply
from .cost.model import estimate
from .cost.profiles import HardwareProfile
from .errors import AutocompressError, one_of
from .space import BoundSpace

SAMPLERS = ("nsga2", "tpe", "random")
FINISHED = (TrialState.COMPLETE, TrialState.FAIL, TrialState.PRUNED)
WARM_START = (0.25, 0.5, 0.75)  # uniform policies tried first: the front never loses to uniform compression


@dataclass
class Problem:
    """Everything a trial needs: the model, how to price and judge it, and what is asked."""

    model: torch.nn.Module
    example_input: torch.Tensor
    bound: BoundSpace
    profile: HardwareProfile
    objectives: tuple[str, ...]
    limits: dict[str, float]
    evaluator: Callable | None


def make_sampler(name: str, seed: int, trials: int) -> optuna.samplers.BaseSampler:
    if name not in SAMPLERS:
        raise one_of("sampler", name, SAMPLERS)
    constraints = _constraints
    if name == "nsga2":
        population = max(8, min(50, trials // 5))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed, constraints_func=constraints)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=constraints,
                                          n_startup_trials=max(5, min(20, trials // 5)))
    return optuna.samplers.RandomSampler(seed=seed)


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return trial.user_attrs.get("constraints", [])


def open_study(storage, study_name: str, objectives, sampler, config: dict) -> optuna.Study:
    """Create the study, or load it to resume; refuse one that was made with another configuration."""
    directions = [METRICS[o] for o in objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    try:
        study = optuna.create_study(storage=storage, study_name=study_name, directions=directions,
                                    sampler=sampler, load_if_exists=True)
    except Exception as exc:
        raise AutocompressError(f"cannot open study {study_name!r} in storage {storage!r}: {str(exc).splitlines()[0]}") from None
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("config", config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives))  # readable names in optuna-dashboard
    elif stored != config:
        key = next(k for k in sorted(set(stored) | set(config)) if stored.get(k) != config.get(k))
        raise AutocompressError(
            f"study {study_name!r} in {storage!r} was made with another configuration ({key}: {stored.get(key)!r}, "
            f"now {config.get(key)!r}); use a new output folder or study name, or the original settings")
    return study


def fail_stale_trials(study: optuna.Study) -> int:
    """Trials left RUNNING by a run that died: mark them failed so they are retried, not lost or doubled."""
    stale = [t for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))]
    for t in stale:
        study._storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
    return len(stale)


def enqueue_warm_start(study: optuna.Study, bound: BoundSpace) -> None:
    if not study.trials:
        for fraction in WARM_START:
            study.enqueue_trial(bound.uniform(fraction), skip_if_exists=True)


def evaluate_policy(problem: Problem, policy) -> dict:
    """Apply, price and (when within budget) judge one policy; returns every metric of the trial."""
    model = apply(problem.model, policy, problem.example_input)
    metrics = estimate(model, problem.example_input, problem.profile).as_dict()
    metrics["constraints"] = violations(metrics, problem.limits)
    metrics["feasible"] = all(v <= 0 for v in metrics["constraints"])
    metrics["accuracy"] = None
    if metrics["feasible"] and problem.evaluator is not None:
        value = problem.evaluator(model)
        if value is None or not math.isfinite(float(value)):
            raise AutocompressError(f"the evaluator returned {value!r}, not a finite number")
        metrics["accuracy"] = float(value)
    return metrics


def objective_values(metrics: dict, objectives) -> list[float]:
    # An infeasible candidate's accuracy is never measured; Optuna needs a number, and the worst one
    # keeps it behind every feasible candidate (the constraint already does that for NSGA-II and TPE).
    return [(metrics[o] if metrics[o] is not None else 0.0) for o in objectives]


def make_objective(problem: Problem, on_error: Callable[[int, str], None]):
    def objective(trial: optuna.Trial):
        start = time.perf_counter()
        policy = problem.bound.sample(trial)
        trial.set_user_attr("policy", policy.to_json())
        try:
            metrics = evaluate_policy(problem, policy)
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:  # the study goes on; the trial is recorded as failed with its reason
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            trial.set_user_attr("error", f"{type(exc).__name__}: {reason}")
            on_error(trial.number, reason)
            return [math.nan] * len(problem.objectives)
        metrics["duration_s"] = time.perf_counter() - start
        for key, value in metrics.items():
            trial.set_user_attr(key, value)
        return objective_values(metrics, problem.objectives)

    return objective


def finished(study: optuna.Study) -> int:
    return len(study.get_trials(deepcopy=False, states=FINISHED))


def run(study: optuna.Study, problem: Problem, trials: int, progress: bool = True) -> bool:
    """Run until the study holds `trials` finished trials. Returns False if interrupted (Ctrl-C)."""
    remaining = trials - finished(study)
    if remaining <= 0:
        return True
    bar = _progress(study, remaining, problem.objectives) if progress else None
    errors = []

    def on_error(number, reason):
        errors.append(number)
        (bar.write if bar else print)(f"trial {number} failed and is recorded as such: {reason}")

    callbacks = [bar.callback] if bar else []
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        while finished(study) < trials:  # failed trials count: a broken space cannot loop forever
            study.optimize(make_objective(problem, on_error), n_trials=trials - finished(study),
                           callbacks=callbacks, gc_after_trial=False)
        return True
    except KeyboardInterrupt:
        return False
    finally:
        optuna.logging.set_verbosity(optuna_level)
        if bar:
            bar.close()


class _progress:
    """A tqdm bar: trials done, feasible count, best value of each objective, ETA."""

    def __init__(self, study, total: int, objectives):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=total, desc="search", unit="trial", dynamic_ncols=True)
        self.objectives = objectives
        self.feasible = sum(t.user_attrs.get("feasible", False) for t in study.get_trials(deepcopy=False))
        self.best: dict[str, float] = {}
        self.write = self.bar.write

    def callback(self, study, trial) -> None:
        self.bar.update(1)
        if trial.state == TrialState.COMPLETE and trial.user_attrs.get("feasible"):
            self.feasible += 1
            for o in self.objectives:
                v = trial.user_attrs.get(o)
                if v is not None:
                    better = max if METRICS[o] == "maximize" else min
                    self.best[o] = better(self.best.get(o, v), v)
        shown = {"feasible": self.feasible, **{f"best {o}": f"{v:.4g}" for o, v in self.best.items()}}
        self.bar.set_postfix(shown, refresh=True)

    def close(self):
        self.bar.close()


def config_json(config: dict) -> dict:
    """Round-trip through JSON so stored and fresh configs compare equal."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))
