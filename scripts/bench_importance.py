"""Which channels to prune: the importance criteria compared at equal MACs on the digits model.

Every channel group keeps the same fraction of its channels, so for one keep ratio every criterion
gives the same architecture (the table checks the MACs agree) and only the choice of channels
differs. Each pruned model is judged as the search judges it: BatchNorm recalibration on 8 training
batches, then top-1 accuracy on the validation split, no fine-tuning. Taylor scores channels on the
first `--taylor-batches` training batches with their labels.

    .venv/bin/python scripts/bench_importance.py [--keeps 0.75 0.5 0.375 0.25]
"""
from __future__ import annotations

import argparse
import itertools

import pandas as pd
import torch

import autocompress as ac
from autocompress.compress.prune import IMPORTANCE, calibration_data
from autocompress.data import digits_loaders
from autocompress.evaluate import Evaluator
from autocompress.models import digits_resnet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--keeps", type=float, nargs="+", default=[0.75, 0.5, 0.375, 0.25])
    parser.add_argument("--taylor-batches", type=int, default=4)
    args = parser.parse_args()
    model = digits_resnet()
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    train, val = digits_loaders(seed=0)
    judge = Evaluator(train, val)
    graph = ac.analyze(model, x)
    batches = list(itertools.islice(train, args.taylor_batches))
    rows = []
    for keep in args.keeps:
        policy = {"prune": {"keep": {g.id: keep for g in graph.groups}, "round_to": 8}}
        row, macs = {"keep": keep}, set()
        for criterion in IMPORTANCE:
            policy["prune"]["importance"] = criterion
            with calibration_data(batches):
                pruned = ac.apply(model, policy, x)
            macs.add(ac.analyze(pruned, x, groups=False).macs)
            row[criterion] = judge(pruned)
        assert len(macs) == 1, f"criteria gave different architectures at keep {keep}: {macs}"
        rows.append({**row, "MACs (M)": round(macs.pop() / 1e6, 2)})
    table = pd.DataFrame(rows).set_index("keep")
    table.loc["mean"] = table.mean()
    print(f"digits_resnet, uncompressed accuracy {judge(digits_resnet()):.4f} (after the same recalibration)")
    print(table.round(4).to_string())


if __name__ == "__main__":
    main()
