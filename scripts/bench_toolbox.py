"""The compression toolbox on the digits model: every technique alone, Deep Compression, and the combined search.

Each row is one search (NSGA-II, objectives accuracy and size, candidates fine-tuned with distillation
from the original model, early stopping on). From each search it reports
  - the most accurate model within the same size budget (default 10% of the original), and
  - the largest size reduction reached at <= 1 point accuracy loss.
Every reported model is rebuilt and re-measured independently: accuracy of Result.model(n) (the policy
applied, then the search's own seeded recalibration and fine-tune), size by the cost model and by
writing the packed file (autocompress.cost.pack, weights only: it adds a small header), latency by
timing it on this host (median, one thread; fake-quant models run float kernels, so their measured
latency is that of the float model they simulate).
A last table sets the real int8 model's measured latency and file size beside the estimate.

    .venv/bin/python scripts/bench_toolbox.py [--trials 16] [--combined-trials 40] [--steps 20]
"""
from __future__ import annotations

import argparse
import tempfile
import time
import warnings

import pandas as pd
import torch

import autocompress as ac
from autocompress.cost.measure import measure_latency_ms
from autocompress.data import digits_loaders
from autocompress.evaluate import accuracy, fixed_batches
from autocompress.int8 import int8_report
from autocompress.models import digits_resnet
from autocompress.space import SearchSpace

ALONE = {
    "prune (channels)": {"prune": {"keep": {"low": 0.25, "high": 1.0, "step": 0.125}}},
    "lowrank": "lowrank",
    "sparsity": {"sparsity": {"density": [1.0, 0.5, 0.35, 0.25, 0.15, 0.1, 0.05]}},
    "share (k-means)": {"share": {"bits": [32, 8, 5, 4, 3, 2, 1]}},
    "quantize (mixed precision)": "mixed_precision",
}
PRESETS = {"deep_compression": "deep_compression", "all (combined)": "all"}


def space_of(name: str, spec) -> SearchSpace:
    return SearchSpace.load(spec) if isinstance(spec, str) else SearchSpace(name, spec)


def packed_kb(model) -> float:
    """KB of the packed file autocompress.cost.pack writes (weights only): an independent size measurement."""
    from autocompress.cost.pack import save_packed

    with tempfile.TemporaryDirectory() as folder:
        return save_packed(model, f"{folder}/model.acpack", architecture=False) / 1024


def pick(trials: pd.DataFrame, base_acc: float, budget_kb: float) -> dict:
    """Trial numbers: most accurate within the size budget, and smallest within 1 point of the original."""
    ok = trials[trials["feasible"] & (trials["state"] == "COMPLETE") & trials["accuracy"].notna()]
    if "early_stopped" in ok:
        ok = ok[ok["early_stopped"] != True]  # noqa: E712 -- their accuracy is a partial fine-tune's
    within = ok[ok["size_kb"] <= budget_kb]
    close = ok[ok["accuracy"] >= base_acc - 0.01]
    return {"budget": within["accuracy"].idxmax() if len(within) else None,
            "1pt": close["size_kb"].idxmin() if len(close) else None}


def remeasure(result, number: int, val, x: torch.Tensor) -> tuple[dict, torch.nn.Module]:
    """Rebuild trial `number` (its policy applied, then re-prepared by the search's judge: the same seeded
    recalibration and fine-tune) and measure accuracy and size again, each by its own route."""
    model = result.model(number)
    return {"accuracy": accuracy(model, val), "size_kb": ac.estimate(model, x, "host").size_kb,
            "packed_kb": packed_kb(model)}, model


def latencies(models: dict, x: torch.Tensor, rounds: int = 5) -> dict:
    """Median host latency of every model, measured in interleaved rounds so that load on a shared
    machine hits them all alike."""
    times = {key: [] for key in models}
    for _ in range(rounds):
        for key, model in models.items():
            times[key].append(measure_latency_ms(model, x))
    return {key: float(pd.Series(t).median()) for key, t in times.items()}


