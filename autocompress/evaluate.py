"""Judging a candidate: BN recalibration, an optional short fine-tune with knowledge distillation, accuracy.

Pruning changes which channels feed each BatchNorm, so its running statistics are stale; re-estimating
them on a few batches (no gradient steps) recovers most of the accuracy at almost no cost, and it is
always done (activation-quantization ranges are re-calibrated on the same batches). With
`finetune_steps`, the candidate then trains for that many steps from its own (the user's) weights,
with the uncompressed model as teacher: KL divergence on temperature-softened logits plus the label
loss. Every compression stays in force while it trains (each technique's `constraint`: masks with
dynamic network surgery, shared values, quantization grids, all through straight-through float
shadows). Batches are drawn in a seeded order, so a candidate judged twice gets the same weights.

Multi-fidelity: the fine-tuning runs in rungs (`Rungs`, asynchronous successive halving over the Pareto
rank): every candidate is judged after BatchNorm recalibration alone, and only those that could reach the
front go on to rungs of fine-tuning. Optuna's pruners do not work in multi-objective studies (`Trial.report`
raises), so the rule lives here and reads the other candidates' rung accuracies from the study, which every worker shares.
`Evaluator.deliver` gives the final front its longer fine-tune and measures it on validation and test data.

The search talks to one protocol, `Judge`: the built-in `Evaluator` implements it, and a user's
`evaluator=callable(model) -> accuracy` is wrapped in a `CallableJudge` (see `make_evaluator`).
"""
from __future__ import annotations

import abc
import contextlib
import copy
import dataclasses
import itertools
import math
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .compress import TECHNIQUES, calibrate, get_meta
from .cost.runtimes import as_run, check_runtime, prepare_as_run
from .data import split_data
from .errors import AutocompressError

NORM_TYPES = (nn.modules.batchnorm._BatchNorm,)


def _inputs(batch):
    return batch[0] if isinstance(batch, (tuple, list)) else batch


@torch.no_grad()
def recalibrate_bn(model: nn.Module, loader, batches: int | None = None) -> nn.Module:
    """Re-estimate BatchNorm running statistics from `batches` training batches (all if None; cumulative average)."""
    norms = [m for m in model.modules() if isinstance(m, NORM_TYPES)]
    if not norms or loader is None:
        return model.eval()
    model.eval()
    saved = []
    for m in norms:
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None  # cumulative moving average over the calibration batches
        m.train()
    for batch in itertools.islice(loader, batches):
        model(_inputs(batch))
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, loader, max_batches: int | None = None) -> float:
    """Top-1 accuracy in [0, 1] over `loader` (all of it unless `max_batches`)."""
    model.eval()
    correct = total = 0
    for batch in itertools.islice(loader, max_batches):
        x, y = batch[0], batch[1]
        out = model(x)
        if isinstance(out, (tuple, list)):
            out = out[0]
        correct += (out.argmax(1) == y).sum().item()
        total += y.numel()
    return correct / total if total else math.nan


def seeded_batches(loader, count: int, seed: int = 0):
    """Yield `count` batches of a map-style dataset in an order fixed by `seed` (a new permutation per pass),
    whatever state the loader's own shuffling is in; other loaders are simply cycled."""
    dataset, size = _indexable(loader), getattr(loader, "batch_size", None)
    if dataset is None:
        yield from itertools.islice(itertools.cycle(loader), count)
        return
    gen = torch.Generator().manual_seed(seed)
    while count > 0:
        order = torch.randperm(len(dataset), generator=gen).tolist()
        for start in range(0, len(order), size):
            if count == 0:
                return
            yield loader.collate_fn([dataset[i] for i in order[start:start + size]])
            count -= 1


def fixed_batches(loader, batches: int, seed: int = 0) -> list:
    """The same `batches` input batches whatever state the loader's shuffling is in: a seeded random subset
    of a map-style dataset (so every candidate and every run is recalibrated on the same images)."""
    return [_inputs(b) for b in seeded_batches(loader, batches, seed)]


@contextlib.contextmanager
def compression_kept(model: nn.Module):
    """Inside the block every compressed weight is computed from a float shadow through its techniques'
    constraints, in application order, so gradient steps never undo the compression; on exit the weights
    hold the constrained values and the model is plain again."""
    constrained = []
    model.eval()
    for module in list(model.modules()):
        if not get_meta(module) or not isinstance(getattr(module, "weight", None), nn.Parameter):
            continue
        for technique in TECHNIQUES.values():
            rule = technique.constraint(module) if technique.constraint else None
            if rule is not None:
                parametrize.register_parametrization(module, "weight", rule)
                constrained.append(module)
    try:
        yield model
    finally:
        model.eval()
        for module in dict.fromkeys(constrained):
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)


