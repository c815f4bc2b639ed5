"""The command line: autocompress run | worker | report | export | estimate | hardware | calibrate."""
from __future__ import annotations

import argparse
import datetime
import sys
import time
from pathlib import Path

from . import api, export, models, report
from .budgets import Budgets
from .cost import hardware
from .cost.calibrate import busy_reason, calibrate, calibrate_host, quality_line, write_profile
from .cost.profiles import builtin_profiles, default_threads
from .cost.runtimes import RUNTIMES
from .data import load_data
from .errors import AutocompressError
from .result import Result
from .search import WORKER
from .search.storage import hide_password

DEFAULT_BUDGETS = ["latency=60%", "size=30%"]


def _run(args) -> int:
    _check_counts(args, "trials", "finetune_steps", "final_epochs")
    start = time.perf_counter()
    model = models.load_model(args.model, args.checkpoint)
    example = _example_input(args, model)
    data_spec = args.data or ("digits" if args.model == "digits_resnet" else None)
    loaders = load_data(data_spec, tuple(example.shape)) if data_spec else None
    budgets = Budgets.parse(args.budget if args.budget else DEFAULT_BUDGETS)
    out = Path(args.out or f"runs/{datetime.datetime.now():%Y%m%d-%H%M%S}")
    out.mkdir(parents=True, exist_ok=True)
    storage = args.storage or f"sqlite:///{out / 'study.db'}"
    objectives = args.objectives.split(",") if args.objectives else _default_objectives(budgets, loaders)
    spec = {"model_spec": args.model, "checkpoint": args.checkpoint, "data": data_spec}
    print(f"model {args.model}, data {data_spec or 'none (cost-only)'}, hardware {args.hardware}, "
          f"space {args.space}, {args.trials} trials -> {out}", file=sys.stderr)
    profile = (hardware.load_profile(args.hardware, threads=args.threads, runtime=args.runtime)
               if args.threads or args.runtime else args.hardware)
    result = api.compress(model, example, data=loaders, hardware=profile, budgets=budgets,
                          objectives=objectives, space=args.space, trials=args.trials, seed=args.seed,
                          sampler=args.sampler, storage=storage, study_name=args.study,
                          progress=not args.no_progress, model_spec=spec, repair=not args.no_repair,
                          finetune_steps=args.finetune_steps, final_epochs=args.final_epochs,
                          weights=args.weights, measure=args.measure)
    if args.trials == 0:  # the study alone, for workers to fill
        _print_joining(storage, args.study, result)
        return 0
    result.save(out)
    print(report.format_table(result))
    print(f"\nwrote {out}/ (study.db, trials.csv, pareto.csv, config.json, models/) in {time.perf_counter() - start:.1f} s")
    return INTERRUPTED if result.interrupted else 0


def _default_objectives(budgets, loaders) -> list[str] | None:
    """With data: accuracy and every budgeted cost (a user who limits latency and size trades off both);
    otherwise None, the API's default."""
    costs = list(budgets.cost_metrics())
    return ["accuracy", *costs] if loaders is not None and costs else None


def _worker(args) -> int:
    _check_counts(args, "trials")
    start = time.perf_counter()
    print(f"worker {WORKER}: joining study {args.study!r} in {_shown(args.storage)}, adding {args.trials} trials "
          f"to its target", file=sys.stderr)
    result = api.work(args.storage, args.study, args.trials, progress=not args.no_progress, weights=args.weights)
    print(report.format_table(result))
    print(f"\nworker {WORKER} done in {time.perf_counter() - start:.1f} s: the study holds "
          f"{int((result.trials['state'] == 'COMPLETE').sum())} completed trials; see them again with "
          f"`autocompress report --storage {_shown(args.storage)} --study {args.study}`")
    return INTERRUPTED if result.interrupted else 0


def _check_counts(args, *names: str) -> None:
    for name in names:
        if getattr(args, name) < 0:
            raise AutocompressError(f"--{name.replace('_', '-')} {getattr(args, name)} is not allowed; it must be 0 "
                                    f"or more")


def _print_joining(storage: str, study: str, result) -> None:
    print(f"study {study!r} is ready in {_shown(storage)} ({len(result.trials)} trials so far); "
          f"add workers, on this machine or others, with\n"
          f"  autocompress worker --storage {_shown(storage)} --study {study} --trials N")


def _shown(storage: str) -> str:
    return hide_password(storage)


def _example_input(args, model):
    import torch

    if args.input_shape:
        try:
            shape = tuple(int(v) for v in args.input_shape.split(","))
        except ValueError:
            raise AutocompressError(f"--input-shape {args.input_shape!r} must be integers like 1,3,224,224") from None
        return torch.randn(shape, generator=torch.Generator().manual_seed(0))
    torch.manual_seed(0)
    return models.default_input(args.model, model)


