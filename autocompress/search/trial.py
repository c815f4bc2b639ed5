"""The trial protocol: one trial claimed, sampled, evaluated and recorded, safely beside other processes.

- A trial is claimed before it is evaluated: after `ask`, a process that sees more live trials (counted +
  running) than the target steps back (a queued policy goes back to the queue, a blank trial is closed as a
  PRUNED surplus); of two that raced, at least the later one sees the other, so the target is never overshot.
- A policy is claimed the same way: written to the trial, then checked against every other live trial; a
  process that sees its policy elsewhere records its trial as a PRUNED duplicate.
- A worker whose trial was declared lost while it still ran finds it finished when it reports, and drops its
  result: never counted twice.
- Ctrl-C gives the running trial back to the queue: resuming evaluates the same policy.
"""
from __future__ import annotations

import os
import time
import traceback
import warnings
from typing import Callable

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from optuna.trial import TrialState

from ..errors import AutocompressError
from ..repair import repair
from . import _optuna
from .problem import Problem, RungLog, evaluate_policy, objective_values
from .record import TrialRecord, counted, write
from .study import first_line
from .workers import WORKER, Heartbeat


def run_trial(study: optuna.Study, problem: Problem, goal: int, say: Callable[[str], None]) -> str:
    """Claim, sample, evaluate and record one trial; returns what happened: "surplus" (the target was
    already met by others: the trial stepped back), "duplicate", "lost", "failed" or "complete"."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we beat ourselves, below
        trial = study.ask()
    with Heartbeat(study, trial):
        try:
            if _live(study) > goal:
                _step_back(study, trial)
                return "surplus"
            policy = _claim_policy(study, trial, problem)
            return "duplicate" if policy is None else _evaluate(study, trial, problem, policy, say)
        except KeyboardInterrupt:
            _release(study, trial)  # back to the queue: a resumed search evaluates the same policy
            raise
        except (UpdateFinishedTrialError, _FinishedElsewhere):
            say(f"trial {trial.number} was declared lost (no heartbeat for the grace period) while it ran; "
                f"its result is dropped and its retry counts instead")
            return "lost"


def _claim_policy(study: optuna.Study, trial, problem: Problem):
    """The trial's policy (repaired toward the budgets when asked), or None when another live trial holds the
    same one (this trial is then recorded as a PRUNED duplicate, without its policy, so no policy is ever
    evaluated twice)."""
    values = problem.bound.suggest(trial)
    if problem.repair and problem.limits:
        values = _repaired(trial, problem, values)
    policy = problem.bound.policy(values)
    write(trial, worker=WORKER, policy=policy.to_json(), origin=policy.kind())
    twin = _duplicate_of(study, trial)
    if twin is None:
        return policy
    write(trial, policy=None, duplicate_of=twin)
    _tell(study, trial, TrialState.PRUNED)
    return None


def _evaluate(study: optuna.Study, trial, problem: Problem, policy, say) -> str:
    """Evaluate the policy and record its metrics; an evaluation error is recorded as a failed trial."""
    start = time.perf_counter()
    try:
        metrics, model = evaluate_policy(problem, policy, RungLog(study, trial))
        if metrics["accuracy"] is not None:
            problem.store.put(trial.number, model)  # what Result.model(n) loads: the model as judged
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception as exc:  # the study goes on; the trial is recorded as failed with its reason
        reason = first_line(exc) + _where(exc)
        write(trial, error=f"{type(exc).__name__}: {reason}")
        _tell(study, trial, TrialState.FAIL)
        say(f"trial {trial.number} failed and is recorded as such: {reason}")
        return "failed"
    metrics["duration_s"] = time.perf_counter() - start
    write(trial, **metrics)
    _tell(study, trial, TrialState.COMPLETE, objective_values(metrics, problem.objectives))
    return "complete"


def _repaired(trial, problem: Problem, values: dict) -> dict:
    """Sampled values scaled to fit the budgets; the factor is recorded (1.0: fitted as sampled, None: nothing
    fits). A policy that cannot be priced is left as sampled: its evaluation records the failure."""
    try:
        values, factor = repair(problem.bound, values, problem.price, problem.limits, problem.budget_levers())
    except (KeyboardInterrupt, SystemExit):
        raise
    except Exception:
        return values
    write(trial, repair=factor)
    return values


class _FinishedElsewhere(Exception):
    """This process's trial was finished by another: declared lost (and requeued) while it ran."""


def _tell(study: optuna.Study, trial, state: TrialState, values=None) -> None:
    if study.tell(trial, values, state=state, skip_if_finished=True).state != state:
        raise _FinishedElsewhere


def _live(study: optuna.Study) -> int:
    """Trials counted or running, this one included (read after claiming it: see the module docstring)."""
    return sum(counted(t) or t.state == TrialState.RUNNING for t in study.get_trials(deepcopy=False))


def _duplicate_of(study: optuna.Study, trial) -> int | None:
    """The number of another live trial holding this trial's policy, if any."""
    mine = _optuna.stored_trial(study, trial)
    if mine.state != TrialState.RUNNING:
        raise _FinishedElsewhere
    policy = TrialRecord.of(mine).policy
    for t in study.get_trials(deepcopy=False):
        if (t.number != trial.number and TrialRecord.of(t).policy == policy
                and (counted(t) or t.state == TrialState.RUNNING)):
            return t.number
    return None


def _step_back(study: optuna.Study, trial) -> None:
    """Give up a trial claimed beyond the target. A queued policy (warm start, retry) goes back to the queue;
    a blank trial is closed as PRUNED: left waiting, it would be taken before a retry queued after it, and the
    lost policy would never be evaluated."""
    if "fixed_params" in _optuna.stored_trial(study, trial).system_attrs:
        _release(study, trial)
        return
    write(trial, surplus=True)
    study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)


def _release(study: optuna.Study, trial) -> None:
    """Put a claimed trial back in the queue (WAITING), its parameters kept for whoever takes it next."""
    try:
        _optuna.set_waiting(study, trial)
    except UpdateFinishedTrialError:  # already declared lost and requeued by another worker
        pass


def _where(exc: Exception) -> str:
    """' (at module.py:line)': the innermost frame of this package an unexpected error came from, so that a
    failed trial says where without a traceback; empty for our own errors, which name the bad value."""
    if isinstance(exc, AutocompressError):
        return ""
    ours = [f for f in traceback.extract_tb(exc.__traceback__) if f"{os.sep}autocompress{os.sep}" in f.filename]
    if not ours:
        return ""
    frame = ours[-1]
    return f" (at {frame.filename.split(f'{os.sep}autocompress{os.sep}', 1)[1]}:{frame.lineno})"