def distill_loss(student: torch.Tensor, teacher: torch.Tensor | None, labels: torch.Tensor,
                 temperature: float, weight: float) -> torch.Tensor:
    """weight * T^2 * KL(teacher_T || student_T) + (1 - weight) * cross-entropy; labels only without a teacher."""
    hard = F.cross_entropy(student, labels)
    if teacher is None:
        return hard
    soft = F.kl_div(F.log_softmax(student / temperature, 1), F.log_softmax(teacher / temperature, 1),
                    log_target=True, reduction="batchmean") * temperature ** 2
    return weight * soft + (1 - weight) * hard


def logits(out):
    """A classifier's logits from its output: the output itself, or the first of a tuple (GoogLeNet's aux...)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class TeacherOutputs:
    """The teacher's logits for the training samples, computed once per sample and shared by every candidate's
    fine-tune and delivery: the teacher's forward pass costs more than a compressed student's training step.

    Only map-style datasets are indexed (with random augmentation a sample keeps the logits of its first view);
    other loaders, and samples past `limit` stored logits, get the teacher run on every batch."""

    def __init__(self, teacher: nn.Module | None, limit: int = 2 ** 26):
        self.teacher, self.limit = teacher, limit
        self.known: dict[int, torch.Tensor] = {}
        self.stored = 0
        if teacher is not None:
            teacher.eval()

    def batches(self, loader, steps: int, seed: int = 0):
        """(inputs, labels, teacher logits or None) of `steps` seeded batches of `loader` (see seeded_batches)."""
        if self.teacher is None or _indexable(loader) is None:
            yield from with_targets(seeded_batches(loader, steps, seed), self.teacher)
            return
        indexed = SimpleNamespace(dataset=_Indexed(loader.dataset), batch_size=loader.batch_size,
                                  collate_fn=lambda items: (loader.collate_fn([item for item, _ in items]),
                                                            [i for _, i in items]))
        for (x, y, *_), idx in seeded_batches(indexed, steps, seed):
            yield x, y, self._targets(x, idx)

    @torch.no_grad()
    def _targets(self, x: torch.Tensor, idx: list[int]) -> torch.Tensor:
        new = [j for j, i in enumerate(idx) if i not in self.known]
        if len(new) == len(idx) or self.stored >= self.limit:
            fresh = logits(self.teacher(x))
            self._keep(idx, fresh)
            return fresh
        if new:
            self._keep([idx[j] for j in new], logits(self.teacher(x[new])))
        return torch.stack([self.known[i] for i in idx])

    def _keep(self, idx: list[int], outputs: torch.Tensor) -> None:
        for i, row in zip(idx, outputs):
            if self.stored >= self.limit:
                return
            if i not in self.known:
                self.known[i] = row.clone()
                self.stored += row.numel()


def with_targets(batches, teacher: nn.Module | None):
    """(inputs, labels, teacher logits or None) for an iterable of (inputs, labels, ...) batches."""
    for x, y, *_ in batches:
        with torch.no_grad():  # not around the yield: the consumer trains with gradients
            target = logits(teacher(x)) if teacher is not None else None
        yield x, y, target


def _indexable(loader):
    """The map-style dataset behind `loader`, or None."""
    dataset = getattr(loader, "dataset", None)
    if dataset is None or getattr(loader, "batch_size", None) is None or not hasattr(dataset, "__getitem__") \
            or not hasattr(dataset, "__len__"):
        return None
    return dataset


class _Indexed:
    """A dataset's items with their indices."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.dataset[i], i


class _Trainer:
    """SGD with Nesterov momentum and a cosine learning rate over `total` steps of distillation, run in pieces
    (the rungs) over (inputs, labels, teacher logits or None) batches; the model must be inside
    `compression_kept`."""

    def __init__(self, model: nn.Module, total: int, lr: float = 0.01, temperature: float = 4.0,
                 distill_weight: float = 0.7):
        torch.manual_seed(0)  # dropout and friends: the same candidate always gets the same weights
        self.model = model
        self.temperature, self.distill_weight = temperature, distill_weight
        params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
        self.schedule = torch.optim.lr_scheduler.CosineAnnealingLR(self.opt, max(1, total))

    def run(self, batches, steps: int) -> int:
        """Take up to `steps` steps from the `batches` iterator; returns how many were taken."""
        done = 0
        self.model.train()
        for x, y, target in itertools.islice(batches, steps):
            loss = distill_loss(logits(self.model(x)), target, y, self.temperature, self.distill_weight)
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            self.schedule.step()
            done += 1
        return done


