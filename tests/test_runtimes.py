"""Runtimes are part of the hardware: a profile names the runtime whose kernels it was timed in, calibration
times ONNX Runtime's kernels when asked, and measurement times the model in the profile's runtime."""
import math

import numpy as np
import pytest
import torch
from torch import nn

import autocompress as ac
from autocompress.cost import calibrate as cal
from autocompress.cost.measure import measure_latency_ms
from autocompress.cost.profiles import HardwareProfile, read_profile
from autocompress.cost.runtimes import BoundOrt, layout_share, onnx_bytes, runnable


def test_a_model_run_in_onnx_runtime_gives_the_torch_outputs(digits_model, digits_input):
    x = torch.randn(3, *digits_input.shape[1:])
    ort = runnable(digits_model, digits_input, "onnxruntime", threads=1)
    np.testing.assert_allclose(ort(x).numpy(), digits_model(x).detach().numpy(), rtol=1e-4, atol=1e-4)
    assert measure_latency_ms(digits_model, digits_input, repeats=3, warmup=1, runtime="onnxruntime") > 0


def test_a_profile_refuses_a_runtime_it_was_not_timed_in(digits_model, digits_input):
    with pytest.raises(ac.AutocompressError, match="prices runtime 'torch', not 'onnxruntime'"):
        ac.estimate(digits_model, digits_input, "raspberry-pi-4", runtime="onnxruntime")
    with pytest.raises(ac.AutocompressError, match="unknown runtime 'tflite'; allowed: onnxruntime, torch"):
        ac.load_profile("raspberry-pi-4", runtime="tflite")
    data = ac.load_profile("raspberry-pi-4").to_dict()
    assert "runtime" not in data  # eager PyTorch profiles read and hash as before
    with pytest.raises(ac.AutocompressError, match="runtime = 'tflite'; allowed: torch, onnxruntime"):
        HardwareProfile.from_dict({**data, "runtime": "tflite"}, "t")


def test_copies_of_a_kernel_timed_in_one_graph_are_distinct(digits_input):
    """ONNX Runtime merges equal subexpressions: equal copies would time as one."""
    kernel = nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU()).eval()
    branches = cal._Branches(kernel, 3)
    weights = [c[0].weight for c in branches.copies]
    assert not torch.equal(weights[0], weights[1]) and not torch.equal(weights[1], weights[2])
    x = torch.randn(1, 4, 8, 8)
    bound = BoundOrt(onnx_bytes(branches, x), x, threads=1)
    bound(x)
    np.testing.assert_allclose(bound.outputs[2], branches(x)[2].detach().numpy(), rtol=1e-4, atol=1e-5)


def test_layout_conversions_of_a_kernel_timed_alone_are_measured():
    """A convolution alone converts its input and output to and from ONNX Runtime's NCHWc layout, which a model
    does at its ends only; a linear layer converts nothing."""
    conv, x = nn.Sequential(nn.Conv2d(32, 32, 3, padding=1), nn.ReLU()).eval(), torch.randn(1, 32, 16, 16)
    assert 0.0 < layout_share(onnx_bytes(conv, x), x, threads=1) < 0.5
    linear, v = nn.Linear(64, 64).eval(), torch.randn(1, 64)
    assert layout_share(onnx_bytes(linear, v), v, threads=1) == 0.0


def test_an_onnx_runtime_calibration_prices_onnx_runtime_not_eager_torch(digits_model, digits_input, monkeypatch,
                                                                         tmp_path):
    monkeypatch.setitem(cal.SAMPLES, True, 200)  # a small fit: enough to tell one runtime from the other
    monkeypatch.setattr(cal, "PROBE_LIMIT", 10.0)  # one thread on its CPU clock: noise is another test's subject
    profile = cal.calibrate("host", quick=True, threads=1, runtime="onnxruntime")
    assert profile.runtime == "onnxruntime" and profile.calibration["runtime"] == "onnxruntime"
    assert profile.call_us > 0 and profile.calibration["kernels"] >= 50
    saved = read_profile(cal.write_profile(profile, tmp_path / "ort.yaml"))
    assert saved.runtime == "onnxruntime" and saved.call_us == profile.call_us
    predicted = ac.estimate(digits_model, digits_input, saved, threads=1, runtime="onnxruntime")
    assert predicted.runtime == "onnxruntime"
    ort_ms = measure_latency_ms(digits_model, digits_input, threads=1, clock="cpu", runtime="onnxruntime")
    torch_ms = measure_latency_ms(digits_model, digits_input, threads=1, clock="cpu")
    assert ort_ms < torch_ms / 1.5  # the runtimes differ here: a torch-timed profile cannot be right for both
    # nearer ONNX Runtime's time than eager torch's (on ORT's side of their geometric mean) and within 2x of it.
    # No tighter: a fit on 200 kernels is rough (80 predicted 0.92x to 1.70x ORT's time with seeds 0-2)
    off = abs(math.log(predicted.latency_ms / ort_ms))
    assert off < math.log(2) and off < abs(math.log(predicted.latency_ms / torch_ms)), \
        (predicted.latency_ms, ort_ms, torch_ms)
    with pytest.raises(ac.AutocompressError, match="prices runtime 'onnxruntime', not 'torch'"):
        ac.estimate(digits_model, digits_input, saved, runtime="torch")
