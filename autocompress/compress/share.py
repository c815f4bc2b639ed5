"""Weight sharing: a layer's weights clustered by k-means into at most 2^bits shared values.

The knob is a layer's index `bits` (32 = no sharing). scikit-learn's KMeans, with Deep Compression's
linear initialisation (centres spread evenly between the smallest and largest weight), is fitted
on the layer's non-zero weights (a seeded sample of at most `FIT_SAMPLE` of them, for speed) and
every weight is replaced by its nearest centre; zeros left by sparsity stay zero. A shared layer is
stored (its `CODEBOOK` stage) as the codebook plus a `bits`-bit index per stored weight, optionally
Huffman-coded.
While fine-tuning, the centres follow the weights: one k-means step per forward pass (nearest
centre, then each centre moves to its members' mean), so shared values are trained as in Deep
Compression.
"""
from __future__ import annotations

import math
import warnings

import numpy as np
import torch
from torch import nn

from ..unpack import read_values
from ..weights import Loaded, Stage, Stored, pack_bits, raw_bytes, to_codes, weight_grid
from .base import Between, Technique, get_meta, layer_targets, set_meta, straight_through, weight_layers

FIT_SAMPLE = 20_000


def _nearest(values: torch.Tensor, centres: torch.Tensor) -> torch.Tensor:
    """Index of the nearest of the sorted 1-D `centres` for every value."""
    return torch.bucketize(values, (centres[1:] + centres[:-1]) / 2)


@torch.no_grad()
def cluster(weight: torch.Tensor, bits: int, seed: int = 0) -> torch.Tensor:
    """`weight` with its non-zero values replaced by at most 2^bits k-means centres."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    nonzero = weight != 0
    values = weight[nonzero]
    k = 2 ** bits
    if torch.unique(values).numel() <= k:
        return weight.clone()
    gen = np.random.default_rng(seed)
    sample = values.numpy()
    if sample.size > FIT_SAMPLE:
        sample = gen.choice(sample, FIT_SAMPLE, replace=False)
    init = np.linspace(sample.min(), sample.max(), k)[:, None]
    # one thread: on a small 1-D problem, spinning up an OpenMP pool costs 10-40x the work itself
    with warnings.catch_warnings(), threadpool_limits(1):
        warnings.simplefilter("ignore")  # fewer distinct sample values than k: KMeans warns and copes
        kmeans = KMeans(n_clusters=k, init=init, n_init=1, random_state=seed).fit(sample[:, None].astype(np.float64))
    centres = torch.sort(torch.as_tensor(kmeans.cluster_centers_[:, 0], dtype=weight.dtype)).values
    out = torch.zeros_like(weight)
    out[nonzero] = centres[_nearest(values, centres)]
    return out


def codebook_bytes(clusters: int, value_bits: int) -> int:
    """Bytes of a codebook of `clusters` values of `value_bits` bits (plus one fp32 scale when integer)."""
    return math.ceil(clusters * value_bits / 8) + (4 if value_bits < 16 else 0)


def _encode_codebook(stored: Stored) -> None:
    """The distinct stored values, and each stored value's index into them (left for the codes slot)."""
    book, codes = torch.unique(stored.values(), return_inverse=True)
    stored.code_bits = max(int(stored.meta["share_bits"]), math.ceil(math.log2(max(2, book.numel()))))
    stored.enc["book"], stored.enc["code_bits"] = int(book.numel()), stored.code_bits
    stored.sections.append(_codebook(book, stored.bits))
    stored.codes = codes.numpy().astype(np.int64)


def _codebook(values: torch.Tensor, bits: int) -> bytes:
    """Shared values: integers on one fp32 scale below 16 bits (quantize puts a shared layer on one grid), else
    fp16/fp32 values."""
    if bits >= 16:
        return raw_bytes(values, bits)
    q, scale = weight_grid(values.reshape(1, -1), bits, per_channel=False)
    return pack_bits(to_codes(q, bits), bits) + scale.tobytes()


def _codebook_size(stored: Stored) -> int:
    stored.code_bits = int(stored.meta["share_bits"])
    return codebook_bytes(int(stored.meta["clusters"]), stored.bits)


def _decode_codebook(loaded: Loaded) -> None:
    """The codebook; the codes slot's codes index it."""
    book = read_values(loaded.sections.pop(0), loaded.enc["bits"], loaded.enc["book"])
    loaded.alphabet = loaded.enc["book"]
    loaded.from_codes = lambda codes: book[codes]


CODEBOOK = Stage(name="codebook", slot="values", order=10, keys=("book", "code_bits"),
                 present=lambda s: "clusters" in s.meta, encode=_encode_codebook, nbytes=_codebook_size,
                 written=lambda enc: "book" in enc, decode=_decode_codebook)


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    huffman = bool(section.get("huffman", False))
    for name, bits in section.get("bits", {}).items():
        if int(bits) >= 32:
            continue
        for module in weight_layers(model, name):
            w = cluster(module.weight.data, int(bits))
            module.weight.data = w
            set_meta(module, share_bits=int(bits), clusters=int(torch.unique(w[w != 0]).numel()), huffman=huffman)
    return model


class Shared(nn.Module):
    """Fine-tuning parametrization: weights snap to the shared values; each step the values move to the
    mean of the weights nearest to them (one k-means step), gradients reach every float weight."""

    def __init__(self, weight: torch.Tensor):
        super().__init__()
        self.register_buffer("centres", torch.unique(weight[weight != 0]))  # sorted

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            nonzero = weight != 0
            values = weight[nonzero]
            idx = _nearest(values, self.centres)
            if self.training:
                sums = torch.zeros_like(self.centres).index_add_(0, idx, values)
                counts = torch.zeros_like(self.centres).index_add_(0, idx, torch.ones_like(values))
                moved = torch.where(counts > 0, sums / counts.clamp_min(1), self.centres)
                self.centres = torch.sort(moved).values
                idx = _nearest(values, self.centres)
            snapped = torch.zeros_like(weight)
            snapped[nonzero] = self.centres[idx]
        return straight_through(weight, snapped)


def constraint(module: nn.Module) -> nn.Module | None:
    return Shared(module.weight.detach()) if "share_bits" in get_meta(module) else None


TECHNIQUE = Technique(
    name="share",
    order=80,
    fields={"bits": [32, 8, 5, 4, 3, 2]},
    settings={"huffman": False},
    allowed_settings={"huffman": (False, True), "bits": Between(0, 16, whole=True, also=(32,))},
    targets=layer_targets,
    apply=apply,
    constraint=constraint,
    titles={"bits": "bits per shared-weight index, per layer"},
    stages=(CODEBOOK,),
)
