"""The Optuna study: sampler, budgets as constraints, a target shared by any number of workers, faults.

Per trial: sample a policy, scale it toward the budgets if the cost model prices it over them
(repair.py), apply it, price the compressed module; a candidate still over budget is recorded as
infeasible without spending an accuracy evaluation; the rest are judged by the evaluator. Every metric is stored as a trial user attribute, so the study alone is enough to
rebuild results (and every model, from its policy).

Many processes may work on one study (see storage.py for where it can live). What keeps them honest:
- The target is the study's: `run` asks for its --trials, each worker adds its own (`trials_asked:*`
  user attributes, one key per asker, so concurrent writes never collide). Every process evaluates
  until the study holds that many counted trials: completed ones, and those whose evaluation failed
  with a recorded error (a broken candidate is a result too, and a broken space cannot loop forever).
- A trial is claimed before it is evaluated: after `ask`, a process that sees more live trials
  (counted + running) than the target steps back (a queued policy goes back to the queue, a blank trial
  is closed as a PRUNED surplus); of two that raced, at least the later one sees the other, so the
  target is never overshot.
- A policy is claimed the same way: written to the trial, then checked against every other live
  trial; a process that sees its policy elsewhere records its trial as a PRUNED duplicate.
- Running trials send heartbeats; one silent for the grace period is marked failed and its policy
  queued again (at most MAX_RETRIES times), so a worker killed with kill -9 loses nothing. A failed
  trial without an error is such a lost one and does not count; until its retry is queued, the others
  wait for it rather than sample a new policy in its place. A worker whose trial was declared
  lost while it still ran finds it finished when it reports, and drops its result: never counted twice.
- Ctrl-C gives the running trial back to the queue: resuming evaluates the same policy.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import random
import socket
import threading
import time
import traceback
import uuid
import warnings
from dataclasses import dataclass, field
from typing import Callable

import optuna
import torch
from optuna.exceptions import UpdateFinishedTrialError
from optuna.storages._heartbeat import is_heartbeat_enabled
from optuna.trial import TrialState

from . import storage as storages
from .budgets import METRICS, accuracy_violation, violations
from .compress import apply
from .cost.model import estimate
from .cost.profiles import HardwareProfile
from .errors import AutocompressError, one_of
from .evaluate import Evaluator
from .judged import WeightStore
from .repair import levers, repair
from .space import KINDS, STUDENT, BoundSpace
from .versions import package_versions

SAMPLERS = ("nsga2", "tpe", "random")
WARM_START = (0.25, 0.5, 0.75)  # uniform policies tried first: the front never loses to uniform compression
ALONE_START = 0.25              # ... and each technique alone at this position, in a space of several
BUDGET_SHARES = (1.0, 0.8, 0.6)  # ... and uniform policies that just fit these shares of the budgets
ASKED = "trials_asked:"         # study user attributes: one per asker (`run`, each worker), summed into the target
MAX_RETRIES = 2                 # a policy whose worker keeps dying is given up after this many retries
MAX_DUPLICATES = 50             # consecutive duplicate samples before the space counts as exhausted
WORKER = f"{socket.gethostname()}:{os.getpid()}"


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
    repair: bool = True  # scale over-budget samples toward the budget before evaluating them (repair.py)
    floor: float | None = None  # the accuracy budget: the lowest accuracy a delivered model may have
    store: WeightStore = field(default_factory=WeightStore)  # judged weights, what Result.model(n) loads
    levers: dict | None = None  # per budgeted metric, the techniques that lower it (repair.levers, found once)
    prices: dict = field(default_factory=dict, repr=False)  # policy JSON -> its cost metrics

    def price(self, values: dict) -> dict:
        """The cost metrics of the policy these knob values make (no accuracy evaluation). Each policy is priced
        once: the bisections of repairs and of the warm start meet the same policies again."""
        policy = self.bound.policy(values)
        key = policy.to_json()
        if key not in self.prices:
            model = apply(self.model, policy, self.example_input)
            self.prices[key] = estimate(model, self.example_input, self.profile).as_dict()
        return self.prices[key]

    def budget_levers(self) -> dict:
        """Per budgeted metric, the techniques that lower it on this model and device (priced once)."""
        if self.levers is None and self.limits:
            self.levers = levers(self.bound, self.price, self.limits)
        return self.levers or {}


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
    return trial.user_attrs.get("constraints", [])


def open_study(storage, study_name: str, objectives, config: dict) -> optuna.Study:
    """Create the study, or load it to resume; refuse one that was made with another configuration.
    The caller sets its sampler (see `seed_for`)."""
    directions = [METRICS[o] for o in objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    heartbeat = storages.default_heartbeat()  # checked before a study is made
    backend = storages.open_storage(storage)
    try:
        study = optuna.create_study(storage=backend, study_name=study_name, directions=directions,
                                    load_if_exists=True)
    except Exception as exc:
        raise AutocompressError(f"cannot open study {study_name!r} in storage {_shown(storage)!r}: "
                                f"{_shown(_first_line(exc))}") from None
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("versions", package_versions())  # not part of config: a resumed study may upgrade
        study.set_user_attr("heartbeat_s", heartbeat)
        study.set_user_attr("config", config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives))  # readable names in optuna-dashboard
    elif stored != config:
        key = next(k for k in sorted(set(stored) | set(config)) if stored.get(k) != config.get(k))
        raise AutocompressError(
            f"study {study_name!r} in {_shown(storage)!r} was made with another configuration ({key}: "
            f"{stored.get(key)!r}, now {config.get(key)!r}); use a new output folder or study name, or the "
            f"original settings")
    storages.arm(backend, study.user_attrs.get("heartbeat_s", storages.HEARTBEAT_S), requeue_lost)
    return study


def seed_for(study: optuna.Study, seed: int | None) -> int | None:
    """The sampler seed for this session: `seed` on a new study (reproducible runs), shifted by the trials
    already there on a resumed one (the same seed would propose the first session's policies again)."""
    return None if seed is None else seed + len(study.trials)


def peek(storage, study_name: str) -> tuple[dict, int]:
    """The configuration a study was made with, and its target, read without joining it (a worker rebuilds
    its problem from the configuration)."""
    study = storages.read_study(storage, study_name)
    config = study.user_attrs.get("config")
    if config is None:
        raise AutocompressError(f"study {study_name!r} in {_shown(storage)!r} was not made by autocompress "
                                f"(it stores no configuration)")
    return config, target(study)


def ask_trials(study: optuna.Study, asker: str, trials: int) -> None:
    """Record that `asker` wants `trials` counted trials; the study's target is the sum over askers."""
    study.set_user_attr(ASKED + asker, trials)


def target(study: optuna.Study) -> int:
    return sum(v for k, v in study.user_attrs.items() if k.startswith(ASKED))


def counted(t: optuna.trial.FrozenTrial) -> bool:
    """A trial that counts toward the target: completed, or failed with its evaluation's error recorded."""
    return t.state == TrialState.COMPLETE or (t.state == TrialState.FAIL and "error" in t.user_attrs)


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


def enqueue_warm_start(study: optuna.Study, problem: Problem) -> None:
    """Uniform policies first, so the front is never worse than them: every knob at each WARM_START position
    (for your model compressed and, in a space with a `kind` knob, for a student too); in a space of several
    compression techniques, each technique alone at ALONE_START; and, where there are budgets, the uniform
    policies that just fit them (budget_fitted)."""
    if study.trials:
        return
    bound = problem.bound
    kinds = KINDS if bound.has_kind else KINDS[:1]
    warm = [bound.uniform(fraction, kind=kind) for kind in kinds for fraction in WARM_START]
    techniques = [t for t in bound.techniques if t != STUDENT]
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
            start = bound.uniform(1.0, only=t, kind=STUDENT if t == STUDENT else KINDS[0])
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


def evaluate_policy(problem: Problem, policy, rungs: "RungLog | None" = None) -> tuple[dict, torch.nn.Module]:
    """Apply, price and (when within budget) judge one policy; returns every metric of the trial and the model
    in the state it was judged in. `rungs` shares the fine-tuning rungs' accuracies with the other trials."""
    model = apply(problem.model, policy, problem.example_input)
    metrics = estimate(model, problem.example_input, problem.profile).as_dict()
    metrics["accuracy"] = None
    metrics["constraints"] = constraints(metrics, problem)
    metrics["feasible"] = _costs_fit(metrics, problem)
    if metrics["feasible"] and problem.evaluator is not None:
        outcome = _judge(problem, model, metrics, rungs)
        value = outcome.pop("accuracy")
        if value is None or not math.isfinite(float(value)):
            raise AutocompressError(f"the evaluator returned {value!r}, not a finite number")
        metrics.update(outcome, accuracy=float(value))
        # Judging may change what is stored (fine-tuning splices pruned weights back, moves shared values): the
        # trial reports the model as judged, and is feasible only if that model still is.
        metrics.update(estimate(model, problem.example_input, problem.profile).as_dict())
        metrics["constraints"] = constraints(metrics, problem)
        metrics["feasible"] = all(v <= 0 for v in metrics["constraints"])
    return metrics, model


def constraints(metrics: dict, problem: Problem) -> list[float]:
    """Optuna's constraint values (<= 0: met): each cost budget, then the accuracy budget if there is one."""
    return violations(metrics, problem.limits) + accuracy_violation(metrics.get("accuracy"), problem.floor)


def _costs_fit(metrics: dict, problem: Problem) -> bool:
    return all(v <= 0 for v in violations(metrics, problem.limits))


def _judge(problem: Problem, model, metrics: dict, rungs: "RungLog | None") -> dict:
    """The evaluator's verdict; the built-in one fine-tunes over rungs, competing on the study's objectives."""
    if not isinstance(problem.evaluator, Evaluator):
        return {"accuracy": problem.evaluator(model)}
    cost = tuple(metrics[o] for o in problem.objectives if o != "accuracy")
    if rungs is None:
        return problem.evaluator.judge(model, cost)
    rungs.cost = cost
    return problem.evaluator.judge(model, cost, rungs.peers, rungs.record)


@dataclass
class RungLog:
    """One trial's rung accuracies, written to the trial as they are reached (`rung_accuracy`, and the costs it
    competes with in `rung_cost`), and the other trials' ones at a rung, read from the study: how the workers
    of a study share one successive-halving schedule."""

    study: optuna.Study
    trial: optuna.Trial
    cost: tuple = ()
    reached: dict = field(default_factory=dict)

    def record(self, steps: int, accuracy: float) -> None:
        self.reached[str(steps)] = accuracy
        self.trial.set_user_attr("rung_cost", list(self.cost))
        self.trial.set_user_attr("rung_accuracy", dict(self.reached))

    def peers(self, steps: int) -> list[tuple[float, tuple]]:
        key, out = str(steps), []
        for t in self.study.get_trials(deepcopy=False):
            reached = t.user_attrs.get("rung_accuracy") or {}
            if t.number != self.trial.number and key in reached and t.state != TrialState.FAIL:
                out.append((reached[key], tuple(t.user_attrs.get("rung_cost", ()))))
        return out


def objective_values(metrics: dict, objectives) -> list[float]:
    # An infeasible candidate's accuracy is never measured; Optuna needs a number, and the worst one
    # keeps it behind every feasible candidate (the constraint already does that for NSGA-II and TPE).
    return [(metrics[o] if metrics[o] is not None else 0.0) for o in objectives]


def run(study: optuna.Study, problem: Problem, progress: bool = True, timeout: float | None = None) -> bool:
    """Evaluate trials until the study holds its target of counted trials, whoever evaluates them, or until
    `timeout` seconds have passed (no trial starts after that). Returns False if interrupted (Ctrl-C)."""
    deadline = None if timeout is None else time.monotonic() + timeout
    bar = _Progress(problem.objectives) if progress else None
    say = bar.write if bar else print
    beating = is_heartbeat_enabled(study._storage)
    poll = min(2.0, study._storage.get_heartbeat_interval()) if beating else 0.0
    grace = storages.GRACE_FACTOR * study._storage.get_heartbeat_interval() if beating else 0.0
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


def run_trial(study: optuna.Study, problem: Problem, goal: int, say: Callable[[str], None]) -> str:
    """Claim, sample, evaluate and record one trial; returns what happened: "surplus" (the target was
    already met by others: the trial stepped back), "duplicate", "lost", "failed" or "complete"."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Heartbeat of storage")  # we beat ourselves, below
        trial = study.ask()
    with _Heartbeat(study._storage, trial._trial_id):
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
    trial.set_user_attr("worker", WORKER)
    trial.set_user_attr("policy", policy.to_json())
    trial.set_user_attr("origin", "student" if "student" in policy else "compressed")
    twin = _duplicate_of(study, trial)
    if twin is None:
        return policy
    trial.set_user_attr("policy", None)
    trial.set_user_attr("duplicate_of", twin)
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
        reason = _first_line(exc) + _where(exc)
        trial.set_user_attr("error", f"{type(exc).__name__}: {reason}")
        _tell(study, trial, TrialState.FAIL)
        say(f"trial {trial.number} failed and is recorded as such: {reason}")
        return "failed"
    metrics["duration_s"] = time.perf_counter() - start
    for key, value in metrics.items():
        trial.set_user_attr(key, value)
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
    trial.set_user_attr("repair", factor)
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
    mine = study._storage.get_trial(trial._trial_id)
    if mine.state != TrialState.RUNNING:
        raise _FinishedElsewhere
    for t in study.get_trials(deepcopy=False):
        if (t.number != trial.number and t.user_attrs.get("policy") == mine.user_attrs["policy"]
                and (counted(t) or t.state == TrialState.RUNNING)):
            return t.number
    return None


def _step_back(study: optuna.Study, trial) -> None:
    """Give up a trial claimed beyond the target. A queued policy (warm start, retry) goes back to the queue;
    a blank trial is closed as PRUNED: left waiting, it would be taken before a retry queued after it, and the
    lost policy would never be evaluated."""
    if "fixed_params" in study._storage.get_trial(trial._trial_id).system_attrs:
        _release(study, trial)
        return
    trial.set_user_attr("surplus", True)
    study.tell(trial, state=TrialState.PRUNED, skip_if_finished=True)


def _release(study: optuna.Study, trial) -> None:
    """Put a claimed trial back in the queue (WAITING), its parameters kept for whoever takes it next."""
    try:
        study._storage.set_trial_state_values(trial._trial_id, TrialState.WAITING)
    except UpdateFinishedTrialError:  # already declared lost and requeued by another worker
        pass


class _Heartbeat:
    """Beats for one trial from a thread while it is claimed, if the storage keeps heartbeats."""

    def __init__(self, storage, trial_id: int):
        self.storage, self.trial_id = storage, trial_id
        self.stop = threading.Event()
        self.thread = None

    def __enter__(self):
        if is_heartbeat_enabled(self.storage):
            self.thread = threading.Thread(target=self._beat, daemon=True)
            self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        if self.thread is not None:
            self.thread.join()

    def _beat(self) -> None:
        interval = self.storage.get_heartbeat_interval()
        while True:
            try:
                self.storage.record_heartbeat(self.trial_id)
            except Exception:  # a finished trial (declared lost meanwhile) takes no beats; the trial's owner reports it
                pass
            if self.stop.wait(interval):
                return


class _Progress:
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
        feasible = [t for t in done if t.state == TrialState.COMPLETE and t.user_attrs.get("feasible")]
        shown = {"feasible": len(feasible)}
        for o in self.objectives:
            values = [t.user_attrs[o] for t in feasible if t.user_attrs.get(o) is not None]
            if values:
                shown[f"best {o}"] = f"{(max if METRICS[o] == 'maximize' else min)(values):.4g}"
        self.bar.set_postfix(shown, refresh=True)

    def close(self) -> None:
        if self.bar:
            self.bar.close()


def new_asker() -> str:
    """A name for one worker's ask, unique across machines."""
    return f"worker:{WORKER}:{uuid.uuid4().hex[:8]}"


def config_json(config: dict) -> dict:
    """Round-trip through JSON so stored and fresh configs compare equal."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def _shown(storage) -> str:
    return storages.hide_password(storage) if isinstance(storage, str) else type(storage).__name__


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


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
