"""Judging candidates at equal wall time: BN recalibration only, a fixed fine-tune per candidate, and the
multi-fidelity rungs (successive halving over the Pareto rank), on the digits model and a torchvision ResNet-18
trained on the digits at 32 px.

The three schedules of a problem, each with `--seeds` sampler seeds, run side by side, one process and one torch
thread each, so that they share whatever load the machine has at the same moments; each searches for the same
wall time (`--minutes`), then its front is delivered the same way (the same final fine-tune) and measured on the
held-out test data. Printed per problem, schedule and seed: trials judged, hypervolume on (1 - test accuracy,
latency / the model's) with reference (1, 1), and the smallest and the fastest delivered model within 1 point of
the original's test accuracy; then each schedule's mean over the seeds (one short search's front holds two or
three models, so one seed's hypervolume says more about the sampler's luck than about the schedule).

    .venv/bin/python scripts/bench_fidelity.py --problems digits,resnet18 --minutes 4 --seeds 2
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, TensorDataset

import autocompress as ac
from autocompress.data import digits_tensors
from autocompress.cost.hardware import load_profile
from autocompress.evaluate import Evaluator, accuracy
from autocompress.models import cache_dir, digits_resnet, train_classifier
from autocompress.report import hypervolume

BUDGETS = {"latency": 0.6, "size": 0.3}


def schedules(data, teacher, steps: int):
    """name -> evaluator: no fine-tuning; every candidate `steps // 3` steps; rungs of 0, steps/9, /3 and steps."""
    return {"bn-only": Evaluator(*data, teacher=teacher),
            "fixed": Evaluator(*data, finetune_steps=steps // 3, teacher=teacher, eta=None),
            "multi-fidelity": Evaluator(*data, finetune_steps=steps, teacher=teacher, eta=3)}


def digits_problem():
    (xt, yt), (xv, yv), (xs, ys) = digits_tensors()
    return digits_resnet(), torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0)), _loaders(
        (xt, yt), (xv, yv), (xs, ys))


def resnet18_problem():
    """torchvision resnet18 (weights=None, 10 classes) on the digits as 3-channel 32 px images, trained once."""
    import torchvision

    (xt, yt), (xv, yv), (xs, ys) = [(x.repeat(1, 3, 1, 1), y) for x, y in digits_tensors()]
    data = _loaders((xt, yt), (xv, yv), (xs, ys))
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    path = cache_dir() / "bench-resnet18-digits32.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        train_classifier(model, data[0], epochs=8)
        torch.save(model.state_dict(), path)
    return model.eval(), torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0)), data


def _loaders(train, val, test):
    gen = torch.Generator().manual_seed(0)
    return (DataLoader(TensorDataset(*train), batch_size=64, shuffle=True, generator=gen),
            DataLoader(TensorDataset(*val), batch_size=256), DataLoader(TensorDataset(*test), batch_size=256))


def measure(result, baseline_test: float) -> dict:
    front = result.pareto
    delivered = front[front["delivered"]]
    points = np.stack([1 - delivered["test_accuracy"].to_numpy(float),
                       delivered["latency_ms"].to_numpy(float) / result.baseline["latency_ms"]], axis=1)
    near = delivered[delivered["test_accuracy"] >= baseline_test - 0.01]
    return {"trials judged": int(result.trials["accuracy"].notna().sum()), "front": len(front),
            "hypervolume": hypervolume(points, (1.0, 1.0)),
            "within 1 pt": len(near),
            "smallest KB": near["size_kb"].min() if len(near) else np.nan,
            "fastest ms": near["latency_ms"].min() if len(near) else np.nan,
            "best test acc": delivered["test_accuracy"].max()}


def run_one(problem: str, schedule: str, seed: int, args) -> dict:
    model, x, data = PROBLEMS[problem]()
    baseline_test = accuracy(model, data[2])
    judge = schedules(data, model, args.steps)[schedule]
    start = time.perf_counter()
    result = ac.compress(model, x, data=data, evaluator=judge, budgets=BUDGETS, trials=10_000, seed=seed,
                         timeout=args.minutes * 60, final_epochs=args.final_epochs, progress=False)
    return {"problem": problem, "schedule": schedule, "seed": seed, "baseline test acc": baseline_test,
            **measure(result, baseline_test), "wall s": time.perf_counter() - start}


PROBLEMS = {"digits": digits_problem, "resnet18": resnet18_problem}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--problems", default="digits,resnet18")
    p.add_argument("--minutes", type=float, default=3.0, help="search wall time per schedule")
    p.add_argument("--steps", type=int, default=90, help="the multi-fidelity schedule's largest rung")
    p.add_argument("--final-epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=2, help="sampler seeds per schedule, run side by side")
    p.add_argument("--one", help="PROBLEM:SCHEDULE:SEED: run one, print its row as JSON (what the side-by-side runs do)")
    args = p.parse_args()
    if args.one:
        torch.set_num_threads(1)
        problem, schedule, seed = args.one.split(":")
        print(json.dumps(run_one(problem, schedule, int(seed), args), default=float))
        return
    load_profile("host", threads=1)  # the runs' one thread, calibrated once (if not yet) before they start side by side
    rows = []
    for problem in args.problems.split(","):
        PROBLEMS[problem]()  # trains and caches the model once, likewise
        procs = [subprocess.Popen([sys.executable, __file__, "--one", f"{problem}:{name}:{seed}", "--minutes",
                                   str(args.minutes), "--steps", str(args.steps), "--final-epochs",
                                   str(args.final_epochs)], stdout=subprocess.PIPE, text=True)
                 for seed in range(args.seeds) for name in ("bn-only", "fixed", "multi-fidelity")]
        for proc in procs:
            rows.append(json.loads(proc.communicate()[0].strip().splitlines()[-1]))
            print(pd.DataFrame(rows[-1:]).to_string(index=False), flush=True)
    table = pd.DataFrame(rows)
    print()
    print(table.set_index(["problem", "schedule", "seed"]).to_string(float_format=lambda v: f"{v:.4g}"))
    print("\nmean over seeds")
    mean = table.drop(columns="seed").groupby(["problem", "schedule"], sort=False).mean(numeric_only=True)
    print(mean.to_string(float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
