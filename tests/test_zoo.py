"""The torchvision classification zoo under random pruning policies.

For each model (weights=None, small inputs): the analysis names the layers it must leave whole in at
most one warning, random keep ratios in [0.2, 1.0] per channel group give a model whose forward runs
with an unchanged output shape, and the parameter count the cost model reports equals one counted
from the modules. COVERAGE records which models prune fully, partly or not at all. MaxViT takes about
a minute (its 7x7 partitions need 224x224 inputs, and Torch-Pruning's index mapping through window
reshapes is slow): it runs with AUTOCOMPRESS_SLOW_TESTS=1.
"""
import os
import random
import warnings

import pytest
import torch
import torchvision

import autocompress as ac
from autocompress.threads import fixed_threads
from counting import count_params

FULL, PARTLY, NONE = "full", "partly", "none"
COVERAGE = {
    "resnet18": FULL, "resnet50": FULL, "resnext50_32x4d": FULL, "wide_resnet50_2": FULL, "mobilenet_v2": FULL,
    "mobilenet_v3_small": FULL, "mobilenet_v3_large": FULL, "efficientnet_b0": FULL, "efficientnet_v2_s": FULL,
    "squeezenet1_1": FULL, "densenet121": FULL, "googlenet": FULL, "inception_v3": FULL, "mnasnet0_5": FULL,
    "regnet_y_400mf": FULL, "vgg11_bn": FULL, "alexnet": FULL, "convnext_tiny": FULL, "vit_b_16": FULL,
    "shufflenet_v2_x1_0": PARTLY,  # branch widths; channels through the shuffle (a 5-d view) stay: order unmapped
    "swin_t": PARTLY,            # MLP widths only: attention weights are used functionally, the stream stays whole
    "maxvit_t": PARTLY,
}
SLOW = {"maxvit_t"}
INPUT_SIZE = {"inception_v3": 96, "maxvit_t": 224}   # inception needs 75+, MaxViT's 7x7 partitions 224
BUILD_ARGS = {"vit_b_16": {"image_size": 64}}
RUN_SLOW = bool(os.environ.get("AUTOCOMPRESS_SLOW_TESTS"))


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Pruning checks run forward passes: one thread is several times faster on a small shared machine."""
    with fixed_threads(1):
        yield


def _coverage(graph) -> str:
    return NONE if not graph.groups else PARTLY if graph.fixed else FULL


def _zoo():
    for name in COVERAGE:
        slow = pytest.mark.skipif(name in SLOW and not RUN_SLOW, reason="slow model: set AUTOCOMPRESS_SLOW_TESTS=1")
        yield pytest.param(name, marks=slow)


@pytest.mark.parametrize("name", _zoo())
def test_random_policies_prune_the_zoo(name):
    model = torchvision.models.get_model(name, weights=None, **BUILD_ARGS.get(name, {})).eval()
    size = INPUT_SIZE.get(name, 64)
    x = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        reference = model(x)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        graph = ac.analyze(model, x)
    named = [str(w.message) for w in caught if "whole because" in str(w.message)]
    assert _coverage(graph) == COVERAGE[name]
    assert len(named) == (1 if graph.fixed else 0)
    if graph.fixed:
        listed = named[0].split(": ", 1)[1].split(", ")
        assert sorted(listed) == sorted(graph.fixed) and len(set(listed)) == len(listed)

    rng = random.Random(name)
    policy = {"prune": {"keep": {g.id: round(rng.uniform(0.2, 1.0), 3) for g in graph.groups}, "round_to": 8}}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pruned = ac.apply(model, policy, x)
    assert not [w for w in caught if "cannot be pruned safely" in str(w.message)]   # analysis kept only safe groups
    with torch.no_grad():
        assert pruned(x).shape == reference.shape
    params = count_params(pruned)
    assert ac.estimate(pruned, x, hardware="raspberry-pi-4").params == params
    assert params < count_params(model) if graph.groups else params == count_params(model)
