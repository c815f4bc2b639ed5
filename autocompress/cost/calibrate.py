"""Calibrate a hardware profile by timing kernels on this machine (its CPU, or its CUDA GPU), at one thread count.

Kernels (cost/kernels.py: conv+bn+act, pointwise, grouped and depthwise convs, linears, adds, pools,
concatenations, ...) are sampled over the shapes that pruning and students produce (channel counts that
are not multiples of 8, feature maps down to 1x1, strides, kernel sizes), each built as a small module,
traced to its feature row the way the cost model traces a model, and timed alone with the profile's torch
threads (in an int8 runtime, most of those with an int8 kernel timed as that, and float <-> int8
conversions sampled too). The roofline prior is measured (an empty op, a large convolution, large copies) and a
gradient-boosted regressor (scikit-learn) is fitted on log(latency / prior): nothing is fitted against a
bound. None of the kernels is a model that scripts/bench_cost_model.py scores.

Timing notices noise. A reference kernel (a small convolution) is timed before the kernels and after every
block of PROBE_EVERY of them; its quiet time is the least of its single-thread CPU time (which load does not
inflate) and its quickest timing so far. A block after which the reference runs more than PROBE_LIMIT times
its quiet time was timed while something else ran: it is timed again (RETRIES times, after a pause), and its
kernels are dropped when it stays noisy. Within a kernel, rounds further apart than SPREAD_LIMIT are timed
again, then dropped. The load average is read before and during the timing. When the cores are busy before
timing starts (the reference slow, or the load average above the cores the timing leaves free) a
calibration that may keep a previous profile stops there (`Busy`); one that must write a profile times the
kernels on one thread with the CPU clock, which the load does not inflate, and says so (a thread count
timed on busy cores is not what anyone will run: on 2 shared cores 2 threads time 100x slower). The
roofline prior is measured so that it stays physical (no number at a clamp). The profile records the load,
the reference's slowdown, the blocks timed again and dropped, how repeatable the rest were and the fit's
quality on held-out kernels (5-fold cross-validation: median error, share within 10 and 20 %, R^2 of log
latency); `busy_reason` says when that is not a profile to trust, and `calibrate_host` then keeps the
previous profile unless forced.
"""
from __future__ import annotations

import copy
import datetime
import math
import os
import platform
import random
import statistics
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from ..errors import AutocompressError
from ..threads import fixed_threads
from . import kernels as K
from . import quantized
from .fusion import fusion_groups
from .measure import measure_latency_ms
from .profiles import KINDS, HardwareProfile, default_threads
from .ort import onnx_bytes, op_types
from .ort_int8 import qdq_bytes
from .runtimes import ENGINES, INT8_RUNTIMES, check_runtime
from .trace import trace

MODEL_VERSION = 11  # bump when the latency model or its timing changes: cached host profiles are then re-fitted
                   # (7: timing that notices busy cores; a version-6 profile may hold the timings of busy cores)
SAMPLES = {True: 500, False: 2000}      # kernels timed by a quick (first use) and a full calibration
MAX_MACS = {True: 30e6, False: 120e6}   # the largest kernel sampled: beyond it, the prior's slope carries
ROUND_MS = {True: 3.0, False: 10.0}     # timing per round of a kernel
SPREAD_LIMIT = 1.25                     # rounds further apart than this (max / min) are timed again, then dropped
BUSY_DROPPED = 0.2                      # more kernels dropped than this: the machine was busy
PROBE_EVERY = 20                        # kernels timed between two timings of the reference kernel
PROBE_LIMIT = 1.3                       # the reference slower than this x its quiet time: the block is noisy
WARM_CALLS = 3                          # calls of each copy of a kernel before it is timed (see warm)
WARM_ROUNDS = 5                         # ... within this many rounds' time (ROUND_MS)
RETRIES = 2                             # a noisy block is timed again this many times, then its kernels dropped
PAUSE_S = 0.5                           # the wait before a noisy block is timed again
START_TRIES = 3                         # reference timings (PAUSE_S apart) before the cores count as busy
SERIAL_SLACK = 2.5                      # more threads may run the reference this much slower than one on idle cores
POOR_FIT = 0.5                          # held-out median error above this: the timings do not fit any model
HOROWITZ_ENERGY = {"mac_pj": {32: 4.6, 16: 1.5, 8: 0.23, 4: 0.065, 2: 0.02, 1: 0.01}, "dram_pj_per_byte": 80.0,
                   "sram_pj_per_byte": 1.25}
WIDTHS = (3, 8, 16, 24, 32, 40, 48, 64, 72, 96, 120, 128, 160, 192, 240, 256, 320, 384, 480, 512, 576, 672, 768, 960,
          1024, 1280, 2048)
RESOLUTIONS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112)
ACTS = (nn.ReLU, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid, nn.GELU)
INT8_SHARE = 0.6                        # int8 runtimes: kernels with an int8 kernel timed as that (the rest float)
BOUNDARY_SHARE = 0.1                    # int8 runtimes: samples that are a float <-> int8 conversion
WEIGHTS = {"conv": 5, "pointwise": 6, "grouped": 2, "dwconv": 4, "linear": 2, "add": 2, "mul": 1.5, "cat": 1,
           "act": 1, "norm": 0.5, "maxpool": 0.7, "avgpool": 0.3, "adaptivepool": 1, "other": 0.3}


