"""Many workers on one study: `autocompress worker` processes on a real PostgreSQL server over loopback (and on a
journal file), the study-wide target, no policy evaluated twice, heartbeats and kill -9, storage specs."""
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import optuna
import pytest
import torch
from optuna.trial import TrialState

import worker_problem

import autocompress as ac
from autocompress import search
from autocompress.cli import main
from autocompress.search.storage import HeartbeatJournalStorage, open_storage

TESTS = Path(__file__).resolve().parent
EXE = Path(sys.executable).parent / "autocompress"
# A small CNN on real digits; every candidate is within budget and its evaluation sleeps 1.5 s (worker_problem.py).
MODEL, DATA = "worker_problem:tiny_model", "worker_problem:slow_digits"
RUN = ["run", "--model", MODEL, "--input-shape", "1,1,32,32", "--data", DATA, "--budget", "size=200%", "--no-progress",
       "--finetune-steps", "0", "--final-epochs", "0"]
HEARTBEAT_S = 2                   # so a killed worker's trial is retried after 6 s


@pytest.fixture
def tiny():
    return worker_problem.tiny_model(), torch.randn(worker_problem.INPUT_SHAPE)


@pytest.fixture(scope="session")
def postgres():
    """A database on the local PostgreSQL server: $AUTOCOMPRESS_TEST_POSTGRES, else the cluster that
    tests/start_postgres.sh starts (.ci/run installs PostgreSQL and sets AUTOCOMPRESS_REQUIRE_POSTGRES)."""
    if os.environ.get("AUTOCOMPRESS_TEST_POSTGRES"):
        return os.environ["AUTOCOMPRESS_TEST_POSTGRES"]
    if shutil.which("pg_ctlcluster") is None:
        reason = "PostgreSQL is not installed (apt-get install postgresql) and AUTOCOMPRESS_TEST_POSTGRES is not set"
        if os.environ.get("AUTOCOMPRESS_REQUIRE_POSTGRES"):
            pytest.fail(reason)
        pytest.skip(reason)
    proc = subprocess.run([str(TESTS / "start_postgres.sh")], capture_output=True, text=True, timeout=120)
    if proc.returncode != 0:
        pytest.fail(f"tests/start_postgres.sh could not start PostgreSQL (it needs root): {proc.stderr.strip()[-400:]}")
    return proc.stdout.strip().splitlines()[-1]


@pytest.fixture(params=["postgres", "journal"])
def storage(request, tmp_path):
    if request.param == "journal":
        return f"journal:{tmp_path}/study.log"
    return request.getfixturevalue("postgres")


@pytest.fixture
def shared_study(storage, tmp_path, monkeypatch):
    """A new study made by `autocompress run --trials 0`, removed afterwards."""
    monkeypatch.setenv("AUTOCOMPRESS_HEARTBEAT_S", str(HEARTBEAT_S))
    monkeypatch.syspath_prepend(str(TESTS))
    name = f"test-{uuid.uuid4().hex[:8]}"
    assert main([*RUN, "--storage", storage, "--study", name, "--trials", "0", "--out", str(tmp_path / "run")]) == 0
    yield name
    optuna.delete_study(study_name=name, storage=open_storage(storage))


def start_workers(storage: str, study: str, count: int, trials: int, folder: Path) -> list[subprocess.Popen]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    procs = []
    for i in range(count):
        log = open(folder / f"worker{i}.log", "w")
        procs.append(subprocess.Popen([str(EXE), "worker", "--storage", storage, "--study", study,
                                       "--trials", str(trials), "--no-progress"],
                                      stdout=log, stderr=subprocess.STDOUT, env=env))
    return procs


def finish(procs, folder: Path) -> None:
    for i, proc in enumerate(procs):
        code = proc.wait(timeout=240)
        assert code == 0, (folder / f"worker{i}.log").read_text()[-2000:]


def load(storage: str, study: str) -> optuna.Study:
    return optuna.load_study(study_name=study, storage=open_storage(storage))


def assert_exactly(study: optuna.Study, asked: int) -> list:
    """`asked` completed trials, nothing left running, and no policy completed twice."""
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(complete) == asked
    assert not [t.number for t in trials if t.state == TrialState.RUNNING]
    policies = [t.user_attrs["policy"] for t in complete]
    assert len(set(policies)) == asked
    return complete


def test_run_with_zero_trials_only_creates_the_study(storage, shared_study):
    study = load(storage, shared_study)
    # the warm-start policies, queued: every knob at 3 positions, pruning alone, quantization alone, and the
    # uncompressed model (what fits the loose size budget best)
    assert [t.state for t in study.trials] == [TrialState.WAITING] * 6
    config = study.user_attrs["config"]
    assert (config["model_spec"], config["checkpoint"], config["data"]) == (MODEL, None, DATA)
    for key in ("space", "budgets", "limits", "hardware", "objectives", "seed", "sampler", "input_shape", "model"):
        assert key in config
    assert study.user_attrs["baseline"]["accuracy"] is not None
    assert search.target(study) == 0 and study.user_attrs["heartbeat_s"] == HEARTBEAT_S


