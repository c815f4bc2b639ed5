"""Result: every trial and the Pareto front as DataFrames, models rebuilt from policies, save/load."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np
import optuna
import pandas as pd
import torch
from optuna.trial import TrialState

from .budgets import METRICS, pareto_mask
from .compress import apply
from .cost.measure import DEFAULT_THREADS, measure_latency_ms
from .cost.runtimes import as_run, keep_ranges
from .errors import AutocompressError
from .export import export
from .judged import WeightStore, beside
from .models import load_recorded, load_state
from .report import render
from .search import TrialRecord
from .space import Policy
from .search.storage import read_study

COLUMNS = ["accuracy", "test_accuracy", "latency_ms", "measured_latency_ms", "energy_mj", "size_kb", "macs", "params", "feasible", "state",
           "origin", "delivered", "search_accuracy", "steps", "final_steps", "policy", "error", "duration_s", "repair",
           "duplicate_of"]
DELIVERED = "delivered:"  # study user attribute per delivered trial: its final numbers (see deliver.py)
# a delivered model's numbers replace its search ones; the search's accuracy stays as search_accuracy
DELIVERY_KEYS = ("accuracy", "test_accuracy", "latency_ms", "measured_latency_ms", "energy_mj", "size_kb", "macs", "params", "feasible",
                 "search_accuracy", "final_steps")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, indexed by trial number, with the API's columns; a delivered trial shows its
    delivered model's numbers (accuracy on validation, test_accuracy on the held-out test data)."""
    rows = []
    deliveries = {k.removeprefix(DELIVERED): v for k, v in study.user_attrs.items() if k.startswith(DELIVERED)}
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        record = TrialRecord.of(t)
        row = {c: record.get(c) for c in COLUMNS}
        row.update(number=t.number, state=t.state.name, origin=record.origin, feasible=record.feasible,
                   delivered=False, search_accuracy=record.accuracy)
        final = deliveries.get(str(t.number), {})
        if "error" in final:
            row["error"] = f"delivery failed: {final['error']}"
        elif final:
            row.update({k: final.get(k) for k in DELIVERY_KEYS}, delivered=True)
        row["feasible"] = bool(row["feasible"]) and t.state == TrialState.COMPLETE
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["number"] + COLUMNS).set_index("number")
    for c in ("accuracy", "test_accuracy", "search_accuracy", "latency_ms", "measured_latency_ms", "energy_mj", "size_kb", "duration_s",
              "repair"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype(float)
    for c in ("steps", "final_steps"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("Int64")
    frame["delivered"] = frame["delivered"].astype(bool)
    for c in ("macs", "params", "duplicate_of"):
        frame[c] = pd.to_numeric(frame[c], errors="coerce").astype("Int64")
    frame["feasible"] = frame["feasible"].astype(bool)
    frame["error"] = frame["error"].astype(object).where(frame["error"].notna(), np.nan)  # as read back from CSV
    return frame


def pareto_front(trials: pd.DataFrame, objectives) -> pd.DataFrame:
    """Non-dominated feasible completed trials; duplicates of a point keep their first trial."""
    ok = trials[trials["feasible"] & (trials["state"] == "COMPLETE")].dropna(subset=list(objectives))
    if ok.empty:
        return ok
    signs = np.array([-1.0 if METRICS[o] == "maximize" else 1.0 for o in objectives])
    values = ok[list(objectives)].to_numpy(dtype=float) * signs
    front = ok[pareto_mask(values)]
    front = front.loc[~front[list(objectives)].duplicated()]
    return front.sort_values(list(objectives), ascending=[METRICS[o] != "maximize" for o in objectives])


class Result:
    """What a search returns: `trials`, `pareto`, `baseline`, and `model(n)` for any judged trial; `base_model` and
    `example_input` are what the trials' models are rebuilt from (what reports and exports price and run)."""

    def __init__(self, trials: pd.DataFrame, baseline: dict, config: dict, base_model=None, example_input=None,
                 weights: Callable[[int], dict | None] | None = None):
        self.trials = trials
        self.baseline = baseline
        self.config = config
        self.objectives = tuple(config["objectives"])
        self.limits = dict(config.get("limits", {}))
        self.min_accuracy = config.get("min_accuracy")
        self.base_model = base_model        # the uncompressed model every trial's policy applies to (None: not given)
        self.example_input = example_input  # the input the run traced and priced models with
        self._weights = weights or (lambda number: None)  # trial number -> the state_dict its numbers measure
        self.interrupted = False  # set by a search stopped by Ctrl-C before its target (the CLI exits 130)

    @classmethod
    def from_study(cls, study: optuna.Study, base_model=None, example_input=None,
                   store: WeightStore | None = None) -> "Result":
        """A result over a study; `store` holds the judged and delivered weights (default: beside the study's
        file, where the search put them)."""
        config = dict(study.user_attrs["config"])
        if study.user_attrs.get("versions"):
            config["versions"] = study.user_attrs["versions"]  # the environment that made the study
        config["min_accuracy"] = study.user_attrs.get("min_accuracy")  # the accuracy budget, as a floor
        if store is None:
            folder = study.user_attrs.get("weights")
            store = WeightStore(folder) if folder else WeightStore()
        trials = trials_frame(study)
        return cls(trials, study.user_attrs.get("baseline", {}), config, base_model, example_input,
                   lambda n: store.get(n, final=bool(trials.loc[n, "delivered"])))

    @property
    def pareto(self) -> pd.DataFrame:
        return pareto_front(self.trials, self.objectives)

    def model(self, number: int) -> torch.nn.Module:
        """Trial `number`'s model as the run's runtime computes it, the module its reported accuracy measures: the
        compressed model (`compressed(n)`), or, in a torch-int8 run, its int8 conversion (8-bit layers on torch.ao's
        kernels, with the activation ranges it was judged with). A trial without accuracy (cost-only) is its policy
        applied; one whose judged weights are gone is refused."""
        model = self.compressed(number)
        if pd.isna(self.trials.loc[number, "accuracy"]):
            return model
        return as_run(model, self.example_input, self.config.get("hardware", {}).get("runtime", "torch"))

    def compressed(self, number: int) -> torch.nn.Module:
        """Trial `number`'s compressed nn.Module, rebuilt from its stored policy with the weights its reported numbers
        were measured on (as delivered for a delivered trial, else as judged in the search): what every export
        writes and every runtime runs (in a torch-int8 run it keeps its int8 activation ranges)."""
        if number not in self.trials.index:
            raise AutocompressError(f"no trial {number!r} in this result; trials run from {self.trials.index.min()} "
                                    f"to {self.trials.index.max()}")
        if self.base_model is None:
            raise AutocompressError("this result has no base model to rebuild from; pass model= to Result.load")
        policy = Policy.from_json(self._policy_text(number))
        model = apply(self.base_model, policy, self.example_input)
        if not pd.isna(self.trials.loc[number, "accuracy"]):
            state = self._weights(number)
            if state is None:
                raise AutocompressError(
                    f"the weights trial {number} was judged with are not stored here (only the front's are kept, in "
                    f"the run folder's models/ and beside the study); its policy alone would not measure its "
                    f"reported accuracy")
            keep_ranges(model, state)
            model.load_state_dict(state)
        return model.eval()

    def measure(self, threads: int | None = None) -> "Result":
        """Time every front model as `model(n)` returns it, and the original, on this machine, in place:
        `measured_latency_ms` beside the cost model's `latency_ms` (median of a batch of the example input), at
        `threads` threads (default: the run's hardware profile's count), in the profile's runtime. What `run --measure` records at
        delivery, for a run made without it; the run's storage is not changed. Returns self."""
        if self.base_model is None:
            raise AutocompressError("timing the front needs the base model to rebuild it from; pass model= to "
                                    "Result.load")
        threads = threads or self.config.get("hardware", {}).get("threads") or DEFAULT_THREADS
        runtime = self.config.get("hardware", {}).get("runtime", "torch")
        timed = {n: measure_latency_ms(self.compressed(n), self.example_input, threads=threads, runtime=runtime)
                 for n in self.pareto.index}
        self.trials["measured_latency_ms"] = self.trials.get("measured_latency_ms", np.nan)
        self.trials.loc[list(timed), "measured_latency_ms"] = list(timed.values())
        self.baseline = {**self.baseline, "measured_latency_ms": measure_latency_ms(
            self.base_model, self.example_input, threads=threads, runtime=runtime)}
        return self

    def _policy_text(self, number: int) -> str:
        """Trial `number`'s stored policy. A PRUNED trial holds none (a duplicate of another trial's policy, or a
        claim beyond the target): refused in one sentence, naming the trial it duplicates."""
        row = self.trials.loc[number]
        if isinstance(row["policy"], str):
            return row["policy"]
        twin = row.get("duplicate_of")
        if twin is not None and not pd.isna(twin):
            raise AutocompressError(f"trial {number} is a duplicate of trial {int(twin)} (it sampled the same "
                                    f"policy and was not evaluated again); use trial {int(twin)}")
        raise AutocompressError(f"trial {number} ({row['state']}) holds no policy, so it has no model; pick a "
                                f"COMPLETE trial (see `report`)")

    def save(self, path) -> Path:
        """Write trials.csv, pareto.csv, config.json, the base model, and each Pareto model (.pt + policy .json)."""
        out = Path(path)
        (out / "models").mkdir(parents=True, exist_ok=True)
        self.trials.to_csv(out / "trials.csv")
        self.pareto.to_csv(out / "pareto.csv")
        (out / "config.json").write_text(json.dumps({**self.config, "baseline": self.baseline}, indent=2, default=str))
        if self.base_model is not None:
            torch.save(self.base_model.state_dict(), out / "base_model.pt")
            torch.save(self.example_input, out / "example_input.pt")
            for number in self.pareto.index:
                torch.save(self.compressed(number).state_dict(), out / "models" / f"trial_{number}.pt")
                (out / "models" / f"trial_{number}.json").write_text(self.trials.loc[number, "policy"])
        return out

    @classmethod
    def read(cls, storage, study: str | None = None, model: torch.nn.Module | None = None,
             build_model: bool = True) -> "Result":
        """The result of study `study` (None: the only one) in an Optuna storage, read without changing it.
        `model` is the uncompressed architecture; without it the model spec the study records is called (named on
        stderr first) unless `build_model` is False: the tables, CSV, JSON and plots need no model."""
        opened = read_study(storage, study)
        where = f"study {opened.study_name!r}"
        base, example = _base(None, _config_of(opened, where), model, build_model, where)
        return cls.from_study(opened, base, example)

    @classmethod
    def load(cls, path, model: torch.nn.Module | None = None, build_model: bool = True,
             study: str | None = None) -> "Result":
        """A run folder: the study in it whenever there is one (study.db, every trial as committed, so also a run
        that was killed), else its saved trials.csv and config.json. `model` and `build_model` as in `read`; the
        folder's base_model.pt and example_input.pt are used where they are."""
        src = Path(path)
        where = f"run folder {str(src)!r}"
        if (src / "study.db").exists():
            opened = _folder_study(src, study)
            base, example = _base(src, _config_of(opened, where), model, build_model, where)
            weights = beside(f"sqlite:///{src / 'study.db'}", opened.study_name)  # there, even if moved
            return cls.from_study(opened, base, example, WeightStore(weights) if weights.is_dir() else None)
        config = _read_config(src)
        trials = _read_trials(src / "trials.csv", config["objectives"])
        baseline = config.pop("baseline", {})
        base, example = _base(src, config, model, build_model, where)
        saved = WeightStore(src / "models")  # the front as reported: one trial_N.pt each
        return cls(trials, baseline, config, base, example, saved.get)

    def report(self, format: str = "table", to=None, trial: int | None = None) -> str:
        """The Pareto report as text: "table", "csv", "json" or "html" (one self-contained page); also written to
        `to` when given. `trial` picks the model whose per-layer costs the HTML report breaks down."""
        text = render(self, format, trial)
        if to is not None:
            Path(to).write_text(text, encoding="utf-8")
        return text

    def export(self, trial: int, format: str = "state_dict", to=None, data=None):
        """Write trial `trial`'s compressed model as "state_dict", "torchscript", "onnx", "torch-int8" or
        "onnx-int8" (see export.py) to `to`, judged as the
        search judged it (BatchNorm re-estimated on `data`'s training loader, else the run's data); returns an
        `Exported` with the file's size and its re-measured accuracy."""
        return export(self, trial, format, to, data)

    def __repr__(self) -> str:
        n_feasible = int(self.trials["feasible"].sum())
        return (f"Result({len(self.trials)} trials, {n_feasible} feasible, {len(self.pareto)} on the Pareto front, "
                f"objectives={self.objectives})")



def _folder_study(src: Path, name: str | None) -> optuna.Study:
    """The study in a run folder's study.db; one that cannot be read is said, never replaced by the CSVs beside
    it (they are written when a run ends, so they may be older than the study)."""
    try:
        return read_study(f"sqlite:///{src / 'study.db'}", name)
    except AutocompressError as exc:
        raise AutocompressError(f"run folder {str(src)!r} holds a study that cannot be read, so its saved CSVs "
                                f"(perhaps older) are not shown instead: {exc}") from None


def _config_of(study: optuna.Study, where: str) -> dict:
    config = study.user_attrs.get("config")
    if not isinstance(config, dict):
        raise AutocompressError(f"{where} was not written by autocompress (it stores no configuration)")
    return config


def _base(src: Path | None, config: dict, model, build_model: bool, where: str):
    """The uncompressed model (`model`, else the recorded spec's when `build_model`, else None) with the run
    folder's base_model.pt weights, and the example input (the folder's, else the seeded one `run` makes)."""
    state = _saved(src / "base_model.pt") if src is not None and (model is not None or build_model) else None
    if model is not None and state is not None:
        load_state(model, state, repr(str(src / "base_model.pt")))
    elif model is None and build_model and config.get("model_spec"):
        model = load_recorded(config, where, state)
    example = _saved(src / "example_input.pt") if src is not None else None
    if example is None and model is not None:
        example = torch.randn(config["input_shape"], generator=torch.Generator().manual_seed(0))
    return model, example


def _saved(path: Path):
    """A tensor or state_dict file of a run folder (None when absent), read with weights_only=True."""
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated, foreign, or a pickle that would run code
        raise AutocompressError(f"{str(path)!r} cannot be read as saved tensors ({type(exc).__name__})") from None


def _read_config(src: Path) -> dict:
    path = src / "config.json"
    if not path.exists() or not (src / "trials.csv").exists():
        raise AutocompressError(f"{str(src)!r} holds no saved result (no study.db, and trials.csv or config.json "
                                f"is missing)")
    try:
        config = json.loads(path.read_text())
    except ValueError as exc:  # not JSON, or not text at all
        raise AutocompressError(f"{str(path)!r} is corrupt ({exc})") from None
    if not isinstance(config, dict) or not isinstance(config.get("objectives"), list):
        raise AutocompressError(f"{str(path)!r} is corrupt (it holds no run configuration with objectives)")
    return config


def _read_trials(path: Path, objectives) -> pd.DataFrame:
    """trials.csv as `Result.save` wrote it; a file that is not one is one sentence."""
    try:
        if not path.read_bytes().endswith(b"\n"):  # pandas ends every line with one
            raise ValueError("it ends in the middle of a line: cut short")
        trials = pd.read_csv(path, index_col="number")
        missing = sorted({"state", "feasible", "policy", *objectives} - set(trials.columns))
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        for c in objectives:
            trials[c] = pd.to_numeric(trials[c]).astype(float)
    except ValueError as exc:  # not text, not CSV, cut short, or not the trials table
        raise AutocompressError(f"{str(path)!r} is corrupt ({str(exc).strip().splitlines()[0]})") from None
    for c in ("macs", "params", "steps", "final_steps"):
        if c in trials:
            trials[c] = trials[c].astype("Int64")
    for c in ("feasible", "delivered"):
        if c in trials:
            trials[c] = trials[c].astype(bool)
    return trials
