"""The Python entry points: compress, estimate, apply, analyze."""
from __future__ import annotations

import copy
import hashlib
from typing import Callable

import torch
from torch import nn

from . import search
from .budgets import Budgets, check_objectives
from .compress import apply as _apply
from .cost.model import Estimate, estimate as _estimate
from .cost.profiles import load_profile
from .errors import AutocompressError
from .evaluate import Evaluator, accuracy, make_evaluator
from .graph import LayerGraph, analyze as _analyze
from .result import Result
from .space import Policy, SearchSpace


def analyze(model: nn.Module, example_input: torch.Tensor) -> LayerGraph:
    """The model's layer graph: layers with shapes, MACs and parameters, and its channel groups."""
    return _analyze(model, example_input)


def estimate(model: nn.Module, example_input: torch.Tensor, hardware="host") -> Estimate:
    """Latency, energy, size, MACs and parameters of `model` on `hardware`, with a per-layer table."""
    return _estimate(model, example_input, hardware)


def apply(model: nn.Module, policy, example_input: torch.Tensor) -> nn.Module:
    """A compressed copy of `model` following `policy` (a Policy, a dict or its JSON text)."""
    if isinstance(policy, str):
        policy = Policy.from_json(policy)
    return _apply(model, Policy(policy), example_input)


def compress(model: nn.Module, example_input: torch.Tensor, data=None, hardware="host", budgets=None,
             objectives=None, space="default", trials: int = 100, seed: int = 0, sampler: str = "nsga2",
             storage=None, study_name: str = "autocompress", evaluator: Callable | None = None,
             progress: bool = True, model_spec: dict | None = None) -> Result:
    """Search compressed versions of `model` within `budgets` and return every trial and the Pareto front.

    data: (train_loader, val_loader) for BN recalibration and accuracy, or None for a cost-only search.
    budgets: {"latency_ms": 2.0, "size_kb": 300} absolute, or {"latency": 0.5} relative to the model.
    objectives: metric names; default ("accuracy", "latency_ms"), or ("latency_ms", "size_kb") without data.
    storage: an Optuna storage URL; the same storage and study name resume a study.
    """
    if isinstance(trials, bool) or not isinstance(trials, int) or trials < 0:
        raise AutocompressError(f"trials={trials!r} is not allowed; it must be an integer >= 0")
    judge = make_evaluator(data, evaluator)
    if objectives is None:
        objectives = ("accuracy", "latency_ms") if judge is not None else ("latency_ms", "size_kb")
    objectives = check_objectives(objectives, judge is not None)
    budgets = budgets if isinstance(budgets, Budgets) else Budgets(budgets)
    profile = load_profile(hardware)
    search_space = SearchSpace.load(space)
    sampler_obj = search.make_sampler(sampler, seed, trials)
    model = model.eval()
    graph = _analyze(model, example_input)
    bound = search_space.bind(graph)

    baseline = _estimate(model, example_input, profile).as_dict()
    limits = budgets.limits(baseline)
    config = search.config_json({
        "objectives": list(objectives), "budgets": budgets.to_dict(), "limits": limits, "hardware": profile.to_dict(),
        "space": search_space.to_dict(), "seed": seed, "sampler": sampler, "model": model_fingerprint(model),
        "input_shape": list(example_input.shape), **(model_spec or {}),
    })
    study = search.open_study(storage, study_name, objectives, sampler_obj, config)
    if "baseline" not in study.user_attrs:
        baseline["accuracy"] = _baseline_accuracy(judge, model)
        study.set_user_attr("baseline", baseline)
    search.fail_stale_trials(study)
    search.enqueue_warm_start(study, bound)
    problem = search.Problem(model, example_input, bound, profile, objectives, limits, judge)
    completed = search.run(study, problem, trials, progress)
    result = Result.from_study(study, model, example_input)
    if not completed:
        print(f"interrupted: {len(result.trials)} finished trials are kept in the study; run again to resume")
    return result


def _baseline_accuracy(judge, model: nn.Module):
    if judge is None:
        return None
    if isinstance(judge, Evaluator):  # the user's model as given: no recalibration of its statistics
        return accuracy(model, judge.val_loader, judge.max_val_batches)
    return float(judge(copy.deepcopy(model)))


def model_fingerprint(model: nn.Module) -> str:
    """A short hash of the model's architecture and weights, so a resumed study is the same problem."""
    h = hashlib.sha1(str(model).encode())
    for name, tensor in model.state_dict().items():
        h.update(name.encode())
        h.update(tensor.detach().cpu().contiguous().numpy().tobytes()[:4096])
    return h.hexdigest()[:16]
