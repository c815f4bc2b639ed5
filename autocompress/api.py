"""The Python entry points: compress, work (join a shared study), estimate, apply, analyze."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from . import judged, search, supernet
from .budgets import Budgets, check_objectives
from .compress import apply as _apply
from .cost.hardware import load_profile
from .cost.model import Estimate, estimate as _estimate
from .cost.profiles import HardwareProfile
from .data import load_recorded_data
from .deliver import deliver_front, dominated_by_delivered, timed
from .errors import AutocompressError
from .evaluate import Judge, make_evaluator
from .compress.prune.groups import with_channel_groups
from .graph import LayerGraph, analyze as _trace
from .judged import WeightStore
from .models import load_recorded, model_fingerprint
from .result import Result
from .space import Policy, SearchSpace


def analyze(model: nn.Module, example_input: torch.Tensor) -> LayerGraph:
    """The model's layer graph: layers with shapes, MACs and parameters, and its channel groups."""
    model = model.eval()
    return with_channel_groups(_trace(model, example_input), model, example_input)


def estimate(model: nn.Module, example_input: torch.Tensor, hardware="host", threads: int | None = None,
             runtime: str | None = None) -> Estimate:
    """Latency, energy, size, MACs and parameters of `model` on `hardware` run with `threads` threads in
    `runtime` (torch or onnxruntime; None: `host` at torch's count in eager PyTorch, a calibrated profile at its
    own), with a per-layer table."""
    return _estimate(model, example_input, hardware, threads, runtime)


def apply(model: nn.Module, policy, example_input: torch.Tensor) -> nn.Module:
    """A compressed copy of `model` following `policy` (a Policy, a dict or its JSON text)."""
    if isinstance(policy, str):
        policy = Policy.from_json(policy)
    return _apply(model, Policy(policy), example_input)


def compress(model: nn.Module, example_input: torch.Tensor, data=None, hardware="host", budgets=None,
             objectives=None, space="default", trials: int = 100, seed: int = 0, sampler: str = "tpe",
             storage=None, study_name: str = "autocompress", evaluator: Callable | None = None,
             progress: bool = True, model_spec: dict | None = None, finetune_steps: int = 0,
             repair: bool = True, final_epochs: int = 3, weights=None, timeout: float | None = None,
             measure: bool = False) -> Result:
    """Search compressed versions of `model` within `budgets` and return every trial and the Pareto front.

    data: (train_loader, val_loader) or (train_loader, val_loader, test_loader): training batches for BN
        recalibration and fine-tuning, validation accuracy to select on, test accuracy (held out) to report;
        None for a cost-only search.
    budgets: {"latency_ms": 2.0, "size_kb": 300} absolute, {"latency": 0.5} relative to the model, and
        {"accuracy_drop": 1.0} (points below the uncompressed model) or {"accuracy": 0.98}.
    objectives: metric names; default ("accuracy", "latency_ms"), or ("latency_ms", "size_kb") without data.
    trials: the study holds this many trials when the call returns, plus any that workers joining it asked for.
    storage: where the study lives: None (memory), sqlite:///PATH.db, journal:PATH, postgresql://... (see
        autocompress.storage) or an Optuna storage; the same storage and study name resume a study.
    model_spec: {"model_spec": ..., "checkpoint": ..., "data": ...} as `autocompress run` records it, which lets
        `autocompress worker` (or `work`) rebuild the problem on another machine.
    finetune_steps: the most steps a candidate is fine-tuned in the search, distilling from `model` (built-in
        evaluator only), in multi-fidelity rungs: every candidate is first judged after BatchNorm recalibration
        alone, the promising third gets steps / 9, the best of those steps / 3, then steps (see evaluate.Rungs).
    repair: a sampled policy over budget is scaled toward the budget before it is evaluated (see repair.py).
    final_epochs: passes over the training data with which every front model is fine-tuned after the search
        (delivery; 0: none, the front is only re-measured on the test data); needs training data.
    measure: time every delivered front model (and the original) on this machine: `measured_latency_ms` beside
        the cost model's `latency_ms`, at the profile's thread count (delivery needs the built-in evaluator).
    timeout: seconds after which no new trial starts (the study then holds fewer than `trials`); delivery follows.
    weights: the folder for the judged weights of trials (what `Result.model(n)` loads); default beside the
        study's file, in memory for an in-memory study. Give shared-database studies a folder all workers reach.
    """
    _check_trials(trials)
    _check_epochs(final_epochs)
    if timeout is not None and (isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or timeout <= 0):
        raise AutocompressError(f"timeout={timeout!r} is not allowed; it must be a number of seconds > 0, or None")
    judge = make_evaluator(data, evaluator, finetune_steps, teacher=model)
    study, problem = _open(_Run(model, example_input, judge, hardware, budgets, objectives, space, seed, sampler,
                                storage, study_name, model_spec, finetune_steps, repair, sampler_seed=seed,
                                trials_hint=trials, weights=weights))
    search.ask_trials(study, "run", trials)
    study.set_user_attr("final_epochs", final_epochs)  # what a worker that ends the study delivers with
    if measure:
        _measure_baseline(study, problem)
    return _search(study, problem, progress, final_epochs, timeout)