def trials_with_flags(result, storage: str) -> pd.DataFrame:
    import optuna

    study = optuna.load_study(study_name="autocompress", storage=storage)
    flags = {t.number: t.user_attrs.get("early_stopped") for t in study.trials}
    return result.trials.assign(early_stopped=pd.Series(flags))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=16, help="trials per single-technique search")
    parser.add_argument("--combined-trials", type=int, default=40, help="trials of Deep Compression and the combined search")
    parser.add_argument("--steps", type=int, default=20, help="fine-tuning steps per candidate")
    parser.add_argument("--budget", type=float, default=0.10, help="size budget, fraction of the original")
    parser.add_argument("--batch", type=int, default=32, help="fine-tuning batch size")
    parser.add_argument("--only", nargs="*", help="run only these rows")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadiest on a shared machine)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model, x = digits_resnet(), torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    train, val, _ = digits_loaders(batch_size=args.batch)
    base_acc = accuracy(model, val)
    base = ac.estimate(model, x, "host")
    budget_kb = base.size_kb * args.budget
    print(f"digits_resnet: accuracy {base_acc:.4f}, size {base.size_kb:.1f} KB, estimated {base.latency_ms:.2f} ms; "
          f"size budget {budget_kb:.1f} KB; "
          f"{args.steps} fine-tuning steps of {args.batch} per candidate\n")

    rows, models = [], {"original": model}
    for name, spec in {**ALONE, **PRESETS}.items():
        if args.only and name not in args.only:
            continue
        trials = args.combined_trials if name in PRESETS else args.trials
        storage = f"sqlite:///{tempfile.mkdtemp(prefix='bench_toolbox_')}/study.db"
        start = time.time()
        result = ac.compress(model, x, data=(train, val), hardware="host", objectives=("accuracy", "size_kb"),
                             space=space_of(name, spec), trials=trials, finetune_steps=args.steps, seed=0,
                             progress=False, storage=storage)
        table = trials_with_flags(result, storage)
        row = {"search": name, "trials": trials, "early_stopped": int((table["early_stopped"] == True).sum()),  # noqa: E712
               "minutes": (time.time() - start) / 60}
        for key, number in pick(table, base_acc, budget_kb).items():
            again = {"number": number}
            if number is not None:
                again, models[(name, number)] = remeasure(result, number, val, x)
                again["number"] = number
                assert abs(again["accuracy"] - table.loc[number, "accuracy"]) < 1e-9, (name, number, again)
                assert abs(again["size_kb"] - table.loc[number, "size_kb"]) < 1e-6, (name, number, again)
                again["x"] = base.size_kb / again["size_kb"]
            for column in ("number", "accuracy", "size_kb", "packed_kb", "x"):
                row[f"{key} {column}"] = again.get(column)
        rows.append(row)
        print(pd.DataFrame([row]).to_string(index=False, float_format=lambda v: f"{v:.4g}"), flush=True)

    measured = latencies(models, x)
    for row in rows:
        for key in ("budget", "1pt"):
            row[f"{key} ms"] = measured.get((row["search"], row[f"{key} number"]))
    print(f"\nBest within {budget_kb:.1f} KB ('budget') and smallest at <= 1 point loss ('1pt'); accuracy = top-1 on "
          f"the 540 validation digits (original {base_acc:.4f}), x = size reduction, ms = measured host latency "
          f"(original {measured['original']:.2f} ms, same rounds)")
    print(pd.DataFrame(rows).to_string(index=False, float_format=lambda v: f"{v:.4g}"))

    report = int8_report(model, x, fixed_batches(train, 8), hardware="host", val_loader=val)
    print("\nReal int8 model (torch.ao FX, x86) beside the cost model's estimate for 8-bit weights and activations:")
    print(pd.DataFrame([report]).to_string(index=False, float_format=lambda v: f"{v:.4g}"))


if __name__ == "__main__":
    main()
