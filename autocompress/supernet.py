"""One elastic supernet per student space, trained once (Once-for-All style, sandwich rule) and cached.

The supernet is a bank of tensors: for every parameter and buffer name a student of the space can have,
the largest tensor any of them needs, from which a student inherits its weights by slicing
(students/bank.py, which the student technique reads; training it needs the bound space and the
evaluator's distillation, so it lives here, above both).

Training (`train_bank`): each step, on one batch, the largest student, the smallest and two random
ones of the space (the sandwich rule of BigNAS / OFA) are run on sliced views of the bank with
`torch.func.functional_call` and their distillation losses from the user's model are summed, so one
optimizer step trains every width, depth, kernel, expansion and structure choice together.
Students are built on the meta device for this, so a step costs only the forward and backward passes.

The bank is cached under `models.cache_dir()/supernets/<key>.pt` (students/bank.py); the key hashes
the teacher's fingerprint (architecture and weights), the training data (a fingerprint of its first
batches), the input shape, the classes and the space's student section (choices, settings, training
steps), so a changed model, data or space trains a new supernet and nothing else does. `prepare` writes
the key into the space's `supernet` setting; every student policy then names it, and the student
technique (compress/student.py) loads that bank and inherits from it.
"""
from __future__ import annotations

import hashlib
import json
import random
import sys
import time

import numpy as np
import torch
from torch import nn

from .compress.student import NAME as STUDENT
from .errors import AutocompressError
from .evaluate import TeacherOutputs, distill_loss, fixed_batches, logits
from .models import model_fingerprint
from .space import KIND
from .students.bank import bank_name, class_count, crop, load, named_tensors, region, save
from .students.build import DEFAULTS, FIELDS_OF, build

VERSION = 1
SANDWICH_RANDOM = 2          # random students per step besides the largest and the smallest
LR, MOMENTUM, WEIGHT_DECAY = 0.05, 0.9, 4e-5


# ---- the space's students ------------------------------------------------------------------------------

class Sampler:
    """The student sections of one bound space: the largest, the smallest and random ones."""

    def __init__(self, bound):
        self.bound, self.kind = bound, {KIND: bound.kind_of(STUDENT)}
        self.knobs = [k for k in bound.knobs if k.technique == STUDENT]

    def section(self, values: dict) -> dict:
        return self.bound.policy({**values, **self.kind})[STUDENT]

    def uniform(self, fraction: float) -> dict:
        return self.section(self.bound.uniform(fraction))

    def random(self, rng: random.Random) -> dict:
        return self.section({k.param: rng.choice(choices(k.distribution)) for k in self.knobs})

    def spanning(self) -> list[dict]:
        """The largest student, and the largest with each field set to each of its choices in turn: between
        them, every tensor name and the largest shape of each (every shape grows with every size knob)."""
        top = self.bound.uniform(1.0)
        out = [self.section(top)]
        for field in dict.fromkeys(k.field for k in self.knobs):
            same = [k for k in self.knobs if k.field == field]
            for choice in choices(same[0].distribution):
                out.append(self.section({**top, **{k.param: choice for k in same}}))
        return out


def choices(distribution) -> list:
    if hasattr(distribution, "choices"):
        return list(distribution.choices)
    d = distribution
    return [float(v) for v in np.arange(d.low, d.high + d.step / 2, d.step)]


def make_bank(sampler: Sampler, input_shape, classes: int, seed: int = 0) -> dict:
    """A freshly initialized bank holding the largest tensor of every name the space's students use."""
    torch.manual_seed(seed)
    params, buffers = {}, {}
    for section in sampler.spanning():
        model = build(section, input_shape, classes)
        for store, named in ((params, model.named_parameters()), (buffers, model.named_buffers())):
            for name, t in named:
                if t is not None:
                    store[bank_name(name)] = _larger(store.get(bank_name(name)), t.detach())
    return {"params": params, "buffers": buffers}


def _larger(old: torch.Tensor | None, new: torch.Tensor) -> torch.Tensor:
    """Whichever holds the other; when neither does, the larger one placed in the elementwise-largest shape."""
    if old is None:
        return new.clone()
    if all(a >= b for a, b in zip(old.shape, new.shape)):
        return old
    if all(b >= a for a, b in zip(old.shape, new.shape)):
        return new.clone()
    big = old if old.numel() >= new.numel() else new
    out = torch.zeros([max(a, b) for a, b in zip(old.shape, new.shape)], dtype=big.dtype)
    out[region(out.shape, big.shape)] = big
    return out


