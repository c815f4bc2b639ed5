"""Compact students found by architecture search: blocks (MBConv, fire, Ghost), `build(policy)`, and the
elastic supernet they inherit weights from (import `autocompress.students.supernet` for it)."""
from .build import build

__all__ = ["build"]
