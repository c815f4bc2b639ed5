"""autocompress: hardware-aware auto-compression and architecture search for PyTorch models.

    import autocompress as ac
    result = ac.compress(model, example_input, data=(train_loader, val_loader), hardware="host",
                         budgets={"latency": 0.6, "size_kb": 300}, trials=100)
    result.pareto                       # the non-dominated feasible trials
    small = result.model(result.pareto.index[0])
"""
from . import versions
from .api import analyze, apply, compress, estimate
from .budgets import Budgets
from .cost.hardware import load_profile
from .cost.model import Estimate
from .cost.pack import load_packed
from .cost.profiles import HardwareProfile
from .errors import AutocompressError
from .graph import LayerGraph
from .result import Result
from .space import Policy, SearchSpace

__version__ = versions.__version__

__all__ = ["compress", "estimate", "apply", "analyze", "SearchSpace", "Policy", "HardwareProfile", "Budgets",
           "Result", "Estimate", "LayerGraph", "AutocompressError", "load_profile",
           "load_packed"]
