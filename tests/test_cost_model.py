"""The cost model's rules: dtypes, sparsity, fusion, energy, peak memory; and one formula for fit and estimate."""
import pytest
import torch
import torch.fx
import torchvision
from torch import nn

import autocompress as ac
from autocompress.budgets import Budgets, violations
from autocompress.compress.base import layer_targets
from autocompress.cost import calibrate as cal
from autocompress.cost.hardware import load_profile
from autocompress.cost.measure import measure_peak_activation_bytes
from autocompress.cost.profiles import HardwareProfile
from autocompress.graph import analyze


def every_layer(model, x, **sections):
    names = [n for n, _ in layer_targets(analyze(model, x))]
    fields = {"weight_bits", "act_bits", "density", "bits"}
    return {tech: {k: dict.fromkeys(names, v) if k in fields else v for k, v in cfg.items()}
            for tech, cfg in sections.items()}


def variant(base: str, **changes) -> HardwareProfile:
    return HardwareProfile.from_dict({**load_profile(base).to_dict(), **changes}, "test")


def conv_latency(est) -> float:
    return float(est.layers.loc[est.layers["kind"].isin(["conv", "linear"]), "latency_ms"].sum())


def test_narrow_dtypes_speed_up_only_where_the_device_has_them(digits_model, digits_input):
    w8 = ac.apply(digits_model, every_layer(digits_model, digits_input, quantize={"weight_bits": 8}), digits_input)
    w8a8 = ac.apply(digits_model, every_layer(digits_model, digits_input,
                                              quantize={"weight_bits": 8, "act_bits": 8}), digits_input)
    pi = [ac.estimate(m, digits_input, "raspberry-pi-4") for m in (digits_model, w8, w8a8)]
    assert set(pi[2].layers.loc[pi[2].layers["kind"] == "conv", "dtype"]) == {"int8"}
    assert conv_latency(pi[2]) < 0.75 * conv_latency(pi[0])        # int8 kernels: weights and activations 8-bit
    assert pi[1].latency_ms == pytest.approx(pi[0].latency_ms, rel=1e-4)  # 8-bit weights, float activations: fp32
    assert pi[1].size_kb < 0.3 * pi[0].size_kb and pi[1].energy_mj < pi[0].energy_mj
    fp32_only = variant("raspberry-pi-4", peak_gmacs={"fp32": 48})
    plain, quantized = (ac.estimate(m, digits_input, fp32_only) for m in (digits_model, w8a8))
    assert quantized.latency_ms == pytest.approx(plain.latency_ms, rel=1e-4)  # (+ the activation ranges' 8 bytes)
    assert quantized.energy_mj < plain.energy_mj and quantized.size_kb < 0.3 * plain.size_kb
    tpu = [ac.estimate(m, digits_input, "edge-tpu") for m in (digits_model, w8a8)]   # int8 only: float layers
    assert tpu[0].latency_ms == pytest.approx(tpu[1].latency_ms, rel=1e-4)            # are converted anyway


def test_sparsity_speeds_up_only_on_sparse_hardware(digits_model, digits_input):
    sparse = ac.apply(digits_model, every_layer(digits_model, digits_input, sparsity={"density": 0.1}), digits_input)
    skipping = variant("eyeriss", sparse=True)
    dense_hw = [ac.estimate(m, digits_input, "eyeriss") for m in (digits_model, sparse)]
    sparse_hw = [ac.estimate(m, digits_input, skipping) for m in (digits_model, sparse)]
    assert dense_hw[1].latency_ms == pytest.approx(dense_hw[0].latency_ms)
    assert dense_hw[1].energy_mj < dense_hw[0].energy_mj and dense_hw[1].size_kb < 0.5 * dense_hw[0].size_kb
    assert conv_latency(sparse_hw[1]) < 0.5 * conv_latency(sparse_hw[0])


