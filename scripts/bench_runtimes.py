"""CPU runtimes side by side: eager PyTorch, torch.ao int8, ONNX Runtime fp32 / QDQ int8, OpenVINO fp32 / int8.

    .venv/bin/python scripts/bench_runtimes.py [--rounds 7] [--repeats 20] \
        [--threads 1,2] [--models digits,resnet18,mobilenet_v2] [--epochs 8]

Needs `nncf` beside the project (`pip install nncf==3.4.*`, not a dependency of autocompress; openvino is).
Issue 16 items 1 and 5: is OpenVINO faster than what the library runs today, and does NNCF install beside
torch 2.14.1.

Models, batch 1: the digits ResNet-20-style CNN (`DigitsResNet(widths=(16, 32, 64), blocks=3)`, 1x1x32x32,
trained as scripts/bench_peers.py trains and caches it), torchvision resnet18 and mobilenet_v2 (weights=None) at
1x3x128x128 with their BatchNorm statistics re-estimated on random inputs (so activations have realistic ranges).

Runtimes (one column each), every one built once per thread count T:
  torch-fp32   the eager module, torch.set_num_threads(T)
  torch-int8   `autocompress.int8.to_int8` (torch.ao FX, x86 engine), torch.set_num_threads(T)
  ort-fp32     `autocompress.cost.ort.onnx_bytes` in an ONNX Runtime session (T intra-op threads)
  ort-int8     `autocompress.cost.ort_int8.qdq_bytes(model, x, calibration, keep_float=())` (QDQ; U8S8 on a
               CPU with VNNI, S8S8 elsewhere: `ort_int8.activation_type`)
  ov-fp32      `openvino.convert_model` of the torch module, reshaped to static batch 1, compiled for CPU with
               INFERENCE_NUM_THREADS=T, PERFORMANCE_HINT=LATENCY (also OpenVINO's default) and
               INFERENCE_PRECISION_HINT=f32 (on a CPU with avx512_bf16 OpenVINO's default precision is bf16)
  ov-default   the same with OpenVINO's default precision (bf16 here): what a user gets without the f32 hint
  ov-int8      `nncf.quantize` (post-training, default preset) of the OpenVINO model on the calibration
               inputs, one sample per item, compiled as ov-fp32 (f32 for whatever is left float)
  ov-qdq       the openvino-int8 runtime: ort-int8's QDQ file compiled by OpenVINO (`autocompress.cost.ov.OvModule`,
               static batch 1, f32 for what is left float)
Calibration (every int8 path the same inputs): 8 training batches of 64 digits; 4 random batches of 8 for the
torchvision models.

Latency: interleaved rounds; each round times every (model, runtime, T) entry once in a shuffled order
(`autocompress.cost.measure.measure_latency_ms`: median of `--repeats` calls after 5 warm-up calls, wall clock);
the table shows the median over rounds in ms. Sessions are wrapped as nn.Modules that take a tensor and give a
tensor back (like `autocompress.cost.ort.OrtModule`), so every column pays the same numpy round trip.

Accuracy: the digits model's held-out test accuracy in every runtime (fp32 and int8 alike), so that an int8
path that saturates shows; for the torchvision models (random weights) the agreement of each runtime's top-1 with
eager fp32 on 64 random inputs is printed instead, with the relative L2 error of the logits (near-tied random
logits make the agreement a coarse measure).
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
import traceback
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))

from autocompress.cost.measure import measure_latency_ms  # noqa: E402
from autocompress.cost.ort import OrtModule, onnx_bytes  # noqa: E402
from autocompress.cost import ov as ov_runtime  # noqa: E402
from autocompress.cost.ort_int8 import qdq_bytes  # noqa: E402
from autocompress.data import digits_loaders  # noqa: E402
from autocompress.evaluate import accuracy, fixed_batches  # noqa: E402
from autocompress.int8 import to_int8  # noqa: E402

RUNTIMES = ("torch-fp32", "torch-int8", "ort-fp32", "ort-int8", "ov-fp32", "ov-default", "ov-int8", "ov-qdq")


class OvModule(nn.Module):
    """An OpenVINO compiled model behind the nn.Module call convention (a tensor in, the first output back as a
    tensor), like OrtModule: one infer request, reused."""

    def __init__(self, compiled):
        super().__init__()
        self.compiled = compiled
        self.request = compiled.create_infer_request()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.request.infer({0: x.detach().cpu().numpy()})
        return torch.from_numpy(self.request.get_output_tensor(0).data.copy())


def ov_compile(model, shape, threads: int, precision: str | None):
    """`model` (an openvino.Model) reshaped to the static `shape` and compiled for the CPU with `threads`
    inference threads and the latency hint; `precision` None keeps OpenVINO's default inference precision."""
    import openvino as ov

    model = model.clone()
    model.reshape({0: list(shape)})
    config = {"INFERENCE_NUM_THREADS": threads, "PERFORMANCE_HINT": "LATENCY"}
    if precision:
        config["INFERENCE_PRECISION_HINT"] = precision
    return ov.Core().compile_model(model, "CPU", config)


