"""What every technique provides, and the per-module metadata the cost model reads."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from torch import nn

META = "autocompress_meta"


def get_meta(module: nn.Module) -> dict:
    """Compression metadata of a module (weight_bits, sparsity, rank...); empty when uncompressed."""
    return getattr(module, META, {})


def set_meta(module: nn.Module, **values) -> None:
    meta = dict(get_meta(module))
    meta.update(values)
    setattr(module, META, meta)


@dataclass(frozen=True)
class Technique:
    """One compression technique as the search space sees it.

    `fields` are the knobs it exposes (name -> default choices); `settings` are fixed options with
    their defaults and allowed values (None means any value); `targets(graph)` lists
    (target name, stage) pairs that a knob is sampled for; `apply` performs the compression.
    """

    name: str
    fields: dict
    settings: dict
    targets: Callable
    apply: Callable
    allowed_settings: dict = field(default_factory=dict)
