"""Search spaces (YAML), their binding to a LayerGraph, and the Policy they produce.

A space names techniques and, for each, the choices of its knobs and the granularity at which
they are sampled: one value per target (`layer`), per stage (`stage`: targets at the same
feature-map resolution) or one for the whole model (`global`).

A technique's `allowed_settings` bounds its settings and, for a field it names, every choice of that
field (a tuple of allowed values, or an object supporting `in`, such as a range); a field whose allowed
values are names may list names (`act: [relu, hswish]`).

Candidates of several kinds in one study: each technique says which kind of candidate its policies make
(`Technique.kind`: "compressed", the user's model compressed, or e.g. "student", a new network). A space
holding techniques of more than one kind gets one more knob, `kind` (compressed | student). A policy then
holds only the sections of its kind: a student is built from the student knobs alone, a compressed model
from the compression knobs alone (the other kind's knobs are sampled but unused).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import optuna
import yaml

from .compress import COMPRESSED, TECHNIQUES
from .errors import AutocompressError
from .graph import LayerGraph

GRANULARITIES = ("layer", "stage", "global")
KIND = "kind"  # the knob that chooses a policy's candidate kind, in a space of several kinds


class Policy(dict):
    """Plain JSON data: technique -> settings and per-target values. `apply(model, policy)` is deterministic."""

    def to_json(self) -> str:
        return json.dumps(self, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "Policy":
        try:
            data = json.loads(text)
        except (TypeError, json.JSONDecodeError) as exc:
            raise AutocompressError(f"policy is not valid JSON ({exc})") from None
        if not isinstance(data, dict):
            raise AutocompressError(f"policy must be a JSON object, got {type(data).__name__}")
        return cls(data)

    def kind(self) -> str:
        """The kind of candidate it makes: that of a technique in it that builds a new network, else COMPRESSED."""
        return next((TECHNIQUES[t].kind for t in self if t in TECHNIQUES and TECHNIQUES[t].builds_model),
                    COMPRESSED)


def builtin_spaces() -> list[str]:
    folder = resources.files("autocompress") / "search_spaces"
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


@dataclass
class Knob:
    """One Optuna parameter: its name, distribution, and the technique field/targets it sets."""

    param: str
    distribution: optuna.distributions.BaseDistribution
    technique: str
    field: str
    targets: list[str]


class SearchSpace:
    """A validated search space: technique -> {field: choices, 'granularity': ..., setting: value}."""

    def __init__(self, name: str, techniques: dict, description: str = ""):
        self.name = name
        self.description = description
        self.techniques = {t: _validate_technique(t, cfg, name) for t, cfg in techniques.items()}

    @classmethod
    def load(cls, name_or_path: "str | Path | SearchSpace") -> "SearchSpace":
        """A built-in space by name (see `builtin_spaces()`) or a path to a YAML file."""
        if isinstance(name_or_path, SearchSpace):
            return name_or_path
        text, where = _read_space(str(name_or_path))
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise AutocompressError(f"search space {where} is not valid YAML: {str(exc).splitlines()[0]}") from None
        if not isinstance(data, dict) or not isinstance(data.get("techniques"), dict):
            raise AutocompressError(f"search space {where} must be a mapping with a 'techniques' mapping")
        extra = set(data) - {"name", "description", "techniques"}
        if extra:
            raise AutocompressError(f"unknown key {sorted(extra)[0]!r} in search space {where}; allowed: name, description, techniques")
        return cls(str(data.get("name", where)), data["techniques"], str(data.get("description", "")))

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "techniques": self.techniques}

    @property
    def kinds(self) -> tuple[str, ...]:
        """The candidate kinds its techniques make: COMPRESSED first, then the others in pipeline order."""
        kinds = {TECHNIQUES[t].kind: TECHNIQUES[t].order for t in self.techniques}
        return tuple(sorted(kinds, key=lambda k: (k != COMPRESSED, kinds[k])))

    def bind(self, graph: LayerGraph) -> "BoundSpace":
        """Turn the space into Optuna distributions for this model's layers and channel groups."""
        knobs, fixed = [], []
        for tname, cfg in self.techniques.items():
            technique = TECHNIQUES[tname]
            targets = technique.targets(graph)
            for field in technique.fields:
                dist = _distribution(cfg[field], names=True)  # validated on load
                if _fixed(dist):  # a single choice is a setting, not a knob: nothing for the sampler to do
                    fixed.append(Knob(f"{tname}.{field}.all", dist, tname, field, [t for t, _ in targets]))
                    continue
                for key, members in _group_targets(targets, cfg["granularity"]).items():
                    knobs.append(Knob(f"{tname}.{field}.{key}", dist, tname, field, members))
        if len(self.kinds) > 1:
            knobs.insert(0, Knob(KIND, optuna.distributions.CategoricalDistribution(self.kinds), "", KIND, []))
        return BoundSpace(self, knobs, fixed)


