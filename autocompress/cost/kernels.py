"""Kernel-level latency: the ops a runtime executes together, each predicted by a regressor fitted on timed kernels.

A model's latency is the sum of its kernels'. A kernel is an anchor op with the ops that follow it along
sole-reader edges (KERNEL_FUSES: conv+bn+act, linear+act, add+act, ... as cost/fusion.py matches them), or
one op alone (a pooling, a concatenation, an activation). Each kernel is described by a few numbers
(`features`: its family, work, tensor sizes, GEMM dimensions, channels and their alignment, groups, kernel
size, stride, what is fused into it, whether it runs int8) and its latency is

    seconds = prior x exp(regressor(features, log prior))
    prior   = overhead + max(MACs / peak, bytes / bandwidth)

where overhead, peak and bandwidth are measured on the machine (an empty op, a large matrix product, large
copies), never fitted, and the regressor (scikit-learn's HistGradientBoostingRegressor on log latency over
the prior) is fitted on kernels sampled over the shapes pruning and students produce and timed alone
(cost/calibrate.py). Predicting the ratio to the roofline, not the latency, keeps a kernel larger than any
timed one on the roofline's slope: trees cannot extrapolate, a ratio saturates where efficiency does.
Features are computed from a traced graph, the same way for a timed kernel and for a layer of a model.
In a runtime with int8 kernels (torch-int8) each conversion between float and int8 is a kernel of its own
(families quantize and dequantize, `boundary_row`).
"""
from __future__ import annotations

import base64
import hashlib
import io
import math
import os
import zipfile

import numpy as np
from torch import nn

from ..errors import AutocompressError
from ..models import cache_dir

KERNEL_FUSES = (("conv", "bn", "act"), ("conv", "bn"), ("conv", "act"), ("linear", "act"), ("add", "act"))
FAMILIES = ("conv", "pointwise", "grouped", "dwconv", "linear", "matmul", "norm", "act", "maxpool", "avgpool",
            "adaptivepool", "add", "mul", "cat", "elementwise", "other", "quantize", "dequantize")
ACT_CODES = {"ReLU": 1, "relu": 1, "relu_": 1, "ReLU6": 2, "relu6": 2, "Hardtanh": 2, "hardtanh": 2,
             "Hardswish": 3, "hardswish": 3, "Hardsigmoid": 4, "hardsigmoid": 4, "SiLU": 5, "silu": 5,
             "Sigmoid": 6, "sigmoid": 6, "GELU": 7, "gelu": 7}
FEATURES = ("family", "log_work", "log_in", "log_out", "log_params", "log_m", "log_n", "log_k", "cin", "cout",
            "groups", "kernel", "stride", "cin_mod16", "cout_mod16", "bn", "act", "log_spatial", "int8", "log_weights_between", "log_prior")
OTHER_ACT = 8  # the act code of any activation ACT_CODES does not name
# the act codes with no x86 int8 kernel in torch.ao (quantized.FLOAT_ONLY_ACTS names them; it imports this module)
FLOAT_ACT_CODES = (ACT_CODES["Hardsigmoid"], ACT_CODES["SiLU"], ACT_CODES["Sigmoid"], ACT_CODES["GELU"], OTHER_ACT)
FLOAT_ACT_BYTES = 17.0  # per element: dequantize writes 4, the activation reads 4 and writes 4, quantize reads 4, writes 1
GEMM_FAMILIES = {FAMILIES.index(f) for f in ("conv", "pointwise", "grouped", "dwconv", "linear", "matmul")}


