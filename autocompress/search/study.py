"""The study: created or resumed with its configuration, and the target of trials that every asker adds to.

The target is the study's: `run` asks for its --trials, each worker adds its own (`trials_asked:*` study user
attributes, one key per asker, so concurrent writes never collide).
"""
from __future__ import annotations

import json
import warnings

import optuna

from . import storage as storages
from ..budgets import METRICS
from ..errors import AutocompressError
from ..versions import package_versions
from .workers import requeue_lost

ASKED = "trials_asked:"         # study user attributes: one per asker (`run`, each worker), summed into the target


def open_study(storage, study_name: str, objectives, config: dict) -> optuna.Study:
    """Create the study, or load it to resume; refuse one that was made with another configuration.
    The caller sets its sampler (see `seed_for`)."""
    directions = [METRICS[o] for o in objectives]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    heartbeat = storages.default_heartbeat()  # checked before a study is made
    backend = storages.open_storage(storage)
    try:
        study = optuna.create_study(storage=backend, study_name=study_name, directions=directions,
                                    load_if_exists=True)
    except Exception as exc:
        raise AutocompressError(f"cannot open study {study_name!r} in storage {shown(storage)!r}: "
                                f"{shown(first_line(exc))}") from None
    stored = study.user_attrs.get("config")
    if stored is None:
        study.set_user_attr("versions", package_versions())  # not part of config: a resumed study may upgrade
        study.set_user_attr("heartbeat_s", heartbeat)
        study.set_user_attr("config", config)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names(list(objectives))  # readable names in optuna-dashboard
    elif stored != config:
        key = next(k for k in sorted(set(stored) | set(config)) if stored.get(k) != config.get(k))
        raise AutocompressError(
            f"study {study_name!r} in {shown(storage)!r} was made with another configuration ({key}: "
            f"{stored.get(key)!r}, now {config.get(key)!r}); use a new output folder or study name, or the "
            f"original settings")
    storages.arm(backend, study.user_attrs.get("heartbeat_s", storages.HEARTBEAT_S), requeue_lost)
    return study


def seed_for(study: optuna.Study, seed: int | None) -> int | None:
    """The sampler seed for this session: `seed` on a new study (reproducible runs), shifted by the trials
    already there on a resumed one (the same seed would propose the first session's policies again)."""
    return None if seed is None else seed + len(study.trials)


def peek(storage, study_name: str) -> tuple[dict, int]:
    """The configuration a study was made with, and its target, read without joining it (a worker rebuilds
    its problem from the configuration)."""
    study = storages.read_study(storage, study_name)
    config = study.user_attrs.get("config")
    if config is None:
        raise AutocompressError(f"study {study_name!r} in {shown(storage)!r} was not made by autocompress "
                                f"(it stores no configuration)")
    return config, target(study)


def ask_trials(study: optuna.Study, asker: str, trials: int) -> None:
    """Record that `asker` wants `trials` counted trials; the study's target is the sum over askers."""
    study.set_user_attr(ASKED + asker, trials)


def target(study: optuna.Study) -> int:
    return sum(v for k, v in study.user_attrs.items() if k.startswith(ASKED))


def config_json(config: dict) -> dict:
    """Round-trip through JSON so stored and fresh configs compare equal."""
    return json.loads(json.dumps(config, sort_keys=True, default=str))


def shown(storage) -> str:
    return storages.hide_password(storage) if isinstance(storage, str) else type(storage).__name__


def first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