class BoundSpace:
    """A space bound to one model: sample a Policy from an Optuna trial, or build one from values."""

    def __init__(self, space: SearchSpace, knobs: list[Knob], fixed: list[Knob] | None = None):
        self.space = space
        self.knobs = knobs
        self.fixed = fixed or []

    @property
    def has_kind(self) -> bool:
        """Whether a `kind` knob chooses between kinds of candidate (your model compressed, a student)."""
        return any(k.param == KIND for k in self.knobs)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The kinds of candidate its policies can be, the default (COMPRESSED where there is one) first."""
        return self.space.kinds

    def kind_of(self, technique: str) -> str:
        """The kind of candidate `technique` makes (Technique.kind)."""
        return TECHNIQUES[technique].kind

    @property
    def techniques(self) -> list[str]:
        """The techniques that have knobs here (the `kind` knob is none), sorted."""
        return sorted({k.technique for k in self.knobs if k.param != KIND})

    @property
    def distributions(self) -> dict:
        return {k.param: k.distribution for k in self.knobs}

    def sample(self, trial: optuna.Trial) -> Policy:
        return self.policy(self.suggest(trial))

    def suggest(self, trial: optuna.Trial) -> dict:
        """Knob values (param -> value) sampled by the trial."""
        return {k.param: _suggest(trial, k) for k in self.knobs}

    def policy(self, values: dict) -> Policy:
        """Expand knob values (param -> value) into a Policy; missing knobs take their identity value."""
        policy = Policy()
        for tname, cfg in self.space.techniques.items():
            settings = {k: v for k, v in cfg.items() if k in TECHNIQUES[tname].settings}
            policy[tname] = dict(settings)
        for k in self.fixed + self.knobs:
            if k.param == KIND:
                continue
            value = values.get(k.param, _identity(k.distribution))
            section = policy[k.technique].setdefault(k.field, {})
            for target in k.targets:
                section[target] = value
        if self.has_kind:
            kind = values.get(KIND, self.kinds[0])
            policy = Policy({t: s for t, s in policy.items() if self.kind_of(t) == kind})
        return policy

    def uniform(self, fraction: float, only: str | None = None, kind: str | None = None) -> dict:
        """Knob values at the same relative position `fraction` (0 = most compressed, 1 = none); with `only`, the
        knobs of that technique alone, every other knob at its identity value. In a space with a `kind` knob,
        `kind` says which candidate it is (default: the first of `kinds`, your model compressed)."""
        values = {}
        for k in self.knobs:
            if k.param == KIND:
                values[k.param] = kind or self.kinds[0]
            elif only is not None and k.technique != only:
                values[k.param] = _identity(k.distribution)
            else:
                values[k.param] = value_at(k.distribution, fraction)
        return values


    def scaled(self, values: dict, scale: float, techniques: set[str] | None = None) -> dict:
        """Every ordered knob (of `techniques`, when given) moved toward its most compressed choice: relative
        position p -> scale x p (0 = most compressed, 1 = none), rounded down to a choice. Knobs whose choices
        are names (block type, activation, `kind`) are left as they are: they have no order."""
        out = dict(values)
        for k in self.knobs:
            if techniques is not None and k.technique not in techniques:
                continue
            d, value = k.distribution, values.get(k.param)
            if isinstance(d, optuna.distributions.CategoricalDistribution):
                if not all(isinstance(c, (int, float)) and not isinstance(c, bool) for c in d.choices):
                    continue
                ordered = sorted(d.choices)
                out[k.param] = ordered[math.floor(scale * ordered.index(value) + 1e-9)]
            else:
                out[k.param] = d.low + math.floor(scale * (value - d.low) / d.step + 1e-9) * d.step
        return out


def value_at(d: optuna.distributions.BaseDistribution, position: float):
    """The choice of a knob at relative `position` (0 = its smallest choice, 1 = its largest), rounded to the nearest."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        ordered = sorted(d.choices)
        return ordered[round(position * (len(ordered) - 1))]
    return d.low + round(position * (d.high - d.low) / d.step) * d.step


def _suggest(trial: optuna.Trial, knob: Knob):
    d = knob.distribution
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return trial.suggest_categorical(knob.param, d.choices)
    return trial.suggest_float(knob.param, d.low, d.high, step=d.step)


def _fixed(d) -> bool:
    return isinstance(d, optuna.distributions.CategoricalDistribution) and len(d.choices) == 1


