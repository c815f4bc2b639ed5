"""Calibrate a hardware profile by timing kernels on this machine (its CPU, or its CUDA GPU), at one thread count.

Kernels (cost/kernels.py: conv+bn+act, pointwise, grouped and depthwise convs, linears, adds, pools,
concatenations, ...) are sampled over the shapes that pruning and students produce (channel counts that
are not multiples of 8, feature maps down to 1x1, strides, kernel sizes), each built as a small module,
traced to its feature row the way the cost model traces a model, and timed alone with the profile's torch
threads. The roofline prior is measured (an empty op, a large convolution, large copies) and a
gradient-boosted regressor (scikit-learn) is fitted on log(latency / prior): nothing is fitted against a
bound. None of the kernels is a model that scripts/bench_cost_model.py scores.

Timing notices noise: the load average is read before and during the timing; every kernel is timed in
three rounds and timed again when they disagree by more than SPREAD_LIMIT, and dropped when they still do.
The profile records the load, the share of kernels dropped, how repeatable the rest were and the fit's
quality on held-out kernels (5-fold cross-validation), and `busy_reason` says when that is not a profile to
trust: `calibrate_host` then keeps the previous profile unless forced.
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
from .fusion import fusion_groups
from .measure import measure_latency_ms
from .profiles import KINDS, HardwareProfile, default_threads
from .trace import trace

MODEL_VERSION = 6  # bump when the latency model changes: cached host profiles are then re-fitted
SAMPLES = {True: 500, False: 2000}      # kernels timed by a quick (first use) and a full calibration
MAX_MACS = {True: 30e6, False: 120e6}   # the largest kernel sampled: beyond it, the prior's slope carries
ROUND_MS = {True: 3.0, False: 10.0}     # timing per round of a kernel
SPREAD_LIMIT = 1.25                     # rounds further apart than this (max / min) are timed again, then dropped
BUSY_DROPPED = 0.2                      # more kernels dropped than this: the machine was busy
HOROWITZ_ENERGY = {"mac_pj": {32: 4.6, 16: 1.5, 8: 0.23, 4: 0.065, 2: 0.02, 1: 0.01}, "dram_pj_per_byte": 80.0,
                   "sram_pj_per_byte": 1.25}
WIDTHS = (3, 8, 16, 24, 32, 40, 48, 64, 72, 96, 120, 128, 160, 192, 240, 256, 320, 384, 480, 512, 576, 672, 768, 960,
          1024, 1280, 2048)
RESOLUTIONS = (1, 2, 3, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 112)
ACTS = (nn.ReLU, nn.ReLU, nn.ReLU6, nn.Hardswish, nn.SiLU, nn.Sigmoid, nn.Hardsigmoid, nn.GELU)
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
    graph, flow = trace(model, x)
    return K.features(graph.layers, fusion_groups(graph, flow, K.KERNEL_FUSES), between)[1]


def time_kernel(model: nn.Module, x: torch.Tensor, threads: int | None, clock: str,
                round_ms: float) -> tuple[float | None, float]:
    """(seconds, spread): the median of three rounds, timed again when they disagree by more than SPREAD_LIMIT;
    seconds None when they still do (the machine was too noisy for this kernel)."""
    first = measure_latency_ms(model, x, repeats=3, warmup=2, threads=threads, clock=clock)
    repeats = int(min(25, max(5, round_ms / max(first, 1e-3))))
    spread = math.inf
    for _ in range(2):
        rounds = [measure_latency_ms(model, x, repeats=repeats, warmup=1, threads=threads, clock=clock)
                  for _ in range(3)]
        spread = max(rounds) / max(min(rounds), 1e-9)
        if spread <= SPREAD_LIMIT:
            return statistics.median(rounds) / 1e3, spread
    return None, spread


class _Copy(nn.Module):
    """Copies its input into a buffer of its size: memory traffic only, every byte read once and written once."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.register_buffer("out", torch.empty_like(like))

    def forward(self, x):
        return self.out.copy_(x)


