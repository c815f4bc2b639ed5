"""Hostile input against every entry point: each bad value gets one sentence naming it and what is allowed, exit
code 2 (AutocompressError in Python), no traceback, no password, and the run folder it points at is left
byte-identical. Plus Ctrl-C (exit 130), a resume waiting on a lost trial, and a model whose channel dependencies
Torch-Pruning cannot finish following."""
import hashlib
import subprocess
import sys
import tomllib
from pathlib import Path

import optuna
import pytest
import torch
import yaml

import worker_problem

import autocompress as ac
from autocompress import search
from autocompress.cli import main
from autocompress.search.storage import hide_password, open_storage

TESTS = Path(__file__).resolve().parent
TINY = ["--model", "worker_problem:tiny_model", "--input-shape", "1,1,32,32"]
PROFILE = TESTS.parent / "autocompress" / "cost" / "profiles" / "raspberry-pi-4.yaml"
TWO_POLICIES = "techniques:\n  prune:\n    keep: [0.5, 1.0]\n    granularity: global\n"
SECRET = "s3cr3t"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """A finished cost-only run of the tiny model whose space holds two policies: trials 0 and 1 are evaluated,
    every later trial is a PRUNED duplicate of one of them."""
    root = tmp_path_factory.mktemp("hostile")
    (root / "two.yaml").write_text(TWO_POLICIES)
    out = root / "run"
    code = main(["run", *TINY, "--space", str(root / "two.yaml"), "--trials", "4", "--budget", "size=200%",
                 "--no-progress", "--out", str(out)])
    assert code == 0
    return out


def snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def cli(argv: list[str], capsys) -> tuple[int, str]:
    """Exit code and everything printed, as the shell would see them (argparse exits by SystemExit)."""
    try:
        code = main(argv)
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def write_yaml(path: Path, data) -> str:
    path.write_text(yaml.safe_dump(data))
    return str(path)


def bad_profile(tmp: Path, field: str, value) -> str:
    data = yaml.safe_load(PROFILE.read_text())
    if value is KeyError:
        del data[field]
    else:
        data[field] = value
    return write_yaml(tmp / f"bad_{field}.yaml", data)


def other_checkpoint(tmp: Path) -> str:
    torch.save(torch.nn.Sequential(torch.nn.Linear(3, 4)).state_dict(), tmp / "other.pt")
    return str(tmp / "other.pt")


def space_file(tmp: Path, text: str) -> str:
    (tmp / "space.yaml").write_text("techniques:\n  " + text + "\n")
    return str(tmp / "space.yaml")


def garbage(path: Path) -> Path:
    path.write_bytes(b"garbage" * 100)
    return path


def empty_dir(tmp: Path) -> str:
    (tmp / "empty").mkdir(exist_ok=True)
    return str(tmp / "empty")


def run_copy(F: Path, T: Path, spec: str | None = None, study: bool = True, **files: bytes) -> str:
    """A copy of the run folder F in T: with its recorded model spec replaced by `spec` (in its study and its
    config.json), without study.db unless `study`, and with `files` (trials_csv=... for trials.csv) written over."""
    import json
    import shutil

    copy = T / "copy"
    shutil.copytree(F, copy)
    if spec is not None:
        stored = optuna.load_study(study_name="autocompress", storage=f"sqlite:///{copy}/study.db")
        stored.set_user_attr("config", {**stored.user_attrs["config"], "model_spec": spec})
        config = json.loads((copy / "config.json").read_text())
        (copy / "config.json").write_text(json.dumps({**config, "model_spec": spec}))
    if not study:
        (copy / "study.db").unlink()
    for name, data in files.items():
        (copy / ".".join(name.rsplit("_", 1))).write_bytes(data)
    return str(copy)


def copy_storage(F: Path, T: Path, spec: str) -> str:
    """The study of a copy of F whose recorded model spec is `spec`, as a storage URL."""
    return f"sqlite:///{run_copy(F, T, spec)}/study.db"


def truncated(path: Path) -> bytes:
    """The first half of the file, cut inside a line (half the bytes can end exactly at a line's end, depending on
    the numbers a calibration gave)."""
    data = path.read_bytes()
    cut = len(data) // 2
    return data[:cut - 1] if data[cut - 1:cut] == b"\n" else data[:cut]


