import numpy as np
import pytest

from emoe.core.estimates import (CostEstimate, DecodeTargets, TaskDemand,
                                 expected_expert_tokens, top_experts)
from emoe.core.specs import HardwareSpec, ModelSpec


def test_eq2_sums_tasks_weighted_by_tokens_sensitivity_and_frequency():
    demand = {"qa": TaskDemand(requests=2, input_tokens=30, expected_output_tokens=5),
              "conversation": TaskDemand(requests=1, input_tokens=4, expected_output_tokens=6)}
    frequencies = {"qa": np.array([[0.5, 0.25, 0.25], [0.2, 0.3, 0.5]]),
                   "conversation": np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0]])}
    sensitivity = {"qa": np.array([1.0, 0.0]), "conversation": np.array([1.0, 1.0])}
    scores = expected_expert_tokens(demand, frequencies, sensitivity, (2, 3))
    # qa: (30 + 2*5) = 40 tokens, layer 1 insensitive; conversation: 4 + 6 = 10 tokens.
    np.testing.assert_allclose(scores, [[20.0, 10.0, 20.0], [10.0, 0.0, 0.0]])


def test_eq2_ignores_tasks_without_requests():
    demand = {"qa": TaskDemand(0, 0, 5.0)}
    scores = expected_expert_tokens(demand, {}, {}, (1, 2))
    np.testing.assert_array_equal(scores, np.zeros((1, 2)))


def test_top_experts_per_layer_breaks_ties_by_lower_index():
    scores = np.array([[20.0, 10.0, 20.0], [10.0, 0.0, 0.0]])
    np.testing.assert_array_equal(top_experts(scores, np.array([1, 1])),
                                  [[True, False, False], [True, False, False]])
    np.testing.assert_array_equal(top_experts(scores, np.array([2, 2])),
                                  [[True, False, True], [True, True, False]])
    np.testing.assert_array_equal(top_experts(scores, np.array([3, 1])),
                                  [[True, True, True], [True, False, False]])


def _specs():
    model = ModelSpec("m", num_layers=2, num_experts=4, top_k=2, expert_bytes=1000,
                      non_expert_bytes=1, kv_bytes_per_token=1)
    hw = HardwareSpec("g", gpu_memory_bytes=10**9, pcie_bandwidth_bytes_per_s=1e4,
                      pcie_latency_s=0.05, step_overhead_s=0.01, prefill_s_per_token=0.002,
                      decode_s_per_token=0.001, predictor_s=0.3)
    return model, hw


def test_cost_estimate_load_time_from_bandwidth_and_latency():
    cost = CostEstimate(*_specs())
    assert cost.expert_load_s == pytest.approx(0.05 + 1000 / 1e4)
    assert cost.load_s(3) == pytest.approx(3 * 0.15)
    assert cost.predictor_s == 0.3


def test_cost_estimate_scales_toward_observed_step_times():
    cost = CostEstimate(*_specs(), smoothing=0.5)
    cost.observe_step(100, 4, 1, seconds=2 * cost.modelled_step_s(100, 4))
    assert cost.scale == pytest.approx(1.5)
    assert cost.c_decode == pytest.approx(0.0015)
    assert cost.iteration_overhead_s == pytest.approx(0.015)
    # a macro step of 3 iterations counts as 3 observations of its mean ratio: as an engine
    # stepping singly would have folded them in
    cost.observe_step(0, 4, 3, seconds=2 * 3 * cost.modelled_step_s(0, 4))
    singly = CostEstimate(*_specs(), smoothing=0.5)
    singly.observe_step(100, 4, 1, seconds=2 * singly.modelled_step_s(100, 4))
    for _ in range(3):
        singly.observe_step(0, 4, 1, seconds=2 * singly.modelled_step_s(0, 4))
    assert cost.scale == pytest.approx(singly.scale) == pytest.approx(1.9375)


def test_decode_targets_follow_g_and_the_tpot_slo():
    t = DecodeTargets()
    t.join("a", join_iter=0, expected_output=4, first_token_at=1.0, tpot_s=0.1)
    t.join("b", join_iter=2, expected_output=20, first_token_at=2.0, tpot_s=0.5)
    t.join("c", join_iter=2, expected_output=8, first_token_at=2.0, tpot_s=0.5)
    t.leave("a")
    t.join("a", join_iter=0, expected_output=4, first_token_at=1.0, tpot_s=0.1)
    t.leave("b")
    assert len(t) == 2
    remaining, targets = t.at(iterations=2)
    # c: 1 token, G = 7, target 2 + 0.5 * 7; a: 3 tokens, G = 1, target 1 + 0.1 * 3
    np.testing.assert_allclose(remaining, [7, 1])
    np.testing.assert_allclose(targets, [5.5, 1.3])
    remaining, targets = t.at(iterations=10)
    # a: 11 tokens, G rests at 0.2, target moves on with every token: 1 + 0.1 * (11 + 0.2 - 1)
    # c: 9 tokens of 8 expected, G rests at 0.4
    np.testing.assert_allclose(remaining, [0.4, 0.2])
    np.testing.assert_allclose(targets, [2 + 0.5 * 8.4, 1 + 0.1 * 10.2])


def test_decode_targets_grow_past_their_initial_capacity():
    t = DecodeTargets()
    for i in range(200):
        t.join(str(i), join_iter=i, expected_output=10, first_token_at=0.0, tpot_s=1.0)
    for i in range(0, 200, 2):
        t.leave(str(i))
    remaining, _ = t.at(iterations=200)
    # odd i left; generated 201 - i, so G = i - 191 for i = 193 .. 199, else the floor 0.5
    assert sorted(remaining.tolist()) == [0.5] * 96 + [2.0, 4.0, 6.0, 8.0]


def test_eq2_spreads_input_tokens_by_prompt_routing_and_output_by_generated_routing():
    demand = {"qa": TaskDemand(requests=2, input_tokens=30, expected_output_tokens=5)}
    prefill = {"qa": np.array([[1.0, 0.0]])}
    decode = {"qa": np.array([[0.0, 1.0]])}
    scores = expected_expert_tokens(demand, prefill, {"qa": np.array([0.5])}, (1, 2), decode)
    # 30 input tokens on expert 0, 2 x 5 output tokens on expert 1, times s = 0.5
    np.testing.assert_allclose(scores, [[15.0, 5.0]])


def test_the_loops_work_at_a_macro_steps_end_belongs_to_its_last_iteration():
    """``last_s``: of a macro step's seconds, the loop's work at its end (new requests
    accepted), which an engine stepping singly would have seen in its last step alone."""
    cost = CostEstimate(*_specs(), smoothing=0.5)
    one = cost.modelled_step_s(0, 4)
    cost.observe_step(0, 4, 3, seconds=3 * 2 * one + 0.004, last_s=0.004)
    singly = CostEstimate(*_specs(), smoothing=0.5)
    for extra in (0.0, 0.0, 0.004):
        singly.observe_step(0, 4, 1, seconds=2 * one + extra)
    assert cost.scale == pytest.approx(singly.scale)
    spread = CostEstimate(*_specs(), smoothing=0.5)  # the same seconds as the mean ratio
    spread.observe_step(0, 4, 3, seconds=3 * 2 * one + 0.004)
    assert spread.scale < cost.scale
    alone = CostEstimate(*_specs(), smoothing=0.5)  # a single step: all of it is its own
    alone.observe_step(0, 4, 1, seconds=2 * one + 0.004, last_s=0.004)
    assert alone.scale == pytest.approx((1.0 + (2 * one + 0.004) / one) / 2)
