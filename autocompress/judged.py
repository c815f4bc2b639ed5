"""The judged weights of trials: what `Result.model(n)` loads, so that it returns the very model whose accuracy
was reported, without training anything again.

A trial's model is its policy applied to the user's model plus these weights (BatchNorm statistics, fine-tuned
values, masks and codebooks as judged). They are kept in memory for an in-memory study, else as
`trial_N.pt` (as judged in the search) and `trial_N.final.pt` (as delivered, after the final fine-tune), each a
state_dict, in a folder beside the study, written atomically, so every process of a study on one machine (and a
report opened later) finds them. The delivered weights are written before the study records the delivery.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from .errors import AutocompressError


class WeightStore:
    """Trial number -> judged state_dict, in memory (`folder` None) or in `folder`."""

    def __init__(self, folder: Path | str | None = None):
        self.folder = Path(folder) if folder is not None else None
        self._memory: dict[int, dict] = {}

    def put(self, number: int, model: nn.Module, final: bool = False) -> None:
        state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
        if self.folder is None:
            self._memory[(number, final)] = state
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / f".trial_{number}.{os.getpid()}.tmp"
        torch.save(state, tmp)
        os.replace(tmp, self._path(number, final))  # atomic: a reader never sees half a file

    def get(self, number: int, final: bool = False) -> dict | None:
        if self.folder is None:
            return self._memory.get((number, final))
        path = self._path(number, final)
        if not path.exists():
            return None
        try:
            return torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # truncated or foreign file
            raise AutocompressError(f"the weights of trial {number} in {str(path)!r} cannot be read "
                                    f"({type(exc).__name__})") from None

    def discard(self, numbers) -> None:
        """Forget the weights of `numbers` (trials that no front can hold again)."""
        for number in numbers:
            for final in (False, True):
                self._memory.pop((number, final), None)
                if self.folder is not None:
                    self._path(number, final).unlink(missing_ok=True)

    def _path(self, number: int, final: bool) -> Path:
        return self.folder / f"trial_{int(number)}{'.final' if final else ''}.pt"

    def __repr__(self) -> str:
        return f"WeightStore({str(self.folder) if self.folder else 'memory'})"


def beside(storage, study_name: str) -> Path | None:
    """The weights folder of a study in a file (SQLite, journal): `<file>.weights/<study>` next to it; None for
    an in-memory study or a server database (give `weights=` a folder every worker can reach)."""
    text = storage if isinstance(storage, str) else None
    if text is None:
        return None
    if text.startswith("sqlite:///"):
        path = text.removeprefix("sqlite:///")
    elif text.startswith("journal:") or (text.endswith(".log") and "://" not in text):
        path = text.removeprefix("journal:")
    else:
        return None
    return Path(path).resolve().parent / f"{Path(path).name}.weights" / study_name
