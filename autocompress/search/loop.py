"""The search loop every process runs (`autocompress run` and each worker): trials until the study's target.

Every process evaluates until the study holds its target of counted trials: completed ones, and those whose
evaluation failed with a recorded error (a broken candidate is a result too, and a broken space cannot loop
forever). Trials another process runs, or ran and lost, are waited for rather than sampled anew.
"""
from __future__ import annotations

import random
import time

import optuna
from optuna.trial import TrialState

from . import storage as storages
from . import _optuna
from .problem import Problem
from .progress import Progress
from .record import counted
from .study import target
from .trial import run_trial
from .workers import awaiting_retry, recover_lost

MAX_DUPLICATES = 50             # consecutive duplicate samples before the space counts as exhausted


def run(study: optuna.Study, problem: Problem, progress: bool = True, timeout: float | None = None) -> bool:
    """Evaluate trials until the study holds its target of counted trials, whoever evaluates them, or until
    `timeout` seconds have passed (no trial starts after that). Returns False if interrupted (Ctrl-C)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = Progress(problem.objectives) if progress else None
    say = bar.write if bar else print
    beating = _optuna.keeps_heartbeats(study)
    poll = min(2.0, _optuna.heartbeat_interval(study)) if beating else 0.0
    grace = storages.GRACE_FACTOR * _optuna.heartbeat_interval(study) if beating else 0.0
    duplicates, waiting = 0, False
    optuna_level = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    try:
        while True:
            if beating:
                recover_lost(study)
            trials = study.get_trials(deepcopy=False)
            goal, done = target(study), sum(map(counted, trials))
            if bar:
                bar.show(trials, goal)
            if done >= goal or (deadline is not None and time.monotonic() > deadline):
                return True
            # Trials other workers run may still be lost; wait for them rather than leave them unretried.
            pending = sum(t.state == TrialState.RUNNING for t in trials) + awaiting_retry(trials, grace)
            if beating and done + pending >= goal:
                if not waiting:  # say it once: a resume after kill -9 may sit here for the whole grace period
                    say(f"waiting for {pending} trial(s) that another process runs or ran (a killed one is "
                        f"retried after {grace:.0f} s without a heartbeat)")
                waiting = True
                time.sleep(poll)
                continue
            waiting = False
            outcome = run_trial(study, problem, goal, say)
            if outcome == "surplus":
                time.sleep(random.uniform(0, poll))  # both racers may have stepped back: retry out of step
            duplicates = duplicates + 1 if outcome == "duplicate" else 0
            if duplicates >= MAX_DUPLICATES:
                say(f"stopping: the last {MAX_DUPLICATES} policies sampled had all been evaluated before, so the "
                    f"space seems exhausted")
                return True
    except KeyboardInterrupt:
        return False
    finally:
        optuna.logging.set_verbosity(optuna_level)
        if bar:
            bar.close()
