"""Pareto reports: the terminal table, CSV, JSON and the HTML page, from a real search, checked against the trials."""
import io
import itertools
import json
import re
from contextlib import redirect_stdout

import numpy as np
import optuna
import pandas as pd
import pytest

from autocompress import report
from autocompress.cli import main
from autocompress.cost.model import estimate
from autocompress.cost.profiles import HardwareProfile
from autocompress.errors import AutocompressError
from autocompress.result import Result
from report_runs import cost_only_run, digits_run


@pytest.fixture(scope="module")
def run():
    return digits_run()


def cli(*argv) -> tuple[int, str]:
    out = io.StringIO()
    with redirect_stdout(out):
        code = main([str(a) for a in argv])
    return code, out.getvalue()


@pytest.fixture(scope="module")
def none_met(tmp_path_factory):
    """A command-line run where every candidate is over budget (a latency budget far below anything pruning
    reaches): (its saved result, what the run printed)."""
    folder = tmp_path_factory.mktemp("none-met")
    code, out = cli("run", "--budget", "latency_ms=0.05", "--trials", "3", "--data", "fake",
                    "--objectives", "latency_ms,size_kb", "--out", folder, "--no-progress")
    assert code == 0
    return Result.load(folder), out


@pytest.fixture(scope="module")
def three_objectives():
    """A cost-only search over three objectives, its study stored in SQLite."""
    return cost_only_run((("size", 0.5),), ("latency_ms", "size_kb", "energy_mj"), 4, storage=True)


def test_the_search_gives_a_front_and_over_budget_trials(run):
    """The fixture is worth testing on: several Pareto models, and candidates over budget."""
    result, _ = run
    assert len(result.pareto) >= 2
    assert (~result.trials["feasible"]).sum() >= 1


def test_table_shows_baseline_budgets_and_the_binding_budget_of_each_model(run):
    result, _ = run
    text = result.report()
    lines = {line.split()[0] + (" " + line.split()[1] if line.startswith("trial") else ""): line
             for line in text.splitlines() if line.strip()}
    assert f"{result.baseline['accuracy']:.4g}" in lines["baseline"]
    for metric, limit in result.limits.items():
        assert f"{metric} <= {limit:.4g}" in text
        assert f"{limit:.4g}" in lines["budget"]
    for n, row in result.pareto.iterrows():
        used = {m: row[m] / limit for m, limit in result.limits.items()}
        metric = max(used, key=used.get)
        assert all(u <= 1 for u in used.values())
        assert lines[f"trial {n}"].endswith(f"{metric} {used[metric]:.0%}")
        assert f"{row['accuracy']:.4g}" in lines[f"trial {n}"]


def test_csv_and_json_hold_the_pareto_rows(run, tmp_path):
    result, folder = run
    code, out = cli("report", folder, "--format", "csv")
    assert code == 0
    table = pd.read_csv(io.StringIO(out), index_col="row")
    assert list(table.index) == ["baseline", "budget"] + [f"trial {n}" for n in result.pareto.index]
    for n, row in result.pareto.iterrows():
        for metric in ("accuracy", "latency_ms", "size_kb", "macs", "params"):
            assert table.loc[f"trial {n}", metric] == pytest.approx(float(row[metric]), rel=1e-12)
        assert json.loads(table.loc[f"trial {n}", "policy"]) == json.loads(row["policy"])

    target = tmp_path / "front.json"
    code, out = cli("report", folder, "--format", "json", "--to", target)
    assert code == 0 and f"wrote {target}" in out
    data = json.loads(target.read_text())
    assert list(data["pareto"]) == [f"trial {n}" for n in result.pareto.index]
    assert data["limits"] == pytest.approx(result.limits)
    assert data["hypervolume"]["value"] == pytest.approx(report.hypervolume_history(result).iloc[-1])
    assert data["hypervolume"]["reference"] == {"accuracy": 0.0, "latency_ms": result.limits["latency_ms"]}


def test_hypervolume_is_exact():
    # 2-D staircase: 3*1 + 2*1 + 1*1
    assert report.hypervolume([[1, 3], [2, 2], [3, 1]], [4, 4]) == pytest.approx(6.0)
    # dominated points, duplicates and points beyond the reference add nothing
    assert report.hypervolume([[1, 3], [2, 2], [3, 1], [3, 3], [2, 2], [5, 0]], [4, 4]) == pytest.approx(6.0)
    assert report.hypervolume(np.zeros((0, 2)), [1, 1]) == 0.0
    rng = np.random.default_rng(0)
    for dims in (2, 3, 4):
        points = rng.uniform(0, 1, size=(7, dims))
        assert report.hypervolume(points, np.ones(dims)) == pytest.approx(_union_volume(points, np.ones(dims)))


def _union_volume(points, ref) -> float:
    """Volume of the union of the boxes [p, ref] by inclusion-exclusion: exponential, independent, exact."""
    total = 0.0
    for k in range(1, len(points) + 1):
        for subset in itertools.combinations(points, k):
            total += (-1) ** (k + 1) * np.prod(ref - np.max(subset, axis=0))
    return total


