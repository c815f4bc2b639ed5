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

from .budgets import METRICS
from .compress import apply
from .errors import AutocompressError
from .judged import WeightStore
from .space import Policy

COLUMNS = ["accuracy", "test_accuracy", "latency_ms", "energy_mj", "size_kb", "macs", "params", "feasible", "state",
           "origin", "delivered", "search_accuracy", "steps", "final_steps", "policy", "error", "duration_s", "repair",
           "duplicate_of"]
DELIVERED = "delivered:"  # study user attribute per delivered trial: its final numbers (see deliver.py)
# a delivered model's numbers replace its search ones; the search's accuracy stays as search_accuracy
DELIVERY_KEYS = ("accuracy", "test_accuracy", "latency_ms", "energy_mj", "size_kb", "macs", "params", "feasible",
                 "search_accuracy", "final_steps")


def trials_frame(study: optuna.Study) -> pd.DataFrame:
    """One row per trial, indexed by trial number, with the API's columns; a delivered trial shows its
    delivered model's numbers (accuracy on validation, test_accuracy on the held-out test data)."""
    rows = []
    deliveries = {k.removeprefix(DELIVERED): v for k, v in study.user_attrs.items() if k.startswith(DELIVERED)}
    for t in study.get_trials(deepcopy=False):
        if t.state in (TrialState.RUNNING, TrialState.WAITING):
            continue
        a = t.user_attrs
        row = {c: a.get(c) for c in COLUMNS}
        row.update(number=t.number, state=t.state.name, origin=a.get("origin", "compressed"),
                   feasible=bool(a.get("feasible", False)), delivered=False, search_accuracy=a.get("accuracy"))
        final = deliveries.get(str(t.number), {})
        if "error" in final:
            row["error"] = f"delivery failed: {final['error']}"
        elif final:
            row.update({k: final.get(k) for k in DELIVERY_KEYS}, delivered=True)
        row["feasible"] = bool(row["feasible"]) and t.state == TrialState.COMPLETE
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["number"] + COLUMNS).set_index("number")
    for c in ("accuracy", "test_accuracy", "search_accuracy", "latency_ms", "energy_mj", "size_kb", "duration_s",
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


def pareto_mask(values: np.ndarray) -> np.ndarray:
    """Rows of `values` (all to be minimized) that no other row dominates."""
    n = len(values)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        dominated = np.all(values <= values[i], axis=1) & np.any(values < values[i], axis=1)
        keep[i] = not dominated.any()
    return keep


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
    """What a search returns: `trials`, `pareto`, `baseline`, and `model(n)` for any judged trial."""

    def __init__(self, trials: pd.DataFrame, baseline: dict, config: dict, base_model=None, example_input=None,
                 weights: Callable[[int], dict | None] | None = None):
        self.trials = trials
        self.baseline = baseline
        self.config = config
        self.objectives = tuple(config["objectives"])
        self.limits = dict(config.get("limits", {}))
        self.min_accuracy = config.get("min_accuracy")
        self._base_model = base_model
        self._example_input = example_input
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
        """Trial `number`'s compressed model, rebuilt from its stored policy with the weights its reported numbers
        were measured on (as delivered for a delivered trial, else as judged in the search). A trial without
        accuracy (cost-only) is its policy applied; one whose judged weights are gone is refused."""
        if number not in self.trials.index:
            raise AutocompressError(f"no trial {number!r} in this result; trials run from {self.trials.index.min()} "
                                    f"to {self.trials.index.max()}")
        if self._base_model is None:
            raise AutocompressError("this result has no base model to rebuild from; pass model= to Result.load")
        policy = Policy.from_json(self._policy_text(number))
        model = apply(self._base_model, policy, self._example_input)
        if not pd.isna(self.trials.loc[number, "accuracy"]):
            state = self._weights(number)
            if state is None:
                raise AutocompressError(
                    f"the weights trial {number} was judged with are not stored here (only the front's are kept, in "
                    f"the run folder's models/ and beside the study); its policy alone would not measure its "
                    f"reported accuracy")
            model.load_state_dict(state)
        return model.eval()

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
        if self._base_model is not None:
            torch.save(self._base_model.state_dict(), out / "base_model.pt")
            torch.save(self._example_input, out / "example_input.pt")
            for number in self.pareto.index:
                torch.save(self.model(number).state_dict(), out / "models" / f"trial_{number}.pt")
                (out / "models" / f"trial_{number}.json").write_text(self.trials.loc[number, "policy"])
        return out

    @classmethod
    def load(cls, path, model: torch.nn.Module | None = None) -> "Result":
        """Read a saved result; `model` (the uncompressed architecture) is needed unless the run named a model spec."""
        src = Path(path)
        if not (src / "trials.csv").exists() or not (src / "config.json").exists():
            raise AutocompressError(f"{str(src)!r} holds no saved result (trials.csv and config.json are missing)")
        try:
            config = json.loads((src / "config.json").read_text())
        except json.JSONDecodeError as exc:
            raise AutocompressError(f"{str(src / 'config.json')!r} is corrupt ({exc})") from None
        baseline = config.pop("baseline", {})
        trials = pd.read_csv(src / "trials.csv", index_col="number")
        for c in ("macs", "params", "steps", "final_steps"):
            if c in trials:
                trials[c] = trials[c].astype("Int64")
        for c in ("feasible", "delivered"):
            if c in trials:
                trials[c] = trials[c].astype(bool)
        base, example = model, None
        if (src / "example_input.pt").exists():
            example = torch.load(src / "example_input.pt", weights_only=True)
        if base is None and config.get("model_spec"):
            from .models import load_model

            base = load_model(config["model_spec"], config.get("checkpoint"))
        if base is not None and (src / "base_model.pt").exists():
            base.load_state_dict(torch.load(src / "base_model.pt", map_location="cpu", weights_only=True))
        saved = WeightStore(src / "models")  # the front as reported: one trial_N.pt each
        return cls(trials, baseline, config, base, example, saved.get)

    def report(self, format: str = "table", to=None, trial: int | None = None) -> str:
        """The Pareto report as text: "table", "csv", "json" or "html" (one self-contained page); also written to
        `to` when given. `trial` picks the model whose per-layer costs the HTML report breaks down."""
        from .report import render

        text = render(self, format, trial)
        if to is not None:
            Path(to).write_text(text, encoding="utf-8")
        return text

    def export(self, trial: int, format: str = "state_dict", to=None, data=None):
        """Write trial `trial`'s compressed model as "state_dict", "torchscript", "onnx", "torch-int8" or
        "onnx-int8" (see export.py) to `to`, judged as the
        search judged it (BatchNorm re-estimated on `data`'s training loader, else the run's data); returns an
        `Exported` with the file's size and its re-measured accuracy."""
        from .export import export

        return export(self, trial, format, to, data)

    def __repr__(self) -> str:
        n_feasible = int(self.trials["feasible"].sum())
        return (f"Result({len(self.trials)} trials, {n_feasible} feasible, {len(self.pareto)} on the Pareto front, "
                f"objectives={self.objectives})")

