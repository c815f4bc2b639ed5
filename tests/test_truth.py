"""A number on the front is a promise: for every built-in space, every trial whose weights a result holds (the
delivered front, and judged trials that were early-stopped, repaired or promoted) measures what it reports, as
`Result.model(n)` returns it, after `Result.save` / `Result.load`, and as every exported file; sizes and parameters
are those the cost model measures on the returned module. Small data and a 3-step supernet keep it quick."""
import copy

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import autocompress as ac
from autocompress.evaluate import accuracy
from autocompress.space import SearchSpace, builtin_spaces
from autocompress.students import bank


@pytest.fixture(scope="module")
def tiny_data():
    from autocompress.data import digits_tensors

    (xt, yt), (xv, yv), (xs, ys) = digits_tensors()
    gen = torch.Generator().manual_seed(0)
    return (DataLoader(TensorDataset(xt[:128], yt[:128]), batch_size=64, shuffle=True, generator=gen),
            DataLoader(TensorDataset(xv[:96], yv[:96]), batch_size=96),
            DataLoader(TensorDataset(xs[:96], ys[:96]), batch_size=96))


def quick(name: str) -> SearchSpace:
    """The built-in space, its student supernet (if any) trained 3 steps instead of hundreds."""
    space = SearchSpace.load(name)
    techniques = copy.deepcopy(space.techniques)
    if "student" in techniques:
        techniques["student"]["supernet_steps"] = 3
    return SearchSpace(space.name, techniques, space.description)


@pytest.mark.parametrize("name", builtin_spaces())
def test_every_reported_number_is_what_the_user_takes_away(name, digits_model, digits_input, tiny_data, tmp_path,
                                                           monkeypatch):
    monkeypatch.setattr(bank, "_path", lambda key: tmp_path / f"{key}.pt")
    monkeypatch.setattr(bank, "_LOADED", {})
    storage = f"sqlite:///{tmp_path}/study.db"
    result = ac.compress(digits_model, digits_input, data=tiny_data, space=quick(name), trials=4, finetune_steps=12,
                         final_epochs=1, budgets={"size": 0.9}, progress=False, storage=storage)
    assert not result.pareto.empty and result.pareto["delivered"].all()
    result.save(tmp_path / "run")
    again = ac.Result.load(tmp_path / "run", model=copy.deepcopy(digits_model))
    reread = ac.Result.from_study(__import__("optuna").load_study(study_name="autocompress", storage=storage),
                                  digits_model, digits_input)
    checked = 0
    for number, row in result.trials[result.trials["accuracy"].notna()].iterrows():
        try:
            model = result.model(number)
        except ac.AutocompressError:  # a dominated trial whose weights were let go: refused, never guessed
            assert number not in result.pareto.index
            continue
        assert accuracy(model, tiny_data[1]) == row["accuracy"], (name, number)
        if row["delivered"]:
            assert accuracy(model, tiny_data[2]) == row["test_accuracy"], (name, number)
        cost = ac.estimate(model, digits_input)
        assert cost.size_kb == pytest.approx(row["size_kb"], rel=1e-9) and cost.params == row["params"]
        assert accuracy(reread.model(number), tiny_data[1]) == row["accuracy"]
        checked += 1
    assert checked >= len(result.pareto)
    for number, row in result.pareto.iterrows():
        assert accuracy(again.model(number), tiny_data[1]) == row["accuracy"]
        for fmt in ("state_dict", "torchscript", "onnx"):
            info = result.export(number, fmt, tmp_path / f"t{number}.{fmt}", data=tiny_data)
            assert info.accuracy == pytest.approx(row["accuracy"], abs=1.5 / 96), (name, number, fmt)
            if fmt != "onnx":  # the same kernels: exactly; ONNX Runtime's may flip a near tie
                assert info.accuracy == row["accuracy"] and info.test_accuracy == row["test_accuracy"]


