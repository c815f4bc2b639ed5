"""Device profiles: the required set, a source for every number, validation, and the CLI around them."""
import re
from importlib import resources

import pytest
import yaml

import autocompress as ac
from autocompress.cli import main
from autocompress.cost.hardware import load_profile
from autocompress.cost.profiles import builtin_profiles

REQUIRED = {"host", "raspberry-pi-4", "cortex-a76", "jetson-orin-nano", "edge-tpu", "eyeriss", "nvidia-h100"}
NUMBER = re.compile(r"^(\s*)[\w-]+:\s*(-?[\d.]+(e-?\d+)?|\{[^#]*\d[^#]*\}|\[[^#]*\d[^#]*\])\s*(#.*)?$")


def builtin_files():
    return sorted(p for p in (resources.files("autocompress.cost") / "profiles").iterdir() if p.name.endswith(".yaml"))


def test_the_required_devices_are_there():
    assert REQUIRED <= set(builtin_profiles())


@pytest.mark.parametrize("path", builtin_files(), ids=lambda p: p.name)
def test_every_number_has_a_source(path):
    """A line holding a number carries a comment, or sits under a key whose line (or the comment line right above
    it) does."""
    lines = path.read_text().splitlines()
    for i, line in enumerate(lines):
        m = NUMBER.match(line)
        if not m or m.group(4):
            continue
        parents = [j for j in range(i) if lines[j].strip() and not lines[j].lstrip().startswith("#")
                   and len(lines[j]) - len(lines[j].lstrip()) < len(m.group(1))]
        assert parents, f"{path.name}: no source for {line.strip()!r}"
        j = parents[-1]
        assert "#" in lines[j] or lines[j - 1].lstrip().startswith("#"), f"{path.name}: no source for {line.strip()!r}"
    profile = load_profile(path.name[:-5])
    assert ac.HardwareProfile.from_dict(profile.to_dict(), "round trip") == profile


@pytest.mark.parametrize("change, message", [
    ({"fuses": ["bn+conv"]}, "fuses has 'bn\\+conv'"),
    ({"peak_gmacs": {"int3": 5}}, "unknown key 'int3'"),
    ({"channel_multiple": 0}, "channel_multiple = 0"),
    ({"turbo": True}, "unknown key 'turbo'"),
    ({"sparse": "yes"}, "sparse = 'yes'"),
    ({"gemm_half": {"q": 1}}, "unknown key 'q'"),
    ({"narrow_n": -1}, "narrow_n = -1"),
    ({"narrow_efficiency": 0}, "narrow_efficiency = 0"),
])
def test_profile_validation(tmp_path, change, message):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({**load_profile("edge-tpu").to_dict(), **change}))
    with pytest.raises(ac.AutocompressError, match=message):
        load_profile(str(path))


def test_hardware_list_and_show(capsys):
    assert main(["hardware", "list"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in REQUIRED)
    assert main(["hardware", "show", "edge-tpu"]) == 0
    shown = capsys.readouterr().out
    assert "coral.ai" in shown and "int8: 2000" in shown         # the file itself, sources included


def test_estimate_command_prints_layers_and_totals(tmp_path, capsys):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(load_profile("jetson-orin-nano").to_dict()))
    assert main(["estimate", "--model", "torchvision:mobilenet_v3_small", "--input-shape", "1,3,64,64",
                 "--hardware", str(path)]) == 0
    out = capsys.readouterr().out
    header = out.splitlines()[0].split()
    assert header[:5] == ["kind", "macs", "params", "bits", "dtype"]
    assert {"bytes", "bound", "latency_ms", "energy_mj", "fused_into"} <= set(header)
    assert re.search(r"total on jetson-orin-nano: latency [\d.]+ ms, energy [\d.]+ mJ, size [\d.]+ KB, "
                     r"peak activation memory [\d.]+ KB, [\d,]+ MACs", out)
    assert "compute" in out and "memory" in out and "features.0.0" in out


def test_calibrate_command_guards_cuda_and_names(capsys):
    import torch

    assert main(["calibrate", "--hardware", "my-board"]) == 2
    assert "pass --to FILE" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(["calibrate", "--device", "cuda"]) == 2
        assert "needs a CUDA GPU" in capsys.readouterr().err
