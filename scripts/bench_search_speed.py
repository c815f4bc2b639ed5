"""How fast the cost model prices a model and how many cost-only trials a search runs per second.

For each torchvision model (weights=None, nothing downloaded) at its resolution, on one profile and one torch
thread: the median time of `ac.estimate` of the uncompressed model (after one warm-up call), and a cost-only
search (`ac.compress(..., data=None)`, default space, seed 0) timed from the call to its return, after a
1-trial search that warms up what a process does once (imports, a first-use host calibration, the trace of the
model's pruning graph). The search's rate is given over its whole wall time (its setup included: analysis,
channel groups, baseline estimate) and over its trials alone (wall time less the setup, measured as a 1-trial
search's wall time less that trial's own duration). Issue 19's goals: estimate of resnet50 at 224 px <= 0.2 s, cost-only
search >= 3 trials/s.

    .venv/bin/python scripts/bench_search_speed.py                                  # resnet50 at 224 px, 60 trials
    .venv/bin/python scripts/bench_search_speed.py --models resnet50,mobilenet_v2,efficientnet_b0 --trials 100
    .venv/bin/python scripts/bench_search_speed.py --hardware host                  # calibrates on first use
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import warnings

import pandas as pd
import torch
import torchvision

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import autocompress as ac  # noqa: E402


def estimate_s(model, x, hardware: str, rounds: int) -> float:
    ac.estimate(model, x, hardware=hardware)  # warm-up: the profile's regressor is loaded once per process
    times = []
    for _ in range(rounds):
        start = time.perf_counter()
        ac.estimate(model, x, hardware=hardware)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def search_s(model, x, hardware: str, trials: int) -> tuple[float, pd.DataFrame]:
    start = time.perf_counter()
    result = ac.compress(model, x, data=None, hardware=hardware, trials=trials, seed=0, progress=False)
    return time.perf_counter() - start, result.trials


def row(name: str, size: int, hardware: str, trials: int, rounds: int) -> dict:
    model = getattr(torchvision.models, name)(weights=None).eval()
    x = torch.randn(1, 3, size, size)
    search_s(model, x, hardware, 1)  # warm-up: imports, a first-use calibration, the pruning graph's trace
    wall, frame = search_s(model, x, hardware, trials)
    one_wall, one = search_s(model, x, hardware, 1)
    setup = one_wall - float(one["duration_s"].sum())
    return {"model": name, "px": size, "estimate s": round(estimate_s(model, x, hardware, rounds), 3),
            "trials": len(frame), "feasible": int(frame["feasible"].sum()), "search wall s": round(wall, 1),
            "setup s": round(setup, 1), "trials/s (wall)": round(len(frame) / wall, 2),
            "trials/s (trials)": round(len(frame) / max(wall - setup, 1e-9), 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="resnet50", help="comma-separated torchvision model names")
    parser.add_argument("--size", type=int, default=224, help="input resolution in pixels")
    parser.add_argument("--hardware", default="raspberry-pi-4", help="a profile name (host calibrates on first use)")
    parser.add_argument("--trials", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=7, help="timed estimate calls per model")
    args = parser.parse_args()
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    load = os.getloadavg()[0]
    rows = [row(name, args.size, args.hardware, args.trials, args.rounds) for name in args.models.split(",")]
    print(f"profile {args.hardware}, 1 torch thread, load average {load:.2f} before and "
          f"{os.getloadavg()[0]:.2f} after")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
