"""Algorithm 1 (as corrected in docs/scheduler.md) with hand-computed Eq. 3 values."""

import pytest

from emoe.core.estimates import CostEstimate
from emoe.core.plan import StepResult
from emoe.core.policies import BatchEstimate
from emoe.core.policy_file import PolicyConfig
from emoe.core.scheduler import Scheduler
from emoe.core.specs import HardwareSpec, ModelSpec

from tests.core.loop import TINY_GPU, TINY_MODEL, make_request

FLAT = HardwareSpec("flat", gpu_memory_bytes=10**6, pcie_bandwidth_bytes_per_s=100.0,
                    pcie_latency_s=0.0, step_overhead_s=0.0, prefill_s_per_token=0.01,
                    decode_s_per_token=0.01, predictor_s=0.5)
MODEL = ModelSpec("m", 2, 2, 1, 10, 10, 1)


def batch(load_s=0.0):
    # A: G = 10, must finish within 3 s; B: G = 20, loose. Now: A needs 10*2*0.01 = 0.2 s.
    return BatchEstimate(0.0, CostEstimate(MODEL, FLAT), load_s, [(10.0, 3.0), (20.0, 100.0)])


def test_admits_when_no_running_request_would_miss():
    # A: 200*0.01 + 10*(2*0.01) = 2.2 <= 3 (the candidate, G = 5, finishes before A)
    assert batch().protects_slos_with(remaining=5, input_tokens=200)


def test_refuses_when_a_running_request_would_miss():
    # A: 300*0.01 + 0.2 = 3.2 > 3
    assert not batch().protects_slos_with(remaining=5, input_tokens=300)


def test_longer_candidate_adds_to_n_i():
    # candidate G = 50 outlives A, so n_A = 3: 270*0.01 + 10*3*0.01 = 3.0 <= 3; 271 -> 3.01
    assert batch().protects_slos_with(remaining=50, input_tokens=270)
    assert not batch().protects_slos_with(remaining=50, input_tokens=271)


def test_expert_loading_latency_counts():
    # dE = 1: 1 + 2 + 0.2 = 3.2 > 3
    assert not batch(load_s=1.0).protects_slos_with(remaining=5, input_tokens=200)


def test_a_request_already_missing_its_slo_does_not_block():
    # alone, the member needs 10 * 0.01 = 0.1 s
    b = BatchEstimate(0.0, CostEstimate(MODEL, FLAT), 0.0, [(10.0, 0.1)])  # just on time
    assert not b.protects_slos_with(remaining=5, input_tokens=10**6)
    b = BatchEstimate(0.0, CostEstimate(MODEL, FLAT), 0.0, [(10.0, 0.09)])  # late already
    assert b.protects_slos_with(remaining=5, input_tokens=10**6)


def test_requests_admitted_in_the_same_step_add_their_input_tokens():
    b = batch()
    assert b.protects_slos_with(remaining=5, input_tokens=150)
    b.add(5.0, 100.0, 150)
    # both candidates finish before A (n_A = 2): A needs (150 + W)*0.01 + 0.2 <= 3
    assert not b.protects_slos_with(remaining=5, input_tokens=150)
    assert b.protects_slos_with(remaining=5, input_tokens=50)


def test_scheduler_skips_a_request_that_would_break_an_slo_and_admits_the_next():
    s = Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(scheduling="emoe", planner="all"))
    a = make_request("a", 0.0, input_tokens=10, output_tokens=200, expected=100, ttft=0.5,
                     tpot=0.01)
    s.add_request(a)
    plan = s.next_step(0.0)
    s.on_step_done(StepResult(0.0, 0.02))
    assert a.first_token_at == 0.02
    # A: G = 99, deadline 0.5 + 99*0.01 = 1.49; alone it needs 99*(0.01 + 0.001) = 1.089 s.
    # b (tightest deadline): 1000 prompt tokens -> 1.0 + 1.089 > 1.47 of slack: skipped.
    # c: 10 tokens -> 0.01 + 1.089 fits.
    s.add_request(make_request("b", 0.02, input_tokens=1000, ttft=0.1))
    s.add_request(make_request("c", 0.02, input_tokens=10, ttft=0.2))
    plan = s.next_step(0.02)
    assert [c.request_id for c in plan.prefill] == ["c"]
    assert plan.decode == ["a"]
    assert s.num_waiting == 1


def test_fcfs_admits_the_same_request_regardless_of_slos():
    s = Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(scheduling="fcfs", planner="all"))
    s.add_request(make_request("a", 0.0, input_tokens=10, output_tokens=200, ttft=0.5, tpot=0.01))
    s.next_step(0.0)
    s.on_step_done(StepResult(0.0, 0.02))
    s.add_request(make_request("b", 0.02, input_tokens=1000, ttft=0.1))
    assert [c.request_id for c in s.next_step(0.02).prefill] == ["b"]


@pytest.mark.parametrize("scheduling", ["fcfs", "emoe"])
def test_nothing_running_admits_anything_that_fits(scheduling):
    s = Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(scheduling=scheduling, planner="all"))
    s.add_request(make_request("a", 0.0, input_tokens=3000, ttft=0.001))
    assert s.next_step(0.0).prefill


@pytest.mark.parametrize("deadline, admitted", [(4.6 + 1e-9, True), (4.59, False)])
def test_eq3_in_the_papers_form(deadline, admitted):
    # running i arrived at 0, now 2 (r_i = 2), G_i = 20, n_i = 3 (itself and two that outlive it)
    # t_i = dE + (W + n_i G_i) c + r_i = 1 + (100 + 3*20) * 0.01 + 2 = 4.6
    b = BatchEstimate(2.0, CostEstimate(MODEL, FLAT), 1.0,
                      [(20.0, deadline), (30.0, 1e9), (40.0, 1e9)])
    assert b.protects_slos_with(remaining=5, input_tokens=100) is admitted
