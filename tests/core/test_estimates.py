import numpy as np
import pytest

from emoe.core.estimates import (CostEstimate, TaskDemand, expected_expert_tokens,
                                 remaining_tokens, top_experts)
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


def test_remaining_tokens_counts_down_then_floors_at_five_percent():
    assert remaining_tokens(100, 30) == 70
    assert remaining_tokens(100, 100) == pytest.approx(5.0)
    assert remaining_tokens(100, 250) == pytest.approx(5.0)


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
    modelled = cost.modelled_step_s(100, 4) + 2 * cost.modelled_step_s(0, 4)
    cost.observe_step(100, 4, 3, compute_s=2 * modelled)
    assert cost.scale == pytest.approx(1.5)
    assert cost.c_decode == pytest.approx(0.0015)
    assert cost.iteration_overhead_s == pytest.approx(0.015)
    cost.observe_step(100, 4, 3, compute_s=2 * modelled)
    assert cost.scale == pytest.approx(1.75)
