"""Compact students found by architecture search: blocks (MBConv, fire, Ghost), `build(policy)`, and the
bank of the elastic supernet they inherit weights from (`autocompress.students.bank`; training it for a
search space is `autocompress.supernet`)."""
from .build import build

__all__ = ["build"]
