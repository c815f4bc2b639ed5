"""Judging a candidate: BN recalibration, an optional short fine-tune with knowledge distillation, accuracy.

Pruning changes which channels feed each BatchNorm, so its running statistics are stale; re-estimating
them on a few batches (no gradient steps) recovers most of the accuracy at almost no cost, and it is
always done (activation-quantization ranges are re-calibrated on the same batches). With
`finetune_steps`, the candidate then trains for that many steps from its own (the user's) weights,
with the uncompressed model as teacher: KL divergence on temperature-softened logits plus the label
loss. Every compression stays in force while it trains (each technique's `constraint`: masks with
dynamic network surgery, shared values, quantization grids, all through straight-through float
shadows). Batches are drawn in a seeded order, so a candidate judged twice gets the same weights.

Early stopping: Optuna's pruners do not work in multi-objective studies (`Trial.report` raises), so
the rule lives here: after the first steps, a candidate clearly behind completed candidates of
similar cost at the same step stops fine-tuning and is recorded as `early_stopped`.
`finalize` gives the Pareto models a longer fine-tune and re-measures them.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from .compress import TECHNIQUES, get_meta
from .compress.quantize import calibrate_activations
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
    dataset = getattr(loader, "dataset", None)
    size = getattr(loader, "batch_size", None)
    if dataset is None or size is None or not hasattr(dataset, "__getitem__") or not hasattr(dataset, "__len__"):
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


def _logits(out):
    return out[0] if isinstance(out, (tuple, list)) else out


def finetune(model: nn.Module, batches, steps: int, teacher: nn.Module | None = None, lr: float = 0.01,
             temperature: float = 4.0, distill_weight: float = 0.7,
             on_step: Callable[[int], bool] | None = None) -> int:
    """Train `model` in place for `steps` batches of (inputs, labels), compression kept, distilling from
    `teacher` when given (SGD with Nesterov momentum, cosine learning rate). `on_step(step)` may return
    False to stop early. Returns the number of steps taken."""
    torch.manual_seed(0)  # dropout and friends: the same candidate always gets the same weights
    if teacher is not None:
        teacher.eval()
    done = 0
    with compression_kept(model):
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
        model.train()
        for batch in itertools.islice(batches, steps):
            x, y = batch[0], batch[1]
            with torch.no_grad():
                target = _logits(teacher(x)) if teacher is not None else None
            loss = distill_loss(_logits(model(x)), target, y, temperature, distill_weight)
            opt.zero_grad()
            loss.backward()
            opt.step()
            schedule.step()
            done += 1
            if on_step is not None and on_step(done) is False:
                break
            model.train()
    return done


@dataclass
class EarlyStopping:
    """Stop fine-tuning a candidate after `after` steps (None: a quarter of them) when its accuracy then is more
    than `margin` behind the best accuracy that at least `min_peers` earlier candidates of similar cost (every
    cost in `keys` within `similar`, relative) had at the same step."""

    after: int | None = None
    margin: float = 0.05
    similar: float = 0.25
    min_peers: int = 2
    keys: tuple = ("latency_ms", "size_kb")
    history: list = field(default_factory=list)

    def check_step(self, steps: int) -> int:
        return self.after if self.after is not None else max(1, steps // 4)

    def _similar(self, a: dict, b: dict) -> bool:
        shared = [k for k in self.keys if a.get(k) and b.get(k)]
        return bool(shared) and all(abs(a[k] / b[k] - 1) <= self.similar for k in shared)

    def behind(self, cost: dict, early_accuracy: float) -> bool:
        peers = [acc for c, acc in self.history if self._similar(cost, c)]
        return len(peers) >= self.min_peers and early_accuracy < max(peers) - self.margin

    def record(self, cost: dict, early_accuracy: float) -> None:
        self.history.append(({k: cost.get(k) for k in self.keys}, early_accuracy))


class Evaluator:
    """The built-in judge: BN (and activation-range) recalibration on training batches, an optional fine-tune with
    distillation from `teacher`, then accuracy on the validation loader.

    With no training loader (data-free) it skips recalibration and fine-tuning: activation ranges stay those
    `apply` set from BatchNorm statistics. `early_stopping`: True for the default rule, False for none, or an
    EarlyStopping; it acts only when the search passes the candidate's cost (see `judge`).
    """

    def __init__(self, train_loader, val_loader, recal_batches: int = 4, max_val_batches: int | None = None,
                 finetune_steps: int = 0, teacher: nn.Module | None = None, lr: float = 0.01,
                 temperature: float = 4.0, distill_weight: float = 0.7, early_stopping: "bool | EarlyStopping" = True):
        self.train_loader = train_loader
        self.val_loader = val_loader
        self.max_val_batches = max_val_batches
        self.recal_data = fixed_batches(train_loader, recal_batches) if train_loader is not None else None
        self.finetune_steps = finetune_steps if train_loader is not None else 0
        self.teacher = teacher
        self.options = {"lr": lr, "temperature": temperature, "distill_weight": distill_weight}
        self.early_stopping = EarlyStopping() if early_stopping is True else early_stopping or None

    def calibrate(self, model: nn.Module) -> nn.Module:
        """BatchNorm statistics, then activation-quantization ranges, from the same training batches."""
        if self.recal_data is not None:
            recalibrate_bn(model, self.recal_data)
            calibrate_activations(model, self.recal_data)
        return model.eval()

    def prepare(self, model: nn.Module, cost: dict | None = None) -> dict:
        """Bring `model` (in place) to the state it is judged in; returns what happened (early stopping)."""
        self.calibrate(model)
        info = {}
        if self.finetune_steps:
            rule = self.early_stopping if cost is not None else None
            check = rule.check_step(self.finetune_steps) if rule else None

            def on_step(step: int) -> bool:
                if step != check:
                    return True
                info["early_accuracy"] = accuracy(model, self.val_loader, self.max_val_batches)
                stop = rule.behind(cost, info["early_accuracy"])
                rule.record(cost, info["early_accuracy"])
                return not stop

            batches = seeded_batches(self.train_loader, self.finetune_steps)
            done = finetune(model, batches, self.finetune_steps, self.teacher, on_step=on_step, **self.options)
            info["early_stopped"] = done < self.finetune_steps
            self.calibrate(model)
        return info

    def judge(self, model: nn.Module, cost: dict | None = None) -> dict:
        """Accuracy and what happened on the way ({"accuracy", "early_stopped", "early_accuracy"});
        `cost` (the candidate's cost metrics) lets early stopping compare it with similar candidates."""
        info = self.prepare(model, cost)
        return {"accuracy": accuracy(model, self.val_loader, self.max_val_batches), **info}

    def __call__(self, model: nn.Module) -> float:
        return self.judge(model)["accuracy"]

    def longer(self, steps: int) -> "Evaluator":
        """The same judge with `steps` fine-tuning steps and no early stopping (for finalizing)."""
        out = copy.copy(self)
        out.finetune_steps, out.early_stopping = steps if self.train_loader is not None else 0, None
        return out


def finalize(result, evaluator: Evaluator, steps: int, example_input: torch.Tensor, hardware="host"):
    """Give every Pareto model of `result` a longer fine-tune and re-measure it: `steps` more steps (distilled,
    compression kept, no early stopping) from the state the search judged it in (`result.model`).

    Returns (table, models): one row per Pareto trial with its search accuracy, its final accuracy and the
    re-estimated cost of the fine-tuned model; models maps trial number -> fine-tuned module.
    """
    import pandas as pd

    from .cost.model import estimate

    judge, rows, models = evaluator.longer(steps), [], {}
    for number in result.pareto.index:
        model = result.model(number)
        final = judge(model)
        cost = estimate(model, example_input, hardware).as_dict()
        rows.append({"number": number, "search_accuracy": result.trials.loc[number, "accuracy"],
                     "accuracy": final, **cost})
        models[number] = model
    return pd.DataFrame(rows).set_index("number"), models


def make_evaluator(data, evaluator: Callable | None, finetune_steps: int = 0,
                   teacher: nn.Module | None = None) -> Callable | None:
    """The user's evaluator if given, else the built-in one over `data` (train may be None: data-free), fine-tuning
    `finetune_steps` steps with `teacher`; None without either (cost-only search)."""
    if isinstance(finetune_steps, bool) or not isinstance(finetune_steps, int) or finetune_steps < 0:
        raise AutocompressError(f"finetune_steps={finetune_steps!r} is not allowed; it must be an integer >= 0")
    if evaluator is not None:
        return evaluator
    if data is None:
        return None
    train, val = data
    return Evaluator(train, val, finetune_steps=finetune_steps, teacher=teacher)
