"""Torch's intra-op thread count held fixed inside a block: for timing (cost/measure.py, cost/calibrate.py) and
for the small SVDs of low-rank factorization (compress/lowrank.py), which both layers need."""
from __future__ import annotations

import contextlib

import torch


@contextlib.contextmanager
def fixed_threads(threads: int | None):
    """Run torch with `threads` intra-op threads inside the block (None: leave as is)."""
    before = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)
