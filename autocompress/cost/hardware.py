"""Which profile a `hardware` argument names: a built-in by name, a profile file by path (anything with a `/` or
a .yaml suffix), or this machine. `host` is the latest calibration of this machine's CPU saved in the user's
cache directory (made, quickly, on first use); `host-cuda` the same for its GPU (made by `autocompress
calibrate --device cuda`).

Apart from profiles.py because calibrating `host` on first use needs cost/calibrate.py, which builds profiles.
"""
from __future__ import annotations

import platform
import warnings
from importlib import resources
from pathlib import Path

from ..errors import AutocompressError
from ..models import cache_dir
from . import calibrate
from .profiles import HardwareProfile, builtin_profiles, default_threads, read_profile
from .runtimes import check_runtime


def host_profile_path(device: str = "cpu", threads: int | None = None, runtime: str = "torch") -> Path:
    """Where the calibration of this machine (its CPU at `threads` threads, default: torch's count, in `runtime`;
    or its GPU with device='cuda') is saved."""
    suffix = "-cuda" if device == "cuda" else f"-t{threads or default_threads()}"
    suffix += "" if runtime == "torch" else f"-{runtime}"
    return cache_dir() / "profiles" / f"host-{platform.node() or 'local'}{suffix}.yaml"


def load_profile(spec: "str | Path | HardwareProfile", threads: int | None = None,
                 runtime: str | None = None) -> HardwareProfile:
    """A profile by name (`host`, `host-cuda`, a built-in) or a path to a YAML file, for `threads` threads in
    `runtime` (None: `host` at torch's count in eager PyTorch, any other profile at its own). `host` at a thread
    count and runtime is this machine's calibration of them (made on first use); a fitted profile refuses
    another count, and every profile another runtime than its own."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise AutocompressError(f"threads = {threads!r} is not allowed; it must be an integer >= 1")
    if runtime is not None:
        check_runtime(runtime)
    if isinstance(spec, HardwareProfile):
        profile = spec
    elif str(spec) in ("host", "host-cuda"):
        return _cached_host("cuda" if str(spec) == "host-cuda" else "cpu", threads, runtime or "torch")
    else:
        profile = _named(str(spec))
    profile.check_threads(threads)
    profile.check_runtime(runtime)
    return profile


def _named(spec: str) -> HardwareProfile:
    """A built-in profile by name, or a profile file by path."""
    if spec not in builtin_profiles() and Path(spec).is_dir():
        raise AutocompressError(f"hardware {spec!r} is a folder; pass a profile YAML file or a name: "
                                f"{', '.join(builtin_profiles())}")
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        if not Path(spec).is_file():
            raise AutocompressError(f"hardware profile file {spec!r} does not exist")
        return read_profile(Path(spec))
    if spec not in builtin_profiles():
        raise AutocompressError(f"unknown hardware {spec!r}; allowed: {', '.join(builtin_profiles())}, "
                                "or a path to a profile YAML")
    return read_profile(resources.files("autocompress.cost") / "profiles" / f"{spec}.yaml")


def profile_text(spec: str) -> str:
    """The YAML text of a profile, comments (the sources of its numbers) included."""
    profile = load_profile(spec)  # validates, and calibrates `host` on first use
    if spec in ("host", "host-cuda"):
        return host_profile_path(profile.device, profile.threads, profile.runtime).read_text()
    if spec.endswith((".yaml", ".yml")) or "/" in spec:
        return Path(spec).read_text()
    return (resources.files("autocompress.cost") / "profiles" / f"{spec}.yaml").read_text()


def _cached_host(device: str, threads: int | None, runtime: str = "torch") -> HardwareProfile:
    """This machine's saved calibration at `threads` in `runtime`; on the CPU made now (quick) when missing or
    fitted to an older model."""
    threads = threads or default_threads()
    path = host_profile_path(device, threads, runtime)
    try:
        profile = read_profile(path) if path.exists() else None
    except AutocompressError:  # written by an older version: calibrate again
        profile = None
    if profile is not None and profile.calibration.get("model_version") == calibrate.MODEL_VERSION:
        return profile
    if device == "cuda":
        raise AutocompressError("hardware 'host-cuda' has no calibration for this cost model yet; run "
                                "`autocompress calibrate --device cuda` on this machine (it needs a CUDA GPU)")
    path.unlink(missing_ok=True)  # fitted to an older model: not a profile to keep, whatever the load
    calibrate.calibrate_host(path, quick=True, threads=threads, runtime=runtime)
    profile = read_profile(path)
    reason = calibrate.busy_reason(profile)
    if reason:
        flag = "" if runtime == "torch" else f" --runtime {runtime}"
        warnings.warn(f"hardware 'host' at {threads} threads was calibrated on a busy machine ({reason}); run "
                      f"`autocompress calibrate --threads {threads}{flag} --force` when it is idle")
    return profile
