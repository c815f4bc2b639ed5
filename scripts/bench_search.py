"""Does the search beat the baselines? Hypervolume of NSGA-II, TPE and random search, against uniform pruning and
Torch-Pruning's global magnitude pruning, on two fixed problems:

  digits    the built-in digits model and data; maximize accuracy (BN recalibration on 4 training batches, no
            fine-tune, for every candidate and baseline alike), minimize host latency (cost model); budget:
            latency <= 50 % of the model's
  resnet18  torchvision resnet18 (random weights) at 64x64, cost only; minimize host latency and size;
            budget: latency <= 50 % of the model's

Both use the default search space (per-group keep ratios, weight bit-widths). Hypervolume is computed on
normalized objectives, both minimized: x = latency / the model's latency, y = 1 - accuracy (digits) or
size / the model's size (resnet18); reference point (0.5, 1.0): the latency budget, and zero accuracy or the
model's full size. Only feasible completed trials count. Printed per problem and sampler: the median over
seeds of the hypervolume after 25, 50 and 100 trials (the first 7: the warm start's uniform policies), and the
feasible rate with budget-aware repair (the default) and without.

Baselines, each at the latency targets TARGETS x the model's latency: `uniform` prunes every channel group to
one keep ratio (the largest that meets the target, found by bisection with the cost model); `torch-pruning`
runs Torch-Pruning's MagnitudePruner (L1, global ranking, the classifier left whole) at the ratio whose MACs
match the uniform model's. A baseline point is "dominated or equalled" when some front point of every seed's
100-trial search is at least as good in both objectives.

    .venv/bin/python scripts/bench_search.py            # 3 seeds x 100 trials, about 30 min on 2 cores
    .venv/bin/python scripts/bench_search.py --quick    # 1 seed x 25 trials, a few minutes
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings
from concurrent.futures import ProcessPoolExecutor

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), ".."))
import autocompress as ac  # noqa: E402
from autocompress.cost.hardware import load_profile  # noqa: E402
from autocompress.evaluate import make_evaluator  # noqa: E402

SAMPLERS = ("nsga2", "tpe", "random")
PROBLEMS = ("digits", "resnet18")
CHECKPOINTS = (25, 50, 100)
TARGETS = (0.3, 0.4, 0.5)
BUDGET = 0.5
REFERENCE = (BUDGET, 1.0)


def problem(name: str):
    """(model, example input, (train, val) loaders or None, objectives)."""
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)  # jobs run side by side: one thread each, no oversubscription
    if name == "digits":
        from autocompress.data import digits_loaders
        from autocompress.models import load_model

        return load_model("digits_resnet").eval(), torch.randn(1, 1, 32, 32), digits_loaders(), \
            ("accuracy", "latency_ms")
    import torchvision

    return torchvision.models.resnet18(weights=None).eval(), torch.randn(1, 3, 64, 64), None, ("latency_ms", "size_kb")


def points(frame: pd.DataFrame, baseline: dict, objectives) -> np.ndarray:
    """Normalized (x, y) of feasible rows, both minimized."""
    ok = frame[frame["feasible"]].dropna(subset=list(objectives))
    x = ok["latency_ms"].to_numpy() / baseline["latency_ms"]
    y = 1 - ok["accuracy"].to_numpy() if "accuracy" in objectives else ok["size_kb"].to_numpy() / baseline["size_kb"]
    return np.stack([x, y], axis=1) if len(ok) else np.zeros((0, 2))


def hypervolume(pts: np.ndarray, ref=REFERENCE) -> float:
    """Area dominated by `pts` (2-D, minimized) inside the box below `ref`."""
    pts = pts[(pts[:, 0] < ref[0]) & (pts[:, 1] < ref[1])] if len(pts) else pts
    area, best_y = 0.0, ref[1]
    for x, y in sorted(map(tuple, pts)):
        if y < best_y:
            area += (ref[0] - x) * (best_y - y)
            best_y = y
    return area


def search_job(job: tuple) -> dict:
    """One search: (problem, sampler, seed, repair, trials, hardware) -> hypervolume at each checkpoint, feasible rate,
    and the final feasible points."""
    name, sampler, seed, repair, trials, hardware = job
    model, x, data, objectives = problem(name)
    start = time.perf_counter()
    result = ac.compress(model, x, data=data, hardware=hardware, budgets={"latency": BUDGET}, objectives=objectives,
                         trials=trials, sampler=sampler, seed=seed, progress=False, repair=repair)
    frame = result.trials.sort_index()
    done = frame[frame["state"].isin(["COMPLETE", "FAIL"])]  # what the target counts, in trial order
    out = {"problem": name, "sampler": sampler, "seed": seed, "repair": repair, "seconds": time.perf_counter() - start,
           "feasible": float(done["feasible"].mean())}
    for n in CHECKPOINTS:
        if n <= trials:
            out[f"hv@{n}"] = hypervolume(points(done.iloc[:n], result.baseline, objectives))
    out["points"] = points(done, result.baseline, objectives)
    return out


def baseline_job(job: tuple) -> list[dict]:
    """Uniform pruning and Torch-Pruning at each latency target of one problem: normalized points."""
    name, hardware = job
    model, x, data, objectives = problem(name)
    profile = load_profile(hardware)
    judge = make_evaluator(data, None, 0, teacher=model)  # the search's own judge
    full = ac.estimate(model, x, profile)
    bound = ac.SearchSpace("uniform", {"prune": {"keep": {"low": 0.05, "high": 1.0, "step": 0.01},
                                                 "granularity": "global"}}).bind(ac.analyze(model, x))
    rows = []
    for target in TARGETS:
        limit = target * full.latency_ms
        keep, uniform = bisect(lambda r: ac.apply(model, bound.policy({bound.knobs[0].param: r}), x),
                               lambda m: ac.estimate(m, x, profile).latency_ms <= limit, 0.05, 1.0)
        macs = ac.estimate(uniform, x, profile).macs
        tp_keep, tp_model = bisect(lambda r: torch_pruning(model, x, 1 - r),
                                   lambda m: ac.estimate(m, x, profile).macs <= macs, 0.05, 1.0)
        for method, m, ratio in (("uniform", uniform, keep), ("torch-pruning", tp_model, tp_keep)):
            est = ac.estimate(m, x, profile)
            metrics = {"latency_ms": est.latency_ms, "size_kb": est.size_kb, "feasible": True,
                       "accuracy": judge(m) if judge else None}
            pt = points(pd.DataFrame([metrics]), full.as_dict(), objectives)[0]
            rows.append({"problem": name, "target": target, "method": method, "keep": round(ratio, 3),
                         "x": pt[0], "y": pt[1], "accuracy": metrics["accuracy"], "latency_ms": est.latency_ms,
                         "size_kb": est.size_kb, "macs": est.macs})
    return rows


def bisect(build, fits, low: float, high: float, steps: int = 10):
    """(ratio, model): the largest ratio in [low, high] whose model fits (the low end's model when none does)."""
    best = (low, build(low))
    for _ in range(steps):
        middle = (low + high) / 2
        model = build(middle)
        if fits(model):
            best, low = (middle, model), middle
        else:
            high = middle
    return best


def torch_pruning(model, x, ratio: float):
    """Torch-Pruning's global L1 magnitude pruning of `ratio` of the channels, the final classifier left whole."""
    import copy

    import torch_pruning as tp

    pruned = copy.deepcopy(model)
    last = [m for m in pruned.modules() if isinstance(m, torch.nn.Linear)][-1:]
    pruner = tp.pruner.MagnitudePruner(pruned, x, importance=tp.importance.MagnitudeImportance(p=1),
                                       global_pruning=True, pruning_ratio=ratio, ignored_layers=last)
    pruner.step()
    return pruned.eval()


def front_covers(fronts: list[np.ndarray], point: tuple) -> bool:
    """Whether every seed's feasible points include one at least as good as `point` in both objectives."""
    return all(len(f) and bool(np.any((f[:, 0] <= point[0] + 1e-9) & (f[:, 1] <= point[1] + 1e-9))) for f in fronts)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 seed, 25 trials")
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--trials", type=int, default=100)
    p.add_argument("--problems", default=",".join(PROBLEMS))
    p.add_argument("--samplers", default=",".join(SAMPLERS))
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="searches run side by side (1 thread each)")
    p.add_argument("--save", help="write the per-search table to this CSV")
    p.add_argument("--hardware", default="host", help="profile name or YAML path; a copy of the host profile keeps a "
                   "long run's prices fixed while other work recalibrates the cached one")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.trials = 1, 25
    problems, samplers = args.problems.split(","), args.samplers.split(",")
    searches = [(n, s, seed, repair, args.trials, args.hardware) for n in problems for s in samplers
                for seed in range(args.seeds) for repair in (True, False)]
    start = time.perf_counter()
    with ProcessPoolExecutor(args.jobs) as pool:
        baselines = pool.map(baseline_job, [(n, args.hardware) for n in problems])
        runs = list(pool.map(search_job, searches))
        base = pd.DataFrame([row for rows in baselines for row in rows])
    frame = pd.DataFrame(runs)
    if args.save:
        frame.drop(columns="points").to_csv(args.save, index=False)
    hv = [c for c in frame if c.startswith("hv@")]
    repaired = frame[frame["repair"]].groupby(["problem", "sampler"], sort=False)
    table = repaired[hv + ["feasible", "seconds"]].median()
    table["feasible (no repair)"] = frame[~frame["repair"]].groupby(["problem", "sampler"], sort=False)["feasible"].median()
    table[f"{hv[-1]} (no repair)"] = frame[~frame["repair"]].groupby(["problem", "sampler"], sort=False)[hv[-1]].median()
    print(f"\n{args.seeds} seed(s) x {args.trials} trials, medians over seeds; hypervolume reference point "
          f"{REFERENCE} on (latency / model's, 1 - accuracy or size / model's); {time.perf_counter() - start:.0f} s")
    print(table.to_string(float_format=lambda v: f"{v:.4f}"))
    fronts = {key: list(part["points"]) for key, part in repaired}
    base["covered by"] = [", ".join(s for s in samplers if front_covers(fronts[(r.problem, s)], (r.x, r.y)))
                          for r in base.itertuples()]
    print("\nbaselines at latency targets (x = latency / model's); 'covered by': samplers whose front dominates or "
          "equals the point in every seed")
    print(base.drop(columns=["x", "y"]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
