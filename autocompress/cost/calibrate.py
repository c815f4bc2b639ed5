"""Calibrate a hardware profile by timing real networks on this machine.

Small networks of varied shapes and block types (plain and residual convs, depthwise-separable
inverted residuals, MLPs) are built at random, timed (median of repeats) and traced into the same
per-op features the cost model prices. The profile's per-kind overheads and throughputs and its
memory bandwidth are then fitted so that the summed roofline matches the measured networks (least
squares on log latency). Timing whole networks, not isolated ops, captures how ops behave in
context: caches, thread-pool hand-offs, the framework's per-module cost.
"""
from __future__ import annotations

import datetime
import os
import platform
import random
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from torch import nn

from ..graph import analyze
from .measure import DEFAULT_THREADS, measure_latency_ms
from .model import layer_features
from .profiles import KINDS, HardwareProfile

COMPUTE_KINDS = ("conv", "dwconv", "linear", "matmul")
HORowitz_ENERGY = {"mac_pj": {32: 4.6, 16: 1.5, 8: 0.23, 4: 0.12, 2: 0.06, 1: 0.03}, "dram_pj_per_byte": 80.0,
                   "sram_pj_per_byte": 1.25}


class _Residual(nn.Module):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body

    def forward(self, x):
        return x + self.body(x)


