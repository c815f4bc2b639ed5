"""Real speed of channel pruning: torchvision models at a uniform keep ratio against the originals.

Every channel group of the model keeps `--keep` of its channels (L1 importance, widths rounded to
multiples of 8), then both models are timed on this CPU with `measure_latency_ms` (batch 1, one
thread, median of `--repeats` passes), alternating original and pruned `--rounds` times so that
load from other processes hits both alike; the table shows the median over rounds. MACs come from
the graph analysis, parameters are counted from the modules.

    .venv/bin/python scripts/bench_prune_speed.py [--keep 0.5] [--size 224] [--rounds 5] [--repeats 20]
"""
from __future__ import annotations

import argparse
import statistics
import warnings

import pandas as pd
import torch
import torchvision

import autocompress as ac
from autocompress.cost.measure import measure_latency_ms
from autocompress.graph import analyze

MODELS = ("resnet18", "mobilenet_v2")


def count_params(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def uniform_policy(graph, keep: float) -> dict:
    return {"prune": {"keep": {g.id: keep for g in graph.groups}, "importance": "l1", "round_to": 8}}


def bench(name: str, keep: float, size: int, rounds: int, repeats: int) -> dict:
    model = torchvision.models.get_model(name, weights=None).eval()
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        graph = ac.analyze(model, x)
        pruned = ac.apply(model, uniform_policy(graph, keep), x)
    times = {"original": [], "pruned": []}
    for _ in range(rounds):
        for label, m in (("original", model), ("pruned", pruned)):
            times[label].append(measure_latency_ms(m, x, repeats=repeats, warmup=3))
    original, slim = statistics.median(times["original"]), statistics.median(times["pruned"])
    return {"model": name, "keep": keep,
            "MACs (M)": f"{graph.macs / 1e6:.0f} -> {analyze(pruned, x).macs / 1e6:.0f}",
            "params (M)": f"{count_params(model) / 1e6:.2f} -> {count_params(pruned) / 1e6:.2f}",
            "original ms": round(original, 2), "pruned ms": round(slim, 2), "speedup": round(original / slim, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keep", type=float, default=0.5)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    args = parser.parse_args()
    rows = [bench(name, args.keep, args.size, args.rounds, args.repeats) for name in args.models]
    print(f"batch 1, 3x{args.size}x{args.size}, 1 thread, median of {args.rounds} rounds x {args.repeats} passes")
    print(pd.DataFrame(rows).to_string(index=False))


if __name__ == "__main__":
    main()
