"""End to end from Python: search, Pareto front, rebuild, save/load, resume, reproducibility, faults."""
import json
import math

import pandas as pd
import pytest
import torch

import autocompress as ac
from autocompress.evaluate import Judge, accuracy, make_evaluator
from autocompress.models import DigitsResNet
from counting import count_params

BUDGETS = {"latency": 0.7, "size": 0.3}


@pytest.fixture(scope="module")
def search_data():
    """Real digits, with a 192-image validation slice so that each candidate is judged quickly."""
    from torch.utils.data import DataLoader, TensorDataset

    from autocompress.data import digits_tensors

    (xt, yt), (xv, yv), _ = digits_tensors()
    train = DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    return train, DataLoader(TensorDataset(xv[:192], yv[:192]), batch_size=192)
API_COLUMNS = ["accuracy", "latency_ms", "energy_mj", "size_kb", "macs", "params", "feasible", "policy"]


@pytest.fixture(scope="module")
def run(digits_model, digits_input, search_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("run")
    result = ac.compress(digits_model, digits_input, data=search_data, hardware="host", budgets=BUDGETS, final_epochs=0,
                         trials=10, seed=0, progress=False, storage=f"sqlite:///{path}/study.db")
    return result, path


def test_trials_and_pareto_have_the_api_columns(run):
    result, _ = run
    counted = result.trials[result.trials["state"] != "PRUNED"]  # a repair may make a duplicate (PRUNED)
    assert len(counted) == 10
    for column in API_COLUMNS:
        assert column in result.trials.columns and column in result.pareto.columns
    assert not result.pareto.empty
    assert set(result.pareto.index) <= set(result.trials.index[result.trials["feasible"]])


def test_infeasible_candidates_cost_no_accuracy_evaluation(run):
    result, _ = run
    trials = result.trials[result.trials["state"] == "COMPLETE"]
    limits = result.limits
    over = (trials["latency_ms"] > limits["latency_ms"]) | (trials["size_kb"] > limits["size_kb"])
    assert (over == ~trials["feasible"]).all()
    assert trials.loc[over, "accuracy"].isna().all()
    assert trials.loc[~over, "accuracy"].between(0, 1).all()


def test_pareto_is_non_dominated(run):
    result, _ = run
    front = result.pareto
    for i, a in front.iterrows():
        for j, b in front.iterrows():
            if i != j:
                assert not (b["accuracy"] >= a["accuracy"] and b["latency_ms"] <= a["latency_ms"]
                            and (b["accuracy"] > a["accuracy"] or b["latency_ms"] < a["latency_ms"]))
    # every feasible trial is dominated by or equal to some front member
    feasible = result.trials[result.trials["feasible"]]
    for _, t in feasible.iterrows():
        assert ((front["accuracy"] >= t["accuracy"]) & (front["latency_ms"] <= t["latency_ms"])).any()


def test_rebuilt_models_match_reported_numbers(run, digits_input, search_data):
    result, _ = run
    for n in result.pareto.index:
        model = result.model(n)
        assert count_params(model) == result.trials.loc[n, "params"]
        assert model(digits_input).shape == (1, 10)
        again = ac.estimate(model, digits_input, "host")
        assert again.latency_ms == pytest.approx(result.trials.loc[n, "latency_ms"])
        assert again.size_kb == pytest.approx(result.trials.loc[n, "size_kb"])
        # rebuilt in the state it was judged in (BN statistics re-estimated), so it scores what was reported
        assert accuracy(model, search_data[1]) == pytest.approx(result.trials.loc[n, "accuracy"])


def test_save_and_load_round_trip(run, tmp_path, digits_input, search_data):
    result, _ = run
    result.save(tmp_path)
    for name in ("trials.csv", "pareto.csv", "config.json", "base_model.pt"):
        assert (tmp_path / name).exists()
    with pytest.raises(ac.AutocompressError, match="no base model"):
        ac.Result.load(tmp_path).model(int(result.pareto.index[0]))
    again = ac.Result.load(tmp_path, model=DigitsResNet())  # the architecture; weights come from base_model.pt
    assert again.config["versions"]["torch"] == torch.__version__.split("+")[0]  # what the run was made with
    pd.testing.assert_frame_equal(again.pareto.drop(columns=["policy"]), result.pareto.drop(columns=["policy"]),
                                  check_dtype=False)
    for n in result.pareto.index:
        assert (tmp_path / "models" / f"trial_{n}.pt").exists()
        assert json.loads((tmp_path / "models" / f"trial_{n}.json").read_text()) == json.loads(result.trials.loc[n, "policy"])
        state = torch.load(tmp_path / "models" / f"trial_{n}.pt", weights_only=True)
        assert sum(v.numel() for k, v in state.items() if "running" not in k and "num_batches" not in k) == result.trials.loc[n, "params"]
        loaded = again.model(n)
        assert count_params(loaded) == result.trials.loc[n, "params"]
        torch.testing.assert_close(loaded(digits_input), result.model(n)(digits_input))
        assert accuracy(loaded, search_data[1]) == pytest.approx(result.trials.loc[n, "accuracy"])


def test_seeded_runs_are_reproducible(digits_model, digits_input, search_data):
    kwargs = dict(data=search_data, hardware="host", budgets=BUDGETS, trials=4, seed=3, progress=False, final_epochs=0)
    a = ac.compress(digits_model, digits_input, **kwargs).trials
    b = ac.compress(digits_model, digits_input, **kwargs).trials
    cols = ["policy", "accuracy", "latency_ms", "size_kb", "params", "feasible"]
    pd.testing.assert_frame_equal(a[cols], b[cols])


def test_resume_keeps_completed_trials(run, digits_model, digits_input, search_data):
    result, path = run
    more = ac.compress(digits_model, digits_input, data=search_data, hardware="host", budgets=BUDGETS, final_epochs=0,
                       trials=13, seed=0, progress=False, storage=f"sqlite:///{path}/study.db")
    assert len(more.trials[more.trials["state"] != "PRUNED"]) == 13
    cols = ["policy", "accuracy", "latency_ms"]
    pd.testing.assert_frame_equal(more.trials.loc[result.trials.index, cols], result.trials[cols])
    assert more.trials["policy"].nunique() >= 12  # new trials are new candidates, not repeats


def test_a_study_with_another_configuration_is_refused(run, digits_model, digits_input, search_data):
    _, path = run
    with pytest.raises(ac.AutocompressError, match="another configuration"):
        ac.compress(digits_model, digits_input, data=search_data, hardware="host", budgets={"latency": 0.5},
                    trials=12, progress=False, storage=f"sqlite:///{path}/study.db")


def test_cost_only_search_and_custom_evaluator(digits_model, digits_input):
    cost = ac.compress(digits_model, digits_input, data=None, objectives=("latency_ms", "size_kb"),
                       budgets={"size_kb": 1000}, trials=5, progress=False)
    assert cost.trials["accuracy"].isna().all() and not cost.pareto.empty
    calls = []
    custom = ac.compress(digits_model, digits_input, evaluator=lambda m: calls.append(1) or 0.5,
                         objectives=("accuracy", "size_kb"), trials=4, progress=False)
    assert len(calls) == 1 + 4  # the baseline, then each trial
    assert (custom.trials["accuracy"] == 0.5).all() and custom.baseline["accuracy"] == 0.5


def test_a_callable_evaluator_is_one_judge_behind_the_protocol(digits_model, digits_input):
    """The user's callable is wrapped, not special-cased: its number is the accuracy of the candidate it gets,
    nothing is recalibrated, the baseline is judged on a copy, and nothing is delivered."""
    seen = []
    judge = make_evaluator(None, lambda m: seen.append(m) or 0.25)
    assert isinstance(judge, Judge) and not judge.delivers and judge.train_loader is None
    assert judge.run_in("onnxruntime", digits_input) is judge
    judge.aim(0.9)  # no rungs to stop early: nothing changes
    model = ac.apply(digits_model, {}, digits_input)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert judge.judge(model, (1.0,)) == {"accuracy": 0.25} and seen[-1] is model
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())  # no BN recalibration
    assert judge.baseline(digits_model) == {"accuracy": 0.25} and seen[-1] is not digits_model
    assert judge(model) == 0.25 and make_evaluator(None, judge) is judge  # a Judge is used as given
    with pytest.raises(ac.AutocompressError, match="evaluator=0.5 is not allowed"):
        make_evaluator(None, 0.5)