# (id, argv given the run folder F and a scratch folder T, what the last line must say: one text, or several)
RUN = lambda *args: lambda F, T: ["run", *TINY, "--no-progress", "--out", str(F), *args]  # noqa: E731
CASES = [
    # run: trial counts and budgets of every wrong type
    ("trials-text", RUN("--trials", "x"), "invalid int value: 'x'"),
    ("trials-float", RUN("--trials", "1.5"), "invalid int value: '1.5'"),
    ("trials-negative", RUN("--trials", "-1"), "--trials -1 is not allowed; it must be 0 or more"),
    ("budget-text", RUN("--budget", "latency=abc"), "budget 'latency=abc' has a value that is not a number"),
    ("budget-negative", RUN("--budget", "latency=-5%"), "budget latency=-0.05 is not allowed"),
    ("budget-inf", RUN("--budget", "size_kb=inf"), "budget size_kb=inf is not allowed; a budget must be a number"),
    ("budget-nan", RUN("--budget", "size_kb=nan"), "budget size_kb=nan is not allowed"),
    ("budget-percent-absolute", RUN("--budget", "size_kb=5%"), "percentages are for relative budgets"),
    ("budget-unknown", RUN("--budget", "speed=3"),
     "unknown budget 'speed'; allowed: accuracy, accuracy_drop, energy, energy_mj, latency, latency_ms, macs, params, "
     "peak_mem, peak_mem_kb, size, size_kb"),
    ("budget-no-value", RUN("--budget", "latency"), "must look like KEY=VALUE"),
    # run: spaces with a field wrong in turn
    ("space-keep-list", lambda F, T: RUN("--space", space_file(T, "prune:\n    keep: [0.5, 1.0, 1.7]"))(F, T),
     "prune.keep choice 1.7 is not allowed; allowed: numbers above 0 up to 1"),
    ("space-keep-range", lambda F, T: RUN("--space", space_file(T, "prune:\n    keep: {low: 0.25, high: 1.7}"))(F, T),
     "prune.keep choice 1.7 is not allowed; allowed: numbers above 0 up to 1"),
    ("space-step", lambda F, T: RUN("--space", space_file(T, "prune:\n    keep: {low: 0.25, high: 1, step: 0.3}"))(F, T),
     "prune.keep step=0.3 is not allowed; it must be a positive number that divides high - low = 0.75"),
    ("space-round-to", lambda F, T: RUN("--space", space_file(T, "prune:\n    round_to: eight"))(F, T),
     "prune.round_to = 'eight' is not allowed; allowed: whole numbers above 0"),
    ("space-bits", lambda F, T: RUN("--space", space_file(T, "quantize:\n    weight_bits: [3, 8]"))(F, T),
     "quantize.weight_bits choice 3 is not allowed; allowed: 1, 2, 4, 8, 16, 32"),
    ("space-act-bits", lambda F, T: RUN("--space", space_file(T, "quantize:\n    act_bits: [64]"))(F, T),
     "quantize.act_bits choice 64 is not allowed; allowed: 1, 2, 4, 8, 16, 32"),
    ("space-share", lambda F, T: RUN("--space", space_file(T, "share:\n    bits: [2.5, 8]"))(F, T),
     "share.bits choice 2.5 is not allowed; allowed: whole numbers above 0 up to 16, or 32"),
    ("space-density", lambda F, T: RUN("--space", space_file(T, "sparsity:\n    density: [0, 0.5]"))(F, T),
     "sparsity.density choice 0 is not allowed; allowed: numbers above 0 up to 1"),
    ("space-rank", lambda F, T: RUN("--space", space_file(T, "lowrank:\n    rank: [1.5]"))(F, T),
     "lowrank.rank choice 1.5 is not allowed"),
    ("space-primary", lambda F, T: RUN("--space", space_file(T, "ghost:\n    primary: [2]"))(F, T),
     "ghost.primary choice 2 is not allowed"),
    ("space-depth", lambda F, T: RUN("--space", space_file(T, "depth:\n    keep: [0, 2]"))(F, T),
     "depth.keep choice 2 is not allowed; allowed: 0, 1"),
    ("space-tie", lambda F, T: RUN("--space", space_file(T, "tie:\n    separate: [0.5]"))(F, T),
     "tie.separate choice 0.5 is not allowed; allowed: 0, 1"),
    ("space-granularity", lambda F, T: RUN("--space", space_file(T, "prune:\n    granularity: block"))(F, T),
     "granularity 'block' of 'prune' is not allowed; allowed: layer, stage, global"),
    ("space-folder", lambda F, T: RUN("--space", empty_dir(T))(F, T), "is a folder; pass a space YAML file or a name"),
    # run: data, hardware, checkpoints
    ("data-empty-imagefolder", lambda F, T: RUN("--data", f"imagefolder:{empty_dir(T)}")(F, T),
     "holds 0 images in class sub-folders; pass imagefolder:DIR with one sub-folder per class"),
    ("hardware-folder", lambda F, T: RUN("--hardware", empty_dir(T))(F, T),
     "is a folder; pass a profile YAML file or a name: cortex-a76"),
    ("checkpoint-other-architecture", lambda F, T: RUN("--checkpoint", other_checkpoint(T))(F, T),
     'does not match the model: Missing key(s) in state_dict: "1.weight"'),
    # hardware profiles with a field wrong in turn
    *[(f"profile-{field}", (lambda field, value: lambda F, T: ["hardware", "show", bad_profile(T, field, value)])(
        field, value), message) for field, value, message in [
        ("name", KeyError, "lacks 'name'; required: name, peak_gmacs"),
        ("peak_gmacs", {"fp64": 3}, "peak_gmacs has unknown key 'fp64'; allowed: fp32, fp16"),
        ("efficiency", {"conv": -1}, "efficiency.conv = -1; it must be a positive number"),
        ("bandwidth_gbs", "fast", "bandwidth_gbs = 'fast'; it must be a positive number"),
        ("overhead_us", "x", "overhead_us = 'x'; it must be a number >= 0 or a mapping by op kind"),
        ("energy", 5, "energy must be a mapping with mac_pj"),
        ("sparse", "yes", "sparse = 'yes'; it must be true or false"),
        ("cache_kb", -1, "cache_kb = -1; it must be a non-negative number"),
        ("fuses", ["conv+dance"], "fuses has 'conv+dance'"),
        ("overlap", 2, "overlap = 2; it must be between 0 and 1"),
        ("channel_multiple", 0, "channel_multiple = 0; it must be an integer >= 1"),
        ("narrow_efficiency", 0, "narrow_efficiency = 0; it must be in (0, 1]"),
        ("threads", 0, "threads = 0; it must be an integer >= 1"),
        ("device", "tpu", "device = 'tpu'; allowed: cpu, cuda"),
        ("colour", "red", "has unknown key 'colour'"),
    ]],
    ("hardware-show-folder", lambda F, T: ["hardware", "show", empty_dir(T)], "is a folder"),
    ("hardware-show-unknown", lambda F, T: ["hardware", "show", "toaster"], "unknown hardware 'toaster'; allowed:"),
    # estimate and calibrate
    ("estimate-shape", lambda F, T: ["estimate", *TINY[:2], "--input-shape", "1,a"],
     "--input-shape '1,a' must be integers like 1,3,224,224"),
    ("estimate-hardware", lambda F, T: ["estimate", *TINY, "--hardware", "toaster"], "unknown hardware 'toaster'"),
    ("calibrate-threads", lambda F, T: ["calibrate", "--threads", "0", "--to", str(T / "p.yaml")],
     "--threads 0 is not allowed; it must be 1 or more"),
    ("calibrate-name", lambda F, T: ["calibrate", "--hardware", "raspberry-pi-4"], "only host and host-cuda are saved"),
    # report, export and worker on absent, corrupt and secret-bearing storages
    ("report-absent-sqlite", lambda F, T: ["report", "--storage", f"sqlite:///{T}/absent.db"],
     "absent.db', which does not exist"),
    ("report-absent-journal", lambda F, T: ["report", "--storage", f"journal:{T}/absent.log"],
     "absent.log', which does not exist"),
    ("worker-absent-sqlite", lambda F, T: ["worker", "--storage", f"sqlite:///{T}/absent.db"],
     "absent.db', which does not exist"),
    ("report-garbage-sqlite", lambda F, T: ["report", "--storage", f"sqlite:///{garbage(T / 'garbage.db')}"],
     "file is not a database"),
    ("report-no-study", lambda F, T: ["report", "--storage", f"sqlite:///{F}/study.db", "--study", "nope"],
     "no study 'nope' in storage 'sqlite:///"),
    ("report-password", lambda F, T: ["report", "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/db"],
     "postgresql://u:***@127.0.0.1:1/db"),
    ("report-password-at", lambda F, T: ["report", "--storage", f"postgresql://u:se@{SECRET}@127.0.0.1:1/db"],
     "the password in storage 'postgresql://u:***@127.0.0.1:1/db' holds '@'; write it as %40"),
    ("report-password-query", lambda F, T: ["report", "--storage", f"postgresql://u@127.0.0.1:1/db?password={SECRET}"],
     "postgresql://u@127.0.0.1:1/db?password=***"),
    ("export-password", lambda F, T: ["export", "--trial", "0", "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/db"],
     "postgresql://u:***@127.0.0.1:1/db"),
    ("worker-password", lambda F, T: ["worker", "--storage", f"postgresql://u:{SECRET}@127.0.0.1:1/db"],
     "postgresql://u:***@127.0.0.1:1/db"),
    ("export-duplicate", lambda F, T: ["export", str(F), "--trial", "2", "--to", str(T / "m.pt")],
     "trial 2 is a duplicate of trial 1 (it sampled the same policy and was not evaluated again); use trial 1"),
    ("export-absent-trial", lambda F, T: ["export", str(F), "--trial", "999", "--to", str(T / "m.pt")], "no trial 999"),
    ("export-format", lambda F, T: ["export", str(F), "--trial", "0", "--format", "tflite"],
     "invalid choice: 'tflite' (choose from 'state_dict', 'torchscript', 'onnx', 'torch-int8', 'onnx-int8', 'openvino', "
     "'openvino-int8', 'packed')"),
    ("export-openvino-not-xml", lambda F, T: ["export", str(F), "--trial", "0", "--format", "openvino-int8", "--to",
                                              str(T / "m.int8")],
     "an OpenVINO IR is written to a path ending in .xml (its weights go beside it as .bin), not '"),
    ("report-absent-folder", lambda F, T: ["report", str(T / "nowhere")], "holds no saved result"),
    ("worker-trials-negative", lambda F, T: ["worker", "--storage", f"sqlite:///{F}/study.db", "--trials", "-1"],
     "--trials -1 is not allowed; it must be 0 or more"),
    # model and data specs that are not factories (run), or that a run folder names (export, worker)
    *[(f"run-{what}-{spec.replace(':', '-')}", RUN(f"--{what}", spec),
       (f"{kind} {spec!r} failed when called with no arguments (TypeError", f"; a {kind} takes no arguments and "
                                                                           f"must return {returns}"))
      for what, kind, returns in [("model", "model factory", "a torch.nn.Module"),
                                  ("data", "data function", "(train_loader, val_loader[, test_loader])")]
      for spec in ("os:system", "json:loads")],
    ("run-model-not-callable", RUN("--model", "os:sep"),
     ("model factory 'os:sep' failed when called with no arguments (TypeError: 'str' object is not callable)",
      "must return a torch.nn.Module")),
    ("run-model-absent-module", RUN("--model", "no_such_package:make"),
     "cannot import module 'no_such_package' for model factory 'no_such_package:make'"),
    ("export-spec-exits", lambda F, T: ["export", run_copy(F, T, "sys:exit"), "--trial", "0", "--to", str(T / "m.pt")],
     "model factory 'sys:exit' failed when called with no arguments (SystemExit); a model factory takes no "
     "arguments and must return a torch.nn.Module"),
    ("export-spec-exits-csv", lambda F, T: ["export", run_copy(F, T, "sys:exit", study=False), "--trial", "0",
                                            "--to", str(T / "m.pt")],
     "model factory 'sys:exit' failed when called with no arguments (SystemExit)"),
    ("export-spec-system", lambda F, T: ["export", run_copy(F, T, "os:system"), "--trial", "0"],
     "model factory 'os:system' failed when called with no arguments (TypeError"),
    ("export-spec-not-a-module", lambda F, T: ["export", run_copy(F, T, "bad_models:not_a_module"), "--trial", "0"],
     "model factory 'bad_models:not_a_module' returned int, not a torch.nn.Module"),
    ("export-spec-other-model", lambda F, T: ["export", run_copy(F, T, "bad_models:tiny_cnn"), "--trial", "0"],
     "base_model.pt of run folder '"),
    ("export-storage-spec-other-model",
     lambda F, T: ["export", "--storage", copy_storage(F, T, "bad_models:tiny_cnn"), "--trial", "0"],
     "model 'bad_models:tiny_cnn' (checkpoint None) on this machine differs from the one study 'autocompress' was "
     "made with"),
    ("export-other-model", lambda F, T: ["export", str(F), "--model", "bad_models:tiny_cnn", "--trial", "0"],
     "base_model.pt' does not match the model: Missing key(s) in state_dict"),
    ("export-storage-spec-exits", lambda F, T: ["export", "--storage", copy_storage(F, T, "sys:exit"), "--trial", "0"],
     "model factory 'sys:exit' failed"),
    ("worker-spec-exits", lambda F, T: ["worker", "--storage", copy_storage(F, T, "sys:exit"), "--trials", "1"],
     "model factory 'sys:exit' failed"),
    ("export-corrupt-base-model", lambda F, T: ["export", run_copy(F, T, base_model_pt=b"garbage"), "--trial", "0"],
     "base_model.pt' cannot be read as saved tensors (UnpicklingError)"),
    # run folders with a corrupt study, CSV or configuration
    *[(f"{verb}-{name}", (lambda verb, make: lambda F, T: [verb, make(F, T), *(
        ["--trial", "0", "--to", str(T / "m.pt")] if verb == "export" else [])])(verb, make), message)
      for verb in ("report", "export") for name, make, message in [
        ("garbage-study", lambda F, T: run_copy(F, T, study_db=b"garbage" * 100),
         "holds a study that cannot be read, so its saved CSVs (perhaps older) are not shown instead: cannot open "
         "storage 'sqlite:///"),
        ("truncated-study", lambda F, T: run_copy(F, T, study_db=truncated(F / "study.db")),
         ("holds a study that cannot be read", "database disk image is malformed")),
        ("empty-study", lambda F, T: run_copy(F, T, study_db=b""),
         ("holds a study that cannot be read", "which is empty")),
        ("garbage-trials-csv", lambda F, T: run_copy(F, T, study=False, trials_csv=bytes(range(128, 256)) + b"\n"),
         "trials.csv' is corrupt ('utf-8' codec can't decode byte 0x80"),
        ("truncated-trials-csv", lambda F, T: run_copy(F, T, study=False, trials_csv=truncated(F / "trials.csv")),
         "trials.csv' is corrupt (it ends in the middle of a line: cut short)"),
        ("trials-csv-open-quote", lambda F, T: run_copy(F, T, study=False, trials_csv=(
            F / "trials.csv").read_bytes().split(b"\n")[0] + b'\n0,,,0.1,1,2,3,4,True,COMPLETE,c,False,,,,"{\n'),
         "trials.csv' is corrupt (Error tokenizing data. C error: EOF inside string"),
        ("foreign-trials-csv", lambda F, T: run_copy(F, T, study=False, trials_csv=b"a,b\n1,2\n"),
         "trials.csv' is corrupt (Index number invalid)"),
        ("trials-csv-without-objective", lambda F, T: run_copy(F, T, study=False, trials_csv=b"number,state\n0,x\n"),
         "trials.csv' is corrupt (no column feasible, latency_ms, policy, size_kb)"),
        ("trials-csv-text-objective", lambda F, T: run_copy(F, T, study=False, trials_csv=(
            F / "trials.csv").read_bytes().replace(b"\n0,,,", b"\n0,,,fast", 1)),
         "trials.csv' is corrupt (Unable to parse string 'fast"),
        ("corrupt-config", lambda F, T: run_copy(F, T, study=False, config_json=b"{not json"),
         "config.json' is corrupt (Expecting property name enclosed in double quotes"),
        ("garbage-config", lambda F, T: run_copy(F, T, study=False, config_json=bytes(range(128, 256))),
         "config.json' is corrupt ('utf-8' codec can't decode byte 0x80"),
        ("foreign-config", lambda F, T: run_copy(F, T, study=False, config_json=b"[1, 2]"),
         "config.json' is corrupt (it holds no run configuration with objectives)"),
    ]],
]