def gemm_dims(layer) -> tuple[int, int, int]:
    """(m, n, k) of the layer seen as a matrix product: output channels per group, output positions, reduction
    length per output; (1, 1, 1) for ops that are not products."""
    m = layer.module
    if isinstance(m, nn.modules.conv._ConvNd) and layer.out_shape:
        n = layer.out_numel // max(1, m.out_channels)
        return m.out_channels // m.groups, n, (m.in_channels // m.groups) * math.prod(m.kernel_size)
    if isinstance(m, nn.Linear) and layer.out_shape:
        return m.out_features, layer.out_numel // max(1, m.out_features), m.in_features
    if layer.kind == "matmul" and layer.out_shape:
        n = layer.out_shape[-1]
        return n, max(1, layer.out_numel // max(1, n)), max(1, layer.macs // max(1, layer.out_numel))
    return 1, 1, 1


def pool_work(layer) -> float:
    """Window reads of a pooling op: output elements x window area for a fixed window, else every input once."""
    kernel = getattr(layer.module, "kernel_size", None) if layer.module is not None else None
    if kernel is None or isinstance(layer.module, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)):
        return float(layer.in_numel)
    kernel = kernel if isinstance(kernel, tuple) else (kernel,) * max(1, len(layer.out_shape) - 2)
    return float(layer.out_numel * math.prod(kernel))


def family(layer) -> str:
    """The kernel family of an anchor layer: which code path the runtime takes for it."""
    m = layer.module
    if layer.kind == "conv":
        if m.groups > 1:
            return "grouped"
        return "pointwise" if math.prod(m.kernel_size) == 1 else "conv"
    if layer.kind in ("dwconv", "linear", "matmul", "norm", "act"):
        return layer.kind
    if layer.kind == "pool":
        if isinstance(m, (nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d)) or "adaptive" in layer.type:
            return "adaptivepool"
        return "maxpool" if "max" in layer.type.lower() else "avgpool"
    if layer.kind == "elementwise":
        name = layer.type.lower()
        if name in ("add", "iadd", "add_"):
            return "add"
        if name in ("mul", "imul"):
            return "mul"
        if name in ("cat", "concat"):
            return "cat"
        if layer.type in ACT_CODES:
            return "act"
        return "adaptivepool" if "adaptive" in name else "elementwise"
    return "other"


def weight_bytes(layers) -> float:
    """Float32 bytes of a graph's parameters: what streams through the caches between two visits of one weight."""
    return 4.0 * sum(l.params for l in layers)


def features(layers, anchor: list[int], between: float | None = None,
             int8=None) -> tuple[np.ndarray, np.ndarray]:
    """(anchor indices, feature rows without the prior) of every kernel of a traced graph. `between`: the weight
    bytes read between two runs of a kernel (default: the graph's own, once per inference), which decides from
    which memory level its weights come (0 for a kernel without weights). `int8`: per layer, whether it runs an
    int8 kernel (cost/quantized.py); a kernel is its anchor's."""
    between = weight_bytes(layers) if between is None else between
    members: dict[int, list[int]] = {}
    for i, a in enumerate(anchor):
        if layers[i].kind != "param":
            members.setdefault(a, []).append(i)
    index = np.array(sorted(members), dtype=int)
    rows = [_kernel_row(layers, members[a]) + [float(int8[a]) if int8 is not None else 0.0] for a in index]
    rows = [row + [_log(between) if row[4] else 0.0] for row in rows]  # only a kernel with weights reads them
    return index, np.array(rows, dtype=float).reshape(len(rows), len(FEATURES) - 1)


def boundary_row(kind: str, shape) -> list[float]:
    """The feature row (no prior) of a conversion between float and int8 (`kind` quantize or dequantize) of a
    tensor of `shape`: an elementwise pass over it."""
    numel = math.prod(shape)
    channels = shape[1] if len(shape) > 1 else 1
    spatial = math.prod(shape[2:]) if len(shape) > 2 else 1
    return [FAMILIES.index(kind), _log(numel), _log(numel), _log(numel), 0.0, _log(1), _log(1), _log(1), channels,
            channels, 1, 1, 1, channels % 16, channels % 16, 0.0, 0, _log(spatial), 1.0, 0.0]


