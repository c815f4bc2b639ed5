"""What the study proposes: the sampler (budgets as Optuna constraints) and the warm start queued before it."""
from __future__ import annotations

import optuna

from ..errors import one_of
from ..repair import repair
from ..compress import COMPRESSED
from .problem import Problem
from .record import TrialRecord

SAMPLERS = ("nsga2", "tpe", "random")
WARM_START = (0.25, 0.5, 0.75)  # uniform policies tried first: the front never loses to uniform compression
ALONE_START = 0.25              # ... and each technique alone at this position, in a space of several
BUDGET_SHARES = (1.0, 0.8, 0.6)  # ... and uniform policies that just fit these shares of the budgets


def check_sampler(name: str) -> None:
    if name not in SAMPLERS:
        raise one_of("sampler", name, SAMPLERS)


def make_sampler(name: str, seed: int | None, trials: int) -> optuna.samplers.BaseSampler:
    """The named sampler; seed None (workers) draws a fresh seed, so that no two workers propose alike."""
    check_sampler(name)
    constraints = _constraints
    if name == "nsga2":
        population = max(8, min(50, trials // 5))
        return optuna.samplers.NSGAIISampler(population_size=population, seed=seed, constraints_func=constraints)
    if name == "tpe":
        return optuna.samplers.TPESampler(seed=seed, multivariate=True, constraints_func=constraints,
                                          n_startup_trials=max(5, min(20, trials // 5)))
    return optuna.samplers.RandomSampler(seed=seed)


def _constraints(trial: optuna.trial.FrozenTrial) -> list[float]:
    return TrialRecord.of(trial).constraints


def enqueue_warm_start(study: optuna.Study, problem: Problem) -> None:
    """Uniform policies first, so the front is never worse than them: every knob at each WARM_START position
    (for each kind of candidate in the space: your model compressed, a student); in a space of several
    compression techniques, each technique alone at ALONE_START; and, where there are budgets, the uniform
    policies that just fit them (budget_fitted)."""
    if study.trials:
        return
    bound = problem.bound
    warm = [bound.uniform(fraction, kind=kind) for kind in bound.kinds for fraction in WARM_START]
    techniques = [t for t in bound.techniques if bound.kind_of(t) == COMPRESSED]
    if len(techniques) > 1:
        warm += [bound.uniform(ALONE_START, only=t) for t in techniques]
    warm += budget_fitted(problem)
    seen = set()
    for values in warm:  # positions that round to the same choices make one policy: it is tried once
        policy = bound.policy(values).to_json()
        if policy not in seen:
            seen.add(policy)
            study.enqueue_trial(values, skip_if_exists=True)


def budget_fitted(problem: Problem) -> list[dict]:
    """At each of BUDGET_SHARES of the budgets, the least compressed uniform policy that fits them: of every
    technique that lowers a budgeted metric alone (uniform pruning, uniform bit-width...), and of all of them at
    once (each metric's levers moved, as a repair does). These are what a person would try at those budgets by
    hand; the search's front starts from them. Found with the cost model only (repair.repair's bisection)."""
    if not problem.limits:
        return []
    bound = problem.bound
    try:
        movers = problem.budget_levers()
        starts = [(bound.uniform(1.0), movers)]
        for t in sorted(set().union(*movers.values())):
            start = bound.uniform(1.0, only=t, kind=bound.kind_of(t))
            starts.append((start, {m: {t} for m in movers}))
        fitted = []
        for share in BUDGET_SHARES:
            limits = {m: limit * share for m, limit in problem.limits.items()}
            for values, techniques in starts:
                values, factor = repair(bound, values, problem.price, limits, techniques)
                if factor is not None:
                    fitted.append(values)
        return fitted
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:  # a model the cost model cannot price: its trials record why; the warm start goes without
        return []
