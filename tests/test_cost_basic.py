"""The cost model v1: counts agree with independent re-measurement; profiles validate; host calibration fits."""
import io

import pytest
import torch
import torchvision
import yaml

import autocompress as ac
from autocompress.compress.quantize import fake_quantize
from autocompress.cost.hardware import load_profile


def test_params_and_macs_agree_with_fvcore_and_numel():
    from fvcore.nn import FlopCountAnalysis

    model, x = torchvision.models.resnet18(), torch.randn(1, 3, 64, 64)
    est = ac.estimate(model, x, "raspberry-pi-4")
    assert est.params == sum(p.numel() for p in model.parameters())
    by_op = FlopCountAnalysis(model, x).unsupported_ops_warnings(False).by_operator()
    assert est.macs == by_op["conv"] + by_op["linear"]  # MACs are multiply-accumulates of convs and matmuls


def test_size_equals_the_serialized_weights(digits_model, digits_input):
    est = ac.estimate(digits_model, digits_input, "raspberry-pi-4")
    buffer = io.BytesIO()
    torch.save(digits_model.state_dict(), buffer)
    tensor_bytes = sum(t.numel() * t.element_size() for t in digits_model.state_dict().values())
    assert est.size_kb * 1024 == tensor_bytes
    assert abs(buffer.tell() - tensor_bytes) / buffer.tell() < 0.05  # torch.save adds only its container


def test_quantized_weights_shrink_size_not_host_latency(digits_model, digits_input, host):
    bound = ac.SearchSpace.load("default").bind(ac.analyze(digits_model, digits_input))
    int4 = ac.apply(digits_model, bound.policy({k.param: 4 for k in bound.knobs if k.technique == "quantize"}),
                    digits_input)
    conv = int4.layer1[0].conv1
    assert len(torch.unique(conv.weight[0])) <= 15  # 4-bit symmetric grid
    full, small = ac.estimate(digits_model, digits_input, host), ac.estimate(int4, digits_input, host)
    assert small.size_kb < 0.2 * full.size_kb
    assert small.latency_ms == pytest.approx(full.latency_ms)   # the host profile runs fp32 only
    assert small.energy_mj < full.energy_mj


def test_fake_quantize_levels():
    w = torch.randn(8, 4, 3, 3)
    assert len(torch.unique(fake_quantize(w, 2)[0])) <= 3
    assert len(torch.unique(fake_quantize(w, 1)[0])) <= 2
    assert torch.equal(fake_quantize(w, 32), w)


@pytest.mark.parametrize("change, message", [
    ({"bandwidth_gbs": -1}, "bandwidth_gbs = -1"),
    ({"peak_gmacs": {"fp64": 3}}, "unknown key 'fp64'"),
    ({"efficiency": {"conv": 0}}, "efficiency.conv = 0"),
    ({"overlap": 2}, "overlap = 2"),
])
def test_profile_validation(tmp_path, change, message):
    data = load_profile("raspberry-pi-4").to_dict()
    data.update(change)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ac.AutocompressError, match=message):
        load_profile(str(path))


def test_a_profile_file_works_where_a_name_does(tmp_path, digits_model, digits_input):
    path = tmp_path / "mine.yaml"
    path.write_text(yaml.safe_dump(load_profile("raspberry-pi-4").to_dict()))
    a = ac.estimate(digits_model, digits_input, str(path))
    b = ac.estimate(digits_model, digits_input, "raspberry-pi-4")
    assert a.latency_ms == b.latency_ms and a.energy_mj == b.energy_mj