def _kernel_row(layers, group: list[int]) -> list[float]:
    first, last = layers[group[0]], layers[group[-1]]
    fam = family(first)
    m, n, k = gemm_dims(first)
    mod = first.module
    if isinstance(mod, nn.modules.conv._ConvNd):
        cin, cout, groups = mod.in_channels, mod.out_channels, mod.groups
        kernel, stride = math.prod(mod.kernel_size), math.prod(mod.stride)
    elif isinstance(mod, nn.Linear):
        cin, cout, groups, kernel, stride = mod.in_features, mod.out_features, 1, 1, 1
    else:
        channels = first.out_shape[1] if len(first.out_shape) > 1 else 1
        cin, cout, groups, kernel, stride = channels, channels, 1, 1, 1
    if fam in ("maxpool", "avgpool", "adaptivepool"):
        work = pool_work(first)
    else:
        work = first.macs if FAMILIES.index(fam) in GEMM_FAMILIES else first.out_numel
    act = max([ACT_CODES.get(layers[j].type, OTHER_ACT) for j in group if layers[j].kind in ("act", "elementwise")
               and j != group[0]] or [0])
    spatial = math.prod(last.out_shape[2:]) if len(last.out_shape) > 2 else 1
    return [FAMILIES.index(fam), _log(work), _log(first.in_numel), _log(last.out_numel),
            _log(sum(layers[j].params for j in group)), _log(m), _log(n), _log(k), cin, cout, groups, kernel,
            stride, cin % 16, cout % 16, float(any(layers[j].kind == "norm" for j in group[1:])), act, _log(spatial)]


def _log(value: float) -> float:
    return math.log2(1.0 + float(value))


def prior_s(rows: np.ndarray, overhead_us: float, peak_gmacs: float, bandwidth_gbs: float,
            int8_gmacs: float | None = None, int8_overhead_us: float | None = None) -> np.ndarray:
    """The roofline prior of every kernel row: a measured op overhead plus the larger of its compute at the
    measured peak and its traffic (input, output written once and re-read by every fused op, weights; float32,
    or one byte each for an int8 kernel, which computes at the measured `int8_gmacs`) at the measured bandwidth.
    An int8 convolution or linear kernel costs the measured `int8_overhead_us` per call; an activation with no
    int8 kernel fused into an int8 one (a SiLU after an int8 convolution) runs float between a dequantize and a
    quantize: two ops more, and FLOAT_ACT_BYTES per output element."""
    col = {name: i for i, name in enumerate(FEATURES)}
    work, ins, outs, params = (np.exp2(rows[:, col[c]]) - 1 for c in ("log_work", "log_in", "log_out", "log_params"))
    gemm = np.isin(rows[:, col["family"]], list(GEMM_FAMILIES))
    int8 = rows[:, col["int8"]] > 0
    peak = np.where(int8, int8_gmacs or peak_gmacs, peak_gmacs)
    compute = np.where(gemm, work / (peak * 1e9), 0.0)
    fused = rows[:, col["bn"]] + (rows[:, col["act"]] > 0)
    traffic = np.where(int8, 1.0, 4.0) * (ins + outs * (1.0 + 2.0 * fused) + params) / (bandwidth_gbs * 1e9)
    overhead = np.where(int8 & gemm, int8_overhead_us or overhead_us, overhead_us) * 1e-6
    float_act = int8 & np.isin(rows[:, col["act"]], FLOAT_ACT_CODES)
    detour = np.where(float_act, 2 * overhead_us * 1e-6 + FLOAT_ACT_BYTES * outs / (bandwidth_gbs * 1e9), 0.0)
    return overhead + np.maximum(compute, traffic) + detour


def with_prior(rows: np.ndarray, prior: np.ndarray) -> np.ndarray:
    return np.column_stack([rows, np.log(prior)])


REGRESSOR = {"max_iter": 300, "learning_rate": 0.08, "max_leaf_nodes": 31, "min_samples_leaf": 4,
             "l2_regularization": 1.0, "categorical_features": [0], "early_stopping": False, "random_state": 0}


