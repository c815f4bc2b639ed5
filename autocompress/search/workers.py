"""Many processes on one study: who is who, heartbeats, and the trials lost with a killed worker.

Running trials send heartbeats (`Heartbeat`); one silent for the grace period is marked failed and its policy
queued again (`requeue_lost`, at most MAX_RETRIES times), so a worker killed with kill -9 loses nothing. A failed
trial without an error is such a lost one and does not count; until its retry is queued, the others wait for it
(`awaiting_retry`) rather than sample a new policy in its place.
"""
from __future__ import annotations

import datetime
import os
import socket
import threading
import uuid
import warnings

import optuna
from optuna.trial import TrialState

from . import _optuna
from .record import counted

MAX_RETRIES = 2                 # a policy whose worker keeps dying is given up after this many retries
WORKER = f"{socket.gethostname()}:{os.getpid()}"


def new_asker() -> str:
    """A name for one worker's ask, unique across machines."""
    return f"worker:{WORKER}:{uuid.uuid4().hex[:8]}"


def requeue_lost(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
    """A lost trial's policy goes back to the queue (same parameters), unless it was already retried
    MAX_RETRIES times: a policy that kills every worker that tries it is then given up."""
    history = trial.system_attrs.get("retry_history", []) + [trial.number]
    if len(history) > MAX_RETRIES:
        return
    system = {k: v for k, v in trial.system_attrs.items() if k != "heartbeat"}
    study.add_trial(optuna.trial.create_trial(
        state=TrialState.WAITING, params=trial.params, distributions=trial.distributions,
        system_attrs={**system, "retry_history": history}))


def awaiting_retry(trials, window_s: float) -> int:
    """Lost trials whose retry is not queued yet. Optuna fails a lost trial first and calls requeue_lost after:
    a worker that looked in between and counted the lost trial as gone would sample a new policy in place of
    the retry, which then waits beyond the target. Only trials failed in the last `window_s` count, so a
    process that died between the two steps does not make the others wait forever."""
    retried = {n for t in trials for n in t.system_attrs.get("retry_history", [])}
    now = datetime.datetime.now()
    return sum(t.state == TrialState.FAIL and not counted(t) and t.number not in retried
               and len(t.system_attrs.get("retry_history", [])) < MAX_RETRIES and t.datetime_complete is not None
               and (now - t.datetime_complete).total_seconds() < window_s for t in trials)


def recover_lost(study: optuna.Study) -> None:
    """Mark failed the running trials whose worker stopped beating, and requeue them (requeue_lost)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)


class Heartbeat:
    """Beats for one trial from a thread while it is claimed, if the study's storage keeps heartbeats."""

    def __init__(self, study: optuna.Study, trial):
        self.study, self.trial = study, trial
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self):
        if _optuna.keeps_heartbeats(self.study):
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def _beat(self) -> None:
        interval = _optuna.heartbeat_interval(self.study)
        while True:
            try:
                _optuna.record_heartbeat(self.study, self.trial)
            except Exception:  # a finished trial (declared lost meanwhile) takes no beats; the trial's owner reports it
                pass
            if self.stop.wait(interval):
                return
