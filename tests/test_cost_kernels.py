"""The kernel-level cost model: meta-tensor tracing, kernels, threads in profiles, noise-aware calibration."""
import math

import numpy as np
import pytest
import torch
import torchvision
import yaml
from torch import nn

import autocompress as ac
from autocompress.cli import main
from autocompress.cost import calibrate as cal, hardware, kernels, profiles
from autocompress.cost.flow import dataflow
from autocompress.cost.trace import trace
from autocompress.graph import analyze


def fake_ms(model, x, repeats=30, warmup=5, threads=None, clock="wall"):
    """A made-up, repeatable machine: an op overhead, the input's elements and the weights, in milliseconds."""
    model = model.copies[0] if isinstance(model, cal._RoundRobin) else model  # one copy runs per call
    params = sum(p.numel() for p in model.parameters())
    return 0.004 + 2e-6 * x.numel() + 1e-6 * params


def on_fake_machine(monkeypatch):
    """Calibration on the fake machine: few kernels, a quiet load average, no settling pause."""
    monkeypatch.setattr(cal, "measure_latency_ms", fake_ms)
    monkeypatch.setattr(cal, "SAMPLES", {True: 150, False: 150})
    monkeypatch.setattr(cal, "_settle", lambda device: None)
    monkeypatch.setattr(cal.os, "getloadavg", lambda: (0.1, 0.1, 0.1))
    return monkeypatch


@pytest.fixture
def fake_machine(monkeypatch):
    return on_fake_machine(monkeypatch)


@pytest.fixture(scope="module")
def fitted():
    with pytest.MonkeyPatch.context() as monkeypatch:
        on_fake_machine(monkeypatch)
        return cal.calibrate(quick=True, threads=1)


@pytest.mark.parametrize("name", ["resnet18", "mobilenet_v3_small", "shufflenet_v2_x0_5", "googlenet"])
def test_meta_trace_equals_analyze(name):
    """The estimate's tracer (meta tensors, no arithmetic) finds what analyze's real runs find."""
    kwargs = {"aux_logits": False, "init_weights": False} if name == "googlenet" else {}
    model, x = torchvision.models.get_model(name, **kwargs).eval(), torch.randn(1, 3, 64, 64)
    graph, flow = trace(model, x)
    real = analyze(model, x)
    fields = lambda g: [(l.name, l.kind, l.type, l.in_shape, l.out_shape, l.macs, l.params) for l in g.layers]
    assert fields(graph) == fields(real)
    assert flow == dataflow(model, real) and graph.output_layers == real.output_layers


def test_estimate_runs_no_arithmetic():
    """Every op the estimate runs sees meta tensors: no forward pass on real data (resnet50 at 224 px is priced in
    a fraction of the time it takes to run)."""
    model = torchvision.models.resnet50().eval()
    devices = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            m.register_forward_pre_hook(lambda mod, args: devices.append(args[0].device.type))
    est = ac.estimate(model, torch.randn(1, 3, 224, 224), "raspberry-pi-4")
    assert set(devices) == {"meta"} and len(devices) == 53
    assert est.macs == 4_089_184_256


def test_kernels_group_the_ops_the_runtime_runs_together():
    model, x = torchvision.models.mobilenet_v2().eval(), torch.randn(1, 3, 64, 64)
    graph, flow = trace(model, x)
    anchor = cal.fusion_groups(graph, flow, kernels.KERNEL_FUSES)
    index, rows = kernels.features(graph.layers, anchor)
    names = [graph.layers[i].name for i in index]
    members = {graph.layers[i].name: graph.layers[a].name for i, a in enumerate(anchor) if a != i}
    assert members["features.0.1"] == members["features.0.2"] == "features.0.0"       # conv+bn+relu6
    fam = {n: kernels.FAMILIES[int(f)] for n, f in zip(names, rows[:, 0])}
    assert fam["features.0.0"] == "conv" and fam["features.2.conv.1.0"] == "dwconv"
    assert fam["features.2.conv.2"] == "pointwise" and fam["classifier.1"] == "linear"
    assert sum(f == "add" for f in fam.values()) == 10
    assert rows.shape[1] == len(kernels.FEATURES) - 1


