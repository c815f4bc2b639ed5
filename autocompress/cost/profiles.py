"""Hardware profiles: YAML data describing a device's compute, memory and energy, validated on load."""
from __future__ import annotations

import platform
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import yaml

from ..errors import AutocompressError

KINDS = ("conv", "dwconv", "linear", "matmul", "norm", "act", "pool", "elementwise", "other")
DTYPES = ("fp32", "fp16", "int8", "int4")


@dataclass
class HardwareProfile:
    """A device as the cost model sees it (units in the field names).

    peak_gmacs:   multiply-accumulates per second (1e9) per natively supported dtype
    efficiency:   fraction of that peak real kernels reach, per op kind
    bandwidth_gbs: effective memory bandwidth in GB/s
    overhead_us:  fixed cost of one op in microseconds: one number, or per op kind
    energy:       mac_pj by bit-width, dram_pj_per_byte, sram_pj_per_byte, static_w
    """

    name: str
    peak_gmacs: dict
    efficiency: dict
    bandwidth_gbs: float
    overhead_us: "float | dict"
    energy: dict
    sparse: bool = False
    description: str = ""
    overlap: float = 1.0        # how much memory traffic hides under compute: 1 = pure roofline, 0 = they add up
    im2col: bool = False        # convolutions unfold their input (PyTorch CPU), which costs memory traffic
    threads: int | None = None  # torch threads the profile was calibrated with (measurements use the same)
    extra: dict = field(default_factory=dict)

    def dtype_for(self, bits: int) -> str:
        """The narrowest natively supported dtype able to hold `bits`-bit weights (fp32 otherwise)."""
        for dtype, width in (("int4", 4), ("int8", 8), ("fp16", 16)):
            if bits <= width and dtype in self.peak_gmacs:
                return dtype
        return "fp32"

    def overhead_for(self, kind: str) -> float:
        """Fixed cost of one op of `kind`, in microseconds."""
        if isinstance(self.overhead_us, dict):
            return float(self.overhead_us.get(kind, self.overhead_us.get("other", 0.0)))
        return float(self.overhead_us)

    def to_dict(self) -> dict:
        return {"name": self.name, "description": self.description, "peak_gmacs": self.peak_gmacs,
                "efficiency": self.efficiency, "bandwidth_gbs": self.bandwidth_gbs,
                "overhead_us": self.overhead_us, "energy": self.energy, "sparse": self.sparse,
                "overlap": self.overlap, "im2col": self.im2col,
                **({"threads": self.threads} if self.threads else {}), **self.extra}

    @classmethod
    def from_dict(cls, data, where: str) -> "HardwareProfile":
        if not isinstance(data, dict):
            raise AutocompressError(f"hardware profile {where} must be a YAML mapping")
        required = ("name", "peak_gmacs", "efficiency", "bandwidth_gbs", "overhead_us", "energy")
        missing = [k for k in required if k not in data]
        if missing:
            raise AutocompressError(f"hardware profile {where} lacks {missing[0]!r}; required: {', '.join(required)}")
        _positive_map(data["peak_gmacs"], DTYPES, f"{where} peak_gmacs")
        if "fp32" not in data["peak_gmacs"]:
            raise AutocompressError(f"hardware profile {where} peak_gmacs needs an 'fp32' entry")
        _positive_map(data["efficiency"], KINDS, f"{where} efficiency")
        bw = data["bandwidth_gbs"]
        if not isinstance(bw, (int, float)) or bw <= 0:
            raise AutocompressError(f"hardware profile {where} bandwidth_gbs = {bw!r}; it must be a positive number")
        overhead = data["overhead_us"]
        if isinstance(overhead, dict):
            _positive_map(overhead, KINDS, f"{where} overhead_us", allow_zero=True)
        elif not isinstance(overhead, (int, float)) or overhead < 0:
            raise AutocompressError(f"hardware profile {where} overhead_us = {overhead!r}; it must be a number >= 0 or a mapping by op kind")
        energy = data["energy"]
        for key in ("mac_pj", "dram_pj_per_byte", "sram_pj_per_byte", "static_w"):
            if not isinstance(energy, dict) or key not in energy:
                raise AutocompressError(f"hardware profile {where} energy lacks {key!r}")
        energy = dict(energy, mac_pj={int(k): float(v) for k, v in energy["mac_pj"].items()})
        threads = data.get("threads")
        if threads is not None and (not isinstance(threads, int) or threads < 1):
            raise AutocompressError(f"hardware profile {where} threads = {threads!r}; it must be an integer >= 1")
        overlap = data.get("overlap", 1.0)
        if not isinstance(overlap, (int, float)) or not 0 <= overlap <= 1:
            raise AutocompressError(f"hardware profile {where} overlap = {overlap!r}; it must be between 0 and 1")
        known = set(required) | {"description", "sparse", "threads", "overlap", "im2col"}
        return cls(str(data["name"]), dict(data["peak_gmacs"]), dict(data["efficiency"]), float(bw),
                   overhead, energy, bool(data.get("sparse", False)), str(data.get("description", "")),
                   float(overlap), bool(data.get("im2col", False)), threads,
                   {k: v for k, v in data.items() if k not in known})


def _positive_map(value, allowed, where: str, allow_zero: bool = False) -> None:
    if not isinstance(value, dict) or not value:
        raise AutocompressError(f"{where} must be a non-empty mapping")
    for k, v in value.items():
        if k not in allowed:
            raise AutocompressError(f"{where} has unknown key {k!r}; allowed: {', '.join(allowed)}")
        if not isinstance(v, (int, float)) or v < 0 or (v == 0 and not allow_zero):
            raise AutocompressError(f"{where}.{k} = {v!r}; it must be a positive number")


def builtin_profiles() -> list[str]:
    folder = resources.files("autocompress.cost") / "profiles"
    return sorted(["host"] + [p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml")])


def host_profile_path() -> Path:
    from ..models import cache_dir

    return cache_dir() / "profiles" / f"host-{platform.node() or 'local'}.yaml"


def load_profile(spec: "str | Path | HardwareProfile") -> HardwareProfile:
    """A profile by name (`host`, a built-in) or a path to a YAML file."""
    if isinstance(spec, HardwareProfile):
        return spec
    spec = str(spec)
    if spec == "host":
        path = host_profile_path()
        if not path.exists():
            from .calibrate import calibrate_host

            calibrate_host(path, quick=True)
        return _load_file(path)
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        if not Path(spec).is_file():
            raise AutocompressError(f"hardware profile file {spec!r} does not exist")
        return _load_file(Path(spec))
    if spec not in builtin_profiles():
        raise AutocompressError(f"unknown hardware {spec!r}; allowed: {', '.join(builtin_profiles())}, or a path to a profile YAML")
    return _load_file(resources.files("autocompress.cost") / "profiles" / f"{spec}.yaml")


def _load_file(path) -> HardwareProfile:
    try:
        data = yaml.safe_load(Path(path).read_text() if isinstance(path, (str, Path)) else path.read_text())
    except yaml.YAMLError as exc:
        raise AutocompressError(f"hardware profile {str(path)!r} is not valid YAML: {str(exc).splitlines()[0]}") from None
    return HardwareProfile.from_dict(data, repr(str(path)))
