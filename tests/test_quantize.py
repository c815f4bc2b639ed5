"""Quantization: weight grids (binary, ternary, int, fp16), activation fake-quant, data-free ranges, real int8."""
import copy

import pytest
import torch
from torch import nn

import autocompress as ac
from autocompress.compress import quantize
from autocompress.compress.base import get_meta, layer_targets
from autocompress.cost.model import size_bytes
from autocompress.evaluate import accuracy, fixed_batches
from autocompress.int8 import int8_report, to_int8


@pytest.fixture(scope="module")
def names(digits_model, digits_input):
    return [n for n, _ in layer_targets(ac.analyze(digits_model, digits_input))]


def _policy(names, weight_bits=None, act_bits=None):
    section = {}
    if weight_bits:
        section["weight_bits"] = dict.fromkeys(names, weight_bits)
    if act_bits:
        section["act_bits"] = dict.fromkeys(names, act_bits)
    return {"quantize": section}


def _distinct_per_channel(w):
    return max(torch.unique(row).numel() for row in w.reshape(w.shape[0], -1))


@pytest.mark.parametrize("bits, most", [(1, 2), (2, 3), (4, 15), (8, 255)])
def test_weights_take_at_most_their_grid_of_values(bits, most):
    w = torch.randn(16, 8, 3, 3)
    q = quantize.fake_quantize(w, bits)
    assert _distinct_per_channel(q) <= most
    torch.testing.assert_close(quantize.fake_quantize(q, bits), q)  # idempotent: fine-tuning starts where apply left


def test_ternary_weights_take_three_values():
    w = torch.randn(8, 64)
    q = quantize.fake_quantize(w, 2)
    for row, orig in zip(q, w):
        values = torch.unique(row)
        assert len(values) == 3 and values[1] == 0 and values[0] == -values[2]
        # TWN: weights under 0.7 * mean |w| become zero, the rest keep their sign
        small = orig.abs() <= 0.7 * orig.abs().mean()
        assert (row[small] == 0).all() and torch.equal(torch.sign(row[~small]), torch.sign(orig[~small]))


def test_16_bits_is_fp16_and_zeros_stay_zero():
    w = torch.randn(4, 10)
    assert torch.equal(quantize.fake_quantize(w, 16), w.half().float())
    w[:, :5] = 0
    for bits in (1, 2, 4, 8):
        assert (quantize.fake_quantize(w, bits)[:, :5] == 0).all()


def test_mixed_precision_policy_records_bits_and_prices_packed_weights(digits_model, digits_input, names):
    bits = {n: b for n, b in zip(names, [8, 4, 2, 1] * len(names))}
    model = ac.apply(digits_model, {"quantize": {"weight_bits": bits}}, digits_input)
    expected = 0
    for name, module in model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)) + list(module.named_buffers(recurse=False)):
            if pname == "weight" and name in bits:
                assert get_meta(module)["weight_bits"] == bits[name]
                assert _distinct_per_channel(p) <= max(2, 2 ** bits[name] - 1)
                expected += -(-p.numel() * bits[name] // 8) + 4 * p.shape[0]  # packed values + fp32 scales
            else:
                expected += p.numel() * p.element_size()
    assert size_bytes(model) == expected


def test_activation_fake_quant_limits_inputs_and_survives_copies(digits_model, digits_input, names):
    model = ac.apply(digits_model, _policy(names, act_bits=4), digits_input)
    seen = {}
    layer = model.get_submodule(names[3])
    handle = layer.register_forward_pre_hook(lambda m, args: seen.update(x=args[0]))  # runs after the fake-quant hook
    model(torch.randn(4, 1, 32, 32))
    handle.remove()
    assert 2 < torch.unique(seen["x"]).numel() <= 2 ** 4
    assert get_meta(layer)["act_bits"] == 4 and layer.act_range[0] <= layer.act_range[1]
    copied = copy.deepcopy(model)
    x = torch.randn(2, 1, 32, 32)
    torch.testing.assert_close(copied(x), model(x))
    rebuilt = ac.apply(digits_model, _policy(names, act_bits=4), digits_input)
    rebuilt.load_state_dict(model.state_dict())  # ranges travel in the state_dict
    torch.testing.assert_close(rebuilt(x), model(x))
    assert not torch.allclose(ac.apply(digits_model, {}, digits_input)(x), model(x))  # it does change the output


def test_data_free_activation_ranges_keep_accuracy(digits_model, digits_input, digits_data, names):
    _, val, _ = digits_data
    model = ac.apply(digits_model, _policy(names, weight_bits=8, act_bits=8), digits_input)
    assert accuracy(model, val) >= accuracy(digits_model, val) - 0.02


def test_int8_model_agrees_with_fake_quant(digits_model, digits_input, digits_data, names):
    train, val, _ = digits_data
    batches = fixed_batches(train, 4)
    fake = ac.apply(digits_model, _policy(names, weight_bits=8, act_bits=8), digits_input)
    quantize.calibrate_activations(fake, batches)  # the same calibration data for both
    real = to_int8(digits_model, digits_input, batches)
    x, y = next(iter(val))
    with torch.no_grad():
        a, b = fake(x), real(x)
    assert (a.argmax(1) == b.argmax(1)).float().mean() >= 0.97
    assert (a - b).norm() / a.norm() < 0.1
    assert abs(accuracy(fake, val) - accuracy(real, val)) <= 0.01
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in real.modules())