def test_a_fitted_profile_prices_kernels_as_timed(fitted, tmp_path):
    """Fit and estimate share one feature path: a kernel the calibration never saw, priced through estimate(),
    comes close to the fake machine's time for it; the profile's numbers are measured, none at a bound."""
    assert fitted.threads == 1 and fitted.kernels
    assert fitted.overhead_for("conv") == pytest.approx(4.0 + 2e-3, rel=1e-3)  # the fake op on one element, in us
    conv = nn.Sequential(nn.Conv2d(37, 53, 3, padding=1, bias=False), nn.BatchNorm2d(53), nn.ReLU()).eval()
    x = torch.randn(1, 37, 11, 11)
    est = ac.estimate(conv, x, fitted)
    assert est.threads == 1 and est.layers["latency_ms"].gt(0).sum() == 1     # one kernel, on the conv's row
    row = cal.kernel_rows(conv, x)  # the calibration's feature path, which estimate() must share
    assert est.latency_ms == pytest.approx(kernels.predict_s(row, fitted)[0] * 1e3, rel=1e-9)
    assert 0.5 < est.latency_ms / fake_ms(conv, x) < 2.0
    path = cal.write_profile(fitted, tmp_path / "p.yaml")
    again = hardware.load_profile(str(path))
    assert ac.estimate(conv, x, again).latency_ms == pytest.approx(est.latency_ms, rel=1e-4)
    quality = fitted.calibration
    assert {"fit_median_error", "fit_within_10pct", "fit_within_20pct", "load_before", "dropped"} <= set(quality)


def test_a_fitted_profile_refuses_another_thread_count(fitted):
    model, x = nn.Sequential(nn.Conv2d(3, 8, 3)).eval(), torch.randn(1, 3, 16, 16)
    with pytest.raises(ac.AutocompressError, match="calibrated with 1 torch threads, not 2"):
        ac.estimate(model, x, fitted, threads=2)
    with pytest.raises(ac.AutocompressError, match="threads = 0 is not allowed"):
        ac.estimate(model, x, fitted, threads=0)
    assert ac.estimate(model, x, "raspberry-pi-4", threads=4).threads is None   # a datasheet: no thread count


def test_host_is_calibrated_per_thread_count(fitted, tmp_path, monkeypatch):
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    calls = []

    def fake_host(path, quick, threads, runtime):
        calls.append(threads if runtime == "torch" else (threads, runtime))
        profile = profiles.HardwareProfile.from_dict({**fitted.to_dict(), "threads": threads, "runtime": runtime}, "f")
        return cal.write_profile(profile, path)

    monkeypatch.setattr(cal, "calibrate_host", fake_host)
    assert hardware.load_profile("host", threads=3).threads == 3
    assert hardware.host_profile_path(threads=3).name.endswith("-t3.yaml")
    assert hardware.load_profile("host").threads == torch.get_num_threads()
    hardware.load_profile("host", threads=3)
    assert hardware.load_profile("host", threads=3, runtime="onnxruntime").runtime == "onnxruntime"  # its own file
    assert hardware.host_profile_path(threads=3, runtime="onnxruntime").name.endswith("-t3-onnxruntime.yaml")
    assert calls == [3, torch.get_num_threads(), (3, "onnxruntime")]


