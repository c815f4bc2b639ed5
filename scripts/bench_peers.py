"""autocompress beside a peer pipeline (Torch-Pruning + torch.ao int8) on one ResNet-20, as deployable artifacts.

The model: a ResNet-20-style CNN (stem, 3 stages x 3 basic blocks, 16/32/64 channels, 1 input channel, 10
classes) trained, seeded, on the digits split of `autocompress.data.digits_tensors` and cached under
`autocompress.models.cache_dir()`.

Peer pipeline on that very model: Torch-Pruning's MetaPruner with L2 magnitude importance
(GroupMagnitudeImportance p=2), uniform and global, at each `--ratios` (the final Linear ignored), then BatchNorm
recalibration and `--peer-epochs` epochs of fine-tuning with `autocompress.evaluate.finetune` distilling from the
original (the recipe autocompress delivers its own front with), then int8 post-training quantization with
torch.ao FX (prepare_fx / convert_fx, get_default_qconfig_mapping("x86"), 8 training batches of calibration).
Artifacts: the pruned float model's state_dict (torch.save; timed as the eager module) and the int8 model as
TorchScript (torch.jit.trace + save, timed as torch.jit.load gives it back).

autocompress: `ac.compress` on the same trained model (budget size 0.03, objectives accuracy,
latency_ms, size_kb, finetune_steps 90, final_epochs 3), and every front model exported with `result.export`
as packed, torch-int8, onnx-int8 and onnx, each file loaded back in its runtime.

Latency: one interleaved measurement of every artifact (the baseline float eager model included), batch 1, at
1 and 2 threads, `--rounds` rounds, each timing every artifact once in a shuffled order (median of 30 calls after
5 warm-up calls, `autocompress.cost.measure.measure_latency_ms`; ONNX sessions are opened per thread count); the
median over rounds is reported. Sizes are file bytes on disk; size reduction is against the baseline's
torch.save state_dict bytes; accuracy is top-1 on the held-out test digits, re-measured on the loaded file.

The issue's floors (issue 16 item 5), among artifacts within 1 point of the baseline's test accuracy:
autocompress's best size reduction >= 2x the peer's best, and its best measured speedup >= 1.3x the peer's best
(checked at each thread count).

    .venv/bin/python scripts/bench_peers.py [--trials 40] [--rounds 5] [--ratios 0.3,0.5,0.7] [--space default]
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import pandas as pd
import torch
from torch import nn

import autocompress as ac
from autocompress.cost.measure import measure_latency_ms
from autocompress.data import digits_loaders
from autocompress.evaluate import accuracy, finetune, fixed_batches, recalibrate_bn, seeded_batches
from autocompress.cost.ort import OrtModule
from autocompress.models import DigitsResNet, cache_dir, train_classifier

# The latency objective drives the speed: a latency budget that the host's (eager PyTorch) cost model prices out
# of reach would leave no front at all (0.6 x did: fixed per-op costs dominate this model there). The size budget,
# 3 % of the model's stored bytes (about 33 KB of tensors), is set near what issue 16's 2x size floor over the peer
# needs; trials over it are not evaluated. It met the size floor and cost the speedup floors (README: 0.3 x met
# the speedup floors and not the size floor).
BUDGETS = {"size": 0.03}
OBJECTIVES = ("accuracy", "latency_ms", "size_kb")
AC_FORMATS = ("packed", "torch-int8", "onnx-int8", "onnx")
THREADS = (1, 2)


def trained_resnet20(train, epochs: int) -> nn.Module:
    """Seeded initialisation and training, cached (like bench_fidelity's resnet18)."""
    torch.manual_seed(0)
    model = DigitsResNet(widths=(16, 32, 64), blocks=3)  # ResNet-20's shape
    path = cache_dir() / f"bench-resnet20-digits32-e{epochs}.pt"
    if path.exists():
        model.load_state_dict(torch.load(path, weights_only=True))
    else:
        train_classifier(model, train, epochs=epochs)
        torch.save(model.state_dict(), path.with_suffix(".tmp"))
        os.replace(path.with_suffix(".tmp"), path)
    return model.eval()


def prune_peer(model: nn.Module, x: torch.Tensor, ratio: float, global_pruning: bool) -> nn.Module:
    import torch_pruning as tp

    pruned = copy.deepcopy(model).eval()
    pruner = tp.pruner.MetaPruner(pruned, x, importance=tp.importance.GroupMagnitudeImportance(p=2),
                                  pruning_ratio=ratio, global_pruning=global_pruning, max_pruning_ratio=0.9,
                                  ignored_layers=[pruned.fc])
    pruner.step()
    return pruned.eval()


def peer_int8(model: nn.Module, x: torch.Tensor, calibration) -> nn.Module:
    from torch.ao.quantization import get_default_qconfig_mapping
    from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx

    before = torch.backends.quantized.engine
    torch.backends.quantized.engine = "x86"
    try:
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            prepared = prepare_fx(copy.deepcopy(model).eval(), get_default_qconfig_mapping("x86"), (x,))
            for batch in calibration:
                prepared(batch)
            return convert_fx(prepared)
    finally:
        torch.backends.quantized.engine = before


def save_torchscript(model: nn.Module, x: torch.Tensor, path: Path) -> nn.Module:
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        torch.jit.trace(model, x).save(str(path))
        return torch.jit.load(str(path), map_location="cpu").eval()


def peers(model, x, data, ratios, epochs: int, folder: Path, errors: list) -> list[dict]:
    """Every peer artifact: {method, artifact, format, path, runtime: {threads: module}, test_acc}."""
    train, _, test = data
    calibration = fixed_batches(train, 8)
    steps = epochs * len(train)
    out = []
    for mode in ("uniform", "global"):
        for ratio in ratios:
            name = f"tp-l2-{mode}-{ratio:g}"
            try:
                pruned = prune_peer(model, x, ratio, mode == "global")
            except Exception as exc:  # noqa: BLE001 -- reported, the rest goes on
                errors.append(f"{name}: pruning failed: {type(exc).__name__}: {exc}")
                continue
            recalibrate_bn(pruned, calibration)
            finetune(pruned, seeded_batches(train, steps, seed=1), steps, teacher=model)
            recalibrate_bn(pruned, calibration)
            path = folder / f"{name}.pt"
            torch.save(pruned.state_dict(), path)
            out.append({"method": "peer", "artifact": name, "format": "float (state_dict, eager)", "path": path,
                        "runtime": {t: pruned for t in THREADS}, "test_acc": accuracy(pruned, test)})
            try:
                loaded = save_torchscript(peer_int8(pruned, x, calibration), x, folder / f"{name}.int8.ts.pt")
            except Exception as exc:  # noqa: BLE001
                errors.append(f"{name}: int8 (FX PTQ / TorchScript) failed: {type(exc).__name__}: {exc}")
                continue
            out.append({"method": "peer", "artifact": name + " int8", "format": "int8 FX (TorchScript)",
                        "path": folder / f"{name}.int8.ts.pt", "runtime": {t: loaded for t in THREADS},
                        "test_acc": accuracy(loaded, test)})
            out += peer_onnx(pruned, x, calibration, test, folder / name, errors)
            print(f"  {name}: " + ", ".join(f"{a['format']} {a['test_acc']:.4f}" for a in out if
                                            a["artifact"].startswith(name)), flush=True)
    return out


def peer_onnx(pruned, x, calibration, test, stem: Path, errors: list) -> list[dict]:
    """The pruned peer as ONNX Runtime runs it too, fp32 and QDQ int8 (the same writers autocompress exports
    with), so that neither side wins by its runtime alone."""
    from autocompress.export import WRITERS

    out = []
    for fmt, label in (("onnx", "fp32 ONNX (ORT)"), ("onnx-int8", "int8 QDQ ONNX (ORT)")):
        path = stem.parent / f"{stem.name}.{fmt}.onnx"
        try:
            WRITERS[fmt](pruned, x, path, calibration=calibration)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{stem.name}: {fmt} export failed: {type(exc).__name__}: {exc}")
            continue
        runtime = onnx_sessions(path)
        out.append({"method": "peer", "artifact": stem.name + (" int8" if fmt == "onnx-int8" else ""),
                    "format": label, "path": path, "runtime": runtime, "test_acc": accuracy(runtime[1], test)})
    return out


def onnx_sessions(path: Path) -> dict:
    runtime = {}
    for t in THREADS:
        runtime[t] = OrtModule(str(path), threads=t)
    return runtime


def autocompress_side(model, x, data, trials: int, space: str, folder: Path, errors: list) -> tuple[list[dict], object]:
    start = time.perf_counter()
    result = ac.compress(model, x, data=data, budgets=BUDGETS, objectives=OBJECTIVES, trials=trials, space=space,
                         finetune_steps=90, final_epochs=3, progress=False)
    print(f"  search + delivery: {time.perf_counter() - start:.0f} s, front of {len(result.pareto)}", flush=True)
    out = []
    for n in result.pareto.index:
        for fmt in AC_FORMATS:
            try:
                exported = result.export(int(n), fmt, folder / f"trial_{n}.{fmt}", data=data)
            except Exception as exc:  # noqa: BLE001
                errors.append(f"autocompress trial {n} {fmt}: export failed: {type(exc).__name__}: {exc}")
                continue
            if fmt.startswith("onnx"):
                runtime = onnx_sessions(exported.path)
            else:
                from autocompress.export import LOADERS

                loaded = LOADERS[fmt](exported.path, lambda n=n: result.compressed(int(n)))
                runtime = {t: loaded for t in THREADS}
            out.append({"method": "autocompress", "artifact": f"trial {n}", "format": fmt, "path": exported.path,
                        "runtime": runtime, "test_acc": exported.test_accuracy})
    return out, result


def interleaved_latency(artifacts: list[dict], x: torch.Tensor, rounds: int) -> None:
    """Adds ms@T (median over rounds) to every artifact; each round times every artifact once per thread count
    in a shuffled order."""
    times = {(i, t): [] for i in range(len(artifacts)) for t in THREADS}
    for r in range(rounds):
        order = [(i, t) for i in range(len(artifacts)) for t in THREADS]
        random.Random(r).shuffle(order)
        for i, t in order:
            times[(i, t)].append(measure_latency_ms(artifacts[i]["runtime"][t], x, repeats=30, warmup=5, threads=t))
        print(f"  round {r + 1}/{rounds} done", flush=True)
    for i, a in enumerate(artifacts):
        for t in THREADS:
            a[f"ms@{t}"] = statistics.median(times[(i, t)])


def best(table: pd.DataFrame, method: str, base_test: float) -> dict:
    near = table[(table["method"] == method) & (table["test acc"] >= base_test - 0.01)]
    row = {"side": method, "artifacts within 1 pt": len(near)}
    for key in ["size x"] + [f"speedup@{t}" for t in THREADS]:
        if len(near):
            top = near.loc[near[key].idxmax()]
            row[f"best {key}"], row[f"{key} of"] = float(top[key]), f"{top['artifact']} / {top['format']}"
        else:
            row[f"best {key}"], row[f"{key} of"] = float("nan"), "-"
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=40, help="autocompress trials")
    p.add_argument("--rounds", type=int, default=5, help="interleaved latency rounds")
    p.add_argument("--space", default="default", help="autocompress's search space (a name or a YAML path), e.g. "
                                                       "scripts/peers_space.yaml (default + dropping blocks)")
    p.add_argument("--ratios", default="0.3,0.5,0.7", help="Torch-Pruning channel ratios")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of the ResNet-20")
    p.add_argument("--peer-epochs", type=int, default=3, help="fine-tuning epochs of every pruned peer")
    p.add_argument("--out", help="folder for the artifacts (default: a temporary one)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    folder = Path(args.out or tempfile.mkdtemp(prefix="bench_peers_"))
    folder.mkdir(parents=True, exist_ok=True)
    data = digits_loaders()
    model = trained_resnet20(data[0], args.epochs)
    x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
    base_path = folder / "baseline.pt"
    torch.save(model.state_dict(), base_path)
    base_test = accuracy(model, data[2])
    print(f"ResNet-20 (digits, 32 px): test accuracy {base_test:.4f}, state_dict {base_path.stat().st_size:,} bytes, "
          f"{sum(q.numel() for q in model.parameters()):,} parameters; artifacts in {folder}", flush=True)
    errors: list[str] = []
    artifacts = [{"method": "baseline", "artifact": "original", "format": "float (state_dict, eager)",
                  "path": base_path, "runtime": {t: model for t in THREADS}, "test_acc": base_test}]
    print("peer pipeline (Torch-Pruning L2 + BN recalibration + distilled fine-tune + FX int8):", flush=True)
    artifacts += peers(model, x, data, [float(r) for r in args.ratios.split(",")], args.peer_epochs, folder, errors)
    print(f"autocompress ({args.trials} trials, space {args.space}):", flush=True)
    found, _ = autocompress_side(model, x, data, args.trials, args.space, folder, errors)
    artifacts += found
    print(f"latency ({len(artifacts)} artifacts, batch 1, threads {THREADS}, {args.rounds} rounds):", flush=True)
    interleaved_latency(artifacts, x, args.rounds)

    base_bytes = base_path.stat().st_size
    rows = []
    for a in artifacts:
        size = Path(a["path"]).stat().st_size
        row = {"method": a["method"], "artifact": a["artifact"], "format": a["format"], "test acc": a["test_acc"],
               "bytes": size, "size x": base_bytes / size}
        for t in THREADS:
            row[f"ms@{t}"] = a[f"ms@{t}"]
        for t in THREADS:
            row[f"speedup@{t}"] = artifacts[0][f"ms@{t}"] / a[f"ms@{t}"]
        rows.append(row)
    table = pd.DataFrame(rows)
    fmt = lambda v: f"{v:.4g}"  # noqa: E731
    print(f"\nEvery artifact: test accuracy of the loaded file (baseline {base_test:.4f}), bytes on disk, size x = "
          f"baseline state_dict bytes ({base_bytes:,}) / bytes, ms@T = median latency at T threads, speedup@T = "
          f"baseline float eager ms@T / ms@T")
    print(table.to_string(index=False, float_format=fmt))

    summary = pd.DataFrame([best(table, "peer", base_test), best(table, "autocompress", base_test)])
    print(f"\nBest among artifacts within 1 point of the baseline's test accuracy (>= {base_test - 0.01:.4f}):")
    print(summary.to_string(index=False, float_format=fmt))
    peer, ours = summary.iloc[0], summary.iloc[1]
    print("\nFloors (issue 16 item 5): autocompress / peer")
    checks = [("size reduction", "best size x", 2.0)] + [(f"speedup at {t} thread(s)", f"best speedup@{t}", 1.3)
                                                          for t in THREADS]
    for label, key, floor in checks:
        if not peer["artifacts within 1 pt"] or not ours["artifacts within 1 pt"]:
            side = "the peer" if not peer["artifacts within 1 pt"] else "autocompress"
            print(f"  {label}: not comparable, {side} has no artifact within 1 point")
            continue
        ratio = ours[key] / peer[key]
        print(f"  {label}: {ours[key]:.3g} / {peer[key]:.3g} = {ratio:.3g}x (floor {floor}x): "
              f"{'holds' if ratio >= floor else 'DOES NOT HOLD'}")
    if errors:
        print("\nWhat failed:")
        for line in errors:
            print("  " + line)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
