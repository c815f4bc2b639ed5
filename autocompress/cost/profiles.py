"""Hardware profiles: YAML data describing a device's compute, memory and energy, validated on load.

Built-in profiles live in `cost/profiles/*.yaml`, each number with its source in a comment. Which profile a
`hardware` argument names (a built-in, a file, or `host`: this machine's calibration) is cost/hardware.py's.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..errors import AutocompressError
from .runtimes import RUNTIMES

KINDS = ("conv", "dwconv", "linear", "matmul", "norm", "act", "pool", "elementwise", "other")
DTYPE_BITS = {"fp32": 32, "fp16": 16, "int16": 16, "int8": 8, "int4": 4}
DTYPES = tuple(DTYPE_BITS)
FUSION_ANCHORS = ("conv", "linear", "add")
FUSION_MEMBERS = ("bn", "relu", "act", "add")
SHAPE_KEYS = ("m", "n", "k")
REQUIRED = ("name", "peak_gmacs", "efficiency", "bandwidth_gbs", "overhead_us", "energy")
OPTIONAL = ("description", "cache_kb", "cache_bandwidth_gbs", "sparse", "fuses", "overlap", "im2col",
            "channel_multiple", "gemm_half", "narrow_n", "narrow_efficiency", "threads", "device", "calibration",
            "kernels", "runtime", "call_us", "int8_overhead_us")


@dataclass
class HardwareProfile:
    """A device as the cost model sees it (units in the field names).

    peak_gmacs:       multiply-accumulates per second (1e9) per natively supported dtype
                      (fp32, fp16, int16, int8, int4); a layer runs in the narrowest one that holds
                      both its weight and its activation bits, else in the widest one there is
    efficiency:       fraction of that peak real kernels reach, per op kind
    bandwidth_gbs:    effective main-memory (DRAM, or host-link) bandwidth in GB/s
    cache_kb:         on-chip memory (last-level cache, weight SRAM) keeping data between ops and inferences:
                      feature maps that fit move at cache_bandwidth_gbs, and so do the weights of a model
                      whose weights all fit; the rest at bandwidth_gbs. 0: one memory level
    cache_bandwidth_gbs: bandwidth of that on-chip memory in GB/s
    overhead_us:      fixed cost of one op (of a fused group) in microseconds: one number, or per op kind
    energy:           mac_pj by bit-width, dram_pj_per_byte, sram_pj_per_byte, static_w
    sparse:           zero weights are skipped (compute and weight traffic scale with the non-zeros)
    fuses:            op chains the runtime runs as one kernel, e.g. conv+bn+relu, conv+bn+add+relu, add+relu
    overlap:          how much memory traffic hides under compute: 1 = pure roofline, 0 = they add up
    im2col:           convolutions unfold their input (PyTorch CPU), which costs memory traffic
    channel_multiple: channels are padded to a multiple of this (SIMD lanes, PE-array width) for compute
    gemm_half:        the GEMM sizes (m: output channels, n: output pixels, k: reduction) at which a
                      conv/linear kernel reaches half its efficiency; small layers are slower per MAC
    narrow_n:         a convolution with fewer output positions than this runs a slower code path (CPU kernels
                      vectorize over output pixels; a late stage's 2x2 or 3x3 map cannot fill a vector). 0: none
    narrow_efficiency: the fraction of its efficiency such a narrow convolution keeps
    threads:          torch threads a calibration was timed with; a fitted profile prices only that count
    device:           torch device a calibration ran on (cpu, cuda)
    calibration:      how the profile was fitted: when, how long, the load, how repeatable, the fit's quality
    kernels:          timed kernels (cost/kernels.py, base64 text): where present, latency is the kernel
                      regressor's, fitted on them, and peak_gmacs, bandwidth_gbs and overhead_us are its measured prior
    runtime:          what executes the model (cost/runtimes.py): torch (eager PyTorch), torch-int8 (its
                      peak_gmacs has int8: layers at 8 bits or fewer run torch.ao's int8 kernels), onnxruntime
                      or onnxruntime-int8 (ONNX Runtime's QDQ int8 kernels for those layers), openvino or
                      openvino-int8 (the same ONNX files compiled by OpenVINO); a calibration times
                      that runtime's kernels, measurement times the model there
    call_us:          fixed cost of one call of the whole model into the runtime, in microseconds (an ONNX Runtime
                      session's run or an OpenVINO infer request's: input and output conversion), added once per
                      inference
    int8_overhead_us: fixed cost of one int8 convolution or linear kernel in microseconds (torch-int8: torch.ao's
                      call with its requantization, several times a float op's; onnxruntime-int8 and
                      openvino-int8: an int8 convolution on one element); 0: overhead_us
    """

    name: str
    peak_gmacs: dict
    efficiency: dict
    bandwidth_gbs: float
    overhead_us: "float | dict"
    energy: dict
    sparse: bool = False
    description: str = ""
    cache_kb: float = 0.0
    cache_bandwidth_gbs: float = 0.0
    fuses: tuple = ()
    overlap: float = 1.0
    im2col: bool = False
    channel_multiple: int = 1
    gemm_half: dict = field(default_factory=dict)
    narrow_n: int = 0
    narrow_efficiency: float = 1.0
    threads: int | None = None
    device: str = "cpu"
    calibration: dict = field(default_factory=dict)
    kernels: str = ""
    runtime: str = "torch"
    call_us: float = 0.0
    int8_overhead_us: float = 0.0

    def dtype_for(self, bits: int) -> str:
        """The narrowest supported dtype holding `bits` bits, else the widest supported one (an accelerator
        without fp32 runs a float layer in its own format: deployment converts it)."""
        fitting = [d for d in self.peak_gmacs if DTYPE_BITS[d] >= bits]
        if not fitting:
            return max(self.peak_gmacs, key=DTYPE_BITS.get)
        return min(fitting, key=lambda d: (DTYPE_BITS[d], d == "int16"))  # 16-bit weights are fp16 first

    def overhead_for(self, kind: str) -> float:
        """Fixed cost of one op of `kind`, in microseconds."""
        if isinstance(self.overhead_us, dict):
            return float(self.overhead_us.get(kind, self.overhead_us.get("other", 0.0)))
        return float(self.overhead_us)

    def to_dict(self) -> dict:
        out = {"name": self.name, "description": self.description, "peak_gmacs": self.peak_gmacs,
               "efficiency": self.efficiency, "bandwidth_gbs": self.bandwidth_gbs, "cache_kb": self.cache_kb,
               "cache_bandwidth_gbs": self.cache_bandwidth_gbs, "overhead_us": self.overhead_us,
               "energy": self.energy, "sparse": self.sparse, "fuses": ["+".join(p) for p in self.fuses], "overlap": self.overlap,
               "im2col": self.im2col, "channel_multiple": self.channel_multiple, "gemm_half": self.gemm_half,
               "narrow_n": self.narrow_n, "narrow_efficiency": self.narrow_efficiency, "device": self.device}
        if self.runtime != "torch":  # eager PyTorch profiles read (and hash) as they did before runtimes existed
            out["runtime"], out["call_us"] = self.runtime, self.call_us
        if self.int8_overhead_us:
            out["int8_overhead_us"] = self.int8_overhead_us
        if self.threads:
            out["threads"] = self.threads
        if self.calibration:
            out["calibration"] = self.calibration
        if self.kernels:
            out["kernels"] = self.kernels
        return out

    def check_threads(self, threads: int | None) -> None:
        """Refuse to price a thread count a fitted profile was not timed with (its kernels ran on `threads`)."""
        if threads is None or not self.threads or threads == self.threads:
            return
        raise AutocompressError(f"hardware profile {self.name!r} was calibrated with {self.threads} torch threads, "
                                f"not {threads}; estimate with threads={self.threads} or calibrate it with "
                                f"`autocompress calibrate --threads {threads}`")

    def check_runtime(self, runtime: str | None) -> None:
        """Refuse to price a runtime other than the one the profile's numbers are for."""
        if runtime is not None and runtime != self.runtime:
            raise AutocompressError(f"hardware profile {self.name!r} prices runtime {self.runtime!r}, not {runtime!r}; "
                                    f"use a profile of {runtime!r} (for this machine: `autocompress calibrate "
                                    f"--runtime {runtime}`)")

    @classmethod
    def from_dict(cls, data, where: str) -> "HardwareProfile":
        if not isinstance(data, dict):
            raise AutocompressError(f"hardware profile {where} must be a YAML mapping")
        missing = [k for k in REQUIRED if k not in data]
        if missing:
            raise AutocompressError(f"hardware profile {where} lacks {missing[0]!r}; required: {', '.join(REQUIRED)}")
        unknown = sorted(set(data) - set(REQUIRED) - set(OPTIONAL))
        if unknown:
            raise AutocompressError(f"hardware profile {where} has unknown key {unknown[0]!r}; allowed: "
                                    f"{', '.join(REQUIRED + OPTIONAL)}")
        _positive_map(data["peak_gmacs"], DTYPES, f"{where} peak_gmacs")
        _positive_map(data["efficiency"], KINDS, f"{where} efficiency")
        _positive_number(data["bandwidth_gbs"], f"{where} bandwidth_gbs")
        cache_kb, cache_bw = data.get("cache_kb", 0), data.get("cache_bandwidth_gbs", 0)
        _positive_number(cache_kb, f"{where} cache_kb", allow_zero=True)
        _positive_number(cache_bw, f"{where} cache_bandwidth_gbs", allow_zero=True)
        if bool(cache_kb) != bool(cache_bw):
            raise AutocompressError(f"hardware profile {where} gives cache_kb = {cache_kb!r} and cache_bandwidth_gbs = "
                                    f"{cache_bw!r}; give both (an on-chip memory) or neither")
        overhead = data["overhead_us"]
        if isinstance(overhead, dict):
            _positive_map(overhead, KINDS, f"{where} overhead_us", allow_zero=True)
        elif isinstance(overhead, bool) or not isinstance(overhead, (int, float)) or overhead < 0:
            raise AutocompressError(f"hardware profile {where} overhead_us = {overhead!r}; it must be a number >= 0 "
                                    "or a mapping by op kind")
        threads = data.get("threads")
        if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
            raise AutocompressError(f"hardware profile {where} threads = {threads!r}; it must be an integer >= 1")
        overlap = data.get("overlap", 1.0)
        if isinstance(overlap, bool) or not isinstance(overlap, (int, float)) or not 0 <= overlap <= 1:
            raise AutocompressError(f"hardware profile {where} overlap = {overlap!r}; it must be between 0 and 1")
        multiple = data.get("channel_multiple", 1)
        if isinstance(multiple, bool) or not isinstance(multiple, int) or multiple < 1:
            raise AutocompressError(f"hardware profile {where} channel_multiple = {multiple!r}; it must be an integer >= 1")
        gemm_half = data.get("gemm_half") or {}
        if gemm_half:
            _positive_map(gemm_half, SHAPE_KEYS, f"{where} gemm_half", allow_zero=True)
        narrow_n, narrow_efficiency = data.get("narrow_n", 0), data.get("narrow_efficiency", 1.0)
        if isinstance(narrow_n, bool) or not isinstance(narrow_n, int) or narrow_n < 0:
            raise AutocompressError(f"hardware profile {where} narrow_n = {narrow_n!r}; it must be an integer >= 0")
        if (isinstance(narrow_efficiency, bool) or not isinstance(narrow_efficiency, (int, float))
                or not 0 < narrow_efficiency <= 1):
            raise AutocompressError(f"hardware profile {where} narrow_efficiency = {narrow_efficiency!r}; it must be "
                                    "in (0, 1]")
        device = data.get("device", "cpu")
        if device not in ("cpu", "cuda"):
            raise AutocompressError(f"hardware profile {where} device = {device!r}; allowed: cpu, cuda")
        kernels = data.get("kernels", "")
        if not isinstance(kernels, str):
            raise AutocompressError(f"hardware profile {where} kernels must be the base64 text `calibrate` writes")
        runtime = data.get("runtime", "torch")
        if runtime not in RUNTIMES:
            raise AutocompressError(f"hardware profile {where} runtime = {runtime!r}; allowed: {', '.join(RUNTIMES)}")
        call_us = data.get("call_us", 0.0)
        _positive_number(call_us, f"hardware profile {where} call_us", allow_zero=True)
        int8_overhead = data.get("int8_overhead_us", 0.0)
        _positive_number(int8_overhead, f"hardware profile {where} int8_overhead_us", allow_zero=True)
        return cls(str(data["name"]), dict(data["peak_gmacs"]), dict(data["efficiency"]), float(data["bandwidth_gbs"]),
                   overhead, _energy(data["energy"], where), _flag(data, "sparse", where),
                   str(data.get("description", "")), float(cache_kb), float(cache_bw),
                   _fusions(data.get("fuses") or [], where), float(overlap), _flag(data, "im2col", where), multiple,
                   {k: float(v) for k, v in gemm_half.items()}, narrow_n, float(narrow_efficiency), threads, device,
                   dict(data.get("calibration") or {}), kernels, runtime, float(call_us),
                   float(int8_overhead))


def _energy(energy, where: str) -> dict:
    keys = ("mac_pj", "dram_pj_per_byte", "sram_pj_per_byte", "static_w")
    if not isinstance(energy, dict):
        raise AutocompressError(f"hardware profile {where} energy must be a mapping with {', '.join(keys)}")
    for key in keys:
        if key not in energy:
            raise AutocompressError(f"hardware profile {where} energy lacks {key!r}")
    table = energy["mac_pj"]
    if not isinstance(table, dict) or not table or not all(str(k).isdigit() for k in table):
        raise AutocompressError(f"hardware profile {where} energy.mac_pj must map bit-widths (1, 8, 32...) to pJ")
    for key in keys[1:]:
        _positive_number(energy[key], f"{where} energy.{key}", allow_zero=True)
    out = dict(energy, mac_pj={int(k): float(v) for k, v in table.items()})
    for bits, pj in out["mac_pj"].items():
        _positive_number(pj, f"{where} energy.mac_pj.{bits}")
    return out


def _fusions(patterns, where: str) -> tuple:
    """Validated fusion patterns as tuples of tokens, e.g. ('conv', 'bn', 'relu')."""
    if not isinstance(patterns, list):
        raise AutocompressError(f"hardware profile {where} fuses must be a list like [conv+bn, conv+bn+relu]")
    out = []
    for p in patterns:
        tokens = tuple(str(p).split("+"))
        if (len(tokens) < 2 or tokens[0] not in FUSION_ANCHORS
                or any(t not in FUSION_MEMBERS for t in tokens[1:])):
            raise AutocompressError(f"hardware profile {where} fuses has {p!r}; a pattern is one of "
                                    f"{', '.join(FUSION_ANCHORS)} followed by '+' and ops among "
                                    f"{', '.join(FUSION_MEMBERS)}, e.g. conv+bn+relu")
        out.append(tokens)
    return tuple(out)


def _flag(data: dict, key: str, where: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise AutocompressError(f"hardware profile {where} {key} = {value!r}; it must be true or false")
    return value


def _positive_number(value, where: str, allow_zero: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0 or (value == 0 and not allow_zero):
        raise AutocompressError(f"{where} = {value!r}; it must be a {'non-negative' if allow_zero else 'positive'} number")


def _positive_map(value, allowed, where: str, allow_zero: bool = False) -> None:
    if not isinstance(value, dict) or not value:
        raise AutocompressError(f"{where} must be a non-empty mapping")
    for k, v in value.items():
        if k not in allowed:
            raise AutocompressError(f"{where} has unknown key {k!r}; allowed: {', '.join(allowed)}")
        _positive_number(v, f"{where}.{k}", allow_zero)


def builtin_profiles() -> list[str]:
    folder = resources.files("autocompress.cost") / "profiles"
    return sorted(["host"] + [p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")])


def default_threads() -> int:
    """The torch threads a model runs with when nobody sets a count: what `host` is priced for by default."""
    import torch

    return torch.get_num_threads()


def read_profile(path) -> HardwareProfile:
    """The profile in a YAML file (a path or a package resource), validated."""
    try:
        data = yaml.safe_load(Path(path).read_text() if isinstance(path, (str, Path)) else path.read_text())
    except yaml.YAMLError as exc:
        raise AutocompressError(f"hardware profile {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return HardwareProfile.from_dict(data, repr(str(path)))