def test_three_workers_fill_one_study_exactly_and_report_reads_it(storage, shared_study, tmp_path, capsys):
    finish(start_workers(storage, shared_study, 3, trials=2, folder=tmp_path), tmp_path)
    study = load(storage, shared_study)
    complete = assert_exactly(study, 6)
    assert search.target(study) == 6
    assert len({t.user_attrs["worker"] for t in complete}) >= 2  # the work was really shared
    assert main(["report", "--storage", storage, "--study", shared_study]) == 0
    printed = capsys.readouterr().out
    assert "trials: 6 finished" in printed and "Pareto front" in printed


def test_a_worker_killed_midway_changes_nothing(postgres, monkeypatch, tmp_path):
    monkeypatch.setenv("AUTOCOMPRESS_HEARTBEAT_S", str(HEARTBEAT_S))
    monkeypatch.syspath_prepend(str(TESTS))
    name = f"test-{uuid.uuid4().hex[:8]}"
    assert main([*RUN, "--storage", postgres, "--study", name, "--trials", "0", "--out", str(tmp_path / "run")]) == 0
    procs = start_workers(postgres, name, 3, trials=2, folder=tmp_path)
    victim = procs[0]
    mid = wait_for_trial_of(postgres, name, f"{socket.gethostname()}:{victim.pid}")  # it is evaluating this one
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    finish(procs[1:], tmp_path)
    study = load(postgres, name)
    complete = assert_exactly(study, 6)
    lost = study.trials[mid.number]
    assert lost.state == TrialState.FAIL and "error" not in lost.user_attrs  # lost, not counted
    retries = [t for t in complete if mid.number in t.system_attrs.get("retry_history", [])]
    assert len(retries) == 1 and retries[0].user_attrs["policy"] == mid.user_attrs["policy"]
    assert retries[0].user_attrs["worker"] != mid.user_attrs["worker"]
    optuna.delete_study(study_name=name, storage=open_storage(postgres))


def wait_for_trial_of(storage: str, study: str, worker: str, timeout: float = 120) -> optuna.trial.FrozenTrial:
    """The running trial `worker` has sampled a policy for (and is now evaluating)."""
    deadline, study = time.time() + timeout, load(storage, study)
    while time.time() < deadline:
        for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
            if t.user_attrs.get("worker") == worker and t.user_attrs.get("policy"):
                return t
        time.sleep(0.2)
    raise AssertionError(f"worker {worker} never ran a trial")


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_resume_retries_a_trial_whose_process_died(kind, tmp_path, monkeypatch, tiny):
    """One process at a time: a trial left RUNNING by a killed run is failed after the grace period and its policy
    evaluated again; the target counts it once."""
    monkeypatch.setenv("AUTOCOMPRESS_HEARTBEAT_S", "1")
    storage = f"sqlite:///{tmp_path}/study.db" if kind == "sqlite" else f"{tmp_path}/study.log"
    kwargs = dict(evaluator=lambda m: 0.5, objectives=("accuracy", "macs"), progress=False, storage=storage)
    ac.compress(*tiny, trials=2, **kwargs)
    study = load(storage, "autocompress")
    dead = study.ask()  # what a killed run leaves: it took the third warm-start policy, beat once, and vanished
    study._storage.record_heartbeat(dead._trial_id)
    resumed = ac.compress(*tiny, trials=6, **kwargs)  # the retry is queued behind the last two warm-start policies
    states = resumed.trials["state"]
    assert (states == "COMPLETE").sum() == 6 and list(states[states != "COMPLETE"].index) == [dead.number]
    study = load(storage, "autocompress")
    retry = next(t for t in study.trials if t.system_attrs.get("retry_history") == [dead.number])
    assert retry.state == TrialState.COMPLETE and retry.params == study.trials[dead.number].system_attrs["fixed_params"]
    assert resumed.trials.loc[resumed.trials["state"] == "COMPLETE", "policy"].is_unique


def test_a_policy_already_evaluated_is_not_evaluated_again(tmp_path, tiny):
    calls = []
    kwargs = dict(evaluator=lambda m: calls.append(1) or 0.5, objectives=("accuracy", "macs"), progress=False,
                  storage=f"sqlite:///{tmp_path}/study.db")
    warm = len(search.WARM_START) + 2  # every knob at once, then pruning alone and quantization alone
    first = ac.compress(*tiny, trials=warm, **kwargs)
    study = load(kwargs["storage"], "autocompress")
    study.enqueue_trial(study.trials[0].params)  # e.g. a sampler proposing trial 0's policy again
    calls.clear()
    second = ac.compress(*tiny, trials=warm + 1, **kwargs)
    assert second.trials.loc[warm, "state"] == "PRUNED" and load(kwargs["storage"], "autocompress").trials[
        warm].user_attrs["duplicate_of"] == 0
    done = second.trials[second.trials["state"] == "COMPLETE"]
    assert len(done) == warm + 1 and done["policy"].is_unique and len(calls) == 1
    assert list(done.index[:warm]) == list(first.trials.index)


