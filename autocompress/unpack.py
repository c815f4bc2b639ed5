"""Read a packed autocompress file (`autocompress export --format packed`) with numpy alone.

This file imports nothing but numpy and the standard library, so it can be copied next to a packed file and
used where autocompress is not installed:

    import unpack                                   # this file
    state = unpack.read_packed("model.acpk")        # {tensor name: numpy array}, the module's state_dict
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()})

Every weight comes back as the float values the compressed module held (integer codes times their scales,
codebook values, non-zeros put back at their bitmask or CSR positions, Huffman streams decoded). The file also
stores the module's structure (a zlib-compressed `torch.save` of it on the meta device, after the tensors); this
reader does not unpickle it: `architecture_bytes` returns it for `torch.load` where you trust the file.
autocompress's own loader (`autocompress.load_packed`) decodes through the functions below.

Layout: b"ACPACK01", a little-endian uint32 header length, the zlib-compressed JSON header (per tensor: name,
shape, encoding, lengths of its byte sections), the sections in header order, the structure.
"""
from __future__ import annotations

import json
import math
import struct
import zlib
from pathlib import Path

import numpy as np

MAGIC = b"ACPACK01"
SYNC = 4096  # Huffman codes between restart offsets


def read_packed(path) -> dict[str, np.ndarray]:
    """Every tensor of the packed file at `path`, decoded, by its state_dict name."""
    data = Path(path).read_bytes()
    header, pos = read_header(data, path)
    return {entry["name"]: decode(entry, sections) for entry, sections in entries(data, header, pos)}


def architecture_bytes(path) -> bytes:
    """The stored module structure (a torch.save stream; empty when the file holds none). Not unpickled here:
    unpickling runs code, so `torch.load(io.BytesIO(...), weights_only=False)` it only for files you trust."""
    data = Path(path).read_bytes()
    return architecture(data, *read_header(data, path))


def architecture(data: bytes, header: dict, pos: int) -> bytes:
    """architecture_bytes of a file already read: `data`, with its header and first section's offset."""
    start = pos + sum(sum(entry["sections"]) for entry in header["tensors"])
    return zlib.decompress(data[start: start + header["architecture"]]) if header["architecture"] else b""


def read_header(data: bytes, path) -> tuple[dict, int]:
    """(header, offset of the first section)."""
    if data[:8] != MAGIC:
        raise ValueError(f"{str(path)!r} is not a packed autocompress model (no {MAGIC.decode()} header)")
    (size,) = struct.unpack("<I", data[8:12])
    return json.loads(zlib.decompress(data[12: 12 + size])), 12 + size


def entries(data: bytes, header: dict, pos: int):
    """(header entry, its byte sections) of every tensor, in file order."""
    for entry in header["tensors"]:
        sections = []
        for n in entry["sections"]:
            sections.append(data[pos: pos + n])
            pos += n
        yield entry, sections


def decode(entry: dict, sections: list[bytes]) -> np.ndarray:
    """One tensor: stored as it is (`raw`), or a compressed conv/linear weight."""
    enc, shape = entry["enc"], tuple(entry["shape"])
    if "raw" not in enc:
        return decode_weight(enc, sections, shape)
    try:
        dtype = np.dtype(enc["raw"])
    except TypeError:
        raise ValueError(f"tensor {entry['name']} is stored as {enc['raw']}, which numpy has no type for") from None
    return np.frombuffer(sections[0], dtype=dtype).reshape(shape).copy()


KNOWN_KEYS = {"bits", "count", "index", "book", "code_bits", "huffman", "symbols", "huffman_bytes"}  # built-in stages


def decode_weight(enc: dict, sections: list[bytes], shape: tuple) -> np.ndarray:
    """A compressed weight as float32: its sections are [index (sparse only)], [codebook or scales], codes."""
    unknown = sorted(set(enc) - KNOWN_KEYS)
    if unknown:
        raise ValueError(f"a weight is stored by a stage this reader does not know (header key {unknown[0]!r}); "
                         "read the file with autocompress.load_packed, the technique that wrote it registered")
    bits, count = enc["bits"], enc["count"]
    numel = math.prod(shape)
    parts = list(sections)
    mask = read_index(enc, parts.pop(0), shape).reshape(-1) if "index" in enc else None
    if "book" in enc:
        book = read_values(parts.pop(0), bits, enc["book"])
        values = book[read_codes(parts.pop(0), enc, enc["book"])]
    elif bits >= 16:
        values = read_raw(parts.pop(0), bits, count)
    else:
        scales = np.frombuffer(parts.pop(0), dtype=np.float32)
        q = from_codes(read_codes(parts.pop(0), enc, 2 ** bits), bits).astype(np.float32)
        rows = np.arange(numel) // (numel // shape[0])
        values = q * scales[rows[mask] if mask is not None else rows]
    if mask is None:
        return values.reshape(shape)
    out = np.zeros(numel, dtype=np.float32)
    out[mask] = values
    return out.reshape(shape)


def read_raw(data: bytes, bits: int, count: int) -> np.ndarray:
    dtype = np.float16 if bits == 16 else np.float32
    return np.frombuffer(data, dtype=dtype)[:count].astype(np.float32)


