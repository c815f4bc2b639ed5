"""Per-layer weight and activation quantization, simulated with fake-quant.

Weights of conv and linear layers are rounded to `weight_bits` and stored back as floats, so the
module runs unchanged while holding only values a `weight_bits` model could hold: 1 = binary
(sign times the channel's mean magnitude, XNOR-Net), 2 = ternary (TWN: threshold 0.7 * mean
magnitude, one magnitude per channel), 4 and 8 = symmetric integers with one scale per output
channel, 16 = fp16. A layer whose weights were shared (k-means) gets its codebook quantized instead,
with one scale for the layer, so it keeps at most 2^share_bits values. A quantized weight is stored (its
`GRID` stage, weights.py) as `weight_bits`-bit grid codes with one fp32 scale per output channel; the `FLOAT`
stage stores every weight no other values stage claims as fp16 or fp32 values.

Activations: a forward pre-hook fake-quantizes a layer's input on a per-tensor affine grid of
`act_bits` bits (the grid PyTorch's own quint8 uses at 8 bits); its range lives in the layer's
`act_range` buffer, so it survives deepcopy and state_dict round trips. `apply` calibrates the
ranges data-free, from BatchNorm statistics (every BN output replaced by samples of
N(beta, gamma^2), what BN produces on real data); the evaluator re-calibrates them on training
batches when it has data. `synthesize_inputs` makes data-free calibration *inputs* (ZeroQ) for
flows that need real inputs, such as the int8 conversion.
"""
from __future__ import annotations

import contextlib
import math

import numpy as np
import torch
from torch import nn

from ..errors import AutocompressError
from ..unpack import from_codes, read_raw
from ..weights import Loaded, Stage, Stored, packed_bytes, raw_bytes, to_codes, weight_grid
from .base import Technique, get_meta, layer_targets, set_meta, straight_through, weight_layers

BITS = (1, 2, 4, 8, 16, 32)
CALIBRATION_BATCH = 8
NORMS = (nn.modules.batchnorm._BatchNorm,)


@torch.no_grad()
def fake_quantize(weight: torch.Tensor, bits: int, per_channel: bool = True) -> torch.Tensor:
    """Round `weight` to `bits` bits, one scale per output channel (dim 0) or per tensor; zeros stay zero."""
    if bits >= 32:
        return weight
    if bits == 16:
        return weight.half().float()
    flat = weight.reshape(weight.shape[0] if per_channel else 1, -1)
    magnitude = flat.abs()
    nonzero = (flat != 0).sum(dim=1, keepdim=True).clamp_min(1)
    if bits == 1:  # binary: sign times the mean magnitude of the channel (XNOR-Net)
        out = torch.sign(flat) * magnitude.sum(dim=1, keepdim=True) / nonzero
    elif bits == 2:  # ternary (TWN): small weights to zero, the rest to +-their mean magnitude
        keep = magnitude > 0.7 * magnitude.sum(dim=1, keepdim=True) / nonzero
        alpha = (magnitude * keep).sum(dim=1, keepdim=True) / keep.sum(dim=1, keepdim=True).clamp_min(1)
        out = torch.sign(flat) * keep * alpha
    else:
        qmax = 2 ** (bits - 1) - 1
        scale = magnitude.amax(dim=1, keepdim=True).clamp_min(1e-12) / qmax
        out = torch.round(flat / scale).clamp(-qmax, qmax) * scale
    return out.reshape_as(weight)


def act_quantize(x: torch.Tensor, bits: int, lo: float, hi: float) -> torch.Tensor:
    """Fake-quantize `x` on the affine grid of 2^bits levels spanning [lo, hi] (widened to hold zero)."""
    if bits == 16:
        return x.half().float()
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    levels = 2 ** bits - 1
    scale = max(hi - lo, 1e-8) / levels
    zero_point = round(-lo / scale)
    return (torch.clamp(torch.round(x / scale) + zero_point, 0, levels) - zero_point) * scale


def act_fake_quant(module: nn.Module, args):
    """Forward pre-hook: the layer sees its input fake-quantized (straight-through gradient)."""
    x = args[0]
    lo, hi = module.act_range.tolist()
    q = act_quantize(x.detach(), get_meta(module)["act_bits"], lo, hi)
    return (straight_through(x, q), *args[1:])


