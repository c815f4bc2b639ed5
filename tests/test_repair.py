"""Budget-aware sampling: over-budget samples are scaled toward the budget before they are evaluated; warm start."""
import json

import pytest
import torchvision

import autocompress as ac
from autocompress.space import SearchSpace


@pytest.fixture(scope="module")
def resnet():
    import torch

    model = torchvision.models.resnet18(weights=None).eval()
    return model, torch.randn(1, 3, 64, 64)


def test_scaling_moves_ordered_knobs_toward_the_most_compressed_choice(digits_model, digits_input):
    space = SearchSpace("t", {"prune": {"keep": [0.25, 0.5, 0.75, 1.0]},
                              "quantize": {"weight_bits": [4, 8, 32], "granularity": "global"}})
    bound = space.bind(ac.analyze(digits_model, digits_input))
    top = bound.uniform(1.0)
    assert bound.scaled(top, 1.0) == top
    assert bound.scaled(top, 0.0) == bound.uniform(0.0)
    half = bound.scaled(top, 0.5)
    assert {half[k.param] for k in bound.knobs if k.technique == "prune"} == {0.5}  # index 3 -> floor(1.5) = 1
    assert {half[k.param] for k in bound.knobs if k.technique == "quantize"} == {8}
    low = {k.param: (0.25 if k.technique == "prune" else 4) for k in bound.knobs}
    assert bound.scaled(low, 0.7) == low  # never less compressed than sampled


def test_repair_makes_most_evaluated_candidates_feasible_at_half_the_latency(resnet):
    model, x = resnet
    rates = {}
    for repair in (False, True):
        # A datasheet profile: the same prices on every machine (which random samples need repair depended on a
        # fresh host calibration, and once none did)
        result = ac.compress(model, x, budgets={"latency": 0.5}, objectives=("latency_ms", "size_kb"), trials=12,
                             sampler="random", seed=3, progress=False, repair=repair, hardware="raspberry-pi-4")
        trials = result.trials[result.trials["state"] == "COMPLETE"]  # not the duplicates a repair may make
        rates[repair] = trials["feasible"].mean()
        assert (trials["latency_ms"][trials["feasible"]] <= result.limits["latency_ms"] * (1 + 1e-9)).all()
        if repair:  # the recorded factor: 1 where the sample fitted as it was, below 1 where it was scaled
            scaled = trials[trials["repair"] < 1]
            assert len(scaled) > 0 and scaled["feasible"].all()
        else:
            assert trials["repair"].isna().all()
    assert rates[True] >= 0.9 > rates[False]


def test_a_budget_nothing_can_meet_leaves_the_sample_as_it_was(resnet):
    model, x = resnet
    result = ac.compress(model, x, budgets={"latency": 0.001}, objectives=("latency_ms", "size_kb"), trials=3,
                         sampler="random", seed=0, progress=False)
    assert not result.trials["feasible"].any() and result.trials["repair"].isna().all()


def test_warm_start_tries_each_technique_alone_as_well_as_all_together(digits_model, digits_input):
    result = ac.compress(digits_model, digits_input, evaluator=lambda m: 0.5, objectives=("accuracy", "size_kb"),
                         trials=5, progress=False)
    policies = [json.loads(p) for p in result.trials["policy"]]
    keeps = [set(p["prune"]["keep"].values()) for p in policies]
    bits = [set(p["quantize"]["weight_bits"].values()) for p in policies]
    assert all(k != {1.0} for k in keeps[:3]) and all(b != {32} for b in bits[:3])  # everything at once
    assert keeps[3] != {1.0} and bits[3] == {32}  # pruning alone
    assert keeps[4] == {1.0} and bits[4] != {32}  # quantization alone