def test_uneven_timings_are_timed_again_then_dropped(monkeypatch):
    times = iter([1.0, 1.0, 2.0, 1.0, 1.0, 1.0, 1.05])  # first probe, a noisy round set, then a steady one
    monkeypatch.setattr(cal, "measure_latency_ms", lambda *a, **k: next(times))
    seconds, spread = cal.time_kernel(nn.ReLU(), torch.randn(4), 1, "cpu", 3.0)
    assert seconds == pytest.approx(1e-3) and spread == pytest.approx(1.05)
    noisy = iter([1.0] + [1.0, 3.0, 1.0] * 2)
    monkeypatch.setattr(cal, "measure_latency_ms", lambda *a, **k: next(noisy))
    assert cal.time_kernel(nn.ReLU(), torch.randn(4), 1, "cpu", 3.0) == (None, 3.0)


def test_a_busy_machine_keeps_the_previous_profile(fake_machine, tmp_path, capsys):
    path = tmp_path / "host.yaml"
    fake_machine.setattr(cal.os, "getloadavg", lambda: (7.5, 7.0, 6.0))
    fake_machine.setattr(hardware, "host_profile_path", lambda device="cpu", threads=None, runtime="torch": path)
    path.write_text("previous")
    assert main(["calibrate", "--quick", "--threads", "1"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "busy (load average 7.50" in out and "--force" in out
    assert path.read_text() == "previous"
    assert main(["calibrate", "--quick", "--threads", "1", "--force"]) == 0
    assert "held-out kernels: median error" in capsys.readouterr().out
    written = yaml.safe_load(path.read_text())
    assert written["threads"] == 1 and written["calibration"]["load_before"] == 7.5


def test_threads_on_the_command_line(fitted, tmp_path, capsys):
    path = cal.write_profile(fitted, tmp_path / "one.yaml")
    assert main(["estimate", "--model", "torchvision:squeezenet1_1", "--input-shape", "1,3,64,64",
                 "--hardware", str(path), "--threads", "1"]) == 0
    assert "at 1 threads: latency" in capsys.readouterr().out
    assert main(["estimate", "--model", "torchvision:squeezenet1_1", "--input-shape", "1,3,64,64",
                 "--hardware", str(path), "--threads", "2"]) == 2
    assert "calibrated with 1 torch threads, not 2" in capsys.readouterr().err
    assert main(["calibrate", "--threads", "0"]) == 2
    assert "--threads 0 is not allowed" in capsys.readouterr().err


def test_prior_uses_only_measured_numbers():
    rows = np.array([[kernels.FAMILIES.index("pointwise"), math.log2(1 + 1e6), math.log2(1 + 1e3),
                      math.log2(1 + 1e3), math.log2(1 + 1e3)] + [0.0] * (len(kernels.FEATURES) - 6)])
    prior = kernels.prior_s(rows, overhead_us=5.0, peak_gmacs=10.0, bandwidth_gbs=1.0)
    assert prior[0] == pytest.approx(5e-6 + 1e6 / 10e9)   # compute-bound: 1 MMAC at 10 GMAC/s, plus the overhead


def test_a_block_timed_while_the_reference_ran_slow_is_timed_again_then_dropped(fake_machine):
    """The reference kernel, timed after every block, decides: slow after a block (something else ran), the block
    is timed again after a pause; slow every time, its kernels are dropped; the profile records it all."""
    slow = {"on": False}
    fake_machine.setattr(cal.time, "sleep", lambda seconds: slow.update(on=False))  # the pause: the load went away
    reference = cal.reference_kernel("cpu")[0]

    def machine(model, x, repeats=30, warmup=5, threads=None, clock="wall"):
        return fake_ms(model, x) * (50.0 if slow["on"] and model is reference else 1.0)

    fake_machine.setattr(cal, "measure_latency_ms", machine)
    fake_machine.setattr(cal, "reference_kernel", lambda device: (reference, torch.randn(1, 32, 14, 14)))
    timed = {"n": 0}
    real_block = cal._time_block

    def block(*args):  # the second block is timed on a busy machine twice, the fourth three times
        timed["n"] += 1
        slow["on"] = timed["n"] in (2, 3) or 6 <= timed["n"] <= 8
        return real_block(*args)

    fake_machine.setattr(cal, "_time_block", block)
    rows, seconds, stats = cal.timed_kernels(100, True, 0, "cpu", 1, "cpu")
    assert stats["blocks_retimed"] == 4 and stats["blocks_dropped"] == 1
    assert stats["reference_slowdown_max"] == pytest.approx(50.0)
    assert stats["kernels"] + stats["dropped"] == sum(1 for b in cal._blocks(100, cal.random.Random(0), 30e6) for _ in b)
    assert len(rows) == len(seconds) == stats["kernels"] and stats["dropped"] >= len(list(cal._blocks(
        100, cal.random.Random(0), 30e6))[3])


def test_kernels_a_runtime_refuses_are_counted(fake_machine):
    """A kernel the runtime cannot run (an op the ONNX exporter cannot write) is not learned from, and the
    profile says how many there were."""
    real = cal.in_runtime
    calls = {"n": 0}

    def every_third_refused(model, x, runtime, threads, int8=False):
        calls["n"] += 1
        return None if calls["n"] % 3 == 0 else real(model, x, runtime, threads, int8)

    fake_machine.setattr(cal, "in_runtime", every_third_refused)
    rows, seconds, stats = cal.timed_kernels(60, True, 0, "cpu", 1, "cpu")
    assert stats["runtime_refused"] == calls["n"] // 3 > 0
    assert stats["kernels"] + stats["dropped"] + stats["runtime_refused"] == calls["n"]


def test_busy_cores_stop_a_calibration_that_keeps_a_profile_or_time_one_thread(fake_machine, tmp_path, capsys):
    """Cores busy before timing starts (the reference kernel far slower than its single-thread CPU time): with a
    previous profile nothing is timed and it is kept; without one, the kernels are timed on one thread with the
    CPU clock (the load does not inflate it) and the written profile says so; nothing is at a bound."""
    seen = []

    def machine(model, x, repeats=30, warmup=5, threads=None, clock="wall"):
        seen.append((threads, clock))
        return fake_ms(model, x) * (30.0 if threads == 2 else 1.0)  # 2 threads on busy cores: 30x, 12x the slack

    fake_machine.setattr(cal, "measure_latency_ms", machine)
    fake_machine.setattr(cal, "PAUSE_S", 0.0)
    path = tmp_path / "host.yaml"
    fake_machine.setattr(hardware, "host_profile_path", lambda device="cpu", threads=None, runtime="torch": path)
    path.write_text("previous")
    assert main(["calibrate", "--quick", "--threads", "2"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "busy (the reference kernel ran 12.0x slower" in out and "--force" in out
    assert path.read_text() == "previous" and len(seen) < 30   # stopped before timing any kernel
    path.unlink()
    assert main(["calibrate", "--quick", "--threads", "2"]) == 0
    out = capsys.readouterr().out.strip()
    assert len(out.splitlines()) == 1 and "on a busy machine" in out and "on 1 thread (cpu clock) for 2 threads" in out
    written = yaml.safe_load(path.read_text())
    assert written["threads"] == 2 and written["calibration"]["timed_threads"] == 1
    assert written["calibration"]["clock"] == "cpu" and "12.0x slower" in written["calibration"]["busy"]
    assert {"fit_r2", "reference_ms", "blocks_dropped"} <= set(written["calibration"])
    assert 0 < written["bandwidth_gbs"] < 1e4 and 0 < written["peak_gmacs"]["fp32"] < 1e6


def test_copy_bandwidth_stays_physical_when_noise_flattens_the_slope(monkeypatch):
    """A larger copy timed no slower than a smaller one (noise) has no slope: the bandwidth is the large copy's
    own rate, never a clamp."""
    monkeypatch.setattr(cal, "measure_latency_ms", lambda model, x, **k: 2.0)
    gbs = cal.copy_bandwidth_gbs(64 * 1024, "cpu", 1, "cpu")
    assert gbs == pytest.approx(2 * 4 * (64 * 1024 * 1024 / 8) / 2e-3 / 1e9)
    monkeypatch.setattr(cal, "measure_latency_ms", lambda model, x, **k: 1e-3 * x.numel() / 1e5)
    assert cal.copy_bandwidth_gbs(64 * 1024, "cpu", 1, "cpu") == pytest.approx(800.0, rel=1e-6)  # 8 bytes per element in 1e-11 s


def test_the_forest_predicts_what_the_regressor_predicts_and_is_fitted_once(fitted, tmp_path, monkeypatch):
    """Estimates predict kernels with the fitted trees as flat arrays: exactly scikit-learn's numbers (unknown
    families and all), fitted once per machine and read back from the cache folder without unpickling."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    x, y = kernels.decode(fitted.kernels)
    model = kernels.regressor().fit(x, y)
    forest = kernels.Forest(model)
    probe = x + np.random.default_rng(0).normal(0, 0.5, x.shape) * (np.arange(x.shape[1]) > 0)
    probe[:7, 0] = [99, 17, -1, 0.5, 3, 3, 15]  # families never seen, out of range, fractional
    for rows in (x, probe, x[:1]):
        assert np.array_equal(forest.predict(rows), model.predict(rows))
    kernels._FITTED.clear()
    first = kernels.fitted(fitted.kernels)
    assert list((tmp_path / "forests").glob("*.npz"))
    kernels._FITTED.clear()
    monkeypatch.setattr(kernels, "regressor", lambda: pytest.fail("refitted instead of read from the cache"))
    again = kernels.fitted(fitted.kernels)
    assert np.array_equal(again.predict(probe), first.predict(probe))
    assert np.array_equal(first.predict(probe), model.predict(probe))


def test_a_stale_host_profile_is_replaced_even_on_a_busy_machine(fitted, tmp_path, monkeypatch):
    """A cached host profile fitted to an older cost model is no profile to keep: first use on busy cores writes
    the new calibration over it (and warns that the cores were busy) instead of keeping the stale one."""
    monkeypatch.setenv("AUTOCOMPRESS_CACHE", str(tmp_path))
    path = hardware.host_profile_path(threads=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    cal.write_profile(profiles.HardwareProfile.from_dict(
        {**fitted.to_dict(), "calibration": {**fitted.calibration, "model_version": cal.MODEL_VERSION - 1}}, "x"), path)
    busy = {**fitted.calibration, "busy": "the reference kernel ran 9.0x slower than on a quiet core"}

    def fake_calibrate(name, quick=False, device="cpu", seed=0, threads=None, clock=None, stop_when_busy=False, runtime="torch",
                       progress=False):
        if stop_when_busy:
            raise cal.Busy(busy["busy"])
        return profiles.HardwareProfile.from_dict({**fitted.to_dict(), "calibration": busy}, "fake")

    monkeypatch.setattr(cal, "calibrate", fake_calibrate)
    with pytest.warns(UserWarning, match="calibrated on a busy machine .the reference kernel ran 9.0x slower"):
        profile = hardware.load_profile("host", threads=1)
    assert profile.calibration["model_version"] == cal.MODEL_VERSION and profile.calibration["busy"]


def test_a_profile_timed_with_other_kernel_features_is_refused():
    """Kernels timed by a version with fewer features would be read column for column by the wrong trees."""
    rows = np.zeros((60, len(kernels.FEATURES) - 1))
    profile = profiles.HardwareProfile(name="old", peak_gmacs={"fp32": 10.0}, efficiency={}, bandwidth_gbs=1.0,
                                       overhead_us=1.0, energy={}, kernels=kernels.encode(rows, np.zeros(60)))
    with pytest.raises(ac.AutocompressError, match=f"have {len(kernels.FEATURES) - 1} features and this autocompress "
                                                f"reads {len(kernels.FEATURES)}"):
        kernels.predict_s(np.zeros((1, len(kernels.FEATURES) - 1)), profile)
