"""The stored-bytes format of compressed weights: what the cost model, the packed export and the loader share.

A compressed conv/linear weight is stored as a stack of stages, one per slot, each declared by the technique
whose compression it stores (`Technique.stages`, registered with the technique) and writing its own header keys:

    index   which weights are stored         sparsity: the non-zeros' bitmask or CSR rows (`index`)
    values  the stored values                share: a codebook and its indices (`book`, `code_bits`);
                                             quantize: one fp32 scale per output channel and grid codes
                                             (`code_bits`), or, the fallback, fp16/fp32 values
    codes   the integer codes a values       this module: Huffman-coded where the metadata says `huffman`
            stage left, if any               (`huffman`, `huffman_bytes`, `symbols`), else fixed-width

In each slot the first stage (by `order`) that is present for the weight runs, so a technique's stage can take
over a slot by ordering itself before the built-in ones. `encode_weight` writes a weight's header and byte
sections, `weight_bytes` counts them without encoding (the cost model's size: cost/model.py), the packed
export (cost/pack.py) writes them, and `decode_weight` reads them back for `load_packed`, each slot by the stage
whose header keys it finds (the built-in stages through unpack.py's readers). unpack.py alone, numpy only so that
it can be copied next to a file, reads the built-in stages' keys and names any other in one sentence.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import AutocompressError
from .unpack import SYNC, canonical_codes, qmax, read_codes

SLOTS = ("index", "values", "codes")
CHUNK = 1 << 20  # values expanded to bits at a time (bounds the encoder's memory)


@dataclass
class Stored:
    """A weight on its way into the file, handed from stage to stage: what the earlier stages decided."""

    weight: torch.Tensor
    meta: dict
    mask: torch.Tensor | None = None     # where the stored values are, in the weight's shape (None: everywhere)
    code_bits: int | None = None         # width of the integer codes a values stage left (None: no codes)
    codes: np.ndarray | None = None      # those codes (when encoding)
    alphabet: int | None = None          # how many codes a grid can have (None: a codebook's indices)
    enc: dict = field(default_factory=dict)          # the header's encoding
    sections: list[bytes] = field(default_factory=list)

    @property
    def bits(self) -> int:
        """Bits of each stored value (the metadata's weight_bits; 32 when it has none)."""
        return int(self.meta.get("weight_bits", 32))

    def count(self) -> int:
        """How many values are stored."""
        return self.weight.numel() if self.mask is None else int(self.mask.sum())

    def values(self) -> torch.Tensor:
        """The stored values, flat, in storage order."""
        flat = self.weight.reshape(-1)
        return flat if self.mask is None else flat[self.mask.reshape(-1)]


@dataclass(frozen=True)
class Stage:
    """One part of a stored weight, declared by the technique that creates it.

    `slot` is one of SLOTS; `order` ranks it among its slot's stages (the first present one runs).
    `present(stored)` says whether it stores this weight (from its metadata and what earlier stages decided);
    `encode(stored)` appends its section and header `keys` and leaves what later stages need (mask, codes);
    `nbytes(stored)` returns the bytes that encoding appends, without encoding, and leaves the same for the
    later stages' counts; None where only encoding can tell (Huffman: a code's length depends on every code).
    Reading back (`decode_weight`, what `load_packed` calls): `written(enc)` says from a header whether this stage
    wrote the weight, and `decode(loaded)` reads its section and leaves what later stages need (mask, a reader of
    codes, or the values).
    """

    name: str
    slot: str
    order: float
    keys: tuple[str, ...]
    present: Callable[[Stored], bool]
    encode: Callable[[Stored], None]
    nbytes: Callable[[Stored], int] | None
    written: Callable[[dict], bool]
    decode: Callable[["Loaded"], None]


@dataclass
class Loaded:
    """A weight on its way out of the file, handed from stage to stage in slot order: its header and shape, the
    sections not read yet, and what the earlier stages read."""

    enc: dict
    sections: list[bytes]
    shape: tuple
    mask: np.ndarray | None = None       # flat: where the stored values go (None: everywhere)
    alphabet: int | None = None          # how many codes the codes slot reads into (a values stage left codes)
    from_codes: Callable[[np.ndarray], np.ndarray] | None = None   # those codes -> the stored values
    values: np.ndarray | None = None     # the stored values, flat, float32

    def rows(self) -> np.ndarray:
        """The output channel of each stored value."""
        numel = math.prod(self.shape)
        rows = np.arange(numel) // (numel // self.shape[0])
        return rows if self.mask is None else rows[self.mask]


STAGES: list[Stage] = []  # every registered stage, by slot, then order


def add_stages(stages) -> None:
    """Register a technique's stages (compress.register does, with the technique)."""
    for stage in stages:
        if stage.slot not in SLOTS:
            raise AutocompressError(f"stage {stage.name!r} has slot {stage.slot!r}; allowed: {', '.join(SLOTS)}")
        if any(s.name == stage.name for s in STAGES):
            raise AutocompressError(f"a weight stage named {stage.name!r} is already registered")
    STAGES.extend(stages)
    STAGES.sort(key=lambda s: (SLOTS.index(s.slot), s.order))


def remove_stages(stages) -> None:
    """Forget stages added with `add_stages` (compress.unregister does)."""
    STAGES[:] = [s for s in STAGES if s not in stages]


def _stack(stored: Stored):
    """The stage of each slot that stores this weight. Lazy: the caller runs a slot's stage before the next
    slot's is chosen, because presence depends on what earlier stages decided (codes only where some are left)."""
    for slot in SLOTS:
        stage = next((s for s in STAGES if s.slot == slot and s.present(stored)), None)
        if stage is not None:
            yield stage


def weight_bytes(weight: torch.Tensor, meta: dict) -> int:
    """Stored bytes of one weight tensor whose module carries `meta` (see compress/base.py for the keys):
    what `encode_weight` writes, counted without encoding where its stages can."""
    stored, total = Stored(weight.detach(), meta), 0
    for stage in _stack(stored):
        if stage.nbytes is None:
            return sum(len(section) for section in encode_weight(weight, meta)[1])
        total += stage.nbytes(stored)
    return total


def encode_weight(weight: torch.Tensor, meta: dict) -> tuple[dict, list[bytes]]:
    """The encoding (JSON-able header) and byte sections of a compressed conv/linear weight."""
    stored = Stored(weight.detach(), meta)
    stored.enc["bits"] = stored.bits
    for stage in _stack(stored):
        if stage.slot == "values":  # the decoder sizes every array by it
            stored.enc["count"] = stored.count()
        stage.encode(stored)
    return stored.enc, stored.sections


def decode_weight(enc: dict, sections: list[bytes], shape: tuple) -> np.ndarray:
    """A compressed weight as float32, each slot read by the registered stage whose header keys it finds (for
    the built-in stages, what unpack.decode_weight, the numpy-only reader, gives)."""
    loaded = Loaded(enc, list(sections), tuple(shape))
    for slot in SLOTS:
        stage = next((s for s in STAGES if s.slot == slot and s.written(enc)), None)
        if stage is not None:
            stage.decode(loaded)
    if loaded.values is None:
        raise AutocompressError(f"no registered stage reads a weight stored with header {enc}; register the "
                                "technique that wrote it")
    if loaded.mask is None:
        return loaded.values.reshape(shape)
    out = np.zeros(math.prod(shape), dtype=np.float32)
    out[loaded.mask] = loaded.values
    return out.reshape(shape)


# ---- what the stages write with -----------------------------------------------------------------------

def packed_bytes(count: int, bits: int) -> int:
    """Bytes of `count` values packed at `bits` bits each."""
    return math.ceil(count * bits / 8)


def pack_bits(codes: np.ndarray, bits: int) -> bytes:
    """Unsigned integers < 2^bits, `bits` bits each, most significant bit first."""
    codes = np.asarray(codes, dtype=np.uint64)
    shifts = np.arange(bits - 1, -1, -1, dtype=np.uint64)
    chunks = [((codes[i: i + CHUNK, None] >> shifts) & 1).astype(np.uint8).reshape(-1)
              for i in range(0, len(codes), CHUNK)]
    return np.packbits(np.concatenate(chunks) if chunks else np.zeros(0, np.uint8)).tobytes()


def raw_bytes(values: torch.Tensor, bits: int) -> bytes:
    """Float values as fp16 (16 bits) or fp32."""
    return values.half().numpy().tobytes() if bits == 16 else values.float().numpy().tobytes()


def to_codes(q: np.ndarray, bits: int) -> np.ndarray:
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


# ---- the codes slot: this module's own stages -----------------------------------------------------------

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


def _encode_huffman(stored: Stored) -> None:
    """A Huffman stream of the codes, with [which codes occur (grids)], the code lengths and the restarts."""
    stored.enc["huffman"] = True
    present, inverse, counts = np.unique(stored.codes, return_inverse=True, return_counts=True)
    lengths = huffman_lengths(counts)
    stream, offsets = huffman_encode(inverse, lengths)
    occurs = b""
    if stored.alphabet is not None:
        flags = np.zeros(stored.alphabet, dtype=np.uint8)
        flags[present] = 1
        occurs = np.packbits(flags).tobytes()
    else:
        stored.enc["symbols"] = int(len(present))
    stored.enc["huffman_bytes"] = [len(occurs), len(lengths), len(stream)]
    stored.sections.append(occurs + bytes(lengths) + stream + np.asarray(offsets, dtype=np.uint32).tobytes())


def _encode_fixed(stored: Stored) -> None:
    stored.enc["huffman"] = False
    stored.sections.append(pack_bits(stored.codes, stored.code_bits))


def _decode_codes(loaded: Loaded) -> None:
    loaded.values = loaded.from_codes(read_codes(loaded.sections.pop(0), loaded.enc, loaded.alphabet))


HUFFMAN = Stage(name="Huffman codes", slot="codes", order=10, keys=("huffman", "symbols", "huffman_bytes"),
                present=lambda s: s.code_bits is not None and bool(s.meta.get("huffman")),
                encode=_encode_huffman, nbytes=None,
                written=lambda enc: enc.get("huffman") is True, decode=_decode_codes)
FIXED_CODES = Stage(name="fixed-width codes", slot="codes", order=20, keys=("huffman",),
                    present=lambda s: s.code_bits is not None, encode=_encode_fixed,
                    nbytes=lambda s: packed_bytes(s.count(), s.code_bits),
                    written=lambda enc: enc.get("huffman") is False, decode=_decode_codes)
add_stages((HUFFMAN, FIXED_CODES))