@pytest.mark.parametrize("make_argv, message", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_one_sentence_exit_2_and_changes_nothing(make_argv, message, folder, tmp_path, capsys):
    before = snapshot(folder)
    argv = make_argv(folder, tmp_path)
    scratch = snapshot(tmp_path)  # what the case made there: a run folder copy, a space file
    code, printed = cli(argv, capsys)
    assert code == 2, printed
    last = printed.strip().splitlines()[-1]
    assert "error: " in last and all(part in last for part in
                                              (message if isinstance(message, tuple) else (message,))), printed
    assert "Traceback" not in printed and SECRET not in printed
    assert snapshot(folder) == before and snapshot(tmp_path) == scratch


@pytest.mark.parametrize("study", [True, False], ids=["study", "csv"])
@pytest.mark.parametrize("fmt", ["table", "csv", "json", "html"])
def test_report_calls_no_model_factory_the_run_folder_names(fmt, study, folder, tmp_path, capsys):
    """A folder (its study, or its config.json when it has no study) naming sys:exit as its model: report reads the
    files and shows the front in every format, exit 0, without calling it (a call would end the command)."""
    copy = run_copy(folder, tmp_path, "sys:exit", study=study)
    before = snapshot(Path(copy))
    code, printed = cli(["report", copy, "--format", fmt, "--to", str(tmp_path / f"report.{fmt}")], capsys)
    assert code == 0 and f"wrote {tmp_path / f'report.{fmt}'} ({fmt}" in printed, printed
    assert "calling" not in printed and snapshot(Path(copy)) == before
    text = (tmp_path / f"report.{fmt}").read_text()
    assert {"table": "Pareto front", "csv": "latency_ms", "json": '"pareto"', "html": "Not available"}[fmt] in text


def test_report_on_a_folder_whose_model_aborts_the_process_shows_the_front(folder, tmp_path):
    """os:abort cannot be caught: a report that called it would die with SIGABRT (exit 134)."""
    copy = run_copy(folder, tmp_path, "os:abort")
    env = {**__import__("os").environ, "PYTHONPATH": f"{TESTS}:{TESTS.parent}"}
    proc = subprocess.run([sys.executable, "-m", "autocompress.cli", "report", copy], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0 and "Pareto front" in proc.stdout, proc.stderr[-2000:]


@pytest.mark.parametrize("verb", ["export", "worker"])
def test_export_and_worker_name_the_factory_a_run_records_before_calling_it(verb, folder, tmp_path, capsys):
    copy = run_copy(folder, tmp_path, "sys:exit")
    argv = {"export": ["export", copy, "--trial", "0", "--to", str(tmp_path / "m.pt")],
            "worker": ["worker", "--storage", f"sqlite:///{copy}/study.db", "--trials", "1"]}[verb]
    code, printed = cli(argv, capsys)
    where = {"export": f"run folder {copy!r}", "worker": "study 'autocompress'"}[verb]
    lines = [line for line in printed.splitlines() if "sys:exit" in line]
    assert code == 2 and lines == [f"model: calling 'sys:exit', as {where} records it",
                                   "error: model factory 'sys:exit' failed when called with no arguments (SystemExit); "
                                   "a model factory takes no arguments and must return a torch.nn.Module"], printed


def test_a_worker_refuses_a_negative_trial_count_before_it_says_it_joins(folder, capsys):
    code, printed = cli(["worker", "--storage", f"sqlite:///{folder}/study.db", "--trials", "-1"], capsys)
    assert code == 2 and printed.strip() == "error: --trials -1 is not allowed; it must be 0 or more"


def test_a_run_killed_during_a_trial_reports_and_exports_from_its_study(tmp_path, capsys):
    """kill -9 while a trial is evaluated: only study.db and the judged weights beside it exist (no trials.csv,
    no config.json). Before any resume, `report DIR` shows the completed trials and `export DIR --trial N` writes
    a model whose file scores what the study reported, and neither changes a file in the folder."""
    import os
    import signal
    import time

    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": f"{TESTS}:{TESTS.parent}"}
    run = subprocess.Popen([sys.executable, "-m", "autocompress.cli", "run", *TINY, "--data",
                            "worker_problem:slow_digits", "--budget", "size=200%", "--trials", "6", "--finetune-steps",
                            "0", "--final-epochs", "0", "--no-progress", "--out", str(out)],
                           env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline, states = time.time() + 600, []
    while time.time() < deadline and run.poll() is None:
        time.sleep(0.5)
        states = _states(out / "study.db")
        if states.count("COMPLETE") >= 2 and "RUNNING" in states:
            break
    os.kill(run.pid, signal.SIGKILL)
    run.wait()
    assert states.count("COMPLETE") >= 2 and "RUNNING" in states, states
    assert not (out / "trials.csv").exists() and not (out / "config.json").exists()
    before = snapshot(out)
    code, printed = cli(["report", str(out)], capsys)
    study = optuna.load_study(study_name="autocompress", storage=f"sqlite:///{out}/study.db")
    done = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert code == 0 and f"trials: {len(done)} finished" in printed and "Pareto front" in printed, printed
    last = done[-1]
    code, printed = cli(["export", str(out), "--trial", str(last.number), "--to", str(tmp_path / "m.pt")], capsys)
    reported = last.user_attrs["accuracy"]
    assert code == 0, printed
    assert f"accuracy of the file on the validation data: {reported:.4f} (reported {reported:.4f})" in printed
    assert "model: calling 'worker_problem:tiny_model', as run folder" in printed
    assert snapshot(out) == before


WRITER_KILLED_MID_TRANSACTION = """
import sqlite3, sys, time
db = sqlite3.connect(sys.argv[1], isolation_level=None)
db.execute('PRAGMA cache_size=1')  # a one-page cache spills the transaction into the file before it commits
db.execute('BEGIN IMMEDIATE')
db.execute("UPDATE trials SET state = 'FAIL'")
db.executemany("INSERT INTO study_user_attributes (study_id, key, value_json) VALUES (1, ?, '0')",
               [(f"k{i}",) for i in range(20000)])
print('written', flush=True)
time.sleep(600)
"""


def test_reading_a_study_a_writer_was_killed_in_changes_no_file(folder, tmp_path, capsys):
    """kill -9 mid-transaction leaves a hot journal beside study.db; SQLite's first reader would roll it back in
    place. `report` shows the committed trials and leaves both files as they were."""
    import os
    import shutil
    import signal

    out = tmp_path / "run"
    shutil.copytree(folder, out)
    code, expected = cli(["report", str(out)], capsys)
    writer = subprocess.Popen([sys.executable, "-c", WRITER_KILLED_MID_TRANSACTION, str(out / "study.db")],
                              stdout=subprocess.PIPE, text=True)
    assert writer.stdout.readline().strip() == "written"
    os.kill(writer.pid, signal.SIGKILL)
    writer.wait()
    assert (out / "study.db-journal").stat().st_size > 0
    before = snapshot(out)
    code, printed = cli(["report", str(out)], capsys)
    assert code == 0 and printed == expected
    assert snapshot(out) == before


def test_a_corrupt_study_beside_a_journal_is_named_as_the_user_named_it(tmp_path, capsys):
    """A journal beside study.db makes `report` read a private copy; an error still names the user's file, and
    the copy is gone."""
    import tempfile

    db = garbage(tmp_path / "study.db")
    (tmp_path / "study.db-journal").write_bytes(b"\0" * 512)
    copies = set(Path(tempfile.gettempdir()).glob("autocompress-read-*"))
    code, printed = cli(["report", "--storage", f"sqlite:///{db}"], capsys)
    assert code == 2 and f"cannot open storage 'sqlite:///{db}': " in printed and "not a database" in printed, printed
    assert "autocompress-read-" not in printed and set(Path(tempfile.gettempdir()).glob("autocompress-read-*")) == copies


def _states(db: Path) -> list[str]:
    """The trial states of the study in `db`, once two trials' judged weights are beside it (so the run has long
    made the study: opening it sooner could create the file, or race the run making its tables)."""
    if len(list(db.parent.glob("study.db.weights/autocompress/trial_*.pt"))) < 2:
        return []
    return [t.state.name for t in optuna.load_study(study_name="autocompress", storage=f"sqlite:///{db}").trials]


@pytest.mark.parametrize("kwargs, message", [
    ({"trials": "3"}, "trials='3' is not allowed; it must be an integer >= 0"),
    ({"trials": 1.5}, "trials=1.5 is not allowed"),
    ({"trials": -2}, "trials=-2 is not allowed"),
    ({"trials": True}, "trials=True is not allowed"),
    ({"budgets": "latency=50%"}, "budgets='latency=50%' is not allowed; give a mapping such as"),
    ({"budgets": {"latency": "50%"}}, "budget latency='50%' is not allowed; a budget must be a number"),
    ({"budgets": {"latency_ms": None}}, "budget latency_ms=None is not allowed"),
    ({"budgets": {"size": float("nan")}}, "budget size=nan is not allowed"),
    ({"budgets": {"speed": 2}}, "unknown budget 'speed'"),
    ({"objectives": "latency_ms"}, "objectives='latency_ms' is not allowed; give a list of metric names"),
    ({"objectives": ("latency_ms", "beauty")}, "unknown objective 'beauty'"),
    ({"hardware": "toaster"}, "unknown hardware 'toaster'"),
    ({"space": "nowhere"}, "unknown search space 'nowhere'"),
    ({"storage": f"postgresql://u:{SECRET}@127.0.0.1:1/db"}, "postgresql://u:***@127.0.0.1:1/db"),
])
def test_python_api_bad_input_is_one_autocompress_error(kwargs, message):
    model, x = worker_problem.tiny_model(), torch.randn(worker_problem.INPUT_SHAPE)
    with pytest.raises(ac.AutocompressError) as info:
        ac.compress(model, x, **{"trials": 0, "progress": False, **kwargs})
    assert message in str(info.value) and "\n" not in str(info.value) and SECRET not in str(info.value)


@pytest.mark.parametrize("url, shown", [
    ("postgresql://u:secret@host:5432/db", "postgresql://u:***@host:5432/db"),
    ("postgresql://u:se@cr@et@host/db", "postgresql://u:***@host/db"),
    ("mysql+pymysql://u:a/b@host/db", "mysql+pymysql://u:***@host/db"),
    ("postgresql://host/db?user=u&password=secret&sslmode=require", "postgresql://host/db?user=u&password=***&sslmode=require"),
    ("cannot open 'postgresql://:secret@h/d': refused", "cannot open 'postgresql://:***@h/d': refused"),
    ("sqlite:///runs/r1/study.db", "sqlite:///runs/r1/study.db"),
    ("journal:runs/a@b.log", "journal:runs/a@b.log"),
])
def test_one_masking_function_hides_every_form_of_password(url, shown):
    assert hide_password(url) == shown


def test_a_budget_the_model_already_meets_is_warned_about(tmp_path, capsys):
    code, printed = cli(["run", *TINY, "--trials", "0", "--no-progress", "--budget", "latency=150%",
                         "--out", str(tmp_path / "r")], capsys)
    assert code == 0
    assert "warning: budget latency=150% (latency_ms" in printed and "so it cannot bind" in printed


def test_onnx_is_a_regular_dependency():
    project = tomllib.loads((TESTS.parent / "pyproject.toml").read_text())["project"]
    names = {d.split(">")[0].split("=")[0].strip() for d in project["dependencies"]}
    assert {"onnx", "onnxruntime"} <= names


def test_ctrl_c_exits_130_and_counts_only_evaluated_trials(tmp_path, capsys, monkeypatch):
    """Two trials evaluated, three PRUNED duplicates, then Ctrl-C: exit 130, "2 finished trials are kept"."""
    (tmp_path / "two.yaml").write_text(TWO_POLICIES)
    calls = []
    real = search.loop.run_trial

    def interrupted_after_five(*args):
        calls.append(1)
        if len(calls) > 5:
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(search.loop, "run_trial", interrupted_after_five)
    code, printed = cli(["run", *TINY, "--space", str(tmp_path / "two.yaml"), "--trials", "3", "--no-progress",
                         "--budget", "size=200%", "--out", str(tmp_path / "r")], capsys)
    assert code == 130
    assert "interrupted: 2 finished trials are kept" in printed
    study = optuna.load_study(study_name="autocompress", storage=f"sqlite:///{tmp_path}/r/study.db")
    states = [t.state.name for t in study.trials]
    assert states.count("COMPLETE") == 2 and states.count("PRUNED") == 3


def test_ctrl_c_outside_the_search_exits_130_without_traceback(tmp_path, capsys, monkeypatch):
    import autocompress.models

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(autocompress.models, "load_model", interrupted)
    try:
        code, printed = cli(["run", *TINY, "--trials", "1", "--out", str(tmp_path / "r")], capsys)
    except KeyboardInterrupt:
        pytest.fail("Ctrl-C escaped autocompress.cli.main")
    assert code == 130 and "interrupted" in printed and "Traceback" not in printed


def test_a_resume_waiting_for_a_lost_trial_says_so(tmp_path, capsys, monkeypatch):
    """A trial left RUNNING by a killed process: the resume says it waits for the grace period, then retries it."""
    monkeypatch.setenv("AUTOCOMPRESS_HEARTBEAT_S", "1")
    model, x = worker_problem.tiny_model(), torch.randn(worker_problem.INPUT_SHAPE)
    storage = f"journal:{tmp_path}/study.log"
    ac.compress(model, x, trials=0, storage=storage, progress=False, space="default")
    study = optuna.load_study(study_name="autocompress", storage=open_storage(storage))
    study.ask()  # the killed process's trial: claimed, never beating
    capsys.readouterr()
    result = ac.compress(model, x, trials=1, storage=storage, progress=False, space="default")
    printed = capsys.readouterr().out
    assert "waiting for 1 trial(s) that another process runs or ran (a killed one is retried after 3 s" in printed
    assert (result.trials["state"] == "COMPLETE").sum() >= 1


def test_a_group_torch_pruning_cannot_finish_stays_whole_and_analysis_ends(tmp_path):
    """Residuals added into a slice of the channels (timm's ReXNet): Torch-Pruning's group of such a layer grows
    forever. Analysis must end in seconds with those layers left whole, named in the one warning, the rest pruned.
    Run in a subprocess so that a regression fails by timeout instead of hanging the suite."""
    code = ("import warnings, torch, sliced_residual, autocompress as ac\n"
            "with warnings.catch_warnings(record=True) as w:\n"
            "    warnings.simplefilter('always')\n"
            "    g = ac.analyze(sliced_residual.sliced_net().eval(), torch.randn(1, 3, 16, 16))\n"
            "print(len(g.groups))\n"
            "print([str(m.message) for m in w if 'whole' in str(m.message)])\n")
    env = {**__import__("os").environ, "PYTHONPATH": f"{TESTS}:{TESTS.parent}"}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr[-2000:]
    groups, warned = proc.stdout.strip().splitlines()[-2:]
    assert int(groups) >= 5
    assert "1.body.5" in warned and "7.body.5" in warned


def _open_after(barrier, path: str, results) -> None:
    barrier.wait()
    try:
        open_storage(f"sqlite:///{path}")
        results.put("ok")
    except Exception as exc:  # reported to the test, which shows it
        results.put(f"{type(exc).__name__}: {exc}")


def test_two_processes_creating_one_new_study_database_both_open_it(tmp_path):
    """Two `autocompress run --out NEW` at once: both create the tables of one new study.db. Without the retry
    about half the rounds end in 'UNIQUE constraint failed: alembic_version' or 'table ... already exists'."""
    import multiprocessing

    context = multiprocessing.get_context("fork")
    for round_ in range(8):
        barrier, results = context.Barrier(2), context.Queue()
        racers = [context.Process(target=_open_after, args=(barrier, str(tmp_path / f"r{round_}.db"), results))
                  for _ in range(2)]
        for p in racers:
            p.start()
        for p in racers:
            p.join(timeout=60)
        assert [results.get(timeout=5), results.get(timeout=5)] == ["ok", "ok"]


def test_ctrl_c_in_a_worker_exits_130(tmp_path, capsys, monkeypatch):
    storage = f"sqlite:///{tmp_path}/study.db"
    assert cli(["run", *TINY, "--trials", "0", "--storage", storage, "--out", str(tmp_path / "r")], capsys)[0] == 0

    def interrupted(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(search.loop, "run_trial", interrupted)
    code, printed = cli(["worker", "--storage", storage, "--trials", "1", "--no-progress"], capsys)
    assert code == 130 and "interrupted: 0 finished trials are kept" in printed
