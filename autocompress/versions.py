"""This package's version and the installed versions of the packages a run depends on: recorded with every
study (search/study.py) and shown in the HTML report (report/html.py)."""
from __future__ import annotations

from importlib import metadata

__version__ = "0.1.0"

PACKAGES = ("autocompress", "torch", "torchvision", "optuna", "torch-pruning", "fvcore", "numpy", "pandas")


def package_versions() -> dict:
    """Installed versions of the packages a run depends on."""
    out = {}
    for name in PACKAGES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out