def ov_model(model: nn.Module, x: torch.Tensor):
    """The torch module as an openvino.Model (batch dynamic), converted from the module itself, or from its ONNX
    file when that fails; and which it was."""
    import openvino as ov

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            return ov.convert_model(copy.deepcopy(model).eval(), example_input=x), "torch"
        except Exception as exc:  # noqa: BLE001 -- fall back, said in the output
            print(f"    openvino.convert_model(torch module) failed ({type(exc).__name__}: {exc}); from ONNX instead")
            path = Path(os.environ.get("TMPDIR", "/tmp")) / f"bench_runtimes_{os.getpid()}.onnx"
            path.write_bytes(onnx_bytes(model.eval(), x))
            try:
                return ov.convert_model(str(path)), "onnx"
            finally:
                path.unlink()


def nncf_int8(model, calibration: list[torch.Tensor]):
    """NNCF's post-training int8 quantization of an openvino.Model on the calibration inputs (one sample an item,
    every sample used)."""
    import nncf

    samples = [s.unsqueeze(0).numpy() for batch in calibration for s in batch]
    return nncf.quantize(model, nncf.Dataset(samples), subset_size=len(samples))


def trained_digits(train, epochs: int) -> nn.Module:
    from bench_peers import trained_resnet20  # the same seeded, cached model as the peer benchmark

    return trained_resnet20(train, epochs)


def torchvision_model(name: str, x: torch.Tensor, calibration: list[torch.Tensor]) -> nn.Module:
    import torchvision

    torch.manual_seed(0)
    model = getattr(torchvision.models, name)(weights=None)
    for m in model.modules():  # BatchNorm statistics of these inputs: activations in realistic ranges
        if isinstance(m, nn.BatchNorm2d):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    with torch.no_grad():
        for batch in calibration:
            model(batch)
    return model.eval()


def build(name: str, model: nn.Module, x: torch.Tensor, calibration, threads, errors: list) -> dict:
    """{runtime: {T: module}} for every runtime that builds; what fails goes to `errors`."""
    entries: dict[str, dict[int, nn.Module]] = {"torch-fp32": {t: model for t in threads}}

    def attempt(runtime, make):
        start = time.perf_counter()
        try:
            entries[runtime] = make()
            print(f"    {runtime}: built in {time.perf_counter() - start:.1f} s", flush=True)
        except Exception as exc:  # noqa: BLE001 -- reported, the rest goes on
            errors.append(f"{name} {runtime}: {type(exc).__name__}: {exc}")
            print(f"    {runtime}: FAILED {type(exc).__name__}: {exc}", flush=True)
            traceback.print_exc(limit=3)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")

        def torch_int8():
            q = to_int8(copy.deepcopy(model), x, calibration)
            return {t: q for t in threads}

        attempt("torch-int8", torch_int8)
        float_file = onnx_bytes(model.eval(), x)
        attempt("ort-fp32", lambda: {t: OrtModule(float_file, t) for t in threads})

        def ort_int8():
            data = qdq_bytes(model, x, calibration, keep_float=())
            return {t: OrtModule(data, t) for t in threads}

        attempt("ort-int8", ort_int8)
        converted = {}

        def ov_f32():
            converted["fp32"], source = ov_model(model, x)
            print(f"    openvino model converted from the {source} module", flush=True)
            return {t: OvModule(ov_compile(converted["fp32"], x.shape, t, "f32")) for t in threads}

        attempt("ov-fp32", ov_f32)
        if "fp32" in converted:
            attempt("ov-default", lambda: {t: OvModule(ov_compile(converted["fp32"], x.shape, t, None))
                                           for t in threads})
            entries_default = entries.get("ov-default")
            if entries_default:
                precision = entries_default[threads[0]].compiled.get_property("INFERENCE_PRECISION_HINT")
                print(f"    ov-default inference precision: {precision}", flush=True)

            def ov_int8():
                q = nncf_int8(converted["fp32"], calibration)
                return {t: OvModule(ov_compile(q, x.shape, t, "f32")) for t in threads}

            attempt("ov-int8", ov_int8)

        def ov_qdq():  # the openvino-int8 runtime: ONNX Runtime's QDQ file (ort-int8's) compiled by OpenVINO
            data = qdq_bytes(model, x, calibration, keep_float=())
            return {t: ov_runtime.OvModule(data, t) for t in threads}

        attempt("ov-qdq", ov_qdq)
    return entries


def per_sample(module: nn.Module):
    """A batch-1 module (OpenVINO compiled for static batch 1) applied to a batch one sample at a time."""
    return lambda xb: torch.cat([module(xb[i:i + 1]) for i in range(len(xb))])