class _RecordingJudge(Judge):
    """A user's own Judge: what the search tells it, and what it returns, reach the study unchanged."""

    def __init__(self):
        self.calls, self.runtime, self.floor = [], None, None

    def judge(self, model, cost=(), peers=None, on_rung=None):
        self.calls.append((cost, peers is not None and on_rung is not None))
        return {"accuracy": 0.75, "steps": 7}

    def baseline(self, model):
        return {"accuracy": 0.8, "test_accuracy": 0.7}

    def run_in(self, runtime, example_input):
        self.runtime = runtime
        return self

    def aim(self, floor):
        self.floor = floor


def test_a_judge_of_ones_own_is_told_the_runtime_floor_and_costs(digits_model, digits_input):
    judge = _RecordingJudge()
    result = ac.compress(digits_model, digits_input, evaluator=judge, objectives=("accuracy", "size_kb"),
                         budgets={"accuracy_drop": 10}, trials=3, progress=False)
    assert judge.runtime == "torch"  # `host` runs eager PyTorch
    assert judge.floor == pytest.approx(0.7) and result.baseline["test_accuracy"] == 0.7
    done = result.trials[result.trials["state"] == "COMPLETE"]
    assert len(done) == len(judge.calls) and (done["accuracy"] == 0.75).all() and (done["steps"] == 7).all()
    assert all(len(cost) == 1 and rungs for cost, rungs in judge.calls)  # size_kb; the study's rung log


