"""How well the cost model predicts measured host latency, at 1 and 2 torch threads, against a MACs baseline.

Random compressed candidates of torchvision models (pruned widths through `ac.apply` with the default
search space's knobs, weight bit-widths, dropped blocks when the depth technique exists; the first of
each model uncompressed) are priced with the host profile of each thread count and timed on this machine
at that thread count (median over rounds of repeated timings, the rounds interleaved over a model's
candidates and thread counts; one thread on the CPU clock, more on the wall clock, as the profile was
calibrated). The host profiles are calibrated on sampled kernels
(cost/calibrate.py), no torchvision model among them, so every scored candidate is held out. The baseline
predicts latency = scale x MACs with the scale fitted on the scored candidates themselves (least squares on
log latency): the best any MACs-proportional model can do. Prints, per model, per thread count and pooled:
Spearman rho, the share within +-10 % and +-20 % of the measured latency, and the share of compressed
candidates whose predicted speedup over their uncompressed model is within +-10 % of the measured one;
with the load average before and after timing.

    .venv/bin/python scripts/bench_cost_model.py                      # the cached host profiles
    .venv/bin/python scripts/bench_cost_model.py --calibrate          # refit them first (full calibration)
    .venv/bin/python scripts/bench_cost_model.py --save m.csv         # keep the timings ...
    .venv/bin/python scripts/bench_cost_model.py --measured m.csv     # ... and re-score profiles without re-timing
"""
from __future__ import annotations

import argparse
import os
import random
import sys
import time
import warnings

import numpy as np
import pandas as pd
import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import autocompress as ac  # noqa: E402
from autocompress.compress import TECHNIQUES  # noqa: E402
from autocompress.cost.hardware import load_profile  # noqa: E402
from autocompress.cost.measure import measure_latency_ms  # noqa: E402
from autocompress.space import value_at  # noqa: E402

MODELS = ("resnet18", "mobilenet_v2", "mobilenet_v3_small", "shufflenet_v2_x1_0", "squeezenet1_1",
          "mnasnet0_5", "regnet_x_400mf", "efficientnet_b0", "googlenet")
RESOLUTIONS = (128,)


def space() -> ac.SearchSpace:
    """The default space (pruned widths, weight bit-widths), plus dropped blocks where the technique exists."""
    base = ac.SearchSpace.load("default")
    if "depth" not in TECHNIQUES:
        return base
    return ac.SearchSpace("bench", {**base.techniques, "depth": {}})


def random_values(bound, rng: random.Random, level: float) -> dict:
    """Knob values scattered around one compression `level` (0 = most compressed, 1 = none); a block is dropped
    with probability 0.3 x (1 - level)."""
    values = {}
    for k in bound.knobs:
        d = k.distribution
        if k.technique == "depth":
            values[k.param] = 0 if rng.random() < 0.3 * (1 - level) else 1
            continue
        values[k.param] = value_at(d, min(1.0, max(0.0, level + rng.gauss(0, 0.2))))
    return values


def make_model(name: str) -> torch.nn.Module:
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    return torchvision.models.get_model(name, weights=None, **kwargs).eval()


def candidates(name: str, n: int, seed: int):
    """(candidate id, resolution, compressed model, input) for `n` random candidates of model `name`."""
    rng = random.Random(f"{name}-{seed}")
    model, bound = make_model(name), {}
    for i in range(n):
        res = RESOLUTIONS[i % len(RESOLUTIONS)]
        x = torch.randn(1, 3, res, res, generator=torch.Generator().manual_seed(i))
        if res not in bound:
            bound[res] = space().bind(ac.analyze(model, x))
        level = 1.0 if i == 0 else rng.uniform(0, 1)
        yield f"{name}/{i}", res, ac.apply(model, bound[res].policy(random_values(bound[res], rng, level)), x), x


def wait_until_quiet(max_load: float, timeout_s: float = 120.0) -> bool:
    """Wait until the 1-minute load average is below `max_load`; False if it stayed above for `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while os.getloadavg()[0] >= max_load:
        if time.monotonic() > deadline:
            return False
        time.sleep(2.0)
    return True


def interleaved_ms(runs: list, args) -> list[float]:
    """Per (model, input, threads, clock) run, the median over rounds of its median of repeated timings. Each round
    times every run once, in turn, so that the machine's drift (+-25 % here over minutes) moves all of one
    model's candidates alike instead of the candidates timed later; a round starts once the load is below
    --max-load."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(args.rounds):
        if args.max_load and not wait_until_quiet(args.max_load):
            print(f"  (load stayed above {args.max_load}: timing anyway)", file=sys.stderr)
        for i, (model, x, threads, clock) in enumerate(runs):
            times[i].append(measure_latency_ms(model, x, repeats=args.repeats, threads=threads, clock=clock))
    return [float(np.median(t)) for t in times]


