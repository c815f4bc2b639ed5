"""A student supernet's bank of tensors: how a student inherits its weights from it, and this machine's cache.

The bank holds, for every parameter and buffer name a student of the space can have, the largest tensor any
of them needs. A student inherits its weights by slicing: leading output and input channels, the centre of
larger kernels (OFA's elastic kernel without its transform matrices), the first blocks of each stage
(elastic depth). Pointwise convs with and without Ghost maps, and squeeze-excite, have their own tensors
(their names differ), shared by every student that uses them.

Banks are cached under `models.cache_dir()/supernets/<key>.pt`. Training one for a search space is
autocompress/supernet.py; the student technique (compress/student.py) only builds and inherits, so this
part sits below the compression techniques and the evaluator that training needs.
"""
from __future__ import annotations

import os

import torch
from torch import nn

from ..errors import AutocompressError
from ..graph import check_forward
from ..models import cache_dir

_LOADED: dict[str, dict] = {}  # key -> bank, for this process


def class_count(teacher: nn.Module, example_input: torch.Tensor) -> int:
    """Classes of a teacher whose output is class scores (batch, classes); anything else is refused."""
    out = check_forward(teacher, example_input)
    if out.dim() != 2 or not out.is_floating_point() or out.shape[1] < 2:
        raise AutocompressError(f"a student is trained from a teacher that outputs class scores of shape "
                                f"(batch, classes); this model outputs a {out.dtype} tensor of shape "
                                f"{tuple(out.shape)}")
    return int(out.shape[1])


# ---- slicing -------------------------------------------------------------------------------------------

def region(big, small) -> tuple:
    """Index of `small` inside `big`: leading channels (dims 0-1), centred in the kernel dims (2+)."""
    return tuple(slice(0, s) if d < 2 else slice((b - s) // 2, (b - s) // 2 + s)
                 for d, (b, s) in enumerate(zip(big, small)))


def crop(tensor: torch.Tensor, shape) -> torch.Tensor:
    """A view of `tensor` with `shape` (see region)."""
    shape = tuple(shape)
    if any(s > b for s, b in zip(shape, tensor.shape)) or len(shape) != tensor.dim():
        raise AutocompressError(f"a student needs a tensor of shape {shape}, larger than its supernet's "
                                f"{tuple(tensor.shape)}")
    return tensor[region(tensor.shape, shape)]


def named_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and buffers by name, each tensor once (tied blocks under their first name)."""
    return {**dict(model.named_parameters()), **{n: b for n, b in model.named_buffers() if b is not None}}


def bank_name(name: str) -> str:
    """The bank tensor a student tensor is cut from: a Ghost conv's real filters are the leading filters of
    the plain pointwise conv in its place, so Ghost students reuse what plain ones learned."""
    return name.replace(".primary.", ".")


def inherit(student: nn.Module, bank: dict) -> nn.Module:
    """Fill `student`'s weights and BatchNorm statistics from the supernet `bank`, in place."""
    tensors = {**bank["params"], **bank["buffers"]}
    with torch.no_grad():
        for name, t in named_tensors(student).items():
            if bank_name(name) not in tensors:
                raise AutocompressError(f"the supernet has no tensor {bank_name(name)!r}; was it trained for "
                                        f"another space?")
            t.copy_(crop(tensors[bank_name(name)], t.shape))
    return student


# ---- cache ---------------------------------------------------------------------------------------------

def _path(key: str):
    folder = cache_dir() / "supernets"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{key}.pt"


def load(key: str) -> dict | None:
    """The cached bank `key`, or None when this machine has none."""
    if key not in _LOADED:
        path = _path(key)
        if not path.exists():
            return None
        _LOADED[key] = torch.load(path, weights_only=True)
    return _LOADED[key]


def save(key: str, bank: dict) -> None:
    path = _path(key)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    torch.save(bank, tmp)
    os.replace(tmp, path)  # atomic: a killed run never leaves half a supernet
    _LOADED[key] = bank