def test_failing_and_nan_trials_are_recorded_and_the_study_goes_on(digits_model, digits_input):
    outcomes = iter([1.0, 0.9, RuntimeError("boom"), math.nan, 0.8, 0.7])  # the baseline first

    def flaky(model):
        value = next(outcomes)
        if isinstance(value, Exception):
            raise value
        return value

    result = ac.compress(digits_model, digits_input, evaluator=flaky, objectives=("accuracy", "macs"),
                         trials=5, progress=False)
    assert list(result.trials["state"]) == ["COMPLETE", "FAIL", "FAIL", "COMPLETE", "COMPLETE"]
    assert "boom" in result.trials.loc[1, "error"]
    assert "(at evaluate.py:" in result.trials.loc[1, "error"]  # where it left the package: the evaluator call
    assert "nan" in result.trials.loc[2, "error"]


def test_ctrl_c_keeps_completed_trials_and_resume_continues(digits_model, digits_input, tmp_path):
    count = {"n": 0}

    def interrupting(model):
        count["n"] += 1
        if count["n"] == 4:  # the baseline, two trials, then Ctrl-C
            raise KeyboardInterrupt
        return 0.5

    storage = f"sqlite:///{tmp_path}/study.db"
    kwargs = dict(objectives=("accuracy", "macs"), trials=5, progress=False, storage=storage)
    first = ac.compress(digits_model, digits_input, evaluator=interrupting, **kwargs)
    assert (first.trials["state"] == "COMPLETE").sum() == 2
    second = ac.compress(digits_model, digits_input, evaluator=lambda m: 0.5, **kwargs)
    assert (second.trials["state"] == "COMPLETE").sum() >= 4
    assert len(second.trials) == 5
    pd.testing.assert_frame_equal(second.trials.loc[:1, ["policy"]], first.trials.loc[:1, ["policy"]])


@pytest.mark.parametrize("kwargs, message", [
    ({"hardware": "toaster"}, "unknown hardware 'toaster'"),
    ({"budgets": {"latency_ms": -3}}, "budget latency_ms=-3"),
    ({"budgets": {"latency_ms": 0}}, "budget latency_ms=0"),
    ({"budgets": {"speed": 2}}, "unknown budget 'speed'"),
    ({"objectives": ("accuracy", "beauty")}, "unknown objective 'beauty'"),
    ({"trials": -1}, "trials=-1"),
    ({"sampler": "grid"}, "unknown sampler 'grid'"),
    ({"space": "nope"}, "unknown search space 'nope'"),
])
def test_bad_input_is_one_clear_sentence(kwargs, message, digits_model, digits_input, search_data):
    with pytest.raises(ac.AutocompressError, match=message) as info:
        ac.compress(digits_model, digits_input, data=search_data, progress=False, **{"trials": 1, **kwargs})
    assert "\n" not in str(info.value)


def test_a_model_that_fails_forward_is_reported(digits_model):
    with pytest.raises(ac.AutocompressError, match=r"forward fails on an example input of shape \(1, 3, 8, 8\)"):
        ac.compress(digits_model, torch.randn(1, 3, 8, 8), trials=1, progress=False, objectives=("macs",))