def train_bank(bank: dict, sampler: Sampler, teacher: nn.Module, train_loader, steps: int, input_shape,
               classes: int, seed: int = 0, log=None) -> dict:
    """Train the bank in place for `steps` batches with the sandwich rule and distillation from `teacher`."""
    rng = random.Random(seed)
    torch.manual_seed(seed)
    params = {n: nn.Parameter(t) for n, t in bank["params"].items()}
    opt = torch.optim.SGD(params.values(), lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WEIGHT_DECAY)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(1, steps))
    extremes = [_skeleton(sampler.uniform(1.0), input_shape, classes), _skeleton(sampler.uniform(0.0), input_shape, classes)]
    start = time.perf_counter()
    for step, (x, y, target) in enumerate(TeacherOutputs(teacher).batches(train_loader, steps, seed)):
        x = x.contiguous(memory_format=torch.channels_last)  # 2-3x faster depthwise convs on CPU
        opt.zero_grad()
        randoms = [_skeleton(sampler.random(rng), input_shape, classes) for _ in range(SANDWICH_RANDOM)]
        for skeleton in extremes + randoms:
            distill_loss(_run_sliced(skeleton, params, bank["buffers"], x), target, y, 4.0, 0.7).backward()
        opt.step()
        schedule.step()
        if log is not None and (step + 1) % max(1, steps // 5) == 0:
            log(f"supernet step {step + 1}/{steps} ({time.perf_counter() - start:.0f} s)")
    bank["params"] = {n: p.detach() for n, p in params.items()}
    return bank


def _skeleton(section: dict, input_shape, classes: int) -> nn.Module:
    """The student `section` without weights (meta device), in training mode, for `_run_sliced`."""
    with torch.device("meta"):
        return build(section, input_shape, classes).train()


def _run_sliced(skeleton: nn.Module, params: dict, buffers: dict, x) -> torch.Tensor:
    """A student skeleton run on views of the bank (gradients reach the bank, BatchNorm statistics update it)."""
    tensors = {n: crop(params.get(bank_name(n), buffers.get(bank_name(n))), t.shape)
               for n, t in named_tensors(skeleton).items()}
    return logits(torch.func.functional_call(skeleton, tensors, (x,)))


# ---- the cache key -------------------------------------------------------------------------------------

def data_fingerprint(loader) -> str:
    """A short hash of the first seeded training batches and the dataset's length."""
    h = hashlib.sha1(str(len(getattr(loader, "dataset", ()) or ())).encode())
    for x in fixed_batches(loader, 2):
        h.update(x.detach().cpu().contiguous().numpy().tobytes()[:1 << 16])
    return h.hexdigest()[:16]


def supernet_key(teacher: nn.Module, train_loader, input_shape, classes: int, cfg: dict) -> str:
    payload = {"version": VERSION, "teacher": model_fingerprint(teacher), "data": data_fingerprint(train_loader),
               "input_shape": list(input_shape), "classes": classes,
               "space": {k: v for k, v in cfg.items() if k != "supernet"}}
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


# ---- the entry point for a search ----------------------------------------------------------------------

def check_section(cfg: dict) -> None:
    """Refuse knobs that the space's block type does not have, and a per-stage input resolution."""
    block = cfg.get("block", "mbconv")
    for field, default in DEFAULTS.items():
        if field not in FIELDS_OF[block] and cfg.get(field, [default]) != [default]:
            users = [b for b, fields in FIELDS_OF.items() if field in fields]
            raise AutocompressError(f"student.{field} applies to {' and '.join(users)} blocks only; this space's "
                                    f"block is {block}")
    resolution = cfg.get("resolution", [1.0])
    if cfg.get("granularity") != "global" and not (isinstance(resolution, list) and len(resolution) == 1):
        raise AutocompressError(f"student.resolution is one value for the whole network; give the space "
                                f"granularity: global, not {cfg.get('granularity')!r}")
    steps = cfg.get("supernet_steps")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise AutocompressError(f"student.supernet_steps = {steps!r} is not allowed; it must be an integer >= 0")


def prepare(bound, teacher: nn.Module, example_input: torch.Tensor, train_loader, log=None) -> str | None:
    """Make the student section of `bound`'s space search-ready: check the teacher and the knobs, then train
    (or find in the cache) its supernet and name it in the section's `supernet` setting. Without training
    data there is no supernet: students start from fresh weights. Returns the key (None without a student
    section or without data)."""
    cfg = bound.space.techniques.get(STUDENT)
    if cfg is None:
        return None
    check_section(cfg)
    classes = class_count(teacher, example_input)
    if train_loader is None:
        cfg["supernet"] = None
        return None
    key = supernet_key(teacher, train_loader, example_input.shape, classes, cfg)
    cfg["supernet"] = key
    log = log or (lambda text: print(text, file=sys.stderr))
    if load(key) is None:
        sampler = Sampler(bound)
        start = time.perf_counter()
        log(f"training the {cfg.get('block', 'mbconv')} student supernet ({cfg['supernet_steps']} steps, once; "
            f"cached as {key})")
        bank = make_bank(sampler, example_input.shape, classes)
        train_bank(bank, sampler, teacher, train_loader, int(cfg["supernet_steps"]), example_input.shape, classes,
                   log=log)
        bank["seconds"] = time.perf_counter() - start
        save(key, bank)
        log(f"supernet trained in {bank['seconds']:.0f} s")
    return key