def test_int8_report_measures_beside_the_estimate(digits_model, digits_input, digits_data):
    report = int8_report(digits_model, digits_input, fixed_batches(digits_data[0], 2))
    assert report["measured_latency_ms"] > 0 and report["float_latency_ms"] > 0
    assert report["file_size_kb"] < report["float_file_kb"] / 3
    assert report["file_size_kb"] == pytest.approx(report["estimated_size_kb"], rel=0.15)


@pytest.fixture(scope="module")
def synthesized(digits_model, digits_input):
    return quantize.synthesize_inputs(digits_model, digits_input, n=4, steps=15)


def test_synthesized_inputs_match_batchnorm_statistics_better_than_noise(digits_model, digits_input, synthesized):
    """Summed over every BatchNorm, the distance of the batch's channel means and deviations from the running
    ones (what the synthesis minimizes; the stem's alone is too few channels to judge one trained model by)."""
    norms = [m for m in digits_model.modules() if isinstance(m, nn.BatchNorm2d)]

    def gap(x):
        gaps = []

        def record(bn, args):
            a = args[0].transpose(0, 1).flatten(1)
            gaps.append((a.mean(1) - bn.running_mean).norm() + (a.std(1) - (bn.running_var + bn.eps).sqrt()).norm())

        handles = [bn.register_forward_pre_hook(record) for bn in norms]
        with torch.no_grad():
            digits_model(x)
        for handle in handles:
            handle.remove()
        return sum(gaps).item()

    assert gap(synthesized) < 0.5 * gap(quantize.random_like_input(digits_input, 4))


def test_data_free_int8_from_synthesized_inputs(digits_model, digits_input, digits_data, synthesized):
    _, val, _ = digits_data
    real = to_int8(digits_model, digits_input, [synthesized])
    assert accuracy(real, val) >= accuracy(digits_model, val) - 0.03


def test_int8_without_calibration_data_synthesizes_its_inputs():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 6 * 6, 4)).eval()
    model[1].running_mean.uniform_(-1, 1)
    x = torch.randn(2, 3, 8, 8)
    real = to_int8(model, x[:1])
    assert any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in real.modules())
    assert (real(x) - model(x)).norm() / model(x).norm() < 0.2


def test_a_bit_width_outside_the_list_is_one_clear_sentence(digits_model, digits_input, names):
    with pytest.raises(ac.AutocompressError, match=r"quantize.weight_bits = 3 is not allowed; allowed: 1, 2, 4, 8, 16, 32"):
        ac.apply(digits_model, _policy(names, weight_bits=3), digits_input)