class Branchy(nn.Module):
    """conv+bn+relu whose ReLU output feeds two readers, and a conv+bn whose BN output is read twice."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1, self.relu = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), nn.BatchNorm2d(8)

    def forward(self, x):
        a = self.relu(self.bn1(self.conv1(x)))
        b = self.bn2(self.conv2(a))
        return a + b + b


def test_fused_ops_are_priced_as_one_kernel():
    model, x = Branchy().eval(), torch.randn(1, 8, 16, 16)
    fused, unfused = ac.estimate(model, x, "jetson-orin-nano"), ac.estimate(model, x, variant("jetson-orin-nano", fuses=[]))
    rows = fused.layers
    assert list(rows.loc[["bn1", "relu"], "fused_into"]) == ["conv1", "conv1"]
    assert (rows.loc[["bn1", "relu"], "latency_ms"] == 0).all()
    assert rows.loc["bn2", "fused_into"] == "conv2"          # conv2+bn2 fuses; bn2 is read twice, so no more
    assert (rows.loc[rows["kind"] == "elementwise", "fused_into"] == "").all()
    assert (unfused.layers["fused_into"] == "").all()
    assert fused.latency_ms < unfused.latency_ms
    assert rows.loc["conv1", "bytes"] < unfused.layers.loc[["conv1", "bn1", "relu"], "bytes"].sum()  # no round trips
    assert fused.macs == unfused.macs


def test_compute_and_memory_bound_ops_are_told_apart():
    model, x = nn.Sequential(nn.Conv2d(64, 64, 3, padding=1), nn.ReLU()).eval(), torch.randn(1, 64, 56, 56)
    rows = ac.estimate(model, x, variant("raspberry-pi-4", fuses=[])).layers
    assert list(rows["bound"]) == ["compute", "memory"]


def test_narrow_convolutions_run_at_the_profiles_narrow_efficiency():
    """A conv with fewer output positions than narrow_n keeps narrow_efficiency of its throughput; others are as
    before, and a profile without narrow_n prices every conv alike."""
    model = nn.Sequential(nn.Conv2d(256, 256, 3, padding=1, bias=False)).eval()
    plain = variant("raspberry-pi-4", fuses=[], overhead_us=0.0, bandwidth_gbs=1e6, cache_bandwidth_gbs=1e6)
    narrow = variant("raspberry-pi-4", fuses=[], overhead_us=0.0, bandwidth_gbs=1e6, cache_bandwidth_gbs=1e6,
                     narrow_n=16, narrow_efficiency=0.25)
    small, large = torch.randn(1, 256, 3, 3), torch.randn(1, 256, 4, 4)
    assert ac.estimate(model, small, narrow).latency_ms == pytest.approx(4 * ac.estimate(model, small, plain).latency_ms)
    assert ac.estimate(model, large, narrow).latency_ms == pytest.approx(ac.estimate(model, large, plain).latency_ms)


def test_energy_follows_horowitz(digits_input):
    """One conv on a profile with no memory or static energy: MACs x the per-MAC energy of its dtype."""
    model = nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False)).eval()
    macs = 16 * 9 * 32 * 32
    profile = variant("raspberry-pi-4", energy={"mac_pj": {32: 4.6, 8: 0.23}, "dram_pj_per_byte": 0,
                                                "sram_pj_per_byte": 0, "static_w": 0})
    assert ac.estimate(model, digits_input, profile).energy_mj == pytest.approx(macs * 4.6e-9)
    w8a8 = ac.apply(model, every_layer(model, digits_input, quantize={"weight_bits": 8, "act_bits": 8}), digits_input)
    assert ac.estimate(w8a8, digits_input, profile).energy_mj == pytest.approx(macs * 0.23e-9)
    weights = variant("raspberry-pi-4", energy={"mac_pj": {32: 1e-12}, "dram_pj_per_byte": 80, "sram_pj_per_byte": 0,
                                                "static_w": 2.0})
    est = ac.estimate(model, digits_input, weights)
    assert est.energy_mj == pytest.approx(16 * 9 * 4 * 80e-9 + 2.0 * est.latency_ms)  # weights from DRAM + static


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v2", "squeezenet1_1", "shufflenet_v2_x0_5"])
def test_peak_memory_equals_the_measured_peak(name):
    """Peak activation memory from liveness, against the tensors PyTorch really holds while the fx-traced model
    (which frees each value after its last use) runs."""
    model, x = torchvision.models.get_model(name).eval(), torch.randn(1, 3, 64, 64)
    est = ac.estimate(model, x, "raspberry-pi-4")
    assert est.peak_mem_kb * 1024 == measure_peak_activation_bytes(torch.fx.symbolic_trace(model), x)
    assert est.as_dict()["peak_mem_kb"] == est.peak_mem_kb


@pytest.mark.parametrize("name", ["efficientnet_b0"])
def test_int8_peak_memory_counts_int8_tensors_and_the_conversions(name):
    """In the torch-int8 runtime a feature map an int8 kernel writes is one byte per element, BatchNorm and ReLU
    folded into their kernel write none, and every float <-> int8 conversion (EfficientNet's SiLU runs float)
    writes a tensor of its own: the peak the model runs at, measured on the converted model (all layers at
    8 bits: exactly; half of them: within 30 %)."""
    from autocompress.cost import kernels, quantized
    from autocompress.cost.runtimes import runnable

    profile = variant("raspberry-pi-4", runtime="torch-int8", peak_gmacs={"fp32": 10, "int8": 20},
                      fuses=["+".join(chain) for chain in kernels.KERNEL_FUSES])
    model, x = torchvision.models.get_model(name).eval(), torch.randn(1, 3, 64, 64)
    names = [n for n, _ in layer_targets(analyze(model, x))]
    for share, tolerance in ((names, 0.0), (names[::2], 0.3)):
        quantized_model = ac.apply(model, {"quantize": {"weight_bits": dict.fromkeys(share, 8),
                                                        "act_bits": dict.fromkeys(share, 8)}}, x)
        est = ac.estimate(quantized_model, x, profile).peak_mem_kb * 1024
        with quantized.engine():
            real = measure_peak_activation_bytes(runnable(quantized_model, x, "torch-int8").model, x)
        assert est == pytest.approx(real, rel=tolerance, abs=0), (name, len(share))
    assert est < ac.estimate(model, x, profile).peak_mem_kb * 1024


def test_peak_memory_is_a_budget(digits_model, digits_input):
    est = ac.estimate(digits_model, digits_input, "raspberry-pi-4").as_dict()
    budgets = Budgets.parse(["peak_mem_kb=1", "peak_mem=50%"])
    limits = budgets.limits(est)
    assert limits == {"peak_mem_kb": 1.0}
    assert violations(est, limits)[0] > 0
    assert violations(est, Budgets({"peak_mem": 1.5}).limits(est)) == [pytest.approx(1 / 1.5 - 1)]


def test_cuda_calibration_is_guarded():
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(ac.AutocompressError, match="needs a CUDA GPU"):
        cal.calibrate(device="cuda")


def test_stale_host_calibration_is_refitted(tmp_path, monkeypatch):
    """A cached host profile fitted to an older cost model is calibrated again on first use."""
    from autocompress.cost import hardware

    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    path = hardware.host_profile_path()
    path.parent.mkdir(parents=True)
    old = {**load_profile("raspberry-pi-4").to_dict(), "name": "host", "calibration": {"model_version": 1}}
    path.write_text(__import__("yaml").safe_dump(old))
    calls = []
    monkeypatch.setattr(cal, "calibrate_host", lambda p, quick, threads, runtime: calls.append(quick) or cal.write_profile(
        HardwareProfile.from_dict({**old, "calibration": {"model_version": cal.MODEL_VERSION}}, "x"), p))
    assert load_profile("host").calibration["model_version"] == cal.MODEL_VERSION
    assert calls == [True]
    load_profile("host")
    assert calls == [True]  # now current: read from the cache