def test_warm_start_in_a_space_of_students_and_compression_tries_uniform_models_of_both_kinds(digits_model,
                                                                                             digits_input):
    import optuna

    from autocompress import search
    from autocompress.cost.hardware import load_profile
    from autocompress.compress.student import NAME as STUDENT
    from autocompress.space import KIND

    bound = SearchSpace.load("all").bind(ac.analyze(digits_model, digits_input))
    study = optuna.create_study(directions=["maximize", "minimize"])
    search.enqueue_warm_start(study, search.Problem(digits_model, digits_input, bound, load_profile("host"),
                                                    ("accuracy", "latency_ms"), {}, None))
    queued = [t.system_attrs["fixed_params"] for t in study.get_trials(states=(optuna.trial.TrialState.WAITING,))]
    kinds = [q[KIND] for q in queued]
    n = len(search.WARM_START)
    assert kinds[:n] == ["compressed"] * n and kinds[n:2 * n] == [STUDENT] * n
    assert all(k == "compressed" for k in kinds[2 * n:])  # then each compression technique alone
    lightest = bound.policy(queued[n - 1])  # everything at once, mildly: several techniques in one policy
    identity = {"prune": ("keep", 1.0), "sparsity": ("density", 1.0), "share": ("bits", 32),
                "quantize": ("weight_bits", 32)}
    assert STUDENT not in lightest
    assert all(set(lightest[t][field].values()) != {same} for t, (field, same) in identity.items())


def test_warm_start_tries_the_least_compressed_uniform_policies_that_fit_shares_of_the_budget(digits_model,
                                                                                            digits_input):
    """Uniform pruning at the budget and below it (BUDGET_SHARES): the front is never worse than a person's
    uniform pruning at those budgets. Each is the largest keep ratio that fits; the next one up does not."""
    from autocompress import search
    from autocompress.cost.hardware import load_profile

    bound = SearchSpace("t", {"prune": {"keep": {"low": 0.25, "high": 1.0, "step": 0.125}, "granularity": "global"},
                              "quantize": {"weight_bits": [32, 8], "granularity": "global"}}
                        ).bind(ac.analyze(digits_model, digits_input))
    problem = search.Problem(digits_model, digits_input, bound, load_profile("raspberry-pi-4"),
                             ("accuracy", "latency_ms"), {}, None)
    full = problem.price(bound.uniform(1.0))["latency_ms"]
    problem.limits = {"latency_ms": 0.5 * full}
    keep, bits = (next(k.param for k in bound.knobs if k.technique == t) for t in ("prune", "quantize"))
    fitted = search.budget_fitted(problem)
    pruned = sorted({v[keep] for v in fitted if v[bits] == 32})
    assert 2 <= len(pruned) <= len(search.BUDGET_SHARES)  # one per share; the shares need different ratios here
    for share in search.BUDGET_SHARES:
        limit = share * problem.limits["latency_ms"]
        ratio = max(r for r in pruned if problem.price({keep: r, bits: 32})["latency_ms"] <= limit)
        assert ratio == 1.0 or problem.price({keep: ratio + 0.125, bits: 32})["latency_ms"] > limit


def test_repair_moves_only_the_techniques_that_lower_the_exceeded_metric(digits_model, digits_input):
    """On a device with only float kernels, fewer weight bits shrink the model but do not speed it up: a latency
    repair leaves them as sampled (and prunes), a size repair may lower them."""
    from autocompress.cost.model import estimate
    from autocompress.cost.hardware import load_profile
    from autocompress.cost.profiles import HardwareProfile
    from autocompress.repair import levers, repair

    space = SearchSpace("t", {"prune": {"keep": [0.25, 0.5, 0.75, 1.0]},
                              "quantize": {"weight_bits": [4, 8, 32], "granularity": "global"}})
    bound = space.bind(ac.analyze(digits_model, digits_input))
    spec = load_profile("raspberry-pi-4").to_dict()
    profile = HardwareProfile.from_dict({**spec, "peak_gmacs": {"fp32": spec["peak_gmacs"]["fp32"]}}, "float only")

    def price(values):
        return estimate(ac.apply(digits_model, bound.policy(values), digits_input), digits_input, profile).as_dict()

    found = levers(bound, price, ("latency_ms", "size_kb"))
    assert found == {"latency_ms": {"prune"}, "size_kb": {"prune", "quantize"}}
    sampled, base = bound.uniform(1.0), price(bound.uniform(1.0))
    for metric, bits_move in (("latency_ms", False), ("size_kb", True)):
        limit = {metric: 0.3 * base[metric]}
        values, factor = repair(bound, sampled, price, limit, found)
        assert 0 <= factor < 1 and price(values)[metric] <= limit[metric]
        bits = {values[k.param] for k in bound.knobs if k.technique == "quantize"}
        assert (bits != {32}) == bits_move
