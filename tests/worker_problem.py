"""A small problem for the worker tests, importable by `autocompress worker` subprocesses (tests/ on PYTHONPATH):
a little CNN that is cheap to analyse, compress and price, and real digits whose validation pass sleeps a fixed
time, so that a trial lasts long enough to be killed midway and three workers on a 2-core machine spend it
waiting rather than fighting over the CPU."""
import os
import time

import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset
from torch.utils.data.dataloader import default_collate

from autocompress.data import digits_tensors

SLEEP_S = float(os.environ.get("AUTOCOMPRESS_TEST_EVAL_S", "1.5"))
INPUT_SHAPE = (1, 1, 32, 32)


def tiny_model() -> nn.Module:
    """Untrained, but the same weights in every process (seeded): its fingerprint must agree across workers."""
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                         nn.Conv2d(16, 32, 3, stride=2, padding=1), nn.BatchNorm2d(32), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10))


def _slow_collate(batch):
    time.sleep(SLEEP_S)
    return default_collate(batch)


def slow_digits():
    (xt, yt), (xv, yv), _ = digits_tensors()
    train = DataLoader(TensorDataset(xt, yt), batch_size=64, shuffle=True, generator=torch.Generator().manual_seed(0))
    val = DataLoader(TensorDataset(xv[:128], yv[:128]), batch_size=128, collate_fn=_slow_collate)
    return train, val
