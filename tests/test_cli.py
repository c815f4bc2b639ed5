"""The command line: a real run writes everything the issue lists; bad input is one sentence, exit 2."""
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from autocompress.cli import main
from counting import count_params

ROOT = Path(__file__).resolve().parent


def test_run_writes_study_tables_models_and_config(tmp_path, capsys):
    out = tmp_path / "r1"
    args = ["run", "--trials", "4", "--out", str(out), "--no-progress", "--budget", "size=40%",
            "--budget", "latency=90%", "--data", "digits", "--finetune-steps", "0", "--final-epochs", "0"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "baseline" in printed and "Pareto front" in printed
    for name in ("study.db", "trials.csv", "pareto.csv", "config.json", "base_model.pt"):
        assert (out / name).exists(), name
    pareto = pd.read_csv(out / "pareto.csv", index_col="number")
    assert len(pareto) >= 1
    config = json.loads((out / "config.json").read_text())
    assert config["model_spec"] == "digits_resnet" and config["budgets"] == {"latency": 0.9, "size": 0.4}
    from autocompress.result import Result

    result = Result.load(out)
    for n in pareto.index:
        state = torch.load(out / "models" / f"trial_{n}.pt", weights_only=True)
        assert (out / "models" / f"trial_{n}.json").exists()
        model = result.model(n)
        model.load_state_dict(state)
        assert count_params(model) == pareto.loc[n, "params"]
    # the same command resumes: no completed trial lost or repeated (a sample that repeats a policy is kept as a
    # PRUNED duplicate, unevaluated; whether one occurs depends on this machine's measured costs)
    first = pd.read_csv(out / "trials.csv", index_col="number")
    assert main(args[:2] + ["6"] + args[3:]) == 0
    trials = pd.read_csv(out / "trials.csv", index_col="number")
    evaluated = trials[trials["state"] != "PRUNED"]
    assert len(evaluated) == 6 and evaluated["policy"].is_unique
    assert trials.loc[trials["state"] == "PRUNED", "duplicate_of"].isin(evaluated.index).all()
    kept = first[first["state"] != "PRUNED"]
    pd.testing.assert_series_equal(evaluated.loc[kept.index, "accuracy"], kept["accuracy"])
    assert main(["report", str(out)]) == 0
    assert "Pareto front" in capsys.readouterr().out


@pytest.mark.parametrize("args, message", [
    (["--hardware", "toaster"], "unknown hardware 'toaster'"),
    (["--budget", "latency_ms=-3"], "budget latency_ms=-3.0 is not allowed"),
    (["--budget", "size_kb=0"], "budget size_kb=0.0 is not allowed"),
    (["--budget", "speed=3"], "unknown budget 'speed'"),
    (["--budget", "latency_ms"], "must look like KEY=VALUE"),
    (["--budget", "latency_ms=fast"], "not a number"),
    (["--objectives", "accuracy,beauty"], "unknown objective 'beauty'"),
    (["--trials", "-1"], "--trials -1 is not allowed"),
    (["--finetune-steps", "-3"], "--finetune-steps -3 is not allowed"),
    (["--model", "no_such_model"], "unknown model 'no_such_model'"),
    (["--model", "torchvision:resnet999"], "unknown torchvision model 'resnet999'"),
    (["--model", "bad_models:shape_mismatch", "--input-shape", "1,3,8,8"], "forward fails on an example input"),
    (["--model", "bad_models:not_a_module"], "returned int, not a torch.nn.Module"),
    (["--space", "missing.yaml"], "search space file 'missing.yaml' does not exist"),
    (["--data", "nowhere"], "unknown data 'nowhere'"),
    (["--checkpoint", "/nonexistent.pt"], "checkpoint '/nonexistent.pt' does not exist"),
])
def test_bad_input_is_one_sentence_and_exit_2(args, message, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT))
    code = main(["run", "--trials", "1", "--no-progress", "--out", str(tmp_path / "r"), *args])
    err = capsys.readouterr().err
    assert code == 2
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: ") and message in last
    assert "Traceback" not in err


def test_corrupt_checkpoint_is_refused(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    assert main(["run", "--checkpoint", str(bad), "--trials", "1", "--out", str(tmp_path / "r")]) == 2
    assert "is not a loadable state_dict" in capsys.readouterr().err


def test_an_output_folder_with_another_configuration_is_refused(tmp_path, capsys):
    out = str(tmp_path / "r")
    common = ["run", "--trials", "1", "--no-progress", "--out", out, "--data", "digits", "--finetune-steps", "0"]
    assert main(common + ["--budget", "size=40%"]) == 0
    assert main(common + ["--budget", "size=20%"]) == 2
    assert "another configuration" in capsys.readouterr().err


def test_console_script_entry_point_runs_without_traceback(tmp_path):
    """The installed `autocompress` command, as a user types it, on a bad budget."""
    exe = Path(sys.executable).parent / "autocompress"
    proc = subprocess.run([str(exe), "run", "--budget", "latency=-5%", "--out", str(tmp_path / "r")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith("error: budget latency=-0.05")
    assert "Traceback" not in proc.stderr