def add_act_quant(module: nn.Module, bits: int) -> None:
    """Quantize `module`'s input activations to `bits` bits from now on (range set by calibration)."""
    if "act_range" not in module._buffers:
        module.register_buffer("act_range", torch.zeros(2))
        module.register_forward_pre_hook(act_fake_quant)
    set_meta(module, act_bits=bits)


def act_quantized(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if "act_range" in m._buffers and "act_bits" in get_meta(m)]


@torch.no_grad()
def calibrate_activations(model: nn.Module, batches) -> None:
    """Set every activation range to the min/max its layer sees over `batches` (inputs), in eval mode."""
    layers = act_quantized(model)
    if not layers:
        return
    for m in layers:
        m.act_range.copy_(torch.tensor([math.inf, -math.inf]))

    def observe(m, args):
        x = args[0]
        m.act_range.copy_(torch.stack([torch.minimum(m.act_range[0], x.min()), torch.maximum(m.act_range[1], x.max())]))

    handles = [m.register_forward_pre_hook(observe, prepend=True) for m in layers]
    was_training = model.training
    try:
        model.eval()
        for x in batches:
            model(x)
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)


def random_like_input(example_input: torch.Tensor, n: int, seed: int = 0) -> torch.Tensor:
    """`n` random inputs with the example's shape, mean and spread (the example itself first)."""
    gen = torch.Generator().manual_seed(seed)
    noise = torch.randn((n - 1, *example_input.shape[1:]), generator=gen)
    std = example_input.std() if example_input.numel() > 1 else torch.tensor(1.0)
    return torch.cat([example_input[:1], example_input.mean() + std * noise])


@contextlib.contextmanager
def bn_sampling(model: nn.Module, seed: int = 0):
    """Inside the block every BatchNorm outputs samples of N(beta, gamma^2) per channel: what it would
    output on real data, known from its statistics alone (data-free calibration)."""
    gen = torch.Generator().manual_seed(seed)

    def sample(bn, args, out):
        shape = (1, -1) + (1,) * (out.dim() - 2)
        gamma = bn.weight.view(shape) if bn.weight is not None else 1.0
        beta = bn.bias.view(shape) if bn.bias is not None else 0.0
        return beta + gamma * torch.randn(out.shape, generator=gen)

    handles = [m.register_forward_hook(sample) for m in model.modules() if isinstance(m, NORMS)]
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def calibrate_data_free(model: nn.Module, example_input: torch.Tensor) -> None:
    """Activation ranges from BatchNorm statistics, with no user data."""
    with bn_sampling(model):
        calibrate_activations(model, [random_like_input(example_input, CALIBRATION_BATCH)])


def synthesize_inputs(model: nn.Module, example_input: torch.Tensor, n: int = 8, steps: int = 30,
                      seed: int = 0) -> torch.Tensor:
    """Inputs whose BatchNorm batch statistics match the running ones (ZeroQ's distilled data): data-free
    calibration inputs for flows that need real inputs. The model is left untouched."""
    norms = [m for m in model.modules() if isinstance(m, NORMS) and m.running_mean is not None]
    x = random_like_input(example_input, n, seed).requires_grad_(True)
    losses = []

    def match(bn, args):
        a = args[0].transpose(0, 1).reshape(args[0].shape[1], -1)
        losses.append((a.mean(1) - bn.running_mean).norm() + (a.std(1) - (bn.running_var + bn.eps).sqrt()).norm())

    handles = [m.register_forward_pre_hook(match) for m in norms]
    was_training = model.training
    opt = torch.optim.Adam([x], lr=0.1)
    try:
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        for _ in range(steps if norms else 0):
            losses.clear()
            model(x)
            opt.zero_grad()
            torch.stack(losses).sum().backward()
            opt.step()
    finally:
        for h in handles:
            h.remove()
        for p in model.parameters():
            p.requires_grad_(True)
        model.train(was_training)
    return x.detach()


def scale_bytes(weight: torch.Tensor, bits: int) -> int:
    """Bytes of the fp32 per-output-channel scales an integer grid of `bits` bits needs (fp16/fp32: none)."""
    return 4 * weight.shape[0] if bits < 16 else 0