def test_a_lost_trial_counts_as_pending_until_its_retry_is_queued():
    """Optuna fails a lost trial before requeue_lost queues its retry: in between, workers must wait for the retry
    rather than sample a new policy in its place (a race seen in test_a_worker_killed_midway_changes_nothing)."""
    study = optuna.create_study()
    lost = study.ask()
    study.tell(lost, state=TrialState.FAIL)  # what fail_stale_trials leaves: failed, no evaluation error
    broken = study.ask()
    broken.set_user_attr("error", "ValueError: bad")  # failed by its evaluation: counted, never retried
    study.tell(broken, state=TrialState.FAIL)
    trials = study.get_trials(deepcopy=False)
    assert search.awaiting_retry(trials, window_s=60) == 1
    assert search.awaiting_retry(trials, window_s=0) == 0  # a recoverer that died in between: not waited for
    search.requeue_lost(study, study.trials[lost.number])
    assert search.awaiting_retry(study.get_trials(deepcopy=False), window_s=60) == 0


def test_a_trial_claimed_beyond_the_target_steps_back(tmp_path):
    """Two workers that raced for the last trial: the one that sees the other's claim steps back. A queued
    policy goes back to the queue; a blank trial is closed, so that it never waits ahead of a queued retry."""
    study = optuna.create_study(storage=open_storage(f"sqlite:///{tmp_path}/study.db"))
    search.ask_trials(study, "run", 1)
    other = study.ask()  # another worker's claim on the only trial asked for
    assert search.run_trial(study, None, search.target(study), print) == "surplus"
    assert [t.state for t in study.trials] == [TrialState.RUNNING, TrialState.PRUNED]
    assert study.trials[1].user_attrs["surplus"]
    study.enqueue_trial({"x": 1.0})
    assert search.run_trial(study, None, search.target(study), print) == "surplus"
    assert study.trials[2].state == TrialState.WAITING and study.trials[2].system_attrs["fixed_params"] == {"x": 1.0}
    study.tell(other, 1.0)


@pytest.mark.parametrize("spec, kind", [("journal:{tmp}/a.log", HeartbeatJournalStorage),
                                        ("{tmp}/b.log", HeartbeatJournalStorage),
                                        ("sqlite:///{tmp}/c.db", optuna.storages.RDBStorage)])
def test_storage_specs(spec, kind, tmp_path):
    storage = open_storage(spec.format(tmp=tmp_path))
    assert isinstance(storage, kind) and storage.get_heartbeat_interval() > 0


@pytest.mark.parametrize("spec, message", [
    ("redis://localhost", "storage 'redis://localhost' is not allowed; use sqlite:///PATH.db, journal:PATH"),
    ("study.db", "storage 'study.db' is not allowed"),
    ("journal:", "storage 'journal:' names no file"),
    ("postgresql://me:secret@127.0.0.1:1/db", "cannot open storage 'postgresql://me:***@127.0.0.1:1/db'"),
])
def test_bad_storage_is_one_sentence_without_the_password(spec, message, tmp_path, capsys, monkeypatch):
    monkeypatch.syspath_prepend(str(TESTS))
    code = main([*RUN, "--trials", "0", "--storage", spec, "--out", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert code == 2 and message in err.strip().splitlines()[-1] and "secret" not in err and "Traceback" not in err


def test_a_worker_needs_a_study_made_by_run(tmp_path, capsys, tiny):
    storage = f"sqlite:///{tmp_path}/study.db"
    assert main(["worker", "--storage", storage, "--study", "nope", "--trials", "1"]) == 2
    assert "which does not exist" in capsys.readouterr().err and not (tmp_path / "study.db").exists()
    ac.compress(*tiny, evaluator=lambda m: 0.5, trials=0, storage=storage, progress=False)
    assert main(["worker", "--storage", storage, "--study", "nope", "--trials", "1"]) == 2
    assert "no study 'nope' in storage" in capsys.readouterr().err
    assert main(["worker", "--storage", storage, "--trials", "1"]) == 2
    assert "was made from Python without a model spec" in capsys.readouterr().err


def test_a_worker_refuses_a_checkpoint_that_differs(tmp_path, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(TESTS))
    checkpoint, storage = tmp_path / "tiny.pt", f"journal:{tmp_path}/study.log"
    model = worker_problem.tiny_model()
    torch.save(model.state_dict(), checkpoint)
    assert main([*RUN, "--checkpoint", str(checkpoint), "--storage", storage, "--trials", "0",
                 "--out", str(tmp_path / "r")]) == 0
    with torch.no_grad():
        model[0].weight.add_(1.0)
    torch.save(model.state_dict(), checkpoint)  # another machine's copy of the file, say
    assert main(["worker", "--storage", storage, "--trials", "1"]) == 2
    assert "differs from the one study 'autocompress' was made with" in capsys.readouterr().err
