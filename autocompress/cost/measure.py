"""Real measurements that the cost model's figures are checked against."""
from __future__ import annotations

import statistics
import time
import weakref

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from ..errors import AutocompressError
from ..threads import fixed_threads
from .runtimes import runnable


DEFAULT_THREADS = 1  # one intra-op thread: on small shared machines two threads time bimodally (1x or 2.3x)


CLOCKS = ("wall", "cpu")


@torch.no_grad()
def measure_latency_ms(model: nn.Module, example_input: torch.Tensor, repeats: int = 30, warmup: int = 5,
                       threads: int | None = DEFAULT_THREADS, clock: str = "wall", runtime: str = "torch") -> float:
    """Median time of one forward pass in milliseconds (eval mode, no grad, fixed thread count), run in
    `runtime` (cost/runtimes.py: eager PyTorch, or the model exported to an ONNX Runtime session with `threads`).

    clock "wall": elapsed time (on a CUDA input, up to the GPU's completion). clock "cpu": the CPU time of
    the calling thread, which with one torch thread is where all the work runs: on a machine shared with
    other work it leaves out the time the thread waited for a core (what the load adds to wall time),
    and on a quiet machine it equals the wall time."""
    if clock not in CLOCKS:
        raise AutocompressError(f"clock {clock!r} is not allowed; allowed: {', '.join(CLOCKS)}")
    if clock == "cpu" and (example_input.is_cuda or threads != 1):
        raise AutocompressError("clock 'cpu' times one torch thread on the CPU; use clock 'wall' with "
                                f"threads={threads} on {example_input.device}")
    model = runnable(model, example_input, runtime, threads)
    sync = torch.cuda.synchronize if example_input.is_cuda else (lambda: None)
    now = time.thread_time if clock == "cpu" else time.perf_counter
    with fixed_threads(threads):
        for _ in range(warmup):
            model(example_input)
        times = []
        for _ in range(repeats):
            sync()
            start = now()
            model(example_input)
            sync()
            times.append(now() - start)
    return statistics.median(times) * 1e3


@torch.no_grad()
def measure_peak_activation_bytes(model: nn.Module, example_input: torch.Tensor) -> int:
    """The most bytes of floating-point and quantized tensors (the input included, weights and buffers not) alive at once
    during one forward pass, tracked through every op PyTorch dispatches: an independent check of the cost
    model's peak_mem_kb. Run it on `torch.fx.symbolic_trace(model)` to free values after their last use,
    as a deployment runtime does, rather than when Python drops them. Integer tensors (max-pooling's
    indices) are not feature maps and are left out."""
    weights = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    with _LiveTensors(weights) as tracker:
        tracker.track(example_input)
        model.eval()(example_input)
    return tracker.peak


class _LiveTensors(TorchDispatchMode):
    """Sums the bytes of live storages after every op; a storage dies with the last tensor that views it."""

    def __init__(self, exclude: set):
        super().__init__()
        self.exclude, self.refs, self.live, self.peak = exclude, {}, 0, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and (t.is_floating_point() or t.is_quantized):
                self.track(t)
        return out

    def track(self, t: torch.Tensor) -> None:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if not ptr or ptr in self.exclude:
            return
        if ptr not in self.refs:
            self.refs[ptr] = [storage.nbytes(), 0]
            self.live += storage.nbytes()
            self.peak = max(self.peak, self.live)
        self.refs[ptr][1] += 1
        weakref.finalize(t, self._release, ptr)

    def _release(self, ptr: int) -> None:
        entry = self.refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.live -= entry[0]
            del self.refs[ptr]
