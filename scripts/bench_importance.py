"""Which channels to prune: the importance criteria compared at equal MACs on the digits model.

For one policy (a keep ratio per channel group) every criterion gives the same architecture (the
script checks the MACs agree); only the choice of channels differs. Policies: every group at the same
keep ratio, and `--random` policies with a keep ratio per group drawn from [0.25, 1.0]. Each pruned
model is judged as the search judges it: BatchNorm recalibration on 8 training batches, then top-1
accuracy on the validation split, no fine-tuning. Taylor scores channels on `--taylor-batches`
training batches with their labels. A random choice of channels is the reference a criterion must beat.

    .venv/bin/python scripts/bench_importance.py [--keeps 0.75 0.5 0.375 0.25] [--random 8]
"""
from __future__ import annotations

import argparse
import copy
import itertools
import random

import pandas as pd
import torch

import autocompress as ac
from autocompress.compress.prune import IMPORTANCE, calibration_data, kept_channels
from autocompress.data import digits_loaders
from autocompress.evaluate import Evaluator
from autocompress.compress.prune.groups import prune_channels
from autocompress.graph import analyze, output_layers
from autocompress.models import digits_resnet
from autocompress.threads import fixed_threads


def random_channels(model, policy, x, seed: int):
    """The policy's widths with channels drawn at random: the baseline every criterion must beat."""
    rng, keep = random.Random(seed), policy["prune"]["keep"]

    def choose(info, group):
        chunk = info.channels // info.chunks
        return rng.sample(range(chunk), chunk - kept_channels(chunk, keep[info.id], 8)) if info.id in keep else []

    return prune_channels(copy.deepcopy(model), x, output_layers(model, x), lambda _: choose)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5, 0.375, 0.25])
    parser.add_argument("--random", type=int, default=8, help="policies with a random keep ratio per group")
    parser.add_argument("--taylor-batches", type=int, default=8)
    args = parser.parse_args()
    model = digits_resnet()
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    train, val, _ = digits_loaders(seed=0)
    judge = Evaluator(train, val)
    graph = ac.analyze(model, x)
    batches = list(itertools.islice(train, args.taylor_batches))
    rng = random.Random(0)
    policies = [(f"uniform {k:g}", {g.id: k for g in graph.groups}) for k in args.keeps]
    policies += [(f"random #{i}", {g.id: rng.choice([0.25, 0.375, 0.5, 0.625, 0.75, 0.875, 1.0]) for g in graph.groups})
                 for i in range(args.random)]
    rows = []
    for label, keep in policies:
        policy = {"prune": {"keep": keep, "round_to": 8}}
        row, macs = {"policy": label}, set()
        for criterion in IMPORTANCE:
            policy["prune"]["importance"] = criterion
            with calibration_data(batches):
                pruned = ac.apply(model, policy, x)
            macs.add(analyze(pruned, x).macs)
            row[criterion] = judge(pruned)
        row["random"] = judge(random_channels(model, policy, x, seed=len(rows)))
        assert len(macs) == 1, f"criteria gave different architectures for {label}: {macs}"
        rows.append({**row, "MACs (M)": round(macs.pop() / 1e6, 2)})
        print(rows[-1], flush=True)
    table = pd.DataFrame(rows).set_index("policy")
    means = {"mean, uniform": table.iloc[:len(args.keeps)], "mean, random policies": table.iloc[len(args.keeps):],
             "mean, all": table.iloc[:len(policies)]}
    for label, part in means.items():
        if len(part):
            table.loc[label] = part.mean()
    print(f"\ndigits_resnet, accuracy {judge(digits_resnet()):.4f} unpruned (after the same recalibration)")
    print(table.round(4).to_string())


if __name__ == "__main__":
    with fixed_threads(1):
        main()
