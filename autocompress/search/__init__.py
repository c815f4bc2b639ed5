"""The Optuna study: sampler, budgets as constraints, a target shared by any number of workers, faults.

Per trial: sample a policy, scale it toward the budgets if the cost model prices it over them (repair.py),
apply it, price the compressed module; a candidate still over budget is recorded as infeasible without spending
an accuracy evaluation; the rest are judged by the evaluator. Every metric is stored on the trial (its
`TrialRecord`), so the study alone is enough to rebuild results (and every model, from its policy).

Many processes may work on one study (see `storage` for where it can live). The modules, each importing only
those after it:
- `loop`: `run`, the loop every process runs until the study's target;
- `trial`: the trial protocol (claim, sample, evaluate, record; step back, duplicates, release on Ctrl-C);
- `study`: the study opened or resumed with its configuration, and its target (`ask_trials`, `target`);
- `progress`: the progress bar;
- `sampler`: samplers and the warm start;
- `problem`: the `Problem` and one policy applied, priced and judged (`evaluate_policy`, `RungLog`);
- `workers`: worker names, heartbeats, lost trials requeued;
- `record`: `TrialRecord`, the typed view of what a trial stores, and `counted`;
- `storage`: where a study lives (SQLite, journal file, PostgreSQL/MySQL), heartbeat settings, passwords hidden;
- `_optuna`: the only module that uses Optuna's private API.
"""
from .loop import MAX_DUPLICATES, run
from .problem import Problem, RungLog, constraints, evaluate_policy, objective_values
from .record import TrialRecord, counted
from .sampler import ALONE_START, BUDGET_SHARES, SAMPLERS, WARM_START, budget_fitted, check_sampler, \
    enqueue_warm_start, make_sampler
from .study import ASKED, ask_trials, config_json, open_study, peek, seed_for, target
from .trial import run_trial
from .workers import MAX_RETRIES, WORKER, awaiting_retry, new_asker, recover_lost, requeue_lost

__all__ = ["ALONE_START", "ASKED", "BUDGET_SHARES", "MAX_DUPLICATES", "MAX_RETRIES", "SAMPLERS", "WARM_START",
           "WORKER", "Problem", "RungLog", "TrialRecord", "ask_trials", "awaiting_retry", "budget_fitted",
           "check_sampler", "config_json", "constraints", "counted", "enqueue_warm_start", "evaluate_policy",
           "make_sampler", "new_asker", "objective_values", "open_study", "peek", "recover_lost", "requeue_lost",
           "run", "run_trial", "seed_for", "target"]