def test_an_accuracy_budget_is_a_constraint_on_the_delivered_accuracy(digits_model, digits_input, tiny_data):
    result = ac.compress(digits_model, digits_input, data=tiny_data, trials=5, finetune_steps=12, final_epochs=1,
                         budgets={"accuracy_drop": 2.0, "latency": 0.8}, progress=False)
    floor = result.baseline["accuracy"] - 0.02
    assert result.min_accuracy == pytest.approx(floor) and result.config["budgets"]["accuracy_drop"] == 2.0
    judged = result.trials[result.trials["accuracy"].notna()]
    assert (judged["feasible"] == (judged["accuracy"] >= floor - 1e-12) & (judged["latency_ms"] <= result.limits[
        "latency_ms"])).all()
    assert (result.pareto["accuracy"] >= floor - 1e-12).all()
    assert f"accuracy >= {floor:.4g}" in result.report()


@pytest.mark.parametrize("item, message", [
    ("accuracy_drop=-1", "accuracy_drop=-1.0 is not allowed; it is accuracy points below"),
    ("accuracy=1.5", "accuracy=1.5 is not allowed; it is a fraction in \\(0, 1\\]"),
    ("accuracy=98%", "percentages are for relative budgets"),
])
def test_bad_accuracy_budgets_name_the_value_and_what_is_allowed(item, message):
    with pytest.raises(ac.AutocompressError, match=message):
        ac.Budgets.parse([item])
    assert ac.Budgets.parse(["accuracy_drop=1", "accuracy=0.9"]).accuracy_floor(0.995) == pytest.approx(0.985)


def test_measure_times_every_delivered_front_model_and_the_original(digits_model, digits_input, tiny_data):
    from autocompress.report.plots import fmt
    from autocompress.report import format_table

    result = ac.compress(digits_model, digits_input, data=tiny_data, trials=3, finetune_steps=0, final_epochs=0,
                         budgets={"size": 0.5}, progress=False, measure=True)
    front = result.pareto
    assert len(front) and front["delivered"].all() and (front["measured_latency_ms"] > 0).all()
    assert result.baseline["measured_latency_ms"] > 0
    assert "measured_latency_ms" in format_table(result)
    page = result.report("html")  # the HTML report plots predicted against measured, one point per timed model
    assert "Predicted against measured latency" in page
    for number, row in front.iterrows():
        assert f"trial {number}: predicted {fmt(row['latency_ms'])} ms, measured {fmt(row['measured_latency_ms'])}" in page
    plain = ac.compress(digits_model, digits_input, data=tiny_data, trials=2, finetune_steps=0, final_epochs=0,
                        progress=False)
    assert plain.pareto["measured_latency_ms"].isna().all() and "measured_latency_ms" not in format_table(plain)
    assert "Predicted against measured latency" not in plain.report("html")


def test_report_measure_times_the_front_of_a_run_made_without_it(digits_model, digits_input, tiny_data, tmp_path):
    """`report --measure` on a saved run: every front model and the original timed here, the folder unchanged."""
    import io
    from contextlib import redirect_stdout

    import pandas as pd

    from autocompress.cli import main

    folder = tmp_path / "run"
    ac.compress(digits_model, digits_input, data=tiny_data, trials=3, finetune_steps=0, final_epochs=0,
                budgets={"size": 0.5}, progress=False).save(folder)
    before = sorted((p.name, p.stat().st_mtime_ns) for p in folder.rglob("*"))
    out = io.StringIO()
    with redirect_stdout(out):
        code = main(["report", str(folder), "--model", "digits_resnet", "--measure", "--format", "csv"])
    assert code == 0
    rows = pd.read_csv(io.StringIO(out.getvalue()), index_col=0)
    front = rows[rows.index.str.startswith("trial")]
    assert len(front) and (front["measured_latency_ms"] > 0).all() and rows.loc["baseline", "measured_latency_ms"] > 0
    again = ac.Result.load(folder, model=digits_model).measure(threads=1)
    assert (again.pareto["measured_latency_ms"] > 0).all() and again.baseline["measured_latency_ms"] > 0
    assert sorted((p.name, p.stat().st_mtime_ns) for p in folder.rglob("*")) == before
