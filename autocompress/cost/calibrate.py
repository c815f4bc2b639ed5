"""Calibrate a hardware profile by timing real networks on this machine (its CPU, or its CUDA GPU).

Torchvision architectures not scored by the benchmark (ZOO) and small networks of varied shapes and block types (plain, residual and bottleneck convs, inverted
residuals with squeeze-excitation, inception and fire branches joined by concatenation, MLPs, chains
of one op, wide convs on few pixels whose weights overflow the caches) are built at random, timed (median of repeats) and traced into the same per-op table the
cost model prices (model.op_table). The roofline's free numbers are then fitted so that the summed
per-op latencies match the measured networks (least squares on log latency): per-kind overheads and
large-GEMM throughputs, the GEMM sizes at which kernels reach half their efficiency (`gemm_half`), the
efficiency left to convolutions on too few output positions to fill a vector (`narrow_efficiency`),
and, by trying each, the roofline's form (`overlap`, `im2col`, `channel_multiple`, `narrow_n`).
Timing whole networks, not isolated ops, captures how ops behave in context: caches, the framework's
per-op cost. None of the networks is a model the benchmark scores (scripts/bench_cost_model.py).
The memory is measured, not fitted (copies, see memory_bandwidths): the on-chip memory's size is the
hardware's, on a CPU the largest private cache of one core (L2; with one torch thread, the L3 is shared
with other cores and, on a VM, other tenants), and both bandwidths are those of copies.
"""
from __future__ import annotations

import datetime
import itertools
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml
from scipy.sparse import csr_matrix
from torch import nn

from ..errors import AutocompressError
from ..graph import analyze
from .flow import dataflow
from .measure import DEFAULT_THREADS, measure_latency_ms
from .model import GEMM_KINDS, memory_s, narrow_factor, on_chip, op_table, roofline_s, shape_efficiency
from .profiles import KINDS, SHAPE_KEYS, HardwareProfile

MODEL_VERSION = 5  # bump when the latency formula changes: cached host profiles are then re-fitted
COMPUTE_KINDS = ("conv", "dwconv", "linear", "matmul", "pool")  # kinds with a fitted throughput (pool: reads/s)
FORMS = {"overlap": (1.0, 0.5, 0.0), "im2col": (False, True), "channel_multiple": (1, 16), "narrow_n": (8, 16, 32)}
HOROWITZ_ENERGY = {"mac_pj": {32: 4.6, 16: 1.5, 8: 0.23, 4: 0.065, 2: 0.02, 1: 0.01}, "dram_pj_per_byte": 80.0,
                   "sram_pj_per_byte": 1.25}
ACTS = (nn.ReLU, nn.ReLU6, nn.SiLU, nn.Hardswish)


class _Residual(nn.Module):
    def __init__(self, body: nn.Module, shortcut: nn.Module | None = None):
        super().__init__()
        self.body, self.shortcut = body, shortcut or nn.Identity()

    def forward(self, x):
        return self.shortcut(x) + self.body(x)


class _Concat(nn.Module):
    def __init__(self, *branches: nn.Module):
        super().__init__()
        self.branches = nn.ModuleList(branches)

    def forward(self, x):
        return torch.cat([b(x) for b in self.branches], 1)


class _SqueezeExcite(nn.Module):
    def __init__(self, channels: int, act):
        super().__init__()
        hidden = max(8, channels // 4)
        self.gate = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Conv2d(channels, hidden, 1), act(),
                                  nn.Conv2d(hidden, channels, 1), nn.Hardsigmoid())

    def forward(self, x):
        return x * self.gate(x)


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act=nn.ReLU):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [act(inplace=True) if act in (nn.ReLU, nn.ReLU6) else act()] if act else layers


