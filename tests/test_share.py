"""Weight sharing: k-means leaves at most 2^b values, the size model prices indices + codebook (+ Huffman)."""
import heapq
import math

import pytest
import torch
from torch import nn

import autocompress as ac
from autocompress.compress import share
from autocompress.compress.base import get_meta, layer_targets
from autocompress.cost.model import size_bytes
from autocompress.evaluate import compression_kept
from autocompress.unpack import SYNC
from autocompress.weights import weight_bytes


@pytest.fixture(scope="module")
def names(digits_model, digits_input):
    return [n for n, _ in layer_targets(ac.analyze(digits_model, digits_input))]


@pytest.mark.parametrize("bits", [1, 2, 3, 5])
def test_kmeans_leaves_at_most_2_to_the_b_values(bits):
    w = torch.randn(64, 32, 3, 3)
    shared = share.cluster(w, bits)
    assert torch.unique(shared).numel() <= 2 ** bits
    # every weight went to its nearest centre
    centres = torch.unique(shared)
    nearest = centres[(w.reshape(-1, 1) - centres).abs().argmin(1)].reshape(w.shape)
    assert torch.equal(shared, nearest)


def test_zeros_stay_zero_and_are_not_a_cluster():
    w = torch.randn(16, 50)
    w[:, ::2] = 0
    shared = share.cluster(w, 2)
    assert (shared[:, ::2] == 0).all() and (shared[:, 1::2] != 0).all()
    assert torch.unique(shared[shared != 0]).numel() == 4


def test_policy_records_clusters_and_the_size_model_prices_indices_plus_codebook(digits_model, digits_input, names):
    model = ac.apply(digits_model, {"share": {"bits": dict.fromkeys(names, 3)}}, digits_input)
    expected = 0
    for module in model.modules():
        meta = get_meta(module)
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if pname == "weight" and "clusters" in meta:
                assert meta["share_bits"] == 3 and meta["clusters"] == torch.unique(p).numel() <= 8
                expected += math.ceil(p.numel() * 3 / 8) + meta["clusters"] * 4  # 3-bit indices + fp32 codebook
            else:
                expected += p.numel() * p.element_size()
    assert size_bytes(model) == expected


def _huffman_lengths(counts):
    """Code length of every symbol from an explicit Huffman tree (an independent construction)."""
    heap = [(c, i, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = [0] * len(counts)
    tie = len(counts)
    while len(heap) > 1:
        c1, _, s1 = heapq.heappop(heap)
        c2, _, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, tie, s1 + s2))
        tie += 1
    return lengths


def test_deep_compression_storage_is_sparse_values_index_and_huffman():
    w = torch.randn(8, 100)
    w[w.abs() < 1.0] = 0  # about 68% zeros
    w = share.cluster(w, 2)
    meta = {"sparsity": float((w == 0).float().mean()), "share_bits": 2, "clusters": 4, "huffman": True}
    nonzero = w[w != 0]
    counts = torch.unique(nonzero, return_counts=True)[1].tolist()
    index = min(math.ceil(800 / 8), 4 * 9 + math.ceil(len(nonzero) * 7 / 8))  # bitmask vs CSR (7-bit columns)
    offsets = 4 * math.ceil(len(nonzero) / SYNC)  # where decoding can restart: one uint32 per SYNC codes
    bits = sum(c * l for c, l in zip(counts, _huffman_lengths(counts)))
    expected = math.ceil(bits / 8) + len(counts) + offsets + index + 4 * 4
    assert weight_bytes(w, meta) == expected
    assert weight_bytes(w, {**meta, "huffman": False}) == math.ceil(len(nonzero) * 2 / 8) + index + 16


def test_fine_tuning_trains_the_shared_values_and_keeps_their_number():
    torch.manual_seed(0)
    layer = nn.Linear(40, 10)
    layer.weight.data = share.cluster(layer.weight.data, 2)
    share_meta = {"share_bits": 2, "clusters": 4}
    setattr(layer, "autocompress_meta", share_meta)
    before = torch.unique(layer.weight.detach())
    x, target = torch.randn(64, 40), torch.randn(64, 10)
    with compression_kept(layer):
        opt = torch.optim.SGD(layer.parameters(), lr=0.1)
        layer.train()
        for _ in range(20):
            opt.zero_grad()
            nn.functional.mse_loss(layer(x), target).backward()
            opt.step()
    after = torch.unique(layer.weight.detach())
    assert after.numel() <= 4 and not torch.allclose(after, before)
    assert type(layer) is nn.Linear and isinstance(layer.weight, nn.Parameter)  # plain again
