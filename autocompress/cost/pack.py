"""The packed export: a file that really stores what the cost model's size counts, and its loader.

Every conv/linear weight is written as `weight_bytes` counts it: integer grid codes
bit-packed at `weight_bits` with one fp32 scale per output channel (binary, ternary, int4, int8),
fp16 values, or (shared weights) `share_bits`-bit indices into a codebook of the shared values;
sparse layers store only their non-zeros plus a bitmask or CSR index, whichever is smaller; codes
are Huffman-coded where the metadata says so. Every other tensor is stored raw. The loader decodes
every tensor back to the float values the compressed module holds (to float rounding of the scales).

`weight_bytes` is that count, and the cost model's size (cost/model.py) is made of it, so the size the
search optimizes is the size of the file:

    stored values  the non-zeros when the layer is sparse, else every weight
    value codes    share_bits per value when shared (codebook index), else weight_bits (32: fp32,
                   16: fp16); Huffman-coded instead when `huffman` and the codes index a small
                   alphabet (shared, or integer grids of < 16 bits): the stream + code-length table +
                   which codes occur + sync offsets
    index          sparsity.index_bytes(mask): bitmask or CSR, whichever is smaller (sparse only)
    tables         shared: share.codebook_bytes(clusters, weight_bits); integer grids: one fp32
                   scale per output channel (quantize.scale_bytes)

File: b"ACPACK01", a 4-byte header length, a zlib-compressed JSON header (per tensor: name, shape,
dtype, encoding and its sections' lengths), the tensors' bytes, and optionally the module's
architecture (torch.save of the module with every tensor on the meta device) so that `load_packed`
can rebuild it from the file alone. A packed file differs from `size_bytes` only by its header, the
architecture, and, for Huffman-coded tensors, one 4-byte offset per 4096 codes (the decoder's restart
points) and the bitmap of the integer codes that occur.
"""
from __future__ import annotations

import copy
import heapq
import io
import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..compress import quantize, share, sparsity
from ..compress.base import get_meta
from ..errors import AutocompressError
from ..unpack import MAGIC, SYNC, architecture, canonical_codes, decode, entries, qmax, read_header
CHUNK = 1 << 20  # values expanded to bits at a time (bounds the encoder's memory)


def tensor_entries(model: nn.Module):
    """(name, tensor, metadata, stored bytes) of every parameter and buffer, module by module: a conv/linear
    weight with compression metadata as `weight_bytes` counts it, any other tensor at its dtype size."""
    for prefix, module in model.named_modules():
        meta = get_meta(module)
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in own:
            key = f"{prefix}.{name}" if prefix else name
            compressed = name == "weight" and bool(meta)
            yield key, t, (meta if compressed else {}), (weight_bytes(t, meta) if compressed
                                                          else t.numel() * t.element_size())


def weight_bytes(weight: torch.Tensor, meta: dict) -> int:
    """Stored bytes of one weight tensor whose module carries `meta` (see compress/base.py for the keys)."""
    bits = int(meta.get("weight_bits", 32))
    huffman = bool(meta.get("huffman")) and ("clusters" in meta or bits < 16)  # codes index a small alphabet
    if not meta.get("sparsity") and "clusters" not in meta and not huffman:
        return quantize.packed_bytes(weight.numel(), bits) + quantize.scale_bytes(weight, bits)
    if huffman:  # a code's length depends on every code's frequency: count the packed file's own encoding
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


# ---- bit packing --------------------------------------------------------------------------------------