def _block(kind: str, width: int, rng: random.Random, act) -> tuple[list, int]:
    """One block of `kind` on `width` channels: (layers, output width)."""
    stride = 2 if rng.random() < 0.25 else 1
    if kind == "plain":
        out = rng.choice([width, width + 8 * rng.randint(1, 4)])
        return _conv_bn(width, out, rng.choice([1, 3, 3, 5]), stride, act=act), out
    if kind == "residual":
        out = width if stride == 1 else width * 2
        short = None if stride == 1 else nn.Sequential(*_conv_bn(width, out, 1, stride, act=None))
        body = nn.Sequential(*_conv_bn(width, out, 3, stride, act=act), *_conv_bn(out, out, 3, act=None))
        return [_Residual(body, short), act()], out
    if kind == "bottleneck":  # ResNet's, or ResNeXt/RegNet's with a grouped 3x3 conv
        mid = max(8, width // rng.choice([1, 2, 4]) // 8 * 8)
        groups = mid // rng.choice([8, 16, mid]) if mid % 16 == 0 else 1
        body = nn.Sequential(*_conv_bn(width, mid, 1, act=act), *_conv_bn(mid, mid, 3, groups=groups, act=act),
                             *_conv_bn(mid, width, 1, act=None))
        return [_Residual(body), act()], width
    if kind == "inverted":
        hidden = width * rng.choice([2, 4, 6])
        parts = [*_conv_bn(width, hidden, 1, act=act), *_conv_bn(hidden, hidden, rng.choice([3, 5]), stride, hidden, act)]
        if rng.random() < 0.4:
            parts.append(_SqueezeExcite(hidden, act))
        body = nn.Sequential(*parts, *_conv_bn(hidden, width, 1, act=None))
        return [_Residual(body) if stride == 1 else body], width
    if kind == "inception":
        a, b, c = (8 * rng.randint(1, max(1, width // 16)) for _ in range(3))
        branches = [nn.Sequential(*_conv_bn(width, a, 1, act=act)),
                    nn.Sequential(*_conv_bn(width, b // 2 or 8, 1, act=act), *_conv_bn(b // 2 or 8, b, 3, act=act)),
                    nn.Sequential(nn.MaxPool2d(3, 1, 1), *_conv_bn(width, c, 1, act=act))]
        return [_Concat(*branches)], a + b + c
    squeeze = max(8, width // 4)  # fire
    return [*_conv_bn(width, squeeze, 1, act=act),
            _Concat(nn.Sequential(*_conv_bn(squeeze, width // 2, 1, act=act)),
                    nn.Sequential(*_conv_bn(squeeze, width // 2, 3, act=act)))], 2 * (width // 2)


def random_network(rng: random.Random) -> tuple[nn.Module, torch.Tensor]:
    """One calibration network: a random mix of block types, widths and resolutions."""
    kind = rng.choice(["plain", "residual", "bottleneck", "inverted", "inception", "fire", "mlp", "single", "wide"])
    if kind == "mlp":
        dims = [rng.choice([64, 128, 256, 512, 1024, 2048]) for _ in range(rng.randint(2, 4))]
        layers = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        tokens = rng.choice([1, 1, 49, 197])
        return nn.Sequential(*layers).eval(), torch.randn(1, tokens, dims[0]) if tokens > 1 else torch.randn(1, dims[0])
    if kind == "wide":  # the tail of a CNN on a small input: many channels, few pixels, weights beyond the caches
        width, res = rng.choice([256, 384, 512, 768, 1024]), rng.choice([2, 3, 4, 7])
        layers = [m for _ in range(rng.randint(2, 5)) for m in _conv_bn(width, width, rng.choice([1, 3]))]
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 1000)]
        return nn.Sequential(*layers).eval(), torch.randn(1, width, res, res)
    res = rng.choice([8, 14, 16, 28, 32, 48, 56, 64])
    width = rng.choice([8, 16, 24, 32, 40, 48, 64, 96, 128, 192, 256])
    width = min(width, max(8, 8 * (2 ** 13 // res ** 2)))  # about 50 MMACs per 3x3 conv at most: quick to time
    if rng.random() < 0.5:  # a pruned model's widths are any number, not multiples of 8
        width = max(4, width - rng.randint(1, 7))
    if kind == "single":  # chains of one op type: separates per-kind overheads that always co-occur elsewhere
        op = rng.choice(["conv", "dwconv", "norm", "act", "add", "pool"])
        x = torch.randn(1, width, res, res)
        n = rng.randint(1, 6)
        if op == "add":
            return _Residual(nn.Sequential(*[nn.Identity() for _ in range(n)])).eval(), x
        make = {"conv": lambda: nn.Conv2d(width, width, rng.choice([1, 3]), padding="same", bias=False),
                "dwconv": lambda: nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                "norm": lambda: nn.BatchNorm2d(width), "act": lambda: rng.choice(ACTS)(),
                "pool": lambda: nn.MaxPool2d(3, 1, 1)}[op]
        return nn.Sequential(*[make() for _ in range(n)]).eval(), x
    act = rng.choice(ACTS)
    cin = rng.choice([1, 3, width])
    layers = _conv_bn(cin, width, rng.choice([1, 3, 5, 7]), rng.choice([1, 1, 2]), act=act)
    for _ in range(rng.randint(1, 4)):
        block, width = _block(kind, width, rng, act)
        layers += block
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, rng.choice([10, 100, 1000]))]
    return nn.Sequential(*layers).eval(), torch.randn(1, cin, res, res)


# Real architectures too: random blocks alone miss how whole models use the caches (weights of deep stages that
# stream from memory, pooling between stages). None of these is a model scripts/bench_cost_model.py scores, and
# the resolutions differ from its 64 and 96 pixels.
ZOO = ("resnet34", "resnet50", "mobilenet_v3_large", "shufflenet_v2_x0_5", "squeezenet1_0", "mnasnet1_0",
       "regnet_y_400mf", "vgg11_bn", "densenet121", "efficientnet_b1")
ZOO_RESOLUTIONS = (48, 80, 112)


def zoo_networks(models=ZOO, per_model: int = 2):
    """(model, input) of torchvision architectures (random weights), each at `per_model` of ZOO_RESOLUTIONS."""
    import torchvision

    for i, name in enumerate(models):
        model = torchvision.models.get_model(name, weights=None).eval()
        for j in range(per_model):
            res = ZOO_RESOLUTIONS[(i + j) % len(ZOO_RESOLUTIONS)]
            yield model, torch.randn(1, 3, res, res)


def measure_networks(n: int, repeats: int, seed: int = 0, device: str = "cpu", threads: int | None = None,
                     clock: str = "wall", zoo=()):
    """Yield (model, input, measured ms) for `n` random networks, then those of the torchvision models `zoo`,
    timed on `device`."""
    rng = random.Random(seed)
    networks = itertools.chain((random_network(rng) for _ in range(n)), zoo_networks(zoo, 1 if len(zoo) < 5 else 2))
    for model, x in networks:
        model, x = model.to(device), x.to(device)
        ms = measure_latency_ms(model, x, repeats=repeats, threads=threads, clock=clock)
        yield model.cpu(), x.cpu(), ms


class _Copy(nn.Module):
    """Copies its input into a buffer of its size: memory traffic only, every byte read once and written once."""

    def __init__(self, like: torch.Tensor):
        super().__init__()
        self.register_buffer("out", torch.empty_like(like))

    def forward(self, x):
        return self.out.copy_(x)


MAIN_MEMORY_PROBE_KB = 512 * 1024  # a copy this large (source and destination) runs from main memory on any device


def copy_bandwidth_gbs(kb: float, device: str, threads: int | None, clock: str) -> float:
    """GB/s (bytes read plus written) of copies spanning `kb` KB, source and destination: the slope between a
    copy of a quarter of that and one of all of it, which leaves out the fixed cost of an op."""
    sizes = (max(1, int(kb * 1024 / 32)), max(2, int(kb * 1024 / 8)))  # float32 elements of each source
    ms = []
    for numel in sizes:
        x = torch.rand(numel, device=device)
        ms.append(measure_latency_ms(_Copy(x), x, repeats=20, threads=threads, clock=clock))
    return 2 * 4 * (sizes[1] - sizes[0]) / max(ms[1] - ms[0], 1e-6) / 1e6


def memory_bandwidths(device: str, cache_kb: float, threads: int | None, clock: str) -> tuple[float, float]:
    """(main memory, on-chip memory) bandwidths in GB/s: copies beyond every cache, and filling half of the
    on-chip memory (0 without one)."""
    main = copy_bandwidth_gbs(MAIN_MEMORY_PROBE_KB, device, threads, clock)
    return main, copy_bandwidth_gbs(cache_kb / 2, device, threads, clock) if cache_kb else 0.0


def traced(networks) -> list:
    """(graph, flow) of every measured network: traced once, priced under every roofline form."""
    out = []
    for model, x, _ in networks:
        graph = analyze(model, x, groups=False)
        out.append((graph, dataflow(model, graph)))
    return out


def _template(channel_multiple: int) -> HardwareProfile:
    """A profile whose op table has the device-independent quantities the fit needs (fp32, nothing fused)."""
    return HardwareProfile("fit", {"fp32": 1.0}, {}, 1.0, 0.0, {}, channel_multiple=channel_multiple)


def design(traces, channel_multiple: int, cache_kb: float, bandwidths: tuple[float, float]) -> dict:
    """Every op of every network as flat arrays: its network, kind, work, GEMM sizes and memory seconds (with and
    without im2col's unfolded input) at the measured `bandwidths` (main memory, on-chip memory; GB/s), feature maps
    in the on-chip memory where they fit, weights where all of a network's fit."""
    parts = []
    for i, (graph, flow) in enumerate(traces):
        table = op_table(graph, flow, _template(channel_multiple))
        table = table[table["kind"] != "param"]
        act, weights = (table["in_bytes"] + table["out_bytes"]).to_numpy(float), table["w_bytes"].to_numpy(float)
        memory = {}
        for im2col in (False, True):
            traffic = act + table["unfold_bytes"].to_numpy(float) * im2col
            memory[im2col] = memory_s(traffic, weights, *on_chip(traffic, weights, cache_kb), *bandwidths)
        parts.append(table.assign(net=i, memory=memory[False], unfolded_memory=memory[True]))
    ops = pd.concat(parts, ignore_index=True)
    return {"net": ops["net"].to_numpy(), "kind": np.array([KINDS.index(k) for k in ops["kind"]]),
            "work": ops["work"].to_numpy(float),
            "memory_s": {False: ops["memory"].to_numpy(float), True: ops["unfolded_memory"].to_numpy(float)},
            "m": ops["m"].to_numpy(float), "n": ops["n"].to_numpy(float), "k": ops["k"].to_numpy(float),
            "gemm": ops["kind"].isin(GEMM_KINDS).to_numpy(), "conv": (ops["kind"] == "conv").to_numpy(),
            "networks": len(traces),
            "sum": csr_matrix((np.ones(len(ops)), (ops["net"].to_numpy(), np.arange(len(ops)))))}  # ops -> networks


N_KINDS, N_COMPUTE = len(KINDS), len(COMPUTE_KINDS)
HALF = N_KINDS + N_COMPUTE
NARROW = HALF + len(SHAPE_KEYS)


def _unpack(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, dict, float]:
    """theta (logs): overhead per kind (us), GMAC/s per compute kind, gemm_half per GEMM dimension, the narrow
    convolutions' efficiency."""
    overhead_us = np.exp(theta[:N_KINDS])
    gmacs = np.ones(N_KINDS)
    gmacs[[KINDS.index(k) for k in COMPUTE_KINDS]] = np.exp(theta[N_KINDS: HALF])
    half = dict(zip(SHAPE_KEYS, np.exp(theta[HALF: NARROW])))
    return overhead_us, gmacs, half, float(np.exp(theta[NARROW]))


def op_seconds(theta: np.ndarray, d: dict, form: dict, jacobian: bool = False):
    """Every op's latency from the fitted numbers under the roofline `form` (the cost model's per-op formula)
    and, with `jacobian`, its derivative by each entry of theta (columns), for an exact-gradient fit."""
    overhead_us, gmacs, half, narrow_efficiency = _unpack(theta)
    narrow = narrow_factor(d["conv"], d["n"], form["narrow_n"], narrow_efficiency)
    rate = gmacs[d["kind"]] * np.where(d["gemm"], shape_efficiency(d["m"], d["n"], d["k"], half), 1.0) * narrow
    compute = d["work"] / (rate * 1e9)
    bound_s, compute_bound = roofline_s(compute, d["memory_s"][form["im2col"]], form["overlap"])
    seconds = overhead_us[d["kind"]] * 1e-6 + bound_s
    if not jacobian:
        return seconds, None
    to_compute = compute * np.where(compute_bound, 1.0, 1.0 - form["overlap"])  # d seconds / d log compute time
    cols = np.zeros((len(seconds), len(theta)))
    cols[np.arange(len(seconds)), d["kind"]] = overhead_us[d["kind"]] * 1e-6
    for j, kind in enumerate(COMPUTE_KINDS):
        mine = d["kind"] == KINDS.index(kind)
        cols[mine, N_KINDS + j] = -to_compute[mine]
    for j, dim in enumerate(SHAPE_KEYS):
        h = half[dim]
        cols[:, HALF + j] = np.where(d["gemm"], to_compute * h / (d[dim] + h), 0.0)
    cols[:, NARROW] = np.where(d["conv"] & (d["n"] < form["narrow_n"]), -to_compute, 0.0)
    return seconds, cols


def predict_ms(theta: np.ndarray, d: dict, form: dict) -> np.ndarray:
    """Each network's latency: its ops' latencies summed."""
    return np.bincount(d["net"], weights=op_seconds(theta, d, form)[0], minlength=d["networks"]) * 1e3


def _log_residuals(d: dict, measured: np.ndarray, form: dict):
    """log(predicted / measured) per network, and its Jacobian by theta."""
    def residuals(theta):
        return np.log(predict_ms(theta, d, form) / measured)

    def jacobian(theta):
        seconds, cols = op_seconds(theta, d, form, jacobian=True)
        return (d["sum"] @ cols) / (d["sum"] @ seconds)[:, None]

    return residuals, jacobian


def fit(networks, cache_kb: float, bandwidths: tuple[float, float], traces=None) -> dict:
    """The profile numbers minimizing the log error over the measured networks, trying each roofline form;
    `cache_kb` is the device's on-chip memory, `bandwidths` the measured (main, on-chip) bandwidths in GB/s
    (memory_bandwidths): measured, not fitted, since per-op overheads and kernel efficiencies absorb whatever a
    fit of them would explain, and the fit ends at unphysical bounds."""
    from scipy.optimize import least_squares

    measured = np.array([ms for _, _, ms in networks])
    traces = traces or traced(networks)
    start, low, high = (np.log(np.concatenate([np.full(N_KINDS, o), np.full(N_COMPUTE, g), np.full(len(SHAPE_KEYS), h),
                                               [e]]))
                        for o, g, h, e in ((5.0, 50.0, 1.0, 0.5), (1e-3, 1e-2, 1e-2, 1e-3), (1e5, 1e7, 1e4, 1.0)))
    best, designs = None, {}
    for values in itertools.product(*FORMS.values()):
        form = dict(zip(FORMS, values))
        if form["channel_multiple"] not in designs:
            designs[form["channel_multiple"]] = design(traces, form["channel_multiple"], cache_kb, bandwidths)
        d = designs[form["channel_multiple"]]
        residuals, jacobian = _log_residuals(d, measured, form)
        result = least_squares(residuals, start, jac=jacobian, bounds=(low, high), x_scale="jac", ftol=1e-6, xtol=1e-6)
        if best is None or result.cost < best[0]:
            best = (result.cost, form, result.x, d)
    _, form, theta, d = best
    errors = np.abs(predict_ms(theta, d, form) / measured - 1)
    used = {KINDS[k] for k in np.unique(d["kind"])}
    overhead_us, gmacs, half, narrow_efficiency = _unpack(theta)
    return {"overhead_us": {k: float(overhead_us[i]) for i, k in enumerate(KINDS) if k in used},
            "throughput_gmacs": {k: float(gmacs[KINDS.index(k)]) for k in COMPUTE_KINDS if k in used},
            "bandwidth_gbs": bandwidths[0], "cache_kb": cache_kb, "cache_bandwidth_gbs": bandwidths[1],
            "gemm_half": {k: float(v) for k, v in half.items()}, "narrow_efficiency": narrow_efficiency, **form,
            "median_error": float(np.median(errors)), "within_20pct": float(np.mean(errors <= 0.2))}


def cache_kb(device: str) -> float:
    """The device's last-level cache in KB (Linux sysfs for the CPU, torch for a CUDA GPU; 0 when unknown)."""
    if device == "cuda":
        return torch.cuda.get_device_properties(0).L2_cache_size / 1024
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        if (f.parent / "shared_cpu_list").exists() and not _private(f.parent / "shared_cpu_list"):
            continue
        text = f.read_text().strip()
        sizes.append(float(text[:-1]) * (1024 if text.endswith("M") else 1) if text[-1] in "KM" else float(text) / 1024)
    return max(sizes, default=0.0)


def _private(shared_cpu_list: Path) -> bool:
    """Whether a cache level belongs to one core (its sibling hyperthreads aside): shared_cpu_list like '0' or '0,1'
    for SMT siblings is read as private only when it names a single CPU."""
    text = shared_cpu_list.read_text().strip()
    return "," not in text and "-" not in text


def calibrate(name: str = "host", quick: bool = False, device: str = "cpu", seed: int = 0,
              threads: int = DEFAULT_THREADS, clock: str | None = None) -> HardwareProfile:
    """Time random networks on `device` with `threads` torch threads; return a fitted profile (no file written).

    clock: "cpu" (the default with one thread on the CPU: the timing thread's CPU time, which other work on a
    shared machine does not inflate) or "wall" (elapsed time; the default otherwise), see measure_latency_ms."""
    if device == "cuda" and not torch.cuda.is_available():
        raise AutocompressError("calibrating on device 'cuda' needs a CUDA GPU, and torch sees none here")
    if device not in ("cpu", "cuda"):
        raise AutocompressError(f"calibration device {device!r} is not allowed; allowed: cpu, cuda")
    clock = clock or ("cpu" if device == "cpu" and threads == 1 else "wall")
    start = time.perf_counter()
    _settle(device)
    timing_threads, on_chip_kb = threads if device == "cpu" else None, cache_kb(device)
    bandwidths = memory_bandwidths(device, on_chip_kb, timing_threads, clock)
    networks = list(measure_networks(40 if quick else 120, 10 if quick else 30, seed, device, timing_threads, clock,
                                     ZOO[:4] if quick else ZOO))
    profile = fitted_profile(fit(networks, on_chip_kb, bandwidths), name, device, threads)
    profile.calibration.update(networks=len(networks), seed=seed, clock=clock,
                               seconds=round(time.perf_counter() - start, 1))
    return profile


def fitted_profile(fitted: dict, name: str, device: str = "cpu", threads: int | None = DEFAULT_THREADS) -> HardwareProfile:
    """The profile holding `fit`'s numbers (energy: Horowitz's 45 nm figures, see SOURCES)."""
    tp = {k: _sig(v) for k, v in fitted["throughput_gmacs"].items()}
    peak = max(tp.values())
    overhead = {k: _sig(v) for k, v in fitted["overhead_us"].items()}
    where = (f"{platform.node() or 'this machine'} ({_device_name(device)}, {os.cpu_count()} cores, "
             f"{threads if device == 'cpu' else 'no'} torch threads)")
    return HardwareProfile(
        name=name,
        description=f"calibrated on {where} on {datetime.date.today().isoformat()}",
        peak_gmacs={"fp32": peak},
        efficiency={k: _sig(tp.get(k, peak) / peak) for k in COMPUTE_KINDS},
        bandwidth_gbs=_sig(fitted["bandwidth_gbs"]),
        cache_kb=fitted["cache_kb"],
        cache_bandwidth_gbs=_sig(fitted["cache_bandwidth_gbs"]) if fitted["cache_kb"] else 0.0,
        overhead_us={k: overhead.get(k, overhead.get("act", 1.0)) for k in KINDS},
        energy={**HOROWITZ_ENERGY, "static_w": 10.0},
        overlap=fitted["overlap"],
        im2col=fitted["im2col"],
        channel_multiple=fitted["channel_multiple"],
        gemm_half={k: _sig(v) for k, v in fitted["gemm_half"].items()},
        narrow_n=fitted["narrow_n"],
        narrow_efficiency=_sig(fitted["narrow_efficiency"]),
        threads=threads if device == "cpu" else None,
        device=device,
        calibration={"model_version": MODEL_VERSION, "fit_median_error": round(fitted["median_error"], 4),
                     "fit_within_20pct": round(fitted["within_20pct"], 4)},
    )


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
# Written by `autocompress calibrate`: every number below was fitted to timings on this machine (see
# calibration:), except energy, which a program cannot measure from user space: mac_pj, dram_pj_per_byte
# and sram_pj_per_byte are the 45 nm figures of M. Horowitz, "Computing's energy problem", ISSCC 2014
# (fp32 mult 3.7 + add 0.9 pJ; int8 0.2 + 0.03 pJ; fp16 1.1 + 0.4 pJ; below 8 bits extrapolated with
# multiplier energy ~ bits^2; DRAM 1.3-2.6 nJ per 64-bit access; 8 KB SRAM 10 pJ per 64-bit access),
# and static_w is an estimate: replace it with a power-meter reading of this machine at idle.
"""


def write_profile(profile: HardwareProfile, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(SOURCES + yaml.safe_dump(profile.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path


def calibrate_host(path: Path, quick: bool = False) -> Path:
    """Calibrate this machine's CPU and save it where `--hardware host` looks."""
    return write_profile(calibrate("host", quick=quick), path)