def finetune(model: nn.Module, batches, steps: int, teacher: nn.Module | None = None, lr: float = 0.01,
             temperature: float = 4.0, distill_weight: float = 0.7) -> int:
    """Train `model` in place for `steps` batches of (inputs, labels), compression kept, distilling from
    `teacher` when given (SGD with Nesterov momentum, cosine learning rate). Returns the steps taken."""
    if teacher is not None:
        teacher.eval()
    with compression_kept(model):
        return _Trainer(model, steps, lr, temperature, distill_weight).run(with_targets(batches, teacher), steps)


def fidelity_rungs(finetune_steps: int, eta: int = 3, smallest: int = 4) -> tuple[int, ...]:
    """The fine-tuning steps after which a candidate is judged and may be promoted: 0 (BatchNorm recalibration
    alone, the cheapest judgement), then `finetune_steps` and its successive divisions by `eta` down to
    `smallest` steps, e.g. 90 -> (0, 10, 30, 90); () for no fine-tuning."""
    rungs = [finetune_steps] if finetune_steps > 0 else []
    while rungs and rungs[0] // eta >= smallest:
        rungs.insert(0, rungs[0] // eta)
    return (0, *rungs) if rungs else ()


def dominance_rank(points: np.ndarray) -> np.ndarray:
    """Non-dominated sorting of rows to be minimized: 0 for the front, 1 for the front of the rest, ..."""
    rank = np.full(len(points), -1)
    level = 0
    while (rank < 0).any():
        left = np.flatnonzero(rank < 0)
        sub = points[left]
        for i, row in zip(left, sub):
            if not (np.all(sub <= row, axis=1) & np.any(sub < row, axis=1)).any():
                rank[i] = level
        level += 1
    return rank


def crowding_distance(points: np.ndarray) -> np.ndarray:
    """NSGA-II's crowding distance of rows (one non-dominated layer): the perimeter of the box spanned by each
    row's neighbours along every objective, normalised by its range; the extremes get infinity."""
    distance = np.zeros(len(points))
    for column in points.T:
        order = np.argsort(column, kind="stable")
        span = column[order[-1]] - column[order[0]]
        distance[order[[0, -1]]] = np.inf
        if span > 0 and len(points) > 2:
            distance[order[1:-1]] += (column[order[2:]] - column[order[:-2]]) / span
    return distance


def promotion_place(points: np.ndarray) -> int:
    """Where row 0 stands among `points` (rows to be minimized) by non-dominated rank, then, within its rank, by
    crowding distance (the spread-out before the crowded, as NSGA-II selects): 0 is the best."""
    rank = dominance_rank(points)
    layer = np.flatnonzero(rank == rank[0])
    crowding = crowding_distance(points[layer])
    return int((rank < rank[0]).sum() + (crowding > crowding[0]).sum())


@dataclass
class Rungs:
    """Multi-fidelity judging by asynchronous successive halving (ASHA) over the Pareto rank.

    A candidate is judged at the first rung (BatchNorm recalibration alone); it goes on to the next rung only if
    it is among the best n // eta of the n candidates judged at this rung (itself included), so, as in ASHA, none
    goes on while fewer than eta were judged there: a study's first draws get the cheap judgement alone (promoting
    them spent a short or busy run fine-tuning two or three candidates of its first minute). Ranked by
    non-dominated layer of (accuracy, costs) and, within a layer, by crowding distance (compressed candidates
    lie on one trade-off curve, so most share the first layer: the layer alone would promote nearly all). Each decision uses what is known when it is taken, so no worker
    waits for another. With an accuracy floor, a candidate more than `floor_margin` below it stops: its steps
    go to candidates that can still meet it. Early stopping is the first rung's decision."""

    steps: tuple[int, ...]
    eta: int = 3
    floor: float | None = None
    floor_margin: float = 0.05

    def promote(self, accuracy: float, cost: tuple, peers: list[tuple[float, tuple]]) -> bool:
        """Whether a candidate with `accuracy` and `cost` (costs to minimize) at this rung goes on, against
        `peers`: (accuracy, cost) of the other candidates judged at the same rung."""
        if self.floor is not None and accuracy < self.floor - self.floor_margin:
            return False
        points = np.array([(-accuracy, *cost)] + [(-a, *c) for a, c in peers], dtype=float)
        return promotion_place(points) < len(points) // self.eta


class Judge(abc.ABC):
    """What the search asks of whatever judges a candidate's accuracy: one protocol for the built-in `Evaluator`
    and a user's callable (`CallableJudge`), so the search never asks which one it holds.

    `judge` brings a candidate to its judged state and measures it; `baseline` measures the uncompressed model;
    `deliver` (only where `delivers`) gives a front model its final fine-tune. `train_loader` is the training
    data a student space's supernet trains on (None: none). `run_in` and `aim` tell it the runtime accuracy is
    computed in and the accuracy floor; a judge that has no use for them keeps these defaults, which do nothing.
    """

    train_loader = None
    delivers = False  # whether `deliver` fine-tunes and re-measures the front after the search

    @abc.abstractmethod
    def judge(self, model: nn.Module, cost: tuple = (), peers: Callable[[int], list] | None = None,
              on_rung: Callable[[int, float], None] | None = None) -> dict:
        """{"accuracy": ..., and whatever else the trial records} of `model`, judged in place (see Evaluator)."""

    @abc.abstractmethod
    def baseline(self, model: nn.Module) -> dict:
        """The uncompressed model's accuracy as given: {"accuracy": ...} and what else the judge measures."""

    def run_in(self, runtime: str, example_input: torch.Tensor) -> "Judge":
        """Judge accuracy as `runtime` computes it; by default the judge's own way. Returns self."""
        return self

    def aim(self, floor: float | None) -> None:
        """The study's accuracy floor (None: none), for a judge that spends less on candidates below it."""

    def deliver(self, model: nn.Module, epochs: int) -> dict:
        raise AutocompressError(f"{type(self).__name__} does not deliver front models (delivers is False)")

    def __call__(self, model: nn.Module) -> float:
        return self.judge(model)["accuracy"]


class CallableJudge(Judge):
    """A user's `evaluator=callable(model) -> accuracy` behind the `Judge` protocol: its number is the accuracy,
    as the callable computes it (no recalibration, no rungs, no delivery); the baseline is judged on a copy,
    so the callable may change the model it gets."""

    def __init__(self, function: Callable[[nn.Module], float]):
        if not callable(function):
            raise AutocompressError(f"evaluator={function!r} is not allowed; it must be a callable(model) -> "
                                    f"accuracy or an evaluate.Judge")
        self.function = function

    def judge(self, model: nn.Module, cost: tuple = (), peers=None, on_rung=None) -> dict:
        return {"accuracy": self.function(model)}

    def baseline(self, model: nn.Module) -> dict:
        return {"accuracy": float(self.function(copy.deepcopy(model)))}


class Evaluator(Judge):
    """The built-in judge: BN (and activation-range) recalibration on training batches, fine-tuning with
    distillation from `teacher` over multi-fidelity rungs (see Rungs), then accuracy on the validation loader;
    `deliver` gives a chosen model its final fine-tune and measures it on validation and test data.

    With no training loader (data-free) it skips recalibration and fine-tuning: activation ranges stay those
    `apply` set from BatchNorm statistics.
    """

    def __init__(self, train_loader, val_loader, test_loader=None, recal_batches: int = 4,
                 max_val_batches: int | None = None, finetune_steps: int = 0, teacher: nn.Module | None = None,
                 lr: float = 0.01, temperature: float = 4.0, distill_weight: float = 0.7, eta: int | None = 3):
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.test_loader = test_loader
        self.max_val_batches = max_val_batches
        self.recal_data = fixed_batches(train_loader, recal_batches) if train_loader is not None else None
        self.finetune_steps = finetune_steps if train_loader is not None else 0
        self.teacher = TeacherOutputs(teacher)
        self.runtime, self.example_input = "torch", None
        self.options = {"lr": lr, "temperature": temperature, "distill_weight": distill_weight}
        if eta is None:  # one fidelity: every candidate gets all the steps
            self.rungs = Rungs((self.finetune_steps,) if self.finetune_steps else ())
        else:
            self.rungs = Rungs(fidelity_rungs(self.finetune_steps, eta), eta)

    delivers = True

    def run_in(self, runtime: str, example_input: torch.Tensor) -> "Evaluator":
        """Judge accuracy as `runtime` computes it (cost/runtimes.as_run): in torch-int8, a model's 8-bit layers
        are judged as the int8 kernels run them, not as their fake-quant simulation. Returns self."""
        self.runtime, self.example_input = check_runtime(runtime), example_input
        return self

    def calibrate(self, model: nn.Module) -> nn.Module:
        """BatchNorm statistics, then what techniques derive from data (activation ranges), then what the runtime
        derives (its int8 activation ranges), all from the same training batches."""
        if self.recal_data is not None:
            recalibrate_bn(model, self.recal_data)
            calibrate(model, self.recal_data)
        prepare_as_run(model.eval(), self.example_input, self.runtime, self.recal_data)
        return model.eval()

    def aim(self, floor: float | None) -> None:
        """The rungs stop spending steps on candidates too far below the accuracy floor (Rungs.floor_margin)."""
        self.rungs = dataclasses.replace(self.rungs, floor=floor)

    def val_accuracy(self, model: nn.Module) -> float:
        return accuracy(self.as_run(model), self.val_loader, self.max_val_batches)

    def baseline(self, model: nn.Module) -> dict:
        """Validation accuracy (as the runtime computes it) and test accuracy (None without test data), with the
        model's statistics as given: nothing is recalibrated."""
        test = accuracy(model, self.test_loader) if self.test_loader is not None else None
        return {"accuracy": self.val_accuracy(model), "test_accuracy": test}

    def as_run(self, model: nn.Module) -> nn.Module:
        return as_run(model, self.example_input, self.runtime)

    def judge(self, model: nn.Module, cost: tuple = (), peers: Callable[[int], list] | None = None,
              on_rung: Callable[[int, float], None] | None = None) -> dict:
        """Bring `model` (in place) to its judged state and measure it. Without rungs: BN recalibration, then
        accuracy. With rungs: fine-tune rung by rung; after each, `on_rung(steps, accuracy)` records it and
        `peers(steps)` gives the (accuracy, cost) of other candidates judged there, against which `cost`
        competes for promotion (no `peers`: judged alone, with every rung's steps). Returns {"accuracy", "steps", "rung", "rung_accuracy", "early_stopped"}."""
        self.calibrate(model)
        if not self.rungs.steps:
            return {"accuracy": self.val_accuracy(model), "steps": 0}
        batches = self.teacher.batches(self.train_loader, self.rungs.steps[-1])
        done, reached, value = 0, {}, math.nan
        # One optimizer and schedule over all rungs: a promoted candidate's steps equal an unstopped one's. Each
        # rung judges the model as it stands if it stops there, with BN statistics and activation ranges of its
        # current weights: training's lagging running averages, measured mid-run, ranked candidates at random
        # (Spearman 0.05 against the final accuracy at 10 of 90 steps; 0.70 recalibrated).
        with compression_kept(model):
            trainer = _Trainer(model, self.rungs.steps[-1], **self.options)
            for index, steps in enumerate(self.rungs.steps):
                if steps > done:
                    done += trainer.run(batches, steps - done)
                    self.calibrate(model)
                value = self.val_accuracy(model)
                reached[str(steps)] = value
                if on_rung is not None:
                    on_rung(steps, value)
                last = index == len(self.rungs.steps) - 1
                if last or (peers is not None and not self.rungs.promote(value, cost, peers(steps))):
                    break
        return {"accuracy": value, "steps": done, "rung": index, "rung_accuracy": reached,
                "early_stopped": done < self.rungs.steps[-1]}

    def deliver(self, model: nn.Module, epochs: int) -> dict:
        """The final fine-tune of a front model, in place: `epochs` passes over the training data, distilled from
        the teacher, cosine learning rate, compression kept; then BN recalibration and accuracy on validation
        ("accuracy") and test ("test_accuracy", None without test data)."""
        steps = epochs * len(self.train_loader) if self.train_loader is not None else 0
        if steps:
            with compression_kept(model):
                _Trainer(model, steps, **self.options).run(self.teacher.batches(self.train_loader, steps, seed=1),
                                                           steps)
        self.calibrate(model)
        test = accuracy(self.as_run(model), self.test_loader) if self.test_loader is not None else None
        return {"accuracy": self.val_accuracy(model), "test_accuracy": test, "final_steps": steps}


def make_evaluator(data, evaluator: "Callable | Judge | None", finetune_steps: int = 0,
                   teacher: nn.Module | None = None) -> Judge | None:
    """The user's evaluator if given (a callable is wrapped in a CallableJudge), else the built-in one over `data`
    (train may be None: data-free), fine-tuning `finetune_steps` steps with `teacher`; None without either
    (cost-only search)."""
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise AutocompressError(f"finetune_steps={finetune_steps!r} is not allowed; it must be an integer >= 0")
    if evaluator is not None:
        return evaluator if isinstance(evaluator, Judge) else CallableJudge(evaluator)
    if data is None:
        return None
    train, val, test = split_data(data)
    return Evaluator(train, val, test, finetune_steps=finetune_steps, teacher=teacher)
