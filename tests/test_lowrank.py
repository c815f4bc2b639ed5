"""Low-rank factorization: exact at full rank, smaller and measurably approximate below it, reachable by later techniques."""
import pytest
import torch
from torch import nn

import autocompress as ac
from autocompress.compress import lowrank
from autocompress.compress.base import get_meta, layer_targets

torch.manual_seed(0)

LAYERS = {
    "linear": nn.Linear(24, 12),
    "pointwise": nn.Conv2d(16, 12, 1, stride=2),
    "kxk": nn.Conv2d(6, 10, 3, stride=2, padding=1),
    "kxk-rect": nn.Conv2d(5, 7, (3, 5), stride=(1, 2), padding=(1, 2), dilation=(2, 1)),
}


def _input(layer):
    return torch.randn(3, 24) if isinstance(layer, nn.Linear) else torch.randn(3, layer.in_channels, 11, 13)


@pytest.mark.parametrize("kind", LAYERS)
@pytest.mark.parametrize("kxk", lowrank.KXK_METHODS)
def test_full_rank_reproduces_the_layer(kind, kxk):
    layer = LAYERS[kind]
    factors = lowrank.factorize(layer, 1.0, kxk)
    x = _input(layer)
    torch.testing.assert_close(factors(x), layer(x), atol=1e-4, rtol=1e-4)
    assert lowrank.relative_error(layer, factors, x) < 1e-5


@pytest.mark.parametrize("kxk, method", [("tucker", "tucker"), ("spatial", "spatial")])
def test_lower_rank_is_smaller_and_records_its_error(kxk, method):
    layer = nn.Conv2d(32, 32, 3, padding=1)
    factors = lowrank.factorize(layer, 0.25, kxk)
    meta = get_meta(factors)
    assert meta["lowrank_method"] == method and meta["rank_fraction"] == 0.25
    assert sum(p.numel() for p in factors.parameters()) < 0.6 * sum(p.numel() for p in layer.parameters())
    x = _input(layer)
    err = ((factors(x) - layer(x)).norm() / layer(x).norm()).item()
    assert 0.05 < err < 1.0 and lowrank.relative_error(layer, factors, x) == pytest.approx(err, rel=1e-5)


def test_truncated_svd_is_the_best_rank_r_approximation():
    layer = nn.Linear(20, 16)
    factors = lowrank.factorize(layer, 0.25, "tucker")  # rank 4
    product = factors[1].weight @ factors[0].weight
    s = torch.linalg.svdvals(layer.weight.detach())
    # Eckart-Young: the error of the best rank-4 approximation is the norm of the dropped singular values
    assert (layer.weight - product).norm().item() == pytest.approx(s[4:].norm().item(), rel=1e-4)
    assert get_meta(factors)["rank"] == 4


def test_policy_replaces_layers_records_error_and_later_techniques_reach_the_factors(digits_model, digits_input):
    names = [n for n, _ in layer_targets(ac.analyze(digits_model, digits_input), ("conv", "linear"))]
    policy = {"lowrank": {"rank": dict.fromkeys(names, 0.5)}, "quantize": {"weight_bits": dict.fromkeys(names, 8)}}
    model = ac.apply(digits_model, policy, digits_input)
    for name in ("layer2.0.conv1", "layer2.0.shortcut.0", "fc"):
        factors = model.get_submodule(name)
        assert isinstance(factors, nn.Sequential) and 0 < get_meta(factors)["lowrank_error"] < 1
        assert all(get_meta(f)["weight_bits"] == 8 for f in factors)
    assert model(digits_input).shape == (1, 10)
    before, after = ac.estimate(digits_model, digits_input), ac.estimate(model, digits_input)
    assert after.params < before.params and after.size_kb < before.size_kb / 4
    untouched = ac.apply(digits_model, {"lowrank": {"rank": dict.fromkeys(names, 1.0)}}, digits_input)
    assert not any(isinstance(untouched.get_submodule(n), nn.Sequential) for n in names)
