"""The packed export: its file holds what size_kb counts (within 2 %), and loads back to the same module."""
import copy
import hashlib
import heapq
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

import autocompress as ac
from autocompress.compress.base import layer_targets
from autocompress.compress.quantize import fake_quantize
from autocompress.cost.model import size_bytes
from autocompress.cost.pack import load_packed, packed_sections, save_packed
from autocompress.unpack import SYNC, huffman_decode, unpack_bits
from autocompress.graph import analyze
from autocompress.weights import encode_weight, huffman_encode, huffman_lengths, pack_bits, weight_bytes


def every_layer(model, x, **sections):
    """A policy giving every conv/linear layer the same value for each field."""
    names = [n for n, _ in layer_targets(analyze(model, x))]
    fields = {"weight_bits", "act_bits", "density", "bits"}
    return {tech: {k: dict.fromkeys(names, v) if k in fields else v for k, v in cfg.items()}
            for tech, cfg in sections.items()}


CASES = {
    "float": {},
    "fp16": {"quantize": {"weight_bits": 16}},
    "int4 weights, int8 activations": {"quantize": {"weight_bits": 4, "act_bits": 8}},
    "ternary": {"quantize": {"weight_bits": 2}},
    "sparse int8": {"sparsity": {"density": 0.1}, "quantize": {"weight_bits": 8}},
    "sparse binary": {"sparsity": {"density": 0.5}, "quantize": {"weight_bits": 1}},
    "shared huffman": {"share": {"bits": 4, "huffman": True}},
    "deep compression": {"sparsity": {"density": 0.2}, "share": {"bits": 5},
                         "quantize": {"weight_bits": 8, "huffman": True}},
}