def _identity(d) -> object:
    """The value that leaves the model as it is: the largest choice (keep 1.0, 32 bits)."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return max(d.choices)
    return d.high


def _read_space(spec: str) -> tuple[str, str]:
    if Path(spec).is_dir() and spec not in builtin_spaces():
        raise AutocompressError(f"search space {spec!r} is a folder; pass a space YAML file or a name: "
                                f"{', '.join(builtin_spaces())}")
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        path = Path(spec)
        if not path.is_file():
            raise AutocompressError(f"search space file {spec!r} does not exist")
        return path.read_text(), repr(spec)
    if spec not in builtin_spaces():
        raise AutocompressError(f"unknown search space {spec!r}; allowed: {', '.join(builtin_spaces())}, or a path to a YAML file")
    return (resources.files("autocompress") / "search_spaces" / f"{spec}.yaml").read_text(), repr(spec)


def _validate_technique(tname: str, cfg, where: str) -> dict:
    if tname not in TECHNIQUES:
        raise AutocompressError(f"unknown technique {tname!r} in search space {where!r}; allowed: {', '.join(TECHNIQUES)}")
    technique = TECHNIQUES[tname]
    cfg = dict(cfg or {})
    allowed = set(technique.fields) | set(technique.settings) | {"granularity"}
    for key in cfg:
        if key not in allowed:
            raise AutocompressError(f"unknown key {key!r} for technique {tname!r}; allowed: {', '.join(sorted(allowed))}")
    out = {"granularity": cfg.get("granularity", "layer")}
    if out["granularity"] not in GRANULARITIES:
        raise AutocompressError(f"granularity {out['granularity']!r} of {tname!r} is not allowed; allowed: {', '.join(GRANULARITIES)}")
    for key, default in technique.settings.items():
        value = cfg.get(key, default)
        choices = technique.allowed_settings.get(key)
        if choices is not None and value not in choices:
            raise AutocompressError(f"{tname}.{key} = {value!r} is not allowed; allowed: {_allowed_text(choices)}")
        out[key] = value
    for key, default in technique.fields.items():
        out[key] = cfg.get(key, default)
        allowed = technique.allowed_settings.get(key)
        names = isinstance(allowed, tuple) and all(isinstance(a, str) for a in allowed)
        dist = _distribution(out[key], f"{tname}.{key}", names=names)
        bad = [v for v in _choices(dist) if allowed is not None and v not in allowed]
        if bad:
            raise AutocompressError(f"{tname}.{key} choice {bad[0]!r} is not allowed; allowed: {_allowed_text(allowed)}")
    return out


def _allowed_text(allowed) -> str:
    return ", ".join(map(str, allowed)) if isinstance(allowed, tuple) else str(allowed)


def _choices(d) -> list:
    """Every value a knob's distribution can take: its listed choices, or its range's ends, then each step between."""
    if isinstance(d, optuna.distributions.CategoricalDistribution):
        return list(d.choices)
    steps = round((d.high - d.low) / d.step)
    return [_tidy(d.low), _tidy(d.high)] + [_tidy(d.low + i * d.step) for i in range(1, steps)]


def _tidy(value: float):
    """A grid value as written: 2.0000000001 -> 2, 0.30000000000000004 -> 0.3."""
    value = round(value, 9)
    return int(value) if value.is_integer() else value


def _distribution(spec, where: str = "knob", names: bool = False):
    if isinstance(spec, list):
        numbers = all(map(_number, spec))
        if not spec or not (numbers or names and all(isinstance(v, str) for v in spec)):
            raise AutocompressError(f"{where} must list {'names' if names else 'numbers'}, got {spec!r}")
        return optuna.distributions.CategoricalDistribution(sorted(set(spec)))
    if isinstance(spec, dict) and {"low", "high"} <= set(spec) and set(spec) <= {"low", "high", "step"}:
        low, high, step = spec["low"], spec["high"], spec.get("step")
        if not (_number(low) and _number(high) and 0 < low <= high):
            raise AutocompressError(f"{where} range must satisfy 0 < low <= high, got low={low!r} high={high!r}")
        step = ((high - low) / 8 or 1.0) if step is None else step
        if not (_number(step) and step > 0 and abs((high - low) / step - round((high - low) / step)) < 1e-6):
            raise AutocompressError(f"{where} step={step!r} is not allowed; it must be a positive number that "
                                    f"divides high - low = {high - low:g} into whole steps")
        return optuna.distributions.FloatDistribution(low, high, step=step)
    raise AutocompressError(f"{where} must be a list of choices or {{low, high, step}}, got {spec!r}")


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _group_targets(targets: list[tuple[str, str]], granularity: str) -> dict[str, list[str]]:
    """Knob key -> targets it sets: one knob per target, per stage, or a single global one."""
    grouped: dict[str, list[str]] = {}
    for target, stage in targets:
        key = target if granularity == "layer" else f"stage_{stage}" if granularity == "stage" else "all"
        grouped.setdefault(key, []).append(target)
    return grouped