def _encode_grid(stored: Stored) -> None:
    """One fp32 scale per output channel; the stored values' grid integers are left as codes."""
    q, scales = weight_grid(stored.weight, stored.bits, per_channel=True)
    stored.codes = to_codes(q if stored.mask is None else q[stored.mask.reshape(-1).numpy()], stored.bits)
    stored.code_bits = stored.enc["code_bits"] = stored.bits
    stored.alphabet = 2 ** stored.bits
    stored.sections.append(scales.tobytes())


def _grid_size(stored: Stored) -> int:
    stored.code_bits = stored.bits
    return scale_bytes(stored.weight, stored.bits)


def _decode_grid(loaded: Loaded) -> None:
    """Codes on the grid, times their channel's scale."""
    bits, scales = loaded.enc["bits"], np.frombuffer(loaded.sections.pop(0), dtype=np.float32)
    loaded.alphabet = 2 ** bits
    loaded.from_codes = lambda codes: from_codes(codes, bits).astype(np.float32) * scales[loaded.rows()]


def _decode_float(loaded: Loaded) -> None:
    loaded.values = read_raw(loaded.sections.pop(0), loaded.enc["bits"], loaded.enc["count"])


GRID = Stage(name="per-channel integer grid", slot="values", order=20, keys=("code_bits",),
             present=lambda s: s.bits < 16, encode=_encode_grid, nbytes=_grid_size,
             written=lambda enc: enc["bits"] < 16, decode=_decode_grid)
FLOAT = Stage(name="fp16/fp32 values", slot="values", order=30, keys=(), present=lambda s: True,
              encode=lambda s: s.sections.append(raw_bytes(s.values(), s.bits)),
              nbytes=lambda s: packed_bytes(s.count(), s.bits), written=lambda enc: True, decode=_decode_float)


def quantize_weight(module: nn.Module, bits: int, huffman: bool) -> None:
    """Fake-quantize `module.weight` to `bits` and record it; a shared layer keeps its codebook structure."""
    meta = get_meta(module)
    shared = "clusters" in meta
    module.weight.data = fake_quantize(module.weight.data, bits, per_channel=not shared)
    extra = {"clusters": int(torch.unique(module.weight.data[module.weight.data != 0]).numel())} if shared else {}
    set_meta(module, weight_bits=bits, huffman=bool(huffman or meta.get("huffman", False)), **extra)


def _bits(value, field: str) -> int:
    if value not in BITS:
        raise AutocompressError(f"quantize.{field} = {value!r} is not allowed; allowed: {', '.join(map(str, BITS))}")
    return int(value)


def apply(model: nn.Module, section: dict, example_input: torch.Tensor) -> nn.Module:
    huffman = bool(section.get("huffman", False))
    for name, bits in section.get("weight_bits", {}).items():
        if _bits(bits, "weight_bits") < 32:
            for module in weight_layers(model, name):
                quantize_weight(module, int(bits), huffman)
    acted = False
    for name, bits in section.get("act_bits", {}).items():
        if _bits(bits, "act_bits") < 32:
            for module in weight_layers(model, name):
                add_act_quant(module, int(bits))
                acted = True
    if acted:
        calibrate_data_free(model, example_input)
    return model


class FakeQuant(nn.Module):
    """Fine-tuning parametrization: the layer computes with quantized weights, gradients reach the float ones."""

    def __init__(self, bits: int, per_channel: bool):
        super().__init__()
        self.bits, self.per_channel = bits, per_channel

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return straight_through(weight, fake_quantize(weight, self.bits, self.per_channel))


def constraint(module: nn.Module) -> nn.Module | None:
    meta = get_meta(module)
    bits = int(meta.get("weight_bits", 32))
    return FakeQuant(bits, "clusters" not in meta) if bits < 32 else None


TECHNIQUE = Technique(
    name="quantize",
    order=90,
    fields={"weight_bits": [32, 16, 8, 4], "act_bits": [32]},
    settings={"huffman": False},
    allowed_settings={"huffman": (False, True), "weight_bits": BITS, "act_bits": BITS},
    targets=layer_targets,
    apply=apply,
    constraint=constraint,
    titles={"weight_bits": "weight bits, per layer", "act_bits": "activation bits, per layer"},
    calibrate=calibrate_activations,
    stages=(GRID, FLOAT),
)