def regressor():
    """The kernel regressor: gradient-boosted trees on the features (the family as a category)."""
    from sklearn.ensemble import HistGradientBoostingRegressor

    return HistGradientBoostingRegressor(**REGRESSOR)


def encode(x: np.ndarray, y: np.ndarray) -> str:
    """Timed kernels (features with prior, log(seconds / prior)) as one base64 text: the profile stays YAML data."""
    buffer = io.BytesIO()
    np.savez_compressed(buffer, x=x.astype(np.float32), y=y.astype(np.float32))
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode(text: str) -> tuple[np.ndarray, np.ndarray]:
    data = np.load(io.BytesIO(base64.b64decode(text)))
    return data["x"].astype(float), data["y"].astype(float)


_FITTED: dict = {}  # kernel data text -> its fitted Forest: read or fitted once per process


def fitted(text: str) -> "Forest":
    """The regressor fitted on a profile's timed kernels, as a Forest. Fitted once per machine and kept in the
    cache folder as plain arrays (`forests/*.npz`, read back without unpickling; keyed by the kernels, the
    regressor's settings and scikit-learn's version), then once per process."""
    if text not in _FITTED:
        width = decode(text)[0].shape[1]
        if width != len(FEATURES):  # an older latency model's kernels: its trees would read the wrong columns
            raise AutocompressError(f"the profile's timed kernels have {width} features and this autocompress reads "
                                    f"{len(FEATURES)}: they were timed by another version; re-run "
                                    "`autocompress calibrate` (with the profile's --runtime and --threads)")
        _FITTED[text] = _stored_forest(text)
    return _FITTED[text]


def _stored_forest(text: str) -> "Forest":
    import sklearn

    key = hashlib.sha256(f"{sklearn.__version__}|{sorted(REGRESSOR.items())}|{text}".encode())
    path = cache_dir() / "forests" / f"{key.hexdigest()[:24]}.npz"
    try:
        with np.load(path, allow_pickle=False) as data:
            return Forest.from_arrays(data)
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):  # none yet, or unreadable: fit it
        pass
    x, y = decode(text)
    forest = Forest(regressor().fit(x, y))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
    np.savez(tmp, **forest.arrays())
    os.replace(tmp, path)
    return forest


