"""Real search results for the report, export and browser tests, each computed once per test session.

Not a conftest fixture so that three test files share one search (about half a minute on 2 cores)
without touching the shared conftest; the test files wrap these in fixtures.
"""
import atexit
import functools
import shutil
import tempfile
from pathlib import Path

import torch

import autocompress as ac
from autocompress.data import digits_loaders
from autocompress.models import digits_resnet

BUDGETS = {"latency": 0.6, "size": 0.3}


def _folder(prefix: str) -> Path:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    atexit.register(shutil.rmtree, path, True)
    return path


def example_input() -> torch.Tensor:
    return torch.randn(1, 1, 32, 32, generator=torch.Generator().manual_seed(0))


@functools.lru_cache(maxsize=None)
def digits_run():
    """(result, saved folder) of a real 6-trial accuracy/latency search on the digits within BUDGETS."""
    result = ac.compress(digits_resnet(), example_input(), data=digits_loaders(), budgets=BUDGETS, trials=6,
                         progress=False, storage=None, repair=False, final_epochs=1,  # repair=False: some over budget
                         hardware="raspberry-pi-4")  # a datasheet profile: the same costs on every machine
    folder = _folder("ac-digits-run-")
    result.save(folder)
    return result, folder


@functools.lru_cache(maxsize=None)
def cost_only_run(budgets: tuple, objectives: tuple, trials: int, storage: bool = False):
    """(result, folder) of a cost-only search (no accuracy evaluation: seconds); the study in folder/study.db
    when `storage`."""
    folder = _folder("ac-cost-run-")
    url = f"sqlite:///{folder / 'study.db'}" if storage else None
    result = ac.compress(digits_resnet(), example_input(), budgets=dict(budgets), objectives=objectives,
                         trials=trials, progress=False, storage=url)
    result.save(folder)
    return result, folder