def test_hypervolume_history_grows_to_the_fronts_area(run):
    result, _ = run
    history = report.hypervolume_history(result)
    assert list(history.index) == list(result.trials.index)
    assert (np.diff(history.to_numpy()) >= -1e-12).all()
    limit = result.limits["latency_ms"]
    points = [(1 - r["accuracy"], r["latency_ms"] / limit) for _, r in result.pareto.iterrows()]
    assert history.iloc[-1] == pytest.approx(_union_volume(np.array(points), np.ones(2)))
    assert 0 < history.iloc[-1] < 1


def test_when_no_candidate_meets_the_budgets_the_report_says_so_and_shows_the_closest(none_met):
    result, _ = none_met
    assert result.pareto.empty
    text = result.report()
    assert "no candidate met the budgets" in text
    limit = result.limits["latency_ms"]
    done = result.trials[result.trials["state"] == "COMPLETE"].sort_values("latency_ms")
    rows = [line for line in text.splitlines() if line.startswith("trial ")]
    assert [int(line.split()[1]) for line in rows] == list(done.index)  # closest first
    for line, (_, trial) in zip(rows, done.iterrows()):
        assert f"latency_ms +{trial['latency_ms'] / limit - 1:.1%}" in line
    page = result.report("html")
    assert "no candidate met the budgets" in page and 'class="alert"' in page
    data = json.loads(result.report("json"))
    assert data["pareto"] == {} and list(data["closest"]) == [f"trial {n}" for n in done.index]


def test_the_run_command_says_plainly_when_nothing_fits(none_met):
    result, printed = none_met
    assert "no candidate met the budgets: all 3 completed candidates are over budget" in printed
    assert result.report() in printed  # the run prints the same table as `autocompress report`


def test_html_is_one_offline_file_with_every_part(run):
    result, _ = run
    page = result.report("html")
    assert not re.search(r"<(script|link|img|iframe)\b", page)
    assert set(re.findall(r"https?://[^\s\"'<>)]+", page)) <= {"http://www.w3.org/2000/svg"}
    # the front: blue Pareto points, grey feasible trials, over-budget crosses, the baseline star
    t = result.trials[result.trials["state"] == "COMPLETE"]
    assert page.count('class="pareto"') == len(result.pareto)
    assert page.count('class="trial"') == int((t["feasible"] & ~t.index.isin(result.pareto.index)).sum())
    assert page.count('class="infeasible"') == int((~t["feasible"]).sum())
    assert page.count('class="baseline"') == 1
    assert page.count('<figure class="plot front">') == 1
    assert 'class="plot hv"' in page
    # the heatmap cells hold each Pareto model's policy values
    for n, row in result.pareto.iterrows():
        policy = json.loads(row["policy"])
        for layer, keep in policy["prune"]["keep"].items():
            assert re.search(rf"<title>#{n} [^<]*/ {re.escape(layer)}: {keep:.4g}</title>", page)
        for layer, bits in policy["quantize"]["weight_bits"].items():
            assert re.search(rf"<title>#{n} [^<]*/ {re.escape(layer)}: {bits}</title>", page)
    # the per-layer breakdown of the chosen (first Pareto) model is the cost model's, re-estimated
    chosen = int(result.pareto.index[0])
    profile = HardwareProfile.from_dict(result.config["hardware"], "test")
    layers = estimate(result.model(chosen), result.example_input, profile).layers
    assert f"every layer of trial {chosen} ({len(layers)} ops)" in page
    assert f"<td>{layers['latency_ms'].sum():.4g}</td><td>{result.trials.loc[chosen, 'latency_ms']:.4g}</td>" in page
    # run metadata
    for needle in (result.config["hardware"]["name"], f"sampler {result.config['sampler']}", "seed 0", "space default", "torch 2."):
        assert needle in page


def test_html_breaks_down_the_named_trial_and_rejects_unknown_ones(run):
    result, _ = run
    other = int(result.pareto.index[-1])
    assert f"Per-layer cost of trial {other}" in result.report("html", trial=other)
    with pytest.raises(AutocompressError, match="no trial 999"):
        result.report("html", trial=999)
    with pytest.raises(AutocompressError, match="unknown report format 'pdf'"):
        result.report("pdf")


def test_more_objectives_get_pairwise_panels(three_objectives):
    result, _ = three_objectives
    page = result.report("html")
    assert page.count('<figure class="plot front">') == 3
    assert page.count('class="pareto"') == 3 * len(result.pareto)


def test_a_stored_study_has_readable_objective_names_and_reports_from_its_storage(three_objectives):
    result, folder = three_objectives
    url = f"sqlite:///{folder / 'study.db'}"
    study = optuna.load_study(study_name="autocompress", storage=url)
    assert study.metric_names == ["latency_ms", "size_kb", "energy_mj"]  # optuna-dashboard's objective names
    code, out = cli("report", "--storage", url, "--study", "autocompress")
    assert code == 0 and out.strip() == result.report().strip()


def test_report_without_a_source_is_one_clear_error(capsys):
    assert main(["report"]) == 2
    assert capsys.readouterr().err.strip() == ("error: report needs a run folder (DIR) or --storage URL with "
                                               "--study NAME")