def work(storage, study_name: str = "autocompress", trials: int = 10, progress: bool = True, weights=None,
         final_epochs: int | None = None) -> Result:
    """Join a study that `autocompress run` made in a shared storage, add `trials` trials to its target, and
    evaluate trials until the whole study reaches its target (retrying those other workers lost).

    Everything else comes from the study: model spec, checkpoint, data, space, budgets, hardware profile,
    objectives, seed. The model and checkpoint must be the same on this machine (their fingerprint is checked).
    """
    _check_trials(trials)
    config, asked = search.peek(storage, study_name)
    if not config.get("model_spec"):
        raise AutocompressError(f"study {study_name!r} was made from Python without a model spec, so a worker "
                                f"cannot rebuild its model; make it with `autocompress run --model ...`")
    model = load_recorded(config, f"study {study_name!r}")
    shape = tuple(config["input_shape"])
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))  # as `autocompress run` makes it
    data = load_recorded_data(config, f"study {study_name!r}")
    judge = make_evaluator(data, None, config.get("finetune_steps", 0), teacher=model)
    profile = HardwareProfile.from_dict(config["hardware"], f"stored in study {study_name!r}")
    space = SearchSpace(config["space"]["name"], config["space"]["techniques"], config["space"]["description"])
    spec = {k: config[k] for k in MODEL_SPEC_KEYS if k in config}
    study, problem = _open(_Run(model, example, judge, profile, config["budgets"], config["objectives"], space,
                                config["seed"], config["sampler"], storage, study_name, spec,
                                config.get("finetune_steps", 0), config.get("repair", True), sampler_seed=None,
                                trials_hint=asked + trials, weights=weights))
    search.ask_trials(study, search.new_asker(), trials)
    epochs = study.user_attrs.get("final_epochs", 0) if final_epochs is None else final_epochs
    return _search(study, problem, progress, epochs)


MODEL_SPEC_KEYS = ("model_spec", "checkpoint", "data")


def _check_trials(trials) -> None:
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise AutocompressError(f"trials={trials!r} is not allowed; it must be an integer >= 0")


def _check_epochs(epochs) -> None:
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 0:
        raise AutocompressError(f"final_epochs={epochs!r} is not allowed; it must be an integer >= 0")


@dataclass
class _Run:
    """What a study is opened with: the problem (model, judge, device, budgets, objectives, space), how it is
    searched, and where it lives. `compress` fills it from its arguments, `work` from the study's record."""

    model: nn.Module
    example_input: torch.Tensor
    judge: Judge | None
    hardware: "str | Path | HardwareProfile"
    budgets: "dict | Budgets | None"
    objectives: "tuple[str, ...] | list[str] | None"
    space: "str | Path | SearchSpace"
    seed: int
    sampler: str
    storage: object                       # None, a URL or path, or an Optuna storage (search/storage.py)
    study_name: str
    model_spec: dict | None
    finetune_steps: int
    repair: bool
    sampler_seed: int | None              # None: the one the study recorded (a worker joining it)
    trials_hint: int                      # how many trials the study will hold: the sampler's startup size
    weights: "str | Path | None" = None