def _report(args) -> None:
    # tables and plots need no model, so no code the run records is called; timing the front does need it
    result = _load_result(args, build=args.measure)
    if args.measure:
        print(f"timing the {len(result.pareto)} front model(s) and the original on this machine", file=sys.stderr)
        result.measure()
    text = result.report(args.format, args.to, args.trial)
    if args.to:
        print(f"wrote {args.to} ({args.format}, {len(text.encode()) / 1024:,.1f} KB)")
    else:
        print(text)


def _export(args) -> None:
    result = _load_result(args, build=True)
    data = None
    if args.data:
        data = load_data(args.data, tuple(result.config.get("input_shape") or ()) or None)
    print(result.export(args.trial, args.format, args.to, data).summary())


def _load_result(args, build: bool):
    """A run folder, or a study in an Optuna storage (--storage URL --study NAME). The model is --model's;
    else, with `build`, the one the run recorded (its factory named on stderr before it is called)."""
    base = models.load_model(args.model) if args.model else None
    if args.dir:
        return Result.load(args.dir, model=base, build_model=build, study=args.study)
    if not args.storage:
        raise AutocompressError(f"{args.command} needs a run folder (DIR) or --storage URL with --study NAME")
    return Result.read(args.storage, args.study or "autocompress", model=base, build_model=build)


def _estimate(args) -> None:
    import pandas as pd

    model = models.load_model(args.model, args.checkpoint)
    est = api.estimate(model, _example_input(args, model), args.hardware, threads=args.threads, runtime=args.runtime)
    table = est.layers.drop(columns=["out_shape", "type"])
    table["bits"] = [f"{w}/{a}" for w, a in zip(table.pop("weight_bits"), table.pop("act_bits"))]
    with pd.option_context("display.max_rows", None, "display.width", 250, "display.max_colwidth", 40):
        print(table[["kind", "macs", "params", "bits", "dtype", "bytes", "bound", "latency_ms", "energy_mj",
                     "fused_into"]].to_string(float_format=lambda v: f"{v:.4g}"))
    where = f"{est.hardware} ({est.runtime}) at {est.threads} threads" if est.threads else est.hardware
    print(f"\ntotal on {where}: latency {est.latency_ms:.4g} ms, energy {est.energy_mj:.4g} mJ, "
          f"size {est.size_kb:.4g} KB, peak activation memory {est.peak_mem_kb:.4g} KB, {est.macs:,} MACs, "
          f"{est.params:,} parameters ({int((est.layers['latency_ms'] > 0).sum())} kernels, "
          f"{int((est.layers['bound'] == 'compute').sum())} compute-bound)")


def _hardware(args) -> None:
    if args.action == "list":
        for name in builtin_profiles():
            desc = "this machine (calibrated on first use)" if name == "host" else hardware.load_profile(name).description
            print(f"{name:20s} {desc}")
    else:
        if not args.name:
            raise AutocompressError("hardware show needs a profile name or path, e.g. `autocompress hardware show host`")
        print(hardware.profile_text(args.name), end="")