def score(pred: np.ndarray, meas: np.ndarray) -> dict:
    from scipy.stats import spearmanr

    err = np.abs(pred / meas - 1)
    return {"n": len(meas), "rho": spearmanr(pred, meas)[0] if len(meas) > 2 else np.nan,
            "within_10": float(np.mean(err <= 0.1)), "within_20": float(np.mean(err <= 0.2)),
            "median_err": float(np.median(err))}


def speedups(frame: pd.DataFrame) -> pd.Series:
    """Per compressed candidate: |predicted speedup over its uncompressed model / measured speedup - 1|."""
    base = frame[frame["candidate"].str.endswith("/0")].set_index(["model", "threads", "resolution"])
    rest = frame[~frame["candidate"].str.endswith("/0")]
    key = list(zip(rest["model"], rest["threads"], rest["resolution"]))
    ref = base.reindex(key)
    predicted = ref["predicted_ms"].to_numpy() / rest["predicted_ms"].to_numpy()
    measured = ref["measured_ms"].to_numpy() / rest["measured_ms"].to_numpy()
    return pd.Series(np.abs(predicted / measured - 1), index=rest.index).dropna()


def table(frame: pd.DataFrame) -> pd.DataFrame:
    """Per model and thread count, per thread count and pooled: the cost model's and the MACs baseline's scores."""
    parts = [(f"{m} @{t}", part) for (t, m), part in frame.groupby(["threads", "model"], sort=False)]
    parts += [(f"all @{t}", part) for t, part in frame.groupby("threads")] + [("pooled", frame)]
    rows = []
    for label, part in parts:
        scale = np.exp(np.mean(np.log(part["measured_ms"] / part["macs"])))  # least squares on log latency
        cost = score(part["predicted_ms"].to_numpy(), part["measured_ms"].to_numpy())
        base = score(part["macs"].to_numpy() * scale, part["measured_ms"].to_numpy())
        sp = speedups(part)
        rows.append({"model": label, "n": cost["n"], "rho": cost["rho"], "±10%": cost["within_10"],
                     "±20%": cost["within_20"], "median err": cost["median_err"],
                     "speedup ±10%": float(np.mean(sp <= 0.1)) if len(sp) else np.nan,
                     "MACs rho": base["rho"], "MACs ±20%": base["within_20"]})
    return pd.DataFrame(rows).set_index("model")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--per-model", type=int, default=6, help="candidates per model (the first is uncompressed)")
    p.add_argument("--threads", default="1,2", help="torch thread counts to price and time at")
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-load", type=float, default=None,
                   help="time only while the 1-minute load average is below this (waits; the bench itself adds ~1)")
    p.add_argument("--calibrate", action="store_true", help="refit the host profiles (full calibration) first")
    p.add_argument("--save", help="write the candidates' timings and predictions to this CSV")
    p.add_argument("--measured", help="reuse the timings in this CSV (written by --save) instead of timing")
    args = p.parse_args(argv)
    warnings.filterwarnings("ignore")
    threads = [int(t) for t in args.threads.split(",")]
    if args.calibrate:
        from autocompress.cost.calibrate import calibrate_host, quality_line
        from autocompress.cost.hardware import host_profile_path

        for t in threads:
            profile, _ = calibrate_host(host_profile_path(threads=t), threads=t, force=True)
            print(f"calibrated host at {t} threads: {quality_line(profile)}")
    profiles = {t: load_profile("host", threads=t) for t in threads}
    known = pd.read_csv(args.measured).set_index(["candidate", "threads"])["measured_ms"] if args.measured else None
    load_before, rows = os.getloadavg(), []
    for name in args.models.split(","):
        priced, runs = [], []
        for cid, res, model, x in candidates(name, args.per_model, args.seed):
            for t, profile in profiles.items():
                priced.append((cid, res, t, ac.estimate(model, x, profile)))
                runs.append((model, x, t, profile.calibration.get("clock", "wall")))
        timed = [float(known[(cid, t)]) for cid, _, t, _ in priced] if known is not None else interleaved_ms(runs, args)
        for (cid, res, t, est), ms in zip(priced, timed):
            rows.append({"candidate": cid, "model": name, "resolution": res, "threads": t, "macs": est.macs,
                         "params": est.params, "predicted_ms": est.latency_ms, "measured_ms": ms})
            print(f"  {cid:24s} {res:4d}px @{t} {est.macs / 1e6:8.1f} MMACs  predicted {est.latency_ms:7.2f} ms  "
                  f"measured {ms:7.2f} ms", file=sys.stderr)
    frame = pd.DataFrame(rows)
    if args.save:
        frame.to_csv(args.save, index=False)
    for t, profile in profiles.items():
        print(f"profile @{t}: {profile.description}; {profile.calibration.get('clock')} clock; "
              f"fit {profile.calibration.get('fit_median_error')} median error on held-out kernels")
    print(f"load average (1, 5, 15 min) before timing {' '.join(f'{v:.2f}' for v in load_before)}, after "
          f"{' '.join(f'{v:.2f}' for v in os.getloadavg())}")
    print(table(frame).to_string(float_format=lambda v: f"{v:.2f}"))


if __name__ == "__main__":
    main()
