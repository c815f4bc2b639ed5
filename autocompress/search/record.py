"""The trial record: what one trial of the study stores (Optuna user attributes), as one typed view.

The search writes these attributes (`write`) and everything downstream reads them through `TrialRecord.of`:
the Result's trials table, delivery, the successive-halving rungs and the progress bar. The stored names are the
field names, so a study written by an earlier version reads the same.
"""
from __future__ import annotations

from dataclasses import dataclass, field, fields

import optuna
from optuna.trial import TrialState


@dataclass(frozen=True)
class TrialRecord:
    """One trial as the search recorded it. Metrics are None where they were not measured (an infeasible
    candidate has no accuracy; a PRUNED duplicate or surplus claim has no metrics at all)."""

    number: int
    state: TrialState
    policy: str | None = None         # the Policy's JSON (None: a PRUNED duplicate or surplus claim)
    origin: str = "compressed"        # its candidate kind (Policy.kind): "compressed" (your model) or "student"
    worker: str | None = None         # host:pid of the process that claimed it
    repair: float | None = None       # the factor a sample was scaled by toward the budgets (None: none fitted)
    duplicate_of: int | None = None   # a PRUNED duplicate: the trial whose policy it sampled again
    surplus: bool = False             # a PRUNED claim beyond the study's target
    error: str | None = None          # why its evaluation failed ("Type: message (at module.py:line)")
    accuracy: float | None = None     # on the validation data, as judged in the search
    latency_ms: float | None = None
    energy_mj: float | None = None
    size_kb: float | None = None
    peak_mem_kb: float | None = None
    macs: int | None = None
    params: int | None = None
    feasible: bool = False            # within every budget (the accuracy budget included)
    constraints: list = field(default_factory=list)  # Optuna's constraint values, <= 0: met
    steps: int | None = None          # fine-tuning steps it was judged after
    rung: int | None = None           # the last multi-fidelity rung it reached
    rung_accuracy: dict = field(default_factory=dict)  # steps (as text) -> accuracy at that rung
    rung_cost: list = field(default_factory=list)      # the costs it competed with for promotion
    early_stopped: bool | None = None  # judged before the last rung (not promoted)
    duration_s: float | None = None
    extra: dict = field(default_factory=dict)  # any other attribute (a custom evaluator's keys)

    @classmethod
    def of(cls, trial: optuna.trial.FrozenTrial) -> "TrialRecord":
        attrs = dict(trial.user_attrs)
        known = {k: attrs.pop(k) for k in list(attrs) if k in STORED}
        # a stored None reads as the field's default, as `user_attrs.get(key, default)` did (e.g. rung_accuracy)
        known = {k: v for k, v in known.items() if v is not None or k in NULLABLE}
        return cls(number=trial.number, state=trial.state, **known, extra=attrs)

    def get(self, name: str, default=None):
        """An attribute by its stored name (a field, or one of `extra`)."""
        if name in STORED:
            return getattr(self, name)
        return self.extra.get(name, default)


STORED = frozenset(f.name for f in fields(TrialRecord)) - {"number", "state", "extra"}
NULLABLE = frozenset(f.name for f in fields(TrialRecord) if f.default is None)


def write(trial: optuna.Trial, **values) -> None:
    """Store `values` on a running trial, each under its TrialRecord name."""
    for key, value in values.items():
        trial.set_user_attr(key, value)


def counted(trial: optuna.trial.FrozenTrial) -> bool:
    """A trial that counts toward the target: completed, or failed with its evaluation's error recorded."""
    return trial.state == TrialState.COMPLETE or (trial.state == TrialState.FAIL and "error" in trial.user_attrs)
