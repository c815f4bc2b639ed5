"""How many bytes a compressed weight tensor takes when stored, from the tensor and its module's metadata.

    stored values  the non-zeros when the layer is sparse, else every weight
    value codes    share_bits per value when shared (codebook index), else weight_bits (32: fp32,
                   16: fp16); Huffman-coded instead when `huffman` and the codes index a small
                   alphabet (shared, or integer grids of < 16 bits): the bytes cost/pack.py writes
                   (stream + code-length table + which codes occur + sync offsets)
    index          sparsity.index_bytes(mask): bitmask or CSR, whichever is smaller (sparse only)
    tables         shared: share.codebook_bytes(clusters, weight_bits); integer grids: one fp32
                   scale per output channel (quantize.scale_bytes)

The cost model's size counts every weight this way and every other tensor at its dtype size.
"""
from __future__ import annotations

import torch

from . import quantize, share, sparsity


def weight_bytes(weight: torch.Tensor, meta: dict) -> int:
    """Stored bytes of one weight tensor whose module carries `meta` (see compress/base.py for the keys)."""
    bits = int(meta.get("weight_bits", 32))
    huffman = bool(meta.get("huffman")) and ("clusters" in meta or bits < 16)  # codes index a small alphabet
    if not meta.get("sparsity") and "clusters" not in meta and not huffman:
        return quantize.packed_bytes(weight.numel(), bits) + quantize.scale_bytes(weight, bits)
    if huffman:  # a code's length depends on every code's frequency: count the packed file's own encoding
        from ..cost.pack import encode_weight

        return sum(len(section) for section in encode_weight(weight, meta)[1])
    w = weight.detach()
    mask = w != 0
    sparse = bool(meta.get("sparsity"))
    values = w[mask] if sparse else w.flatten()
    index = sparsity.index_bytes(mask) if sparse else 0
    if "clusters" in meta:
        code_bits, tables = int(meta["share_bits"]), share.codebook_bytes(int(meta["clusters"]), bits)
    else:
        code_bits, tables = bits, quantize.scale_bytes(w, bits)
    return quantize.packed_bytes(values.numel(), code_bits) + index + tables