class _Fn(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn(x)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    p.add_argument("--repeats", type=int, default=20, help="timed calls per entry per round (median)")
    p.add_argument("--threads", default="1,2")
    p.add_argument("--models", default="digits,resnet18,mobilenet_v2")
    p.add_argument("--epochs", type=int, default=8, help="training epochs of the digits model (bench_peers' cache)")
    args = p.parse_args()
    warnings.filterwarnings("ignore")
    start = time.perf_counter()
    threads = tuple(int(t) for t in args.threads.split(","))
    import openvino
    import nncf

    print(f"torch {torch.__version__}, onnxruntime {__import__('onnxruntime').__version__}, openvino "
          f"{openvino.__version__}, nncf {nncf.__version__}; torch CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}; {os.cpu_count()} CPUs", flush=True)
    errors: list[str] = []
    models, accuracies, errors_rel = {}, {}, {}
    for name in args.models.split(","):
        print(f"{name}:", flush=True)
        if name == "digits":
            train, _, test = digits_loaders()
            model = trained_digits(train, args.epochs)
            x = torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))
            calibration = fixed_batches(train, 8)
        else:
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, 3, 128, 128, generator=gen)
            calibration = [torch.randn(8, 3, 128, 128, generator=gen) for _ in range(4)]
            model = torchvision_model(name, x, calibration)
            test = None
        entries = build(name, model, x, calibration, threads, errors)
        models[name] = (x, entries)
        acc = {}
        with torch.no_grad():
            if test is not None:
                for runtime, by_t in entries.items():
                    module = by_t[threads[0]]
                    acc[runtime] = accuracy(_Fn(per_sample(module)) if runtime.startswith("ov") else module, test)
            else:
                probe = torch.randn(64, *x.shape[1:], generator=torch.Generator().manual_seed(1))
                ref = model(probe)
                err = {}
                for runtime, by_t in entries.items():
                    out = per_sample(by_t[threads[0]])(probe)
                    acc[runtime] = (out.argmax(1) == ref.argmax(1)).float().mean().item()
                    err[runtime] = ((out - ref).norm() / ref.norm()).item()
                errors_rel[name] = err
                print("    relative L2 error of the logits: " + ", ".join(f"{r} {e:.4f}" for r, e in err.items()))
        accuracies[name] = acc
        print("    " + ", ".join(f"{r} {a:.4f}" for r, a in acc.items()), flush=True)

    keys = [(m, r, t) for m, (_, entries) in models.items() for r in entries for t in threads]
    times = {k: [] for k in keys}
    print(f"latency: {len(keys)} entries, {args.rounds} rounds of {args.repeats} calls "
          f"(setup took {time.perf_counter() - start:.0f} s)", flush=True)
    for r in range(args.rounds):
        order = list(keys)
        random.Random(r).shuffle(order)
        for m, rt, t in order:
            x, entries = models[m]
            times[(m, rt, t)].append(measure_latency_ms(entries[rt][t], x, repeats=args.repeats, warmup=5, threads=t))
        print(f"  round {r + 1}/{args.rounds} done ({time.perf_counter() - start:.0f} s)", flush=True)

    print(f"\nBatch-1 latency, ms (median over {args.rounds} interleaved rounds of the median of {args.repeats} "
          f"calls); * = fastest in the row")
    header = f"{'model':<13}{'threads':>8}" + "".join(f"{r:>12}" for r in RUNTIMES)
    print(header)
    for m, (_, entries) in models.items():
        for t in threads:
            row = {r: statistics.median(times[(m, r, t)]) for r in entries}
            fastest = min(row, key=row.get)
            cells = "".join(f"{(f'{row[r]:.3f}' + ('*' if r == fastest else ' ')) if r in row else '-':>12}"
                            for r in RUNTIMES)
            print(f"{m:<13}{t:>8}" + cells)
    print("\nSpread: max/min over rounds of each entry's median (noise of the shared machine)")
    for m, (_, entries) in models.items():
        for t in threads:
            cells = "".join(f"{max(times[(m, r, t)]) / min(times[(m, r, t)]):>12.2f}" if r in entries else f"{'-':>12}"
                            for r in RUNTIMES)
            print(f"{m:<13}{t:>8}" + cells)
    print("\nAccuracy: digits = held-out test accuracy; torchvision (random weights) = top-1 agreement with eager "
          "fp32 on 64 random inputs")
    print(f"{'model':<21}" + "".join(f"{r:>12}" for r in RUNTIMES))
    for m, acc in accuracies.items():
        print(f"{m:<21}" + "".join(f"{acc[r]:>12.4f}" if r in acc else f"{'-':>12}" for r in RUNTIMES))
    if errors_rel:
        print("\nRelative L2 error of the logits against eager fp32 (torchvision models, the same 64 random inputs)")
        print(f"{'model':<21}" + "".join(f"{r:>12}" for r in RUNTIMES))
        for m, err in errors_rel.items():
            print(f"{m:<21}" + "".join(f"{err[r]:>12.4f}" if r in err else f"{'-':>12}" for r in RUNTIMES))
    if errors:
        print("\nWhat failed:")
        for line in errors:
            print("  " + line)
    print(f"\nwall time {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