def copy_bandwidth_gbs(kb: float, device: str, threads: int | None, clock: str) -> float:
    """GB/s (bytes read plus written) of copies spanning `kb` KB, source and destination: the slope between a
    copy of a quarter of that and one of all of it, which leaves out the fixed cost of an op."""
    sizes = (max(1, int(kb * 1024 / 32)), max(2, int(kb * 1024 / 8)))  # float32 elements of each source
    ms = []
    for numel in sizes:
        x = torch.rand(numel, device=device)
        ms.append(measure_latency_ms(_Copy(x), x, repeats=20, threads=threads, clock=clock))
    return 2 * 4 * (sizes[1] - sizes[0]) / max(ms[1] - ms[0], 1e-6) / 1e6


def measured_prior(device: str, threads: int | None, clock: str) -> dict:
    """The roofline prior's numbers, each measured: the time of an op on one element (overhead, us), the
    throughput of a large convolution (GMAC/s) and of copies beyond the caches (GB/s)."""
    tiny = torch.randn(1, device=device)
    overhead_ms = measure_latency_ms(nn.ReLU().to(device), tiny, repeats=50, threads=threads, clock=clock)
    conv, x = nn.Conv2d(128, 128, 3, padding=1, bias=False).to(device).eval(), torch.randn(1, 128, 28, 28, device=device)
    conv_ms = measure_latency_ms(conv, x, repeats=10, threads=threads, clock=clock)
    macs = 128 * 128 * 9 * 28 * 28
    return {"overhead_us": overhead_ms * 1e3, "peak_gmacs": macs / (conv_ms * 1e-3) / 1e9,
            "bandwidth_gbs": copy_bandwidth_gbs(64 * 1024, device, threads, clock)}


def timed_kernels(n: int, quick: bool, seed: int, device: str, threads: int | None, clock: str):
    """(feature rows, seconds, timing statistics) of `n` sampled kernels; noisy ones dropped."""
    rng, rows, seconds, spreads, dropped = random.Random(seed), [], [], [], 0
    load = [os.getloadavg()[0]]
    for i in range(n):
        kernel, x = sample_kernel(rng, MAX_MACS[quick])
        model, between = round_robin(kernel, rng)
        row = kernel_rows(kernel, x, between)
        if len(row) != 1:  # a sample the grouping splits (not one kernel): not a kernel to learn from
            continue
        s, spread = time_kernel(model.to(device), x.to(device), threads, clock, ROUND_MS[quick])
        if s is None:
            dropped += 1
            continue
        rows.append(row[0])
        seconds.append(s)
        spreads.append(spread)
        if i % 50 == 49:
            load.append(os.getloadavg()[0])
    stats = {"kernels": len(rows), "dropped": dropped, "load_before": round(load[0], 2),
             "load_max": round(max(load), 2), "repeat_spread": round(float(np.median(spreads)) - 1, 4) if spreads else None}
    return np.array(rows), np.array(seconds), stats


def fit_quality(x: np.ndarray, y: np.ndarray) -> dict:
    """Errors of the regressor on kernels it was not fitted on (5-fold cross-validation)."""
    from sklearn.model_selection import KFold, cross_val_predict

    predicted = cross_val_predict(K.regressor(), x, y, cv=KFold(5, shuffle=True, random_state=0))
    errors = np.abs(np.exp(predicted - y) - 1)
    return {"fit_median_error": round(float(np.median(errors)), 4),
            "fit_within_10pct": round(float(np.mean(errors <= 0.1)), 4),
            "fit_within_20pct": round(float(np.mean(errors <= 0.2)), 4)}


