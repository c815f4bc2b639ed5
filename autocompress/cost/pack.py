"""The packed export: a file that really stores what the cost model's size counts, and its loader.

Every conv/linear weight with compression metadata is written as weights.py encodes it (its stages: sparse
index, codebook or per-channel scales and grid codes or fp16/fp32 values, fixed-width or Huffman codes), in
exactly the bytes `weights.weight_bytes` counts; every other tensor is stored raw. `tensor_entries` lists both
with their stored bytes, and the cost model's size (cost/model.py) is their sum, so the size the search
optimizes is the size of the file. The loader decodes every tensor back to the float values the compressed
module holds (to float rounding of the scales) with `weights.decode_weight`, whose built-in stages read through
unpack.py, the numpy-only reader users get.

File: b"ACPACK01", a 4-byte header length, a zlib-compressed JSON header (per tensor: name, shape,
dtype, encoding and its sections' lengths), the tensors' bytes, and optionally the module's
architecture (torch.save of the module with every tensor on the meta device) so that `load_packed`
can rebuild it from the file alone. A packed file differs from `size_bytes` only by its header, the
architecture, and, for Huffman-coded tensors, one 4-byte offset per 4096 codes (the decoder's restart
points) and the bitmap of the integer codes that occur.
"""
from __future__ import annotations

import copy
import io
import json
import struct
import zlib
from pathlib import Path

import torch
from torch import nn

from ..compress.base import get_meta
from ..errors import AutocompressError
from ..unpack import MAGIC, architecture, entries, read_header
from ..weights import decode_weight, encode_weight, weight_bytes


def tensor_entries(model: nn.Module):
    """(name, tensor, metadata, stored bytes) of every parameter and buffer, module by module: a conv/linear
    weight with compression metadata as `weights.weight_bytes` counts it, any other tensor at its dtype size."""
    for prefix, module in model.named_modules():
        meta = get_meta(module)
        own = list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False))
        for name, t in own:
            key = f"{prefix}.{name}" if prefix else name
            compressed = name == "weight" and bool(meta)
            yield key, t, (meta if compressed else {}), (weight_bytes(t, meta) if compressed
                                                          else t.numel() * t.element_size())


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
    """The module stored in `path`: its tensors decoded (weights.decode_weight: each weight by the registered stages
    that wrote it, the built-in ones through unpack.py's readers, the numpy reader users get) into `model`
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
    return torch.from_numpy(decode_weight(entry["enc"], sections, tuple(entry["shape"])))


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
