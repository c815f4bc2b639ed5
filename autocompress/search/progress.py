"""The progress bar of a search: the study's target (all workers' trials), feasible count, best of each objective."""
from __future__ import annotations

from optuna.trial import TrialState

from ..budgets import METRICS
from .record import TrialRecord, counted


class Progress:
    """A tqdm bar over the study's target (all workers' trials): trials counted, feasible, best of each objective."""

    def __init__(self, objectives):
        self.objectives = objectives
        self.bar = None

    def write(self, text: str) -> None:
        (self.bar.write if self.bar else print)(text)

    def show(self, trials, goal: int) -> None:
        from tqdm.auto import tqdm

        done = [t for t in trials if counted(t)]
        if self.bar is None:
            self.bar = tqdm(total=goal, initial=len(done), desc="search", unit="trial", dynamic_ncols=True)
        self.bar.total = goal
        self.bar.update(len(done) - self.bar.n)
        records = [TrialRecord.of(t) for t in done if t.state == TrialState.COMPLETE]
        feasible = [r for r in records if r.feasible]
        shown = {"feasible": len(feasible)}
        for o in self.objectives:
            values = [r.get(o) for r in feasible if r.get(o) is not None]
            if values:
                shown[f"best {o}"] = f"{(max if METRICS[o] == 'maximize' else min)(values):.4g}"
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