def _open(run: _Run) -> tuple:
    """Validate the inputs, open (or create) the study with this problem's configuration, and return it with
    the Problem every trial needs. A new study gets the baseline and the warm-start policies."""
    judge, example_input = run.judge, run.example_input
    objectives = run.objectives
    if objectives is None:
        objectives = ("accuracy", "latency_ms") if judge is not None else ("latency_ms", "size_kb")
    objectives = check_objectives(objectives, judge is not None)
    budgets = run.budgets if isinstance(run.budgets, Budgets) else Budgets(run.budgets)
    profile = load_profile(run.hardware)
    search_space = SearchSpace.load(run.space)
    search.check_sampler(run.sampler)
    model = run.model.eval()
    bound = search_space.bind(analyze(model, example_input))
    supernet.prepare(bound, model, example_input, judge.train_loader if judge is not None else None)  # students
    if judge is not None:  # accuracy as the profile's runtime computes it (int8 kernels in torch-int8)
        judge.run_in(profile.runtime, example_input)
    baseline = _estimate(model, example_input, profile).as_dict()
    limits = budgets.limits(baseline)
    if budgets.accuracy and judge is None:
        raise AutocompressError("an accuracy budget needs data or an evaluator to measure accuracy with")
    config = search.config_json({
        "objectives": list(objectives), "budgets": budgets.to_dict(), "limits": limits,
        "hardware": profile.to_dict(), "space": search_space.to_dict(), "seed": run.seed, "sampler": run.sampler,
        "model": model_fingerprint(model), "input_shape": list(example_input.shape),
        "finetune_steps": run.finetune_steps, "repair": bool(run.repair), **(run.model_spec or {}),
    })
    study = search.open_study(run.storage, run.study_name, objectives, config)
    study.sampler = search.make_sampler(run.sampler, search.seed_for(study, run.sampler_seed), run.trials_hint)
    if "baseline" not in study.user_attrs:  # measured once per study: a resume calls no evaluator for it
        measured = judge.baseline(model) if judge is not None else {"accuracy": None}  # statistics as given
        study.set_user_attr("baseline", {**baseline, **measured})
        study.set_user_attr("min_accuracy", budgets.accuracy_floor(study.user_attrs["baseline"]["accuracy"]))
    floor = study.user_attrs.get("min_accuracy")
    if judge is not None:  # the built-in judge's rungs stop spending steps on candidates below the floor
        judge.aim(floor)
    store = _weight_store(study, run.storage, run.study_name, run.weights)
    problem = search.Problem(model, example_input, bound, profile, objectives, limits, judge, bool(run.repair),
                             floor, store)
    search.enqueue_warm_start(study, problem)
    return study, problem


def _weight_store(study, storage, study_name: str, weights) -> WeightStore:
    """Where this process keeps judged weights: `weights`, else the folder the study names, else beside its file;
    a new study records the folder so reports and other workers find it."""
    folder = weights or study.user_attrs.get("weights") or judged.beside(storage, study_name)
    if folder is not None and "weights" not in study.user_attrs:
        study.set_user_attr("weights", str(Path(folder).resolve()))
    return WeightStore(folder)


def _search(study, problem: search.Problem, progress: bool, final_epochs: int, timeout: float | None = None) -> Result:
    completed = search.run(study, problem, progress, timeout)
    if completed:
        deliver_front(study, problem, final_epochs, say=lambda text: print(text, file=sys.stderr))
        problem.store.discard(dominated_by_delivered(study, problem.objectives))
    result = Result.from_study(study, problem.model, problem.example_input, problem.store)
    if not completed:
        result.interrupted = True
        trials = result.trials  # counted as the target counts them: no PRUNED duplicate, no lost trial
        finished = int(((trials["state"] == "COMPLETE") | (trials["state"] == "FAIL") & trials["error"].notna()).sum())
        print(f"interrupted: {finished} finished trials are kept in the study (the running one is "
              f"queued again); run again to resume")
    return result


def _measure_baseline(study, problem: search.Problem) -> None:
    """Turn timing on for the study's deliveries and time the original model once."""
    study.set_user_attr("measure", True)
    baseline = study.user_attrs["baseline"]
    if "measured_latency_ms" not in baseline:
        study.set_user_attr("baseline", {**baseline, "measured_latency_ms": timed(problem.model, problem)})
