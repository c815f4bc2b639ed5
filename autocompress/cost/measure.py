"""Real measurements that the cost model's figures are checked against."""
from __future__ import annotations

import contextlib
import statistics
import time

import torch
from torch import nn


DEFAULT_THREADS = 1  # one intra-op thread: on small shared machines two threads time bimodally (1x or 2.3x)


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


@torch.no_grad()
def measure_latency_ms(model: nn.Module, example_input: torch.Tensor, repeats: int = 30, warmup: int = 5,
                       threads: int | None = DEFAULT_THREADS) -> float:
    """Median wall time of one forward pass in milliseconds (eval mode, no grad, fixed thread count)."""
    model = model.eval()
    with fixed_threads(threads):
        for _ in range(warmup):
            model(example_input)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(example_input)
            times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def count_params(model: nn.Module) -> int:
    """Parameters counted independently of the cost model (each tensor once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