class _WithBuffer(nn.Module):
    """A binary op of the input and a stored tensor: an add, a broadcast multiply or a concatenation."""

    def __init__(self, op: str, other: torch.Tensor, act: nn.Module | None):
        super().__init__()
        self.op, self.act = op, act
        self.register_buffer("other", other)

    def forward(self, x):
        y = x + self.other if self.op == "add" else x * self.other if self.op == "mul" else torch.cat([x, self.other], 1)
        return self.act(y) if self.act is not None else y


class _RoundRobin(nn.Module):
    """Copies of one kernel run in turn, one per call: each call finds its weights where a model with that many
    weight bytes leaves them (cache or main memory), not where its own previous call did."""

    def __init__(self, kernel: nn.Module, copies: int):
        super().__init__()
        self.copies, self.turn = nn.ModuleList(copy.deepcopy(kernel) for _ in range(copies)), 0

    def forward(self, x):
        self.turn = (self.turn + 1) % len(self.copies)
        return self.copies[self.turn](x)


def round_robin(kernel: nn.Module, rng: random.Random) -> tuple[nn.Module, float]:
    """(module to time, weight bytes read between two runs of one copy): most kernels run among copies whose
    weights add up to a random 0.1-64 MB, so every memory level is sampled; the rest alone."""
    own = 4.0 * sum(p.numel() for p in kernel.parameters())
    if not own or rng.random() < 0.2:
        return kernel, own
    copies = int(min(64, max(1, 2 ** rng.uniform(math.log2(1e5), math.log2(64e6)) // own)))
    return _RoundRobin(kernel, copies).eval(), own * copies


class _Call(nn.Module):
    """A module call that computes nothing: what an op the cost model cannot name costs (its dispatch)."""

    def forward(self, x):
        return x.neg()


def _width(rng: random.Random) -> int:
    """A channel count: a common width, or (half the time) what pruning leaves of one (any integer)."""
    width = rng.choice(WIDTHS[1:])
    return max(1, round(width * rng.uniform(0.15, 1.0))) if rng.random() < 0.5 else width


def _act(rng: random.Random) -> nn.Module | None:
    return rng.choice(ACTS)() if rng.random() < 0.75 else None


def _conv_kernel(fam: str, rng: random.Random) -> tuple[list, int, int]:
    """(layers, input channels, stride) of one sampled convolution kernel of family `fam`, with its BN and act."""
    cin, cout = (rng.choice([3, _width(rng)]) if fam == "conv" else _width(rng)), _width(rng)
    k, groups = rng.choice([3, 3, 3, 5, 7]) if fam != "pointwise" else 1, 1
    if fam == "dwconv":
        cout = groups = cin
        k = rng.choice([3, 3, 5, 7])
    elif fam == "grouped":
        per = rng.choice([4, 8, 16, 24, 32, 48, 64])
        groups = rng.choice([2, 4, 8, 16, 32])
        cin, cout, k = per * groups, rng.choice([per, per * 2, _width(rng) // groups or 1]) * groups, 3
    stride = rng.choice([1, 1, 1, 2])
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=rng.random() < 0.15)]
    if rng.random() < 0.85:
        layers.append(nn.BatchNorm2d(cout))
    act = _act(rng)
    return layers + ([act] if act is not None else []), cin, stride


def sample_kernel(rng: random.Random, max_macs: float) -> tuple[nn.Module, torch.Tensor]:
    """One kernel to time: a random family, then shapes within `max_macs` multiply-accumulates."""
    fam = rng.choices(list(WEIGHTS), weights=list(WEIGHTS.values()))[0]
    res = rng.choice(RESOLUTIONS)
    if fam in ("conv", "pointwise", "grouped", "dwconv"):
        per_pixel = math.inf
        while per_pixel > max_macs:  # even one output pixel over the budget: other channels
            layers, cin, stride = _conv_kernel(fam, rng)
            conv = layers[0]
            per_pixel = conv.out_channels * conv.in_channels // conv.groups * math.prod(conv.kernel_size)
        while res > 1 and per_pixel * (res // stride) ** 2 > max_macs:
            res = res * 2 // 3
        return nn.Sequential(*layers).eval(), torch.randn(1, cin, res, res)
    if fam == "linear":
        cin, cout = _width(rng), rng.choice([_width(rng), 10, 100, 1000])
        act = _act(rng) if rng.random() < 0.4 else None
        layers = [nn.Linear(cin, cout)] + ([act] if act is not None else [])
        return nn.Sequential(*layers).eval(), torch.randn(1, cin)
    channels = _width(rng)
    while res > 1 and channels * res * res > max_macs / 8:
        res = res * 2 // 3
    if fam in ("maxpool", "avgpool"):
        res = max(res, 2)  # a 2x2 window needs a 2x2 map
    x = torch.randn(1, channels, res, res)
    if fam in ("add", "mul", "cat"):
        shape = (1, channels, 1, 1) if fam == "mul" and rng.random() < 0.7 else (1, _width(rng), res, res) \
            if fam == "cat" else x.shape
        act = _act(rng) if fam == "add" and rng.random() < 0.6 else None
        return _WithBuffer(fam, torch.randn(shape), act).eval(), x
    make = {"act": lambda: rng.choice(ACTS)(), "norm": lambda: nn.BatchNorm2d(channels), "other": _Call,
            "maxpool": lambda: rng.choice([nn.MaxPool2d(3, 2, 1), nn.MaxPool2d(2, 2), nn.MaxPool2d(3, 1, 1)]),
            "avgpool": lambda: rng.choice([nn.AvgPool2d(2, 2), nn.AvgPool2d(3, 1, 1)]),
            "adaptivepool": lambda: nn.AdaptiveAvgPool2d(rng.choice([1, 1, 1, 7]))}[fam]
    return nn.Sequential(make()).eval(), x


def kernel_rows(model: nn.Module, x: torch.Tensor, between: float | None = None) -> np.ndarray:
    """The feature rows (no prior) of a traced module's kernels, as the cost model forms them."""
    return _traced_rows(model, x, between)[0]


def _traced_rows(model: nn.Module, x: torch.Tensor, between: float | None):
    graph, flow = trace(model, x)
    return K.features(graph.layers, fusion_groups(graph, flow, K.KERNEL_FUSES), between)[1], graph


def time_kernel(model: nn.Module, x: torch.Tensor, threads: int | None, clock: str,
                round_ms: float) -> tuple[float | None, float]:
    """(seconds, spread): the median of three rounds, timed again when they disagree by more than SPREAD_LIMIT;
    seconds None when they still do (the machine was too noisy for this kernel). Warmed first (`warm`)."""
    warm(model, x, WARM_ROUNDS * round_ms)
    first = measure_latency_ms(model, x, repeats=3, warmup=1, threads=threads, clock=clock)
    repeats = int(min(25, max(5, round_ms / max(first, 1e-3))))
    spread = math.inf
    for _ in range(2):
        rounds = [measure_latency_ms(model, x, repeats=repeats, warmup=1, threads=threads, clock=clock)
                  for _ in range(3)]
        spread = max(rounds) / max(min(rounds), 1e-9)
        if spread <= SPREAD_LIMIT:
            return statistics.median(rounds) / 1e3, spread
    return None, spread


@torch.no_grad()
def warm(model: nn.Module, x: torch.Tensor, budget_ms: float) -> None:
    """Call every copy of a round robin WARM_CALLS times (at least WARM_CALLS calls, at most `budget_ms` of
    them): a kernel's first calls run slower (a torch.ao int8 convolution here: 4 ms, 0.5 ms, 0.12 ms, then
    0.07 ms; each new copy of it 0.56 ms, 0.14 ms), and a model's kernels are timed after its warm-up too."""
    copies = len(model.copies) if isinstance(model, _RoundRobin) else 1
    start = time.perf_counter()
    for call in range(WARM_CALLS * copies):
        if call >= WARM_CALLS and time.perf_counter() - start > budget_ms * 1e-3:
            return
        model(x)


class _Copy(nn.Module):
    """Copies its input into a buffer of its size: memory traffic only, every byte read once and written once."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.register_buffer("out", torch.empty_like(like))

    def forward(self, x):
        return self.out.copy_(x)


def _quickest_ms(model: nn.Module, x: torch.Tensor, threads: int | None, clock: str, repeats: int,
                 rounds: int = 3) -> float:
    """The quickest of a few rounds' medians: other work only ever adds time."""
    return min(measure_latency_ms(model, x, repeats=repeats, warmup=2, threads=threads, clock=clock)
               for _ in range(rounds))


def copy_bandwidth_gbs(kb: float, device: str, threads: int | None, clock: str) -> float:
    """GB/s (bytes read plus written) of copies spanning `kb` KB, source and destination: the slope between a
    copy of a quarter of that and one of all of it, which leaves out the fixed cost of an op. Where noise
    makes the slope unphysical (the larger copy not clearly slower, or the slope more than 10x the large
    copy's own rate), the large copy's own rate: a lower bound, never a clamp."""
    sizes = (max(1, int(kb * 1024 / 32)), max(2, int(kb * 1024 / 8)))  # float32 elements of each source
    whole = slope = 0.0
    for _ in range(3):
        ms = []
        for numel in sizes:
            x = torch.rand(numel, device=device)
            ms.append(_quickest_ms(_Copy(x), x, threads, clock, repeats=10))
        whole = 2 * 4 * sizes[1] / (ms[1] * 1e-3) / 1e9
        if ms[1] > 1.5 * ms[0]:
            slope = 2 * 4 * (sizes[1] - sizes[0]) / ((ms[1] - ms[0]) * 1e-3) / 1e9
            if slope <= 10 * whole:
                return slope
    return whole


def measured_prior(device: str, threads: int | None, clock: str, runtime: str = "torch") -> dict:
    """The roofline prior's numbers, each measured: the time of an op on one element (overhead, us), the
    throughput of a large convolution (GMAC/s per dtype: fp32, and in an int8 runtime its int8 kernel's too) and
    of copies beyond the caches (GB/s); in an int8 runtime also an int8 kernel's call on one element (us)."""
    tiny = torch.randn(1, device=device)
    overhead_ms = _quickest_ms(nn.ReLU().to(device), tiny, threads, clock, repeats=50)
    conv, x = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(device).eval(), torch.randn(1, 128, 28, 28, device=device)
    macs = 128 * 128 * 9 * 28 * 28
    gmacs = {"fp32": macs / (_quickest_ms(conv, x, threads, clock, repeats=10) * 1e-3) / 1e9}
    prior = {"overhead_us": overhead_ms * 1e3, "peak_gmacs": gmacs,
             "bandwidth_gbs": copy_bandwidth_gbs(64 * 1024, device, threads, clock)}
    if runtime in INT8_RUNTIMES:
        body, share = in_runtime(conv, x, runtime, threads, int8=True)
        gmacs["int8"] = macs / (_quickest_ms(body, x, threads, clock, repeats=10) * share * 1e-3) / 1e9
        point = torch.randn(1, 1, 1, 1)  # an int8 kernel on one element: its call cost
        call, share = in_runtime(nn.Conv2d(1, 1, 1).eval(), point, runtime, threads, int8=True)
        prior["int8_overhead_us"] = _quickest_ms(call, point, threads, clock, repeats=50) * share * 1e3
    return prior


class Busy(AutocompressError):
    """The cores were busy: a calibration that may keep a previous profile stopped rather than time noise."""


def reference_kernel(device: str) -> tuple[nn.Module, torch.Tensor]:
    """The fixed kernel whose timing tells a quiet machine from a busy one (a 3x3 conv+ReLU, 1.8 MMAC)."""
    generator = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(32, 32, 3, padding=1)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator) * 0.05)
    return nn.Sequential(conv, nn.ReLU()).to(device).eval(), torch.randn(1, 32, 14, 14, generator=generator).to(device)


class Probe:
    """Times the reference kernel the way the kernels are timed and says how much slower than quiet it ran.

    Its quiet time is the least of the single-thread CPU-clock time (on the CPU: no load inflates it), times
    SERIAL_SLACK for more threads (their fork and join cost a small kernel more than it gains), and the
    quickest timing so far."""

    def __init__(self, device: str, threads: int | None, clock: str):
        self.model, self.x = reference_kernel(device)
        self.threads, self.clock = threads, clock
        slack = 1.0 if threads == 1 else SERIAL_SLACK
        self.quiet = (_quickest_ms(self.model, self.x, 1, "cpu", repeats=10) * slack if device == "cpu" else math.inf)
        self.slowdowns: list[float] = []

    def slowdown(self) -> float:
        ms = statistics.median(measure_latency_ms(self.model, self.x, repeats=10, warmup=2, threads=self.threads,
                                                  clock=self.clock) for _ in range(3))
        self.quiet = min(self.quiet, ms)
        self.slowdowns.append(ms / self.quiet)
        return self.slowdowns[-1]


def load_reason(load: float) -> str:
    """Why a load average means busy cores (more tasks waiting to run than there are cores), or ''. Less load
    still slows a timing down where it takes a core the timing needs: the reference kernel tells."""
    cores = os.cpu_count() or 1
    return f"load average {load:.2f} on {cores} cores before timing" if load > cores + 0.5 else ""


def busy_start(probe: Probe) -> str:
    """Why the cores are busy before timing starts (after START_TRIES looks, PAUSE_S apart), or ''."""
    reason = ""
    for attempt in range(START_TRIES):
        if attempt:
            time.sleep(PAUSE_S)
        slow = probe.slowdown()
        reason = load_reason(os.getloadavg()[0]) or (
            f"the reference kernel ran {slow:.1f}x slower than on a quiet core" if slow > PROBE_LIMIT else "")
        if not reason:
            return ""
    return reason


class _Branches(nn.Module):
    """Copies of one kernel, each on the input, all in one graph: in a runtime that runs a whole graph per call
    (ONNX Runtime, OpenVINO) what _RoundRobin is in eager PyTorch. Each copy's weights are nudged apart, so that no
    runtime merges the copies as one common subexpression (ONNX Runtime does with equal ones)."""

    def __init__(self, kernel: nn.Module, copies: int):
        super().__init__()
        self.copies = nn.ModuleList(copy.deepcopy(kernel) for _ in range(copies))
        with torch.no_grad():
            for i, each in enumerate(self.copies):
                for p in each.parameters():
                    p.add_(1e-3 * i)

    def forward(self, x):
        return tuple(each(x) for each in self.copies)


def in_runtime(model: nn.Module, x: torch.Tensor, runtime: str, threads: int | None,
               int8: bool = False) -> tuple[nn.Module, float] | None:
    """(module whose call runs `model`'s kernel in `runtime`, the share of a call's time that is one copy of the
    kernel), or None when the runtime cannot take it (an op the ONNX exporter cannot write, one ONNX Runtime's
    QDQ flow leaves float: no kernel of that runtime to time). In a graph runtime (ONNX Runtime, OpenVINO) a call
    runs every copy, and converts layouts around them as a model does at its ends only (its profiler's share,
    ort.op_share / ov.op_share): that time is no kernel's. `int8`: the kernel as the runtime's int8 flow converts
    it, its conversions from and to float not counted (they are priced on their own): torch.ao's, timed on a
    quantized input with its output left quantized, or the QDQ graph less its profiler's share of the
    conversions (QuantizeLinear and DequantizeLinear; OpenVINO's FakeQuantize and dequantizing ops)."""
    copies = len(model.copies) if isinstance(model, _RoundRobin) else 1
    kernel = model.copies[0] if isinstance(model, _RoundRobin) else model
    if int8 and runtime == "torch-int8":
        try:
            body = quantized.kernel_body(quantized.convert(kernel, x, [x]), x)
        except Exception:  # torch.ao's FX errors have no common type: a kernel it cannot convert is refused
            return None
        return (_shared_inputs(_RoundRobin(body, copies)).eval() if copies > 1 else body), 1.0
    if runtime not in ENGINES:
        return model, 1.0
    engine, graph = ENGINES[runtime], _Branches(kernel, copies) if isinstance(model, _RoundRobin) else model
    try:
        graph_bytes = qdq_bytes(graph.eval(), x, [x], keep_float=()) if int8 else onnx_bytes(graph.eval(), x)
        if int8 and "QuantizeLinear" not in op_types(graph_bytes):
            return None  # ONNX Runtime's QDQ flow left the op float: it has no int8 kernel there
        ops = engine.layout_ops + (engine.conversion_ops if int8 else ())
        return engine.bound(graph_bytes, x, threads), (1.0 - engine.op_share(graph_bytes, x, ops, threads)) / copies
    except Exception:  # the exporter's and the runtime's errors have no common type
        return None


def _shared_inputs(robin: _RoundRobin) -> _RoundRobin:
    """Copies of an int8 kernel body reading one quantized input, as a model's kernels read the feature map
    its previous kernel left in cache (a copy of its own each would time the input's traffic from memory)."""
    first = robin.copies[0]
    inputs = {name: buffer for name, buffer in first.named_buffers() if name.startswith(quantized.BODY_INPUT)}
    for each in robin.copies[1:]:
        for name, buffer in inputs.items():
            setattr(each, name, buffer)
    return robin


class _Quantize(nn.Module):
    """A float tensor converted to uint8 (torch.ao's per-tensor affine): where an int8 kernel reads a float op."""

    def forward(self, x):
        return torch.quantize_per_tensor(x, 0.05, 64, torch.quint8)


class _Dequantize(nn.Module):
    """A stored uint8 tensor converted back to float: where a float op reads an int8 kernel."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.register_buffer("q", torch.quantize_per_tensor(like, 0.05, 64, torch.quint8))

    def forward(self, x):
        return self.q.dequantize()


def boundary_kernel(rng: random.Random, max_macs: float, runtime: str = "torch-int8",
                    threads: int | None = None) -> tuple[list[float], nn.Module, float, torch.Tensor]:
    """(feature row, module to time, share of its time that is the conversion, input) of one float <-> int8
    conversion of a sampled feature map or vector: torch.ao's, or a graph runtime's (`GraphEngine.conversion`)."""
    channels, res = _width(rng), rng.choice(RESOLUTIONS)
    while res > 1 and channels * res * res > max_macs / 8:
        res = res * 2 // 3
    x = torch.randn(1, channels, res, res) if rng.random() < 0.85 else torch.randn(1, channels)
    kind = rng.choice(("quantize", "dequantize"))
    row = K.boundary_row(kind, x.shape)
    if runtime in ENGINES:
        return row, *ENGINES[runtime].conversion(x, kind, threads), x
    return row, _Quantize() if kind == "quantize" else _Dequantize(x), 1.0, x


def call_overhead_us(runtime: str, threads: int | None, clock: str) -> tuple[float, float]:
    """(a kernel timing's own call cost, a model call's fixed cost), in microseconds: in a graph runtime the
    bound call of a one-element graph, and a session run through its Python API (input and output converted), which
    a model pays once per inference. Eager PyTorch's calls are part of every kernel's time: (0, 0)."""
    if runtime not in ENGINES:
        return 0.0, 0.0
    tiny, engine = torch.randn(1), ENGINES[runtime]
    graph = onnx_bytes(_Call(), tiny)
    bound = _quickest_ms(engine.bound(graph, tiny, threads), tiny, threads, clock, repeats=200)
    run = _quickest_ms(engine.session(graph, threads), tiny, threads, clock, repeats=200)
    return bound * 1e3, run * 1e3


def _blocks(n: int, rng: random.Random, max_macs: float, runtime: str = "torch", threads: int | None = None,
            refused: list | None = None, tick=lambda: None):
    """The kernels of `n` samples in blocks of PROBE_EVERY: (feature row, module to time, share of its time
    that is one kernel, input) each; a sample the grouping splits (not one kernel), or one the runtime cannot
    run (appended to `refused`), is not a kernel to learn from. Made a block at a time (a module to time holds
    up to 64 MB of weight copies). In an int8 runtime, INT8_SHARE of the kernels with an int8 kernel are timed as
    that, and BOUNDARY_SHARE of the samples are float <-> int8 conversions."""
    block = []
    for _ in range(n):
        tick()
        if runtime in INT8_RUNTIMES and rng.random() < BOUNDARY_SHARE:
            row, model, share, x = boundary_kernel(rng, max_macs, runtime, threads)
            block.append((np.array(row), model, share, x))
        else:
            kernel, x = sample_kernel(rng, max_macs)
            model, between = round_robin(kernel, rng)
            row, graph = _traced_rows(kernel, x, between)
            int8 = runtime in INT8_RUNTIMES and quantized.native_op(graph.layers[0]) and rng.random() < INT8_SHARE
            timed = in_runtime(model, x, runtime, threads, int8) if len(row) == 1 else None
            if timed is not None:
                row[0, K.FEATURES.index("int8")] = float(int8)
                block.append((row[0], *timed, x))
            elif len(row) == 1 and refused is not None:
                refused.append(row[0])
        if len(block) == PROBE_EVERY:
            yield block
            block = []
    if block:
        yield block


def _time_block(block, device: str, threads: int | None, clock: str, round_ms: float, own_call_s: float = 0.0):
    """(seconds or None, spread) of every kernel of a block, timed in turn: a call's time less its own call
    cost, times the share of it that is one copy of the kernel."""
    out = []
    for _, model, share, x in block:
        s, spread = time_kernel(model.to(device), x.to(device), threads, clock, round_ms)
        out.append((None if s is None else max(s - own_call_s, 0.05 * s) * share, spread))
    return out


def timed_kernels(n: int, quick: bool, seed: int, device: str, threads: int | None, clock: str,
                  probe: Probe | None = None, stop_when_busy: bool = False, runtime: str = "torch",
                  own_call_s: float = 0.0, progress: bool = False):
    """(feature rows, seconds, timing statistics) of `n` sampled kernels, timed in blocks of PROBE_EVERY with
    the reference kernel timed after each: a block after which it ran slow is timed again, then dropped;
    noisy kernels dropped. `stop_when_busy`: raise Busy as soon as more than BUSY_DROPPED of the blocks
    (after five) were dropped. `progress`: a bar of the samples taken on stderr (a first use in an int8 graph
    runtime exports, quantizes and times each: minutes)."""
    from tqdm.auto import tqdm

    probe = probe or Probe(device, threads, clock)
    if not probe.slowdowns:
        probe.slowdown()
    rng, rows, seconds, spreads = random.Random(seed), [], [], []
    dropped = retimed = blocks_dropped = blocks = 0
    load = [os.getloadavg()[0]]
    refused: list = []
    bar = tqdm(total=n, desc=f"calibrating {runtime} kernels at {threads or 'the default'} thread(s)", unit="kernel",
               disable=not progress, dynamic_ncols=True)
    for block in _blocks(n, rng, MAX_MACS[quick], runtime, threads, refused, bar.update):
        blocks += 1
        for attempt in range(RETRIES + 1):
            if probe.slowdowns[-1] > PROBE_LIMIT:  # slow after the last block: look again after a pause
                time.sleep(PAUSE_S)
                probe.slowdown()
            before_ok, retimed = probe.slowdowns[-1] <= PROBE_LIMIT, retimed + bool(attempt)
            timings = _time_block(block, device, threads, clock, ROUND_MS[quick], own_call_s)
            if probe.slowdown() <= PROBE_LIMIT and before_ok:
                break
        else:
            blocks_dropped += 1
            dropped += len(block)
            if stop_when_busy and blocks >= 5 and blocks_dropped / blocks > BUSY_DROPPED:
                raise Busy(f"{blocks_dropped} of {blocks} blocks of kernels timed while the reference kernel ran up "
                           f"to {max(probe.slowdowns):.1f}x slower than on a quiet core")
            continue
        load.append(os.getloadavg()[0])
        for (row, *_), (s, spread) in zip(block, timings):
            if s is None:
                dropped += 1
                continue
            rows.append(row)
            seconds.append(s)
            spreads.append(spread)
    bar.close()
    stats = {"kernels": len(rows), "dropped": dropped, "runtime_refused": len(refused), "load_before": round(load[0], 2),
             "load_max": round(max(load), 2), "repeat_spread": round(float(np.median(spreads)) - 1, 4) if spreads else None,
             "reference_ms": round(probe.quiet, 5), "reference_slowdown_max": round(max(probe.slowdowns), 3),
             "blocks": blocks, "blocks_retimed": retimed, "blocks_dropped": blocks_dropped}
    return np.array(rows), np.array(seconds), stats


def fit_quality(x: np.ndarray, y: np.ndarray) -> dict:
    """Errors of the regressor on kernels it was not fitted on (5-fold cross-validation): median relative error,
    shares within 10 and 20 %, and R^2 of log latency."""
    from sklearn.model_selection import KFold, cross_val_predict

    predicted = cross_val_predict(K.regressor(), x, y, cv=KFold(5, shuffle=True, random_state=0))
    errors = np.abs(np.exp(predicted - y) - 1)
    log_s = y + x[:, -1]  # log seconds: the log ratio to the prior plus the log prior
    r2 = 1 - float(np.sum((predicted - y) ** 2)) / max(float(np.sum((log_s - log_s.mean()) ** 2)), 1e-12)
    return {"fit_median_error": round(float(np.median(errors)), 4),
            "fit_within_10pct": round(float(np.mean(errors <= 0.1)), 4),
            "fit_within_20pct": round(float(np.mean(errors <= 0.2)), 4),
            "fit_r2": round(r2, 4)}


def calibrate(name: str = "host", quick: bool = False, device: str = "cpu", seed: int = 0,
              threads: int | None = None, clock: str | None = None, stop_when_busy: bool = False,
              runtime: str = "torch", progress: bool = False) -> HardwareProfile:
    """Time sampled kernels in `runtime` (cost/runtimes.py) on `device` with `threads` threads (default: torch's
    count); return the fitted profile (no file written). The roofline prior is eager PyTorch's in every runtime:
    it is a feature the regressor corrects, not the answer.

    clock: "cpu" (the default with one thread on the CPU: the timing thread's CPU time, which other work on a
    shared machine does not inflate) or "wall" (elapsed time; the default otherwise), see measure_latency_ms.
    Busy cores before timing starts: with `stop_when_busy` raise Busy; otherwise, for more than one thread on
    the CPU, time one thread on its CPU clock instead (recorded as `timed_threads` and `busy`). `progress`: a bar
    of the kernels sampled, on stderr."""
    if device not in ("cpu", "cuda"):
        raise AutocompressError(f"calibration device {device!r} is not allowed; allowed: cpu, cuda")
    check_runtime(runtime)
    if device == "cuda" and runtime != "torch":
        raise AutocompressError(f"calibrating runtime {runtime!r} runs on the CPU; use --device cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise AutocompressError("calibrating on device 'cuda' needs a CUDA GPU, and torch sees none here")
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise AutocompressError(f"threads = {threads!r} is not allowed; it must be an integer >= 1")
    threads = threads or default_threads()
    clock = clock or ("cpu" if device == "cpu" and threads == 1 else "wall")
    start = time.perf_counter()
    timing_threads = threads if device == "cpu" else None
    with fixed_threads(timing_threads):
        _settle(device)
        probe = Probe(device, timing_threads, clock)
        busy = busy_start(probe)
        if busy and stop_when_busy:
            raise Busy(busy)
        if busy and device == "cpu" and (timing_threads != 1 or clock != "cpu"):
            timing_threads, clock = 1, "cpu"
            probe = Probe(device, timing_threads, clock)
            probe.slowdown()
    with fixed_threads(timing_threads), quantized.engine():  # int8 kernels are timed on torch.ao's x86 engine
        prior = measured_prior(device, timing_threads, clock, runtime)
        own_call_us, call_us = call_overhead_us(runtime, timing_threads, clock)
        rows, seconds, stats = timed_kernels(SAMPLES[quick], quick, seed, device, timing_threads, clock, probe,
                                             stop_when_busy, runtime, own_call_us * 1e-6, progress)
    if len(rows) < 50:
        raise AutocompressError(f"calibration kept {len(rows)} of {SAMPLES[quick]} kernels (the others timed too "
                                "unevenly); the machine is too busy to calibrate")
    peak = prior["peak_gmacs"]
    x = K.with_prior(rows, K.prior_s(rows, prior["overhead_us"], peak["fp32"], prior["bandwidth_gbs"], peak.get("int8"),
                                     prior.get("int8_overhead_us")))
    y = np.log(seconds) - x[:, -1]
    calibration = {"model_version": MODEL_VERSION, "runtime": runtime, "threads": threads, "clock": clock, "seed": seed,
                   **({"timed_threads": timing_threads, "busy": busy} if busy else {}), **stats,
                   **fit_quality(x, y), "seconds": round(time.perf_counter() - start, 1)}
    return fitted_profile(name, device, threads, prior, calibration, K.encode(x, y), runtime, call_us)


def fitted_profile(name: str, device: str, threads: int, prior: dict, calibration: dict,
                   kernels: str, runtime: str = "torch", call_us: float = 0.0) -> HardwareProfile:
    """The profile holding the measured prior and the timed kernels (energy: Horowitz's 45 nm figures, see SOURCES)."""
    where = (f"{platform.node() or 'this machine'} ({_device_name(device)}, {os.cpu_count()} cores, "
             f"{threads if device == 'cpu' else 'no'} {'torch' if runtime == 'torch' else runtime} threads)")
    return HardwareProfile(
        name=name,
        description=f"calibrated on {where} on {datetime.date.today().isoformat()}",
        peak_gmacs={d: _sig(g) for d, g in prior["peak_gmacs"].items()},
        efficiency={"conv": 1.0},
        bandwidth_gbs=_sig(prior["bandwidth_gbs"]),
        overhead_us={k: _sig(prior["overhead_us"]) for k in KINDS},
        energy={**HOROWITZ_ENERGY, "static_w": 10.0},
        fuses=K.KERNEL_FUSES,
        threads=threads if device == "cpu" else None,
        device=device,
        calibration=calibration,
        kernels=kernels,
        runtime=runtime,
        call_us=_sig(call_us),
        int8_overhead_us=_sig(prior.get("int8_overhead_us", 0.0)),
    )


def busy_reason(profile: HardwareProfile) -> str:
    """Why a calibration's timings are not to be trusted (other work on the cores, uneven timings, a fit no
    model of the kernels explains), or ''."""
    cal = profile.calibration
    dropped = cal.get("dropped", 0) / max(1, cal.get("dropped", 0) + cal.get("kernels", 0))
    if cal.get("busy"):
        return cal["busy"]
    reason = load_reason(cal.get("load_before", 0))
    if reason:
        return reason
    if dropped > BUSY_DROPPED:
        return (f"{dropped:.0%} of the kernels timed unevenly (load average up to {cal.get('load_max', 0):.2f}, the "
                f"reference kernel up to {cal.get('reference_slowdown_max', 1):.1f}x slower than quiet)")
    if cal.get("fit_median_error", 0) > POOR_FIT:
        return f"the fit's median error on held-out kernels is {cal['fit_median_error']:.0%}"
    return ""


def quality_line(profile: HardwareProfile) -> str:
    """One line on how the profile was fitted: kernels, load, repeatability, error on held-out kernels."""
    c = profile.calibration
    timed = (f"at {c['threads']} threads" if c.get("timed_threads", c["threads"]) == c["threads"] else
             f"on {c['timed_threads']} thread ({c['clock']} clock) for {c['threads']} threads")
    return (f"{c['kernels']} {profile.runtime} kernels timed {timed} ({c['dropped']} dropped as uneven, "
            f"{c.get('blocks_retimed', 0)} blocks timed again, load average {c['load_before']:.2f}-"
            f"{c['load_max']:.2f}, reference kernel up to {c.get('reference_slowdown_max', 1):.2f}x its quiet time, "
            f"rounds within {c['repeat_spread']:.1%}); held-out kernels: median error {c['fit_median_error']:.1%}, "
            f"{c['fit_within_10pct']:.0%} within 10 %, {c['fit_within_20pct']:.0%} within 20 %, "
            f"R^2 {c.get('fit_r2', float('nan')):.3f} ({c['seconds']:.0f} s)")


def _sig(value: float) -> float:
    """Five significant digits: readable YAML, and well within what the timings can tell apart."""
    return float(f"{value:.5g}")


def _device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    return platform.processor() or platform.machine()


def _settle(device: str, seconds: float = 0.5) -> None:
    """Busy work, then a pause: clocks ramp up, other libraries' spinning thread pools go idle."""
    a = torch.randn(256, 256, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
    if device == "cuda":
        torch.cuda.synchronize()
    time.sleep(0.3)


SOURCES = """\
# Written by `autocompress calibrate`: latency comes from the timed kernels below (kernels:, see
# autocompress/cost/kernels.py) over a prior whose numbers were measured on this machine (peak_gmacs: a
# large convolution; bandwidth_gbs: large copies; overhead_us: an op on one element), except energy, which
# a program cannot measure from user space: mac_pj, dram_pj_per_byte and sram_pj_per_byte are the 45 nm
# figures of M. Horowitz, "Computing's energy problem", ISSCC 2014 (fp32 mult 3.7 + add 0.9 pJ; int8
# 0.2 + 0.03 pJ; fp16 1.1 + 0.4 pJ; below 8 bits extrapolated with multiplier energy ~ bits^2; DRAM
# 1.3-2.6 nJ per 64-bit access; 8 KB SRAM 10 pJ per 64-bit access), and static_w is an estimate: replace
# it with a power-meter reading of this machine at idle.
"""


def write_profile(profile: HardwareProfile, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(SOURCES + yaml.safe_dump(profile.to_dict(), sort_keys=False, width=120))
    os.replace(tmp, path)
    return path


def calibrate_host(path: Path, quick: bool = False, threads: int | None = None, force: bool = False,
                   device: str = "cpu", clock: str | None = None,
                   runtime: str = "torch") -> tuple[HardwareProfile | None, str]:
    """Calibrate this machine and save it where `--hardware host` looks; (profile, why it was not saved or '').

    On a busy machine the previous profile at `path` is kept unless `force` (or there is none): the
    calibration then stops as soon as it sees the cores busy, and the profile returned is None."""
    name = "host-cuda" if device == "cuda" else "host"
    keep = Path(path).exists() and not force
    try:
        profile = calibrate(name, quick=quick, threads=threads, device=device, clock=clock, stop_when_busy=keep,
                            runtime=runtime, progress=True)
    except Busy as exc:
        return None, str(exc)
    reason = busy_reason(profile)
    if reason and keep:
        return profile, reason
    write_profile(profile, path)
    return profile, ""