def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned integers < 2^bits, `bits` bits each, most significant bit first."""
    codes = np.asarray(codes, dtype=np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    chunks = [((codes[i: i + CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
              for i in range(0, len(codes), CHUNK)]
    return np.packbits(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)).tobytes()


# ---- Huffman ------------------------------------------------------------------------------------------

def huffman_lengths(counts) -> list[int]:
    """Optimal code length of every symbol with a count > 0 (one symbol alone: 1 bit)."""
    if len(counts) == 1:
        return [1]
    heap = [(int(c), i, [i]) for i, c in enumerate(counts)]
    heapq.heapify(heap)
    lengths = [0] * len(counts)
    while len(heap) > 1:
        c1, i1, s1 = heapq.heappop(heap)
        c2, i2, s2 = heapq.heappop(heap)
        for s in s1 + s2:
            lengths[s] += 1
        heapq.heappush(heap, (c1 + c2, min(i1, i2), s1 + s2))
    return lengths


def huffman_encode(symbols: np.ndarray, lengths: list[int]) -> tuple[bytes, list[int]]:
    """The bit stream of `symbols` (indices into `lengths`) and the bit offset of every SYNC-th symbol."""
    codes, lens = canonical_codes(lengths), np.asarray(lengths, dtype=np.int64)
    top = int(lens.max())
    shifts = np.arange(top - 1, -1, -1)
    pieces = []
    for i in range(0, len(symbols), CHUNK):
        c, l = codes[symbols[i: i + CHUNK]], lens[symbols[i: i + CHUNK]]
        bits = ((c[:, None] >> shifts.astype(np.uint64)) & 1).astype(np.uint8)  # right-aligned in `top` columns
        pieces.append(bits[shifts[None, :] < l[:, None]])
    starts = np.concatenate([[0], np.cumsum(lens[symbols])[:-1]])[::SYNC]
    return np.packbits(np.concatenate(pieces)).tobytes(), [int(o) for o in starts]


# ---- one tensor ---------------------------------------------------------------------------------------

def _to_codes(q: np.ndarray, bits: int) -> np.ndarray:
    """Unsigned codes of grid integers: q + qmax; binary (+-1) as one bit, which has no room for zeros."""
    if bits > 1:
        return q + qmax(bits)
    if (q == 0).any():
        raise AutocompressError("a 1-bit grid holds +-scale only, but zeros are stored densely")
    return (q > 0).astype(np.int64)


def weight_grid(w: torch.Tensor, bits: int, per_channel: bool) -> tuple[np.ndarray, np.ndarray]:
    """(integer codes in [-qmax, qmax], fp32 scales) with codes x scale == w: the grid quantize.fake_quantize
    put the weights on (binary and ternary: +-scale and 0)."""
    flat = w.detach().reshape(w.shape[0] if per_channel else 1, -1).float()
    scale = (flat.abs().amax(dim=1, keepdim=True) / qmax(bits)).clamp_min(1e-30)
    q = torch.round(flat / scale)
    if not torch.allclose(q * scale, flat, rtol=1e-5, atol=1e-12 * float(scale.max())):
        raise AutocompressError(f"weights are not on the {bits}-bit grid their metadata claims")
    return q.reshape(-1).numpy().astype(np.int64), scale.reshape(-1).numpy().astype(np.float32)


def encode_weight(w: torch.Tensor, meta: dict) -> tuple[dict, list[bytes]]:
    """The encoding (JSON-able) and byte sections of a compressed conv/linear weight."""
    bits = int(meta.get("weight_bits", 32))
    shared, sparse = "clusters" in meta, bool(meta.get("sparsity"))
    huffman = bool(meta.get("huffman")) and (shared or bits < 16)
    flat = w.detach().reshape(-1)
    mask = flat != 0
    enc, sections = {"bits": bits}, []
    if sparse:
        enc["index"], index = _index(mask.reshape(w.shape[0], -1))
        sections.append(index)
        values = flat[mask]
    else:
        values = flat
    enc["count"] = int(values.numel())
    if shared:
        book, codes = torch.unique(values, return_inverse=True)
        enc["book"], enc["code_bits"] = int(book.numel()), max(int(meta["share_bits"]), math.ceil(math.log2(max(2, book.numel()))))
        sections.append(_codebook(book, bits))
        codes = codes.numpy().astype(np.int64)
    elif bits >= 16:
        sections.append(_raw(values, bits))
        return enc, sections
    else:
        q, scales = weight_grid(w, bits, per_channel=True)
        codes = _to_codes(q[mask.numpy()] if sparse else q, bits)
        enc["code_bits"] = bits
        sections.append(scales.tobytes())
    sections.append(_codes(codes, enc, huffman, alphabet=None if shared else 2 ** bits))
    return enc, sections


def _raw(values: torch.Tensor, bits: int) -> bytes:
    return values.half().numpy().tobytes() if bits == 16 else values.float().numpy().tobytes()


def _codebook(values: torch.Tensor, bits: int) -> bytes:
    """Shared values: integers on one fp32 scale below 16 bits (quantize puts a shared layer on one grid), else
    fp16/fp32 values."""
    if bits >= 16:
        return _raw(values, bits)
    q, scale = weight_grid(values.reshape(1, -1), bits, per_channel=False)
    return pack_bits(_to_codes(q, bits), bits) + scale.tobytes()


def _index(mask: torch.Tensor) -> tuple[str, bytes]:
    """The position of the non-zeros: a bitmask or CSR rows (sparsity.index_bytes picks the same)."""
    rows, cols = mask.shape
    bitmask = np.packbits(mask.reshape(-1).numpy().astype(np.uint8)).tobytes()
    if len(bitmask) == sparsity.index_bytes(mask):
        return "bitmask", bitmask
    col_bits = max(1, math.ceil(math.log2(cols)))
    pointers = np.concatenate([[0], np.cumsum(mask.sum(dim=1).numpy())]).astype(np.uint32)
    columns = np.nonzero(mask.numpy())[1]
    return "csr", pointers.tobytes() + pack_bits(columns, col_bits)


def _codes(codes: np.ndarray, enc: dict, huffman: bool, alphabet: int | None) -> bytes:
    """Fixed-width codes, or a Huffman stream with its code-length table (and which codes occur, for a grid)."""
    enc["huffman"] = huffman
    if not huffman:
        return pack_bits(codes, enc["code_bits"])
    present, inverse, counts = np.unique(codes, return_inverse=True, return_counts=True)
    lengths = huffman_lengths(counts)
    stream, offsets = huffman_encode(inverse, lengths)
    occurs = b""
    if alphabet is not None:
        flags = np.zeros(alphabet, dtype=np.uint8)
        flags[present] = 1
        occurs = np.packbits(flags).tobytes()
    else:
        enc["symbols"] = int(len(present))
    enc["huffman_bytes"] = [len(occurs), len(lengths), len(stream)]
    return occurs + bytes(lengths) + stream + np.asarray(offsets, dtype=np.uint32).tobytes()


# ---- the file -----------------------------------------------------------------------------------------

def save_packed(model: nn.Module, path, architecture: bool = True) -> int:
    """Write `model` packed to `path`; returns the file's size in bytes. With `architecture`, the module's
    structure is stored too, so `load_packed(path)` needs nothing else (it unpickles: trusted files only)."""
    header, blobs, offset = [], [], 0
    for key, t, meta, _ in tensor_entries(model):
        if meta:
            try:
                enc, sections = encode_weight(t, meta)
            except AutocompressError as exc:
                raise AutocompressError(f"cannot pack {key}: {exc}") from None
        else:
            enc, sections = {"raw": str(t.dtype).replace("torch.", "")}, [t.detach().cpu().contiguous().numpy().tobytes()]
        header.append({"name": key, "shape": list(t.shape), "enc": enc, "sections": [len(s) for s in sections]})
        blobs += sections
        offset += sum(len(s) for s in sections)
    skeleton = _skeleton(model) if architecture else b""
    head = zlib.compress(json.dumps({"tensors": header, "architecture": len(skeleton)}).encode(), 9)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(MAGIC + struct.pack("<I", len(head)) + head)
        for blob in blobs:
            f.write(blob)
        f.write(skeleton)
    return path.stat().st_size


def _skeleton(model: nn.Module) -> bytes:
    """torch.save of the module with every tensor on the meta device (structure only, no data)."""
    shell = copy.deepcopy(model).to("meta")
    buffer = io.BytesIO()
    torch.save(shell, buffer)
    return zlib.compress(buffer.getvalue(), 9)


def packed_sections(path) -> dict:
    """Bytes of each part of a packed file: header, tensors (what size_kb counts), architecture."""
    data = Path(path).read_bytes()
    header, start = _header(data, path)
    return {"header": start, "tensors": sum(sum(e["sections"]) for e in header["tensors"]),
            "architecture": header["architecture"]}


def _header(data: bytes, path) -> tuple[dict, int]:
    try:
        return read_header(data, path)
    except ValueError as exc:
        raise AutocompressError(str(exc)) from None


def load_packed(path, model: nn.Module | None = None) -> nn.Module:
    """The module stored in `path`: its tensors decoded (unpack.py, the numpy reader users get) into `model`
    (same architecture) or, without one, into the architecture stored in the file."""
    data = Path(path).read_bytes()
    header, pos = _header(data, path)
    tensors = {entry["name"]: _decode(entry, sections) for entry, sections in entries(data, header, pos)}
    if model is None:
        if not header["architecture"]:
            raise AutocompressError(f"{str(path)!r} holds no architecture; pass the module to load into")
        model = torch.load(io.BytesIO(architecture(data, header, pos)), weights_only=False)
    return _fill(model, tensors)


def _decode(entry: dict, sections: list[bytes]) -> torch.Tensor:
    if "raw" in entry["enc"]:  # through torch: numpy has no bfloat16
        dtype = getattr(torch, entry["enc"]["raw"])
        return torch.frombuffer(bytearray(sections[0]), dtype=dtype).reshape(entry["shape"]).clone() \
            if sections[0] else torch.zeros(entry["shape"], dtype=dtype)
    return torch.from_numpy(decode(entry, sections))


def _fill(model: nn.Module, tensors: dict) -> nn.Module:
    """Put the decoded tensors into `model`'s parameters and buffers; every one must find its place."""
    filled = set()
    for prefix, module in model.named_modules():
        for store in (module._parameters, module._buffers):
            for name, old in store.items():
                key = f"{prefix}.{name}" if prefix else name
                if old is None:
                    continue
                new = tensors.get(key)
                if new is None or tuple(new.shape) != tuple(old.shape):
                    found = "nothing" if new is None else f"shape {tuple(new.shape)}"
                    raise AutocompressError(f"the packed file has {found} for {key} {tuple(old.shape)}: a different "
                                            "architecture (rebuild the module with the same policy)")
                store[name] = nn.Parameter(new, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new
                filled.add(key)
    extra = sorted(set(tensors) - filled)
    if extra:
        raise AutocompressError(f"the packed file has {extra[0]}, which the module lacks: a different architecture "
                                "(rebuild the module with the same policy)")
    return model.eval()
