"""Conv+BN folding: fused outputs equal unfused ones, and only safe pairs are folded."""
import pytest
import torch
import torchvision
from torch import nn

import autocompress as ac
from autocompress.compress.fuse import conv_bn_pairs, fuse_conv_bn
from autocompress.threads import fixed_threads


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    with fixed_threads(1):
        yield


def _trained_like(model: nn.Module) -> nn.Module:
    """Random BN statistics and affine terms, as a trained network has (the defaults make folding trivial)."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            with torch.no_grad():
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) * 2 - 1)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) * 1.5 + 0.25)
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


def _bns(model):
    return sum(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2"])
def test_fused_outputs_equal_unfused_within_1e_4(name):
    model = _trained_like(torchvision.models.get_model(name))
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    fused = fuse_conv_bn(model)
    with torch.no_grad():
        ref, out = model(x), fused(x)
    assert _bns(model) > 0 and _bns(fused) == 0        # every BN of these two follows a conv
    assert (out - ref).abs().max().item() <= 1e-4
    assert _bns(model) == len(conv_bn_pairs(model))   # the original is left untouched


def test_a_pruned_model_folds_too(digits_model, digits_input):
    graph = ac.analyze(digits_model, digits_input)
    pruned = ac.apply(digits_model, {"prune": {"keep": {g.id: 0.5 for g in graph.groups}}}, digits_input)
    fused = fuse_conv_bn(pruned)
    with torch.no_grad():
        assert (fused(digits_input) - pruned(digits_input)).abs().max().item() <= 1e-4
    assert _bns(fused) == 0


class SharedOutput(nn.Module):
    """The conv output feeds the BN and a skip: folding would change what the skip reads."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.pre_bn = nn.BatchNorm2d(3)
        self.conv2 = nn.Conv2d(3, 3, 1)

    def forward(self, x):
        y = self.conv(x)
        return self.conv2(self.pre_bn(self.bn(y) + y))


def test_only_a_bn_that_alone_reads_a_conv_is_folded():
    model = _trained_like(SharedOutput())
    assert conv_bn_pairs(model) == []
    x = torch.randn(1, 3, 8, 8)
    with torch.no_grad():
        assert torch.equal(fuse_conv_bn(model)(x), model(x))
