"""The one place that reaches into Optuna's private API. Every use says why no public API serves.

The search runs its own trial loop (claim, heartbeat, step back, release; see `workers`), which Optuna's
`Study.optimize` does inside the library with the same private calls. What Optuna keeps private for that:
the storage a study is opened on, the storage's trial ids, and the heartbeat protocol (which only its RDB
storage implements publicly; `HeartbeatJournalStorage` gives the journal file the same).
"""
from __future__ import annotations

import time

import optuna
from optuna.storages import BaseStorage, JournalStorage
# BaseHeartbeat: the interface `fail_stale_trials` and `optimize` recognise a heartbeat-keeping storage by; Optuna
# keeps it private (RDBStorage is its only public implementation), so a journal storage with heartbeats must
# subclass it here.
# is_heartbeat_enabled: Optuna exports no public test of whether a storage keeps heartbeats (`optimize` calls
# this private helper; `RDBStorage(heartbeat_interval=None)` and other storages have none).
from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled
from optuna.trial import TrialState


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage `study` reads and writes. `Study` has no public accessor for it (only the private
    `_storage`), and its heartbeat, per-trial read and state reset below are storage methods."""
    return study._storage


def trial_id(trial) -> int:
    """The storage's id of a trial (a `Trial` or `FrozenTrial`): the storage API is keyed by it, and both classes
    expose only the study-local `number` publicly."""
    return trial._trial_id


def keeps_heartbeats(study: optuna.Study) -> bool:
    """Whether the study's storage records heartbeats (see `is_heartbeat_enabled` above)."""
    return is_heartbeat_enabled(storage_of(study))


def heartbeat_interval(study: optuna.Study) -> float:
    return storage_of(study).get_heartbeat_interval()


def record_heartbeat(study: optuna.Study, trial) -> None:
    storage_of(study).record_heartbeat(trial_id(trial))


def stored_trial(study: optuna.Study, trial) -> optuna.trial.FrozenTrial:
    """A running trial as stored now, read by its id: `study.trials[number]` reads every trial of the study,
    and `Trial` has no public view of what other processes may have written to it meanwhile."""
    return storage_of(study).get_trial(trial_id(trial))


def set_waiting(study: optuna.Study, trial) -> None:
    """Put a running trial back in the queue. `Study.tell` only finishes trials (COMPLETE, PRUNED, FAIL); no
    public API returns one to WAITING, which is what lets the next process evaluate the same parameters."""
    storage_of(study).set_trial_state_values(trial_id(trial), TrialState.WAITING)


class HeartbeatJournalStorage(JournalStorage, BaseHeartbeat):
    """Optuna's journal storage with the heartbeats its RDB storage has: each beat is a trial system attribute
    holding the writer's clock, which is sound because a journal file is shared by processes of one machine.
    A trial silent for `grace_factor` intervals is stale."""

    def __init__(self, backend, heartbeat_interval: int, grace_factor: int):
        super().__init__(backend)
        self.heartbeat_interval = heartbeat_interval
        self.grace_period = grace_factor * heartbeat_interval
        self.heartbeat_stale_trial_callback = None

    def record_heartbeat(self, trial_id: int) -> None:
        self.set_trial_system_attr(trial_id, "heartbeat", time.time())

    def _get_stale_trial_ids(self, study_id: int) -> list[int]:
        # The private hook of BaseHeartbeat that `optuna.storages.fail_stale_trials` calls: overriding it is how a
        # storage tells Optuna which trials are stale. A trial not yet beating is judged by its start, so a worker
        # killed before its first beat is caught too.
        now = time.time()
        running = self.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return [trial_id(t) for t in running
                if now - t.system_attrs.get("heartbeat", t.datetime_start.timestamp()) > self.grace_period]

    def get_heartbeat_interval(self) -> int:
        return self.heartbeat_interval

    def get_heartbeat_stale_trial_callback(self):
        return self.heartbeat_stale_trial_callback