@pytest.mark.parametrize("case", list(CASES))
def test_packed_file_matches_size_and_round_trips(case, digits_model, digits_input, tmp_path):
    policy = every_layer(digits_model, digits_input, **CASES[case])
    model = ac.apply(digits_model, policy, digits_input)
    written = save_packed(model, tmp_path / "m.acpk")
    parts = packed_sections(tmp_path / "m.acpk")
    assert written == sum(parts.values()) == (tmp_path / "m.acpk").stat().st_size
    assert abs((parts["header"] + parts["tensors"]) / size_bytes(model) - 1) < 0.02  # header, Huffman restarts
    restored = load_packed(tmp_path / "m.acpk")              # the architecture stored in the file
    shell = copy.deepcopy(model)                               # or a module of the same architecture
    for p in shell.parameters():
        p.data.zero_()
    into = load_packed(tmp_path / "m.acpk", shell)
    with torch.no_grad():
        expected = model(digits_input)
        assert torch.allclose(restored(digits_input), expected, rtol=1e-5, atol=1e-5)
        assert torch.allclose(into(digits_input), expected, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(model.state_dict().items(), restored.state_dict().values()):
        assert torch.allclose(a.float(), b.float(), rtol=1e-6, atol=1e-7), name


NUMPY_ONLY = """
import importlib.util, sys
import numpy as np
sys.modules["torch"] = sys.modules["autocompress"] = None  # importing either now fails
spec = importlib.util.spec_from_file_location("unpack", sys.argv[1])
unpack = importlib.util.module_from_spec(spec)
spec.loader.exec_module(unpack)
for packed in sys.argv[2:]:
    np.savez(packed + ".npz", **unpack.read_packed(packed))
    open(packed + ".structure", "wb").write(unpack.architecture_bytes(packed))
"""


def test_the_numpy_reader_alone_reads_every_coding(digits_model, digits_input, tmp_path):
    """unpack.py, copied anywhere, reads every coding back without torch or autocompress importable, and hands
    over the stored structure without unpickling it."""
    import autocompress.unpack

    models = {}
    for i, case in enumerate(CASES):
        models[str(tmp_path / f"{i}.acpk")] = model = ac.apply(
            digits_model, every_layer(digits_model, digits_input, **CASES[case]), digits_input)
        save_packed(model, tmp_path / f"{i}.acpk")
    subprocess.run([sys.executable, "-c", NUMPY_ONLY, autocompress.unpack.__file__, *models], check=True,
                   cwd=tmp_path)
    for path, model in models.items():
        state = model.state_dict()
        read = np.load(path + ".npz")
        assert sorted(read.files) == sorted(state)
        for name, tensor in state.items():
            np.testing.assert_allclose(read[name], tensor.numpy(), rtol=1e-6, atol=1e-7, err_msg=f"{path} {name}")
        with open(path + ".structure", "rb") as f:
            structure = torch.load(f, weights_only=False)
        assert type(structure) is type(model) and list(structure.state_dict()) == list(state)


def huffman_bits(counts) -> int:
    """Reference: total bits of an optimal Huffman code for these symbol counts (one symbol: 1 bit each)."""
    counts = [int(c) for c in counts if c > 0]
    if len(counts) <= 1:
        return sum(counts)
    heapq.heapify(counts)
    total = 0
    while len(counts) > 1:
        merged = heapq.heappop(counts) + heapq.heappop(counts)
        total += merged  # every symbol under a merge gets one more bit
        heapq.heappush(counts, merged)
    return total


def test_estimate_reports_the_packed_size(digits_model, digits_input):
    model = ac.apply(digits_model, every_layer(digits_model, digits_input, quantize={"weight_bits": 4}), digits_input)
    assert ac.estimate(model, digits_input, "raspberry-pi-4").size_kb * 1024 == size_bytes(model)


def test_huffman_coded_grid_matches_size(digits_model, digits_input, tmp_path):
    model = ac.apply(digits_model, every_layer(digits_model, digits_input, quantize={"weight_bits": 4, "huffman": True}),
                     digits_input)
    assert abs(save_packed(model, tmp_path / "w.acpk", architecture=False) / size_bytes(model) - 1) < 0.02


def test_packed_weights_are_really_smaller(digits_model, digits_input, tmp_path):
    full = save_packed(digits_model, tmp_path / "f.acpk", architecture=False)
    int4 = ac.apply(digits_model, every_layer(digits_model, digits_input, quantize={"weight_bits": 4}), digits_input)
    assert save_packed(int4, tmp_path / "q.acpk", architecture=False) < 0.15 * full


@pytest.mark.parametrize("bits", [1, 3, 8, 13])
def test_bit_packing_round_trips(bits):
    codes = np.random.default_rng(bits).integers(0, 2 ** bits, 1001)
    data = pack_bits(codes, bits)
    assert len(data) == -(-1001 * bits // 8)
    assert np.array_equal(unpack_bits(data, bits, 1001), codes)


@pytest.mark.parametrize("n, alphabet", [(1, 1), (50, 3), (3 * SYNC + 17, 40), (10_000, 256)])
def test_huffman_is_optimal_and_decodes(n, alphabet):
    rng = np.random.default_rng(n)
    symbols = np.minimum(rng.geometric(0.3, n) - 1, alphabet - 1)   # skewed: short codes for common symbols
    present, inverse, counts = np.unique(symbols, return_inverse=True, return_counts=True)
    lengths = huffman_lengths(counts)
    stream, offsets = huffman_encode(inverse, lengths)
    assert sum(l * c for l, c in zip(lengths, counts)) == huffman_bits(counts)   # the size model's optimum
    assert len(stream) == -(-huffman_bits(counts) // 8)
    assert np.array_equal(present[huffman_decode(stream, lengths, n, offsets)], symbols)


def test_loader_rejects_other_files_and_architectures(digits_model, digits_input, tmp_path):
    bad = tmp_path / "x.pt"
    torch.save(digits_model.state_dict(), bad)
    with pytest.raises(ac.AutocompressError, match="not a packed autocompress model"):
        load_packed(bad)
    pruned = ac.apply(digits_model, {"prune": {"keep": {"stem.0": 0.5}}}, digits_input)
    save_packed(pruned, tmp_path / "p.acpk", architecture=False)
    with pytest.raises(ac.AutocompressError, match="different architecture"):
        load_packed(tmp_path / "p.acpk", ac.apply(digits_model, {}, digits_input))
    quantized = ac.apply(digits_model, every_layer(digits_model, digits_input, quantize={"act_bits": 8}), digits_input)
    save_packed(quantized, tmp_path / "q.acpk", architecture=False)   # its activation ranges have no place in
    with pytest.raises(ac.AutocompressError, match="which the module lacks"):  # the plain model
        load_packed(tmp_path / "q.acpk", ac.apply(digits_model, {}, digits_input))
    with pytest.raises(ac.AutocompressError, match="holds no architecture"):
        load_packed(tmp_path / "p.acpk")


def _weight(seed, shape=(16, 8, 3, 3)):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _sparse(w, keep):
    return w * (w.abs() >= w.abs().flatten().kthvalue(int(w.numel() * (1 - keep))).values)


def _shared(w, k):
    book = torch.linspace(-1, 1, k)
    return book[torch.bucketize(w.clamp(-1, 1), (book[1:] + book[:-1]) / 2)] * (w != 0)


PINNED = {  # (weight, metadata) -> sha256 of its JSON encoding and sections, as ACPACK01 files have stored them
    "fp32": (lambda: (_weight(0), {"keep": 0.5}), "a6dd6e448ed2b5cb"),
    "fp16": (lambda: (_weight(1).half().float(), {"weight_bits": 16}), "d504e7761e0ccfe7"),
    "int8": (lambda: (fake_quantize(_weight(2), 8), {"weight_bits": 8}), "b86fa64d1187e6e8"),
    "binary": (lambda: (fake_quantize(_weight(3), 1), {"weight_bits": 1}), "f83515307968cf70"),
    "int4, bitmask, Huffman": (lambda: (fake_quantize(_sparse(_weight(4), 0.5), 4),
                                        {"sparsity": 0.5, "weight_bits": 4, "huffman": True}), "7e77a363ef8d6e08"),
    "ternary, CSR": (lambda: (fake_quantize(_sparse(_weight(5, (64, 576)), 0.02), 2),
                              {"sparsity": 0.98, "weight_bits": 2}), "5e5d7663423a7808"),
    "shared": (lambda: (_shared(_weight(6), 8), {"share_bits": 3, "clusters": 8}), "def4b5e6e55414c6"),
    "sparse, shared int8, Huffman": (lambda: (fake_quantize(_shared(_sparse(_weight(7), 0.3), 16), 8, per_channel=False),
                                              {"sparsity": 0.7, "share_bits": 4, "clusters": 16, "weight_bits": 8,
                                               "huffman": True}), "447b6cbe988d3804"),
}


@pytest.mark.parametrize("case", list(PINNED))
def test_the_stored_format_does_not_change(case):
    """Every stage combination encodes to the bytes it always has: files written before still read the same."""
    make, expected = PINNED[case]
    weight, meta = make()
    enc, sections = encode_weight(weight, meta)
    assert hashlib.sha256(json.dumps(enc).encode() + b"".join(sections)).hexdigest()[:16] == expected
    assert sum(map(len, sections)) == weight_bytes(weight, meta)


def test_the_numpy_reader_knows_exactly_the_built_in_stages_header_keys():
    """unpack.py cannot import the stages, so its list of header keys is written out: it must be the keys the
    built-in stages declare (plus the bit-width and count every weight has), or a file would be refused or misread."""
    from autocompress import unpack, weights

    assert unpack.KNOWN_KEYS == {"bits", "count"}.union(*(stage.keys for stage in weights.STAGES))
