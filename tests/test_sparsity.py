"""Unstructured sparsity: masks hit the ratio, the index is priced, dynamic network surgery splices weights back."""
import math

import pytest
import torch
from torch import nn

import autocompress as ac
from autocompress.compress import sparsity
from autocompress.compress.base import get_meta, layer_targets
from autocompress.evaluate import compression_kept


@pytest.mark.parametrize("density", [0.5, 0.3, 0.1, 0.05])
def test_mask_hits_the_ratio_and_keeps_the_largest(digits_model, digits_input, density):
    names = [n for n, _ in layer_targets(ac.analyze(digits_model, digits_input))]
    model = ac.apply(digits_model, {"sparsity": {"density": dict.fromkeys(names, density)}}, digits_input)
    for name in names:
        w, orig = model.get_submodule(name).weight, digits_model.get_submodule(name).weight
        kept = int((w != 0).sum())
        assert kept == max(1, round(w.numel() * density))
        assert get_meta(model.get_submodule(name))["sparsity"] == pytest.approx(1 - kept / w.numel())
        assert torch.equal(w[w != 0], orig[w != 0])  # survivors unchanged
        assert orig[w == 0].abs().max() <= orig[w != 0].abs().min()  # the smallest magnitudes went


def test_index_is_a_bitmask_or_csr_whichever_is_smaller():
    mask = torch.zeros(64, 576, dtype=torch.bool)
    mask[:, :288] = True  # half dense: one bit per weight wins
    assert sparsity.index_bytes(mask) == 64 * 576 // 8
    mask[:] = False
    mask[:, :10] = True  # very sparse: CSR (row pointers + 10-bit column indices) wins
    assert sparsity.index_bytes(mask) == 4 * 65 + math.ceil(640 * 10 / 8)


def test_dynamic_network_surgery_splices_pruned_weights_back_at_the_same_density():
    torch.manual_seed(0)
    layer = nn.Linear(20, 8, bias=False)
    target = torch.randn(8, 20)
    layer.weight.data = target.clone()
    mask = sparsity.magnitude_mask(layer.weight, 40)
    layer.weight.data[~mask] = 0
    layer.autocompress_meta = {"sparsity": 0.75}
    target[~mask] *= 6  # the data now needs weights that magnitude pruning removed
    target[mask] /= 6
    x = torch.randn(256, 20)
    with compression_kept(layer):
        opt = torch.optim.SGD(layer.parameters(), lr=0.5)
        layer.train()
        for _ in range(60):
            opt.zero_grad()
            nn.functional.mse_loss(layer(x), x @ target.t()).backward()
            opt.step()
    w = layer.weight.detach()
    assert int((w != 0).sum()) == 40  # same density
    assert int((w[~mask] != 0).sum()) > 20  # most of the new survivors were pruned at first