class Forest:
    """A fitted HistGradientBoostingRegressor as flat numpy arrays, predicting every row through every tree at
    once: the regressor's own numbers (the same splits, its leaves summed tree by tree in its order) without the
    per-tree call overhead of its predict (300 calls of 0.3-1 ms: most of an estimate's time)."""

    def __init__(self, model):
        encoder = model._preprocessor.named_transformers_["encoder"] if model._preprocessor is not None else None
        if encoder is None or list(model._preprocessor.output_indices_["encoder"].indices(1 << 30))[:2] != [0, 1]:
            raise ValueError("Forest expects the family (column 0) as the only categorical feature")
        categories = np.asarray(encoder.categories_[0], dtype=float)
        trees = [p[0] for p in model._predictors]
        sizes = np.array([len(t.nodes) for t in trees])
        starts = np.concatenate([[0], np.cumsum(sizes)[:-1]]).astype(np.intp)
        nodes = np.concatenate([t.nodes for t in trees])
        own = np.arange(len(nodes))
        leaf = nodes["is_leaf"].astype(bool)
        offset = np.repeat(starts, sizes)
        known, f_idx_map = model._bin_mapper.make_known_categories_bitsets()
        # Per categorical node, where each encoded family code goes (code len(categories): unknown, i.e. missing).
        codes = np.arange(len(categories) + 1)
        is_cat = nodes["is_categorical"].astype(bool) & ~leaf
        table = np.zeros((int(is_cat.sum()) + 1, len(codes)), dtype=bool)
        bitset_starts = np.repeat(np.concatenate([[0], np.cumsum([len(t.raw_left_cat_bitsets) for t in trees])[:-1]]),
                                  sizes)
        left_bits = np.concatenate([t.raw_left_cat_bitsets for t in trees])
        cat_row = np.zeros(len(nodes), dtype=np.intp)
        for r, i in enumerate(np.flatnonzero(is_cat), start=1):
            cat_row[i] = r
            bits = left_bits[nodes["bitset_idx"][i] + bitset_starts[i]]
            kbits = known[f_idx_map[nodes["feature_idx"][i]]]
            for c in codes[:-1]:
                in_left = (int(bits[c // 32]) >> (c % 32)) & 1
                is_known = (int(kbits[c // 32]) >> (c % 32)) & 1
                table[r, c] = bool(in_left) or (not is_known and bool(nodes["missing_go_to_left"][i]))
            table[r, -1] = bool(nodes["missing_go_to_left"][i])
        self.categories, self.cat_table, self.cat_row = categories, table, cat_row
        self.roots, self.categorical = starts, is_cat
        self.feature = np.where(leaf, 0, nodes["feature_idx"]).astype(np.intp)
        self.threshold = nodes["num_threshold"].astype(float)
        self.missing_left = nodes["missing_go_to_left"].astype(bool)
        self.left = np.where(leaf, own, nodes["left"] + offset).astype(np.intp)   # a leaf leads to itself
        self.right = np.where(leaf, own, nodes["right"] + offset).astype(np.intp)
        self.value = nodes["value"].astype(float)
        self.depth = np.array(int(nodes["depth"].max()))
        self.baseline = np.array(float(np.asarray(model._baseline_prediction).reshape(-1)[0]))

    def arrays(self) -> dict:
        return dict(vars(self))

    @classmethod
    def from_arrays(cls, arrays) -> "Forest":
        forest = cls.__new__(cls)
        for k in cls.KEYS:
            setattr(forest, k, np.asarray(arrays[k]))
        return forest

    KEYS = ("categories", "cat_table", "cat_row", "roots", "categorical", "feature", "threshold", "missing_left",
            "left", "right", "value", "depth", "baseline")

    def predict(self, x: np.ndarray) -> np.ndarray:
        x = np.asarray(x, dtype=float)
        if not len(x):
            return np.zeros(0)
        fam = np.searchsorted(self.categories, x[:, 0])
        clipped = np.minimum(fam, len(self.categories) - 1)
        code = np.where(self.categories[clipped] == x[:, 0], clipped, len(self.categories))  # unknown: missing
        x = x.copy()
        x[:, 0] = code  # the family is only ever read by categorical splits
        n, width = x.shape
        flat = x.ravel()
        base = (np.arange(n) * width)[:, None]
        node = np.broadcast_to(self.roots, (n, len(self.roots))).copy()
        codes = np.broadcast_to(code[:, None], node.shape)
        for _ in range(int(self.depth)):
            value = flat[base + self.feature[node]]
            left = np.where(np.isnan(value), self.missing_left[node], value <= self.threshold[node])
            left = np.where(self.categorical[node], self.cat_table[self.cat_row[node], codes], left)
            node = np.where(left, self.left[node], self.right[node])
        leaves = self.value[node]
        out = np.zeros(n) + self.baseline
        for t in range(leaves.shape[1]):  # tree by tree, as the regressor sums them: the same floating-point result
            out += leaves[:, t]
        return out


def predict_s(rows: np.ndarray, profile) -> np.ndarray:
    """Seconds of every kernel row on a profile that carries timed kernels (each distinct row predicted once)."""
    peaks = (profile.overhead_for("other"), profile.peak_gmacs["fp32"], profile.bandwidth_gbs,
             profile.peak_gmacs.get("int8"), profile.int8_overhead_us)
    if not len(rows):
        return prior_s(rows, *peaks)
    unique, inverse = np.unique(rows, axis=0, return_inverse=True)
    prior = prior_s(unique, *peaks)
    return (prior * np.exp(fitted(profile.kernels).predict(with_prior(unique, prior))))[inverse.reshape(-1)]