def calibrate(name: str = "host", quick: bool = False, device: str = "cpu", seed: int = 0,
              threads: int | None = None, clock: str | None = None) -> HardwareProfile:
    """Time sampled kernels on `device` with `threads` torch threads (default: torch's count); return the fitted
    profile (no file written).

    clock: "cpu" (the default with one thread on the CPU: the timing thread's CPU time, which other work on a
    shared machine does not inflate) or "wall" (elapsed time; the default otherwise), see measure_latency_ms."""
    if device not in ("cpu", "cuda"):
        raise AutocompressError(f"calibration device {device!r} is not allowed; allowed: cpu, cuda")
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
        prior = measured_prior(device, timing_threads, clock)
        rows, seconds, stats = timed_kernels(SAMPLES[quick], quick, seed, device, timing_threads, clock)
    if len(rows) < 50:
        raise AutocompressError(f"calibration kept {len(rows)} of {SAMPLES[quick]} kernels (the others timed too "
                                "unevenly); the machine is too busy to calibrate")
    x = K.with_prior(rows, K.prior_s(rows, prior["overhead_us"], prior["peak_gmacs"], prior["bandwidth_gbs"]))
    y = np.log(seconds) - x[:, -1]
    calibration = {"model_version": MODEL_VERSION, "threads": threads, "clock": clock, "seed": seed, **stats,
                   **fit_quality(x, y), "seconds": round(time.perf_counter() - start, 1)}
    return fitted_profile(name, device, threads, prior, calibration, K.encode(x, y))


def fitted_profile(name: str, device: str, threads: int, prior: dict, calibration: dict,
                   kernels: str) -> HardwareProfile:
    """The profile holding the measured prior and the timed kernels (energy: Horowitz's 45 nm figures, see SOURCES)."""
    where = (f"{platform.node() or 'this machine'} ({_device_name(device)}, {os.cpu_count()} cores, "
             f"{threads if device == 'cpu' else 'no'} torch threads)")
    return HardwareProfile(
        name=name,
        description=f"calibrated on {where} on {datetime.date.today().isoformat()}",
        peak_gmacs={"fp32": _sig(prior["peak_gmacs"])},
        efficiency={"conv": 1.0},
        bandwidth_gbs=_sig(prior["bandwidth_gbs"]),
        overhead_us={k: _sig(prior["overhead_us"]) for k in KINDS},
        energy={**HOROWITZ_ENERGY, "static_w": 10.0},
        fuses=K.KERNEL_FUSES,
        threads=threads if device == "cpu" else None,
        device=device,
        calibration=calibration,
        kernels=kernels,
    )


def busy_reason(profile: HardwareProfile) -> str:
    """Why a calibration's timings are not to be trusted (other work on the cores, uneven timings), or ''."""
    cal, cores = profile.calibration, os.cpu_count() or 1
    free = cores - (profile.threads or 1) + 0.5  # load the calibration's own threads leave room for
    dropped = cal.get("dropped", 0) / max(1, cal.get("dropped", 0) + cal.get("kernels", 0))
    if cal.get("load_before", 0) > free:
        return f"load average {cal['load_before']:.2f} on {cores} cores before timing"
    if dropped > BUSY_DROPPED:
        return f"{dropped:.0%} of the kernels timed unevenly (load average up to {cal.get('load_max', 0):.2f})"
    return ""


def quality_line(profile: HardwareProfile) -> str:
    """One line on how the profile was fitted: kernels, load, repeatability, error on held-out kernels."""
    c = profile.calibration
    return (f"{c['kernels']} kernels timed at {c['threads']} threads ({c['dropped']} dropped as uneven, load average "
            f"{c['load_before']:.2f}-{c['load_max']:.2f}, rounds within {c['repeat_spread']:.1%}); held-out kernels: "
            f"median error {c['fit_median_error']:.1%}, {c['fit_within_10pct']:.0%} within 10 %, "
            f"{c['fit_within_20pct']:.0%} within 20 % ({c['seconds']:.0f} s)")


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
                   device: str = "cpu", clock: str | None = None) -> tuple[HardwareProfile, str]:
    """Calibrate this machine and save it where `--hardware host` looks; (profile, why it was not saved or '').

    On a busy machine the previous profile at `path` is kept unless `force` (or there is none)."""
    profile = calibrate("host-cuda" if device == "cuda" else "host", quick=quick, threads=threads, device=device,
                        clock=clock)
    reason = busy_reason(profile)
    if reason and Path(path).exists() and not force:
        return profile, reason
    write_profile(profile, path)
    return profile, ""