def _calibrate(args) -> None:
    threads = default_threads() if args.threads is None else args.threads
    if threads < 1:
        raise AutocompressError(f"--threads {args.threads} is not allowed; it must be 1 or more")
    device = "cuda" if args.hardware == "host-cuda" else args.device
    cached = args.hardware in ("host", "host-cuda")
    if not cached and not args.to:
        raise AutocompressError(f"calibrating {args.hardware!r}: only host and host-cuda are saved by name; "
                                "pass --to FILE")
    if cached and not args.to:
        path = hardware.host_profile_path(device, threads, args.runtime)
        profile, kept = calibrate_host(path, quick=args.quick, threads=threads, force=args.force, device=device,
                                       clock=args.clock, runtime=args.runtime)
    else:
        path, kept = Path(args.to), ""
        profile = calibrate(args.hardware, quick=args.quick, device=device, threads=threads, clock=args.clock,
                            runtime=args.runtime, progress=True)
        write_profile(profile, path)
    busy = busy_reason(profile) if profile is not None else ""
    if kept:
        print(f"the machine is busy ({kept}): kept the previous profile {path}; calibrate again when it is idle, "
              "or pass --force to overwrite it")
    elif busy:
        print(f"wrote {path} on a busy machine ({busy}); calibrate again when it is idle: {quality_line(profile)}")
    else:
        print(f"wrote {path}: {quality_line(profile)}")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="autocompress", description=__doc__)
    sub = p.add_subparsers(dest="command")

    def model_args(sp, default_model="digits_resnet"):
        sp.add_argument("--model", default=default_model, help="built-in name, torchvision:NAME or package.module:factory")
        sp.add_argument("--checkpoint", help="a state_dict file (loaded with weights_only=True)")
        sp.add_argument("--input-shape", help="example input shape, e.g. 1,3,224,224")
        sp.add_argument("--hardware", default="host", help="profile name (see `hardware list`) or a YAML path")

    def threads_arg(sp):
        sp.add_argument("--threads", type=int, help="torch threads the model will run with (default: torch's count "
                                                    "for host, a calibrated profile's own; another count than a "
                                                    "calibrated profile's is refused)")
        sp.add_argument("--runtime", choices=RUNTIMES, help="what runs the model: torch (eager PyTorch), "
                                                            "torch-int8 (torch.ao int8 kernels for 8-bit layers), "
                                                            "onnxruntime or onnxruntime-int8 (its QDQ int8 kernels for "
                                                            "8-bit layers), openvino or openvino-int8 (the same ONNX "
                                                            "files compiled by OpenVINO) (default: host's torch, a "
                                                            "profile's own; "
                                                            "another runtime than a profile's is refused)")

    run = sub.add_parser("run", help="search compressed models within budgets")
    model_args(run)
    threads_arg(run)
    run.add_argument("--data", help="digits, fake, imagefolder:PATH or package.module:function")
    run.add_argument("--budget", action="append", help="KEY=VALUE, repeatable: latency_ms=2, size_kb=300, latency=50%%, "
                                                       "accuracy_drop=1 (points below the original), accuracy=0.98")
    run.add_argument("--objectives", help="comma-separated metrics, e.g. accuracy,latency_ms (default with data: "
                                          "accuracy and every budgeted cost, accuracy,latency_ms,size_kb for the "
                                          "default budgets)")
    run.add_argument("--space", default="default", help="a built-in search space name or a YAML path")
    run.add_argument("--trials", type=int, default=60)
    run.add_argument("--seed", type=int, default=0)
    run.add_argument("--sampler", default="tpe",
                     help="tpe (multivariate; the default, best in scripts/bench_search.py), nsga2 or random")
    run.add_argument("--storage", help="where the study lives (default: sqlite in --out): sqlite:///PATH.db, "
                                       "journal:PATH (processes on one machine), postgresql://... or mysql://... "
                                       "(many machines); with --trials 0 only creates the study, for workers")
    run.add_argument("--study", default="autocompress", help="study name inside the storage")
    run.add_argument("--finetune-steps", type=int, default=90,
                     help="the most steps a candidate is fine-tuned in the search, distilling from the original "
                          "model, in multi-fidelity rungs (90: every candidate BatchNorm recalibration alone, the "
                          "promising third 10 steps, the best of those 30, then 90); 0: BatchNorm recalibration only "
                          "(needs data)")
    run.add_argument("--final-epochs", type=int, default=3,
                     help="passes over the training data that fine-tune every front model after the search "
                          "(0: none); the front then reports the delivered models")
    run.add_argument("--weights", help="folder for the judged weights of trials (default: beside the study file); "
                                       "with a database storage, a folder every worker can reach")
    run.add_argument("--measure", action="store_true", help="time every delivered front model (and the original) on "
                                                            "this machine: measured_latency_ms beside latency_ms")
    run.add_argument("--no-repair", action="store_true", help="evaluate sampled policies as sampled: do not scale "
                                                              "those over budget toward the budget first")
    run.add_argument("--out", help="output folder (default runs/<timestamp>); the same folder resumes")
    run.add_argument("--no-progress", action="store_true")
    run.set_defaults(func=_run)

    wk = sub.add_parser("worker", help="join a study in a shared storage and evaluate more of its trials")
    wk.add_argument("--storage", required=True, help="the study's storage: journal:PATH, postgresql://..., "
                                                     "mysql://... or sqlite:///PATH.db")
    wk.add_argument("--study", default="autocompress", help="study name inside the storage")
    wk.add_argument("--trials", type=int, default=10, help="trials this worker adds to the study's target; it works "
                                                           "until the whole target is met, retrying lost trials")
    wk.add_argument("--weights", help="folder for the judged weights of trials (default: the one the study names)")
    wk.add_argument("--no-progress", action="store_true")
    wk.set_defaults(func=_worker)

    def source_args(sp):
        sp.add_argument("dir", nargs="?", help="a run folder (written by `run` or Result.save)")
        sp.add_argument("--storage", help="read the study from this Optuna storage URL instead of a folder")
        sp.add_argument("--study", help="study name inside --storage (default autocompress) or DIR/study.db "
                                        "(default: its only study)")
        sp.add_argument("--model", help="the uncompressed architecture (built-in name, torchvision:NAME or "
                                        "package.module:factory); default: for export, the one the run recorded, "
                                        "for report none (the HTML per-layer costs need it)")

    rep = sub.add_parser("report", help="show a run's Pareto front (table, CSV, JSON or an HTML page)")
    source_args(rep)
    rep.add_argument("--format", default="table", choices=["table", "csv", "json", "html"])
    rep.add_argument("--to", help="write to this file instead of stdout")
    rep.add_argument("--trial", type=int, help="the model whose per-layer costs the HTML report shows "
                                               "(default: the first Pareto model)")
    rep.add_argument("--measure", action="store_true", help="time every front model (and the original) on this "
                                                            "machine: measured_latency_ms beside latency_ms")
    rep.set_defaults(func=_report)

    exp = sub.add_parser("export", help="write one trial's compressed model to a file and check its accuracy")
    source_args(exp)
    exp.add_argument("--trial", type=int, required=True, help="trial number (see `report`)")
    exp.add_argument("--format", default="state_dict", choices=export.FORMATS,
                     help="state_dict, torchscript, onnx (float); torch-int8 (torch.ao x86 int8 as TorchScript) or "
                          "onnx-int8 (ONNX Runtime QDQ int8), openvino or openvino-int8 (OpenVINO IR, .xml with "
                          "its .bin): files that run without autocompress; packed (every "
                          "weight at its bit-width; autocompress.load_packed reads it)")
    exp.add_argument("--to", help="output file (default trial_N.pt, .ts.pt, .onnx, .int8.ts.pt, .int8.onnx, .xml, "
                                  ".int8.xml or .acpk)")
    exp.add_argument("--data", help="data for BatchNorm statistics and the accuracy check (default: the run's), "
                                    "e.g. digits, imagefolder:PATH or package.module:function")
    exp.set_defaults(func=_export)

    est = sub.add_parser("estimate", help="per-layer cost of a model on a device (latency, energy, size, memory)")
    model_args(est)
    threads_arg(est)
    est.set_defaults(func=_estimate)

    hw = sub.add_parser("hardware", help="list hardware profiles, or show one with the sources of its numbers")
    hw.add_argument("action", choices=["list", "show"])
    hw.add_argument("name", nargs="?", help="a profile name (see `hardware list`) or a YAML path")
    hw.set_defaults(func=_hardware)

    cal = sub.add_parser("calibrate", help="time this machine and write a hardware profile")
    cal.add_argument("--hardware", default="host", help="host (this CPU), host-cuda (this GPU), or a name for --to")
    cal.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="time on the CPU or the CUDA GPU")
    cal.add_argument("--to", help="profile YAML to write (default: the cached host profile)")
    cal.add_argument("--quick", action="store_true", help="fewer networks and repeats (what first use runs)")
    cal.add_argument("--threads", type=int, help="torch threads to time with (CPU; default: torch's count, the one "
                                                 "a model runs with when nobody sets it)")
    cal.add_argument("--runtime", choices=RUNTIMES, default="torch",
                     help="the runtime whose kernels are timed: torch (eager PyTorch), torch-int8 (eager PyTorch "
                          "with torch.ao's x86 int8 kernels, timed in int8 and float, and their conversions), "
                          "onnxruntime (the kernels exported to ONNX and run by ONNX Runtime's CPU sessions) or "
                          "onnxruntime-int8 (the same, quantized by ONNX Runtime's QDQ flow, timed in int8 and "
                          "float, and its QuantizeLinear / DequantizeLinear), openvino or openvino-int8 (the same "
                          "files compiled by OpenVINO for the CPU)")
    cal.add_argument("--force", action="store_true", help="overwrite the host profile even when the machine is busy")
    cal.add_argument("--clock", choices=["wall", "cpu"], help="elapsed time, or the timing thread's CPU time "
                                                             "(default: cpu with one thread on the CPU, else wall)")
    cal.set_defaults(func=_calibrate)
    return p


INTERRUPTED = 130  # the shell's code for a process ended by Ctrl-C (128 + SIGINT): not a finished run


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns its exit code: 0 done, 2 bad input (one sentence on stderr, passwords hidden),
    130 interrupted (what was computed is kept)."""
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    args = parser().parse_args(argv)
    if args.command is None:  # `autocompress` alone: the embedded default run
        args = parser().parse_args(["run", *(argv or [])])
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning
            return args.func(args) or 0
    except AutocompressError as exc:
        print(f"error: {hide_password(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return INTERRUPTED


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """Warnings as the shell shows them: one sentence, no source location, passwords hidden."""
    print(f"warning: {hide_password(str(message))}", file=sys.stderr)


if __name__ == "__main__":
    sys.exit(main())