def read_values(data: bytes, bits: int, count: int) -> np.ndarray:
    """Codebook values: fp16/fp32, or (below 16 bits) grid codes and one fp32 scale."""
    if bits >= 16:
        return read_raw(data, bits, count)
    q = from_codes(unpack_bits(data[:-4], bits, count).astype(np.int64), bits)
    return q.astype(np.float32) * np.frombuffer(data[-4:], dtype=np.float32)[0]


def read_index(enc: dict, data: bytes, shape: tuple) -> np.ndarray:
    """Where the non-zeros are, as a (output channels, rest) boolean mask: one bit per weight, or CSR rows
    (uint32 row pointers, column indices of ceil(log2(columns)) bits)."""
    rows = shape[0]
    cols = math.prod(shape) // rows
    if enc["index"] == "bitmask":
        return np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: rows * cols].astype(bool).reshape(rows, cols)
    pointers = np.frombuffer(data[: 4 * (rows + 1)], dtype=np.uint32).astype(np.int64)
    columns = unpack_bits(data[4 * (rows + 1):], max(1, math.ceil(math.log2(cols))), int(pointers[-1]))
    mask = np.zeros((rows, cols), dtype=bool)
    mask[np.repeat(np.arange(rows), np.diff(pointers)), columns.astype(np.int64)] = True
    return mask


def read_codes(data: bytes, enc: dict, alphabet: int) -> np.ndarray:
    """Fixed-width codes, or a Huffman stream: [which codes occur (grids)], code lengths, stream, restarts."""
    count = enc["count"]
    if not enc["huffman"]:
        return unpack_bits(data, enc["code_bits"], count).astype(np.int64)
    n_occurs, n_lengths, n_stream = enc["huffman_bytes"]
    if n_occurs:
        present = np.nonzero(np.unpackbits(np.frombuffer(data[:n_occurs], dtype=np.uint8))[:alphabet])[0]
    else:
        present = np.arange(enc["symbols"])
    lengths = list(data[n_occurs: n_occurs + n_lengths])
    stream = data[n_occurs + n_lengths: n_occurs + n_lengths + n_stream]
    offsets = np.frombuffer(data[n_occurs + n_lengths + n_stream:], dtype=np.uint32).tolist()
    return present[huffman_decode(stream, lengths, count, offsets)]


def qmax(bits: int) -> int:
    return max(1, 2 ** (bits - 1) - 1)


def from_codes(codes: np.ndarray, bits: int) -> np.ndarray:
    """Grid integers of unsigned codes: code - qmax; binary codes 0/1 are -1/+1."""
    return codes * 2 - 1 if bits == 1 else codes - qmax(bits)


def unpack_bits(data: bytes, bits: int, count: int) -> np.ndarray:
    """`count` unsigned integers of `bits` bits each, most significant bit first."""
    flat = np.unpackbits(np.frombuffer(data, dtype=np.uint8))[: count * bits].reshape(count, bits)
    out = np.zeros(count, dtype=np.uint64)
    for j in range(bits):
        out = (out << np.uint64(1)) | flat[:, j]
    return out


def canonical_codes(lengths) -> np.ndarray:
    """Canonical Huffman codes: by (length, symbol), each code the previous plus one, shifted to its length."""
    codes, code, prev = np.zeros(len(lengths), dtype=np.uint64), 0, 0
    for s in sorted(range(len(lengths)), key=lambda s: (lengths[s], s)):
        code <<= lengths[s] - prev
        codes[s], prev = code, lengths[s]
        code += 1
    return codes


def huffman_decode(data: bytes, lengths: list[int], count: int, offsets: list[int]) -> np.ndarray:
    """Decode `count` symbols; all restart blocks (one every SYNC symbols) advance together, one symbol a step."""
    lens = np.asarray(lengths, dtype=np.int64)
    top = int(lens.max())
    order = sorted(range(len(lengths)), key=lambda s: (lengths[s], s))
    sorted_codes = canonical_codes(lengths)[order]
    # a code of length L left-aligned to `top` bits: symbols sort by that value, so a window's symbol is the last
    # one whose left-aligned code is <= the window
    aligned = sorted_codes << (top - lens[order]).astype(np.uint64)
    padded = np.concatenate([np.frombuffer(data, dtype=np.uint8), np.zeros(8, dtype=np.uint8)])
    words = np.zeros(len(data) + 1, dtype=np.uint64)   # the 64 bits starting at every byte
    for b in range(8):
        words = (words << np.uint64(8)) | padded[b: b + len(words)]
    order = np.asarray(order)
    pos = np.asarray(offsets, dtype=np.int64)
    out = np.zeros(count, dtype=np.int64)
    starts = np.arange(len(pos)) * SYNC
    for step in range(min(SYNC, count)):
        active = starts + step < count
        p = pos[active]
        window = (words[p >> 3] << (p & 7).astype(np.uint64)) >> np.uint64(64 - top)
        sym = order[np.searchsorted(aligned, window, side="right") - 1]
        out[starts[active] + step] = sym
        pos[active] = p + lens[sym]
    return out