def _conv_bn(cin, cout, k=3, stride=1, groups=1, act=True):
    layers = [nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if act else layers


def random_network(rng: random.Random) -> tuple[nn.Module, torch.Tensor]:
    """One calibration network: a random mix of block types, widths and resolutions."""
    kind = rng.choice(["plain", "residual", "inverted", "mlp", "single"])
    if kind == "mlp":
        dims = [rng.choice([64, 128, 256, 512, 1024, 2048]) for _ in range(rng.randint(2, 4))]
        layers = []
        for a, b in zip(dims, dims[1:]):
            layers += [nn.Linear(a, b), nn.ReLU()]
        tokens = rng.choice([1, 1, 49, 197])
        return nn.Sequential(*layers), torch.randn(1, tokens, dims[0]) if tokens > 1 else torch.randn(1, dims[0])
    res = rng.choice([8, 14, 16, 28, 32, 56, 112])
    width = rng.choice([8, 16, 24, 32, 48, 64, 96, 128, 192, 256])
    width = min(width, max(8, 8 * (2 ** 13 // res ** 2)))  # about 50 MMACs per 3x3 conv at most: quick to time
    cin = rng.choice([1, 3, width])
    if kind == "single":  # chains of one op type: separates per-kind overheads that always co-occur elsewhere
        op = rng.choice(["conv", "dwconv", "norm", "act", "add"])
        x = torch.randn(1, width, res, res)
        n = rng.randint(1, 6)
        if op == "add":
            return _Residual(nn.Sequential(*[nn.Identity() for _ in range(n)])).eval(), x
        make = {"conv": lambda: nn.Conv2d(width, width, 3, padding=1, bias=False),
                "dwconv": lambda: nn.Conv2d(width, width, 3, padding=1, groups=width, bias=False),
                "norm": lambda: nn.BatchNorm2d(width), "act": lambda: nn.ReLU()}[op]
        return nn.Sequential(*[make() for _ in range(n)]).eval(), x
    layers = _conv_bn(cin, width, rng.choice([1, 3, 5]))
    for _ in range(rng.randint(1, 4)):
        if kind == "plain":
            layers += _conv_bn(width, width, rng.choice([1, 3]))
        elif kind == "residual":
            layers.append(_Residual(nn.Sequential(*_conv_bn(width, width), *_conv_bn(width, width, act=False))))
        else:
            hidden = width * rng.choice([2, 4, 6])
            layers.append(_Residual(nn.Sequential(*_conv_bn(width, hidden, 1),
                                                  *_conv_bn(hidden, hidden, rng.choice([3, 5]), groups=hidden),
                                                  *_conv_bn(hidden, width, 1, act=False))))
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, rng.choice([10, 100, 1000]))]
    return nn.Sequential(*layers).eval(), torch.randn(1, cin, res, res)


def measure_networks(n: int, repeats: int, seed: int = 0, device: str = "cpu", threads: int | None = None):
    """Yield (features of every op, measured ms) for `n` random networks."""
    rng = random.Random(seed)
    for _ in range(n):
        model, x = random_network(rng)
        model, x = model.to(device), x.to(device)
        graph = analyze(model, x, groups=False)
        feats = [layer_features(l) for l in graph.layers]
        yield feats, measure_latency_ms(model, x, repeats=repeats, threads=threads)


def _design(rows, im2col: bool):
    """Per network: op count per kind, MACs per compute kind, and bytes of each op (for the roofline)."""
    return [(np.array([sum(f["kind"] == k for f in feats) for k in KINDS], dtype=float),
             np.array([[f["macs"] if f["kind"] == k else 0.0 for k in COMPUTE_KINDS] for f in feats]),
             np.array([f["act_bytes"] + f["w_bytes"] + (f["unfold_bytes"] if im2col else 0) for f in feats],
                      dtype=float), ms) for feats, ms in rows]


def _predict_ms(theta: np.ndarray, overlap: float, counts, macs, nbytes) -> float:
    overhead_us, gmacs, bw = np.exp(theta[:len(KINDS)]), np.exp(theta[len(KINDS):-1]), np.exp(theta[-1])
    compute = (macs / (gmacs * 1e6)).sum(1)      # ms per op (an op has MACs of one kind at most)
    memory = nbytes / (bw * 1e6)
    bound = np.maximum(compute, memory) + (1 - overlap) * np.minimum(compute, memory)
    return float(counts @ overhead_us * 1e-3 + bound.sum())


def fit(rows) -> dict:
    """Per-kind overhead (us) and throughput (GMAC/s), bandwidth (GB/s), and the roofline's form
    (overlap, im2col traffic), minimizing the log error over the measured networks."""
    from scipy.optimize import least_squares

    theta0 = np.concatenate([np.log(np.full(len(KINDS), 5.0)), np.log(np.full(len(COMPUTE_KINDS), 50.0)), [np.log(20.0)]])
    best = None
    for overlap in (1.0, 0.5, 0.0):
        for im2col in (False, True):
            design = _design(rows, im2col)

            def residuals(theta):
                return [np.log(_predict_ms(theta, overlap, c, m, b) / ms) for c, m, b, ms in design]

            theta = least_squares(residuals, theta0, bounds=(np.log(1e-3), np.log(1e6))).x
            cost = float(np.sum(np.square(residuals(theta))))
            if best is None or cost < best[0]:
                best = (cost, overlap, im2col, theta, np.exp(np.abs(residuals(theta))) - 1)
    _, overlap, im2col, theta, errors = best
    used = {f["kind"] for feats, _ in rows for f in feats}
    return {"overhead_us": {k: float(np.exp(theta[i])) for i, k in enumerate(KINDS) if k in used},
            "throughput_gmacs": {k: float(np.exp(theta[len(KINDS) + i])) for i, k in enumerate(COMPUTE_KINDS) if k in used},
            "bandwidth_gbs": float(np.exp(theta[-1])), "overlap": overlap, "im2col": im2col,
            "median_error": float(np.median(errors)), "within_20pct": float(np.mean(errors <= 0.2))}


def calibrate(name: str = "host", quick: bool = False, device: str = "cpu", seed: int = 0,
              threads: int = DEFAULT_THREADS) -> HardwareProfile:
    """Time random networks on `device` with `threads` torch threads; return a fitted profile (no file written)."""
    _settle(device)
    rows = list(measure_networks(40 if quick else 120, 10 if quick else 30, seed, device, threads))
    fitted = fit(rows)
    tp = fitted["throughput_gmacs"]
    peak = max(tp.values())
    overhead = fitted["overhead_us"]
    return HardwareProfile(
        name=name,
        description=(f"calibrated on {platform.node() or 'this machine'} ({platform.processor() or platform.machine()}, "
                     f"{os.cpu_count()} cores, {threads} torch threads, device {device}) on "
                     f"{datetime.date.today().isoformat()}"),
        peak_gmacs={"fp32": round(peak, 3)},
        efficiency={k: round(tp.get(k, peak) / peak, 4) for k in COMPUTE_KINDS},
        bandwidth_gbs=round(fitted["bandwidth_gbs"], 3),
        overhead_us={k: round(overhead.get(k, overhead.get("act", 1.0)), 3) for k in KINDS},
        # a host CPU's energy cannot be measured from user space: generic 45 nm figures (Horowitz, ISSCC 2014)
        energy={**HORowitz_ENERGY, "static_w": 10.0},
        overlap=fitted["overlap"],
        im2col=fitted["im2col"],
        threads=threads,
        extra={"calibration": {"networks": len(rows), "seed": seed,
                               "fit_median_error": round(fitted["median_error"], 4),
                               "fit_within_20pct": round(fitted["within_20pct"], 4)}},
    )


def _settle(device: str, seconds: float = 0.5) -> None:
    """Busy work, then a pause: clocks ramp up, other libraries' spinning thread pools go idle."""
    a = torch.randn(256, 256, device=device)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        a @ a
    time.sleep(0.3)


def write_profile(profile: HardwareProfile, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text("# written by `autocompress calibrate`: every number below was fitted to timings on this machine\n"
                   + yaml.safe_dump(profile.to_dict(), sort_keys=False))
    os.replace(tmp, path)
    return path


def calibrate_host(path: Path, quick: bool = False) -> Path:
    """Calibrate this machine and save it where `--hardware host` looks."""
    return write_profile(calibrate("host", quick=quick), path)
