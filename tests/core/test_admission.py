"""Algorithm 1 (as corrected in docs/scheduler.md) with hand-computed Eq. 3 values."""

import dataclasses

import numpy as np
import pytest

from emoe.core.estimates import CostEstimate
from emoe.core.metrics import AdmissionCounters
from emoe.core.plan import StepPlan, StepResult
from emoe.core.policies import BatchEstimate
from emoe.core.policy_file import PolicyConfig
from emoe.core.scheduler import Scheduler
from emoe.core.specs import HardwareSpec, ModelSpec

from tests.core.loop import TINY_GPU, TINY_MODEL, make_request

FLAT = HardwareSpec("flat", gpu_memory_bytes=10**6, pcie_bandwidth_bytes_per_s=100.0,
                    pcie_latency_s=0.0, step_overhead_s=0.0, prefill_s_per_token=0.01,
                    decode_s_per_token=0.01, predictor_s=0.5)
MODEL = ModelSpec("m", 2, 2, 1, 10, 10, 1)


def estimate(now, load_s, members):
    """A BatchEstimate over (G, target) pairs."""
    remaining, targets = zip(*members)
    return BatchEstimate(now, CostEstimate(MODEL, FLAT), load_s, remaining, targets)


def batch(load_s=0.0):
    # A: G = 10, must finish within 3 s; B: G = 20, loose. Now: A needs 10*2*0.01 = 0.2 s.
    return estimate(0.0, load_s, [(10.0, 3.0), (20.0, 100.0)])


def test_admits_when_no_running_request_would_miss():
    # A: 200*0.01 + 10*(2*0.01) = 2.2 <= 3 (the candidate, G = 5, finishes before A)
    assert batch().protects_slos_with(remaining=5, input_tokens=200)


def test_refuses_when_a_running_request_would_miss():
    # A: 300*0.01 + 0.2 = 3.2 > 3
    assert not batch().protects_slos_with(remaining=5, input_tokens=300)


def test_longer_candidate_adds_to_n_i():
    # candidate G = 50 outlives A, so n_A = 3: 269*0.01 + 10*3*0.01 = 2.99 <= 3; 271 -> 3.01
    # (with n_A = 2, 271 would pass: 2.71 + 0.2)
    assert batch().protects_slos_with(remaining=50, input_tokens=269)
    assert not batch().protects_slos_with(remaining=50, input_tokens=271)


def test_expert_loading_latency_counts():
    # dE = 1: 1 + 2 + 0.2 = 3.2 > 3
    assert not batch(load_s=1.0).protects_slos_with(remaining=5, input_tokens=200)


def test_a_request_already_missing_its_slo_does_not_block():
    # alone, the member needs 10 * 0.01 = 0.1 s
    b = estimate(0.0, 0.0, [(10.0, 0.1)])  # just on time
    assert not b.protects_slos_with(remaining=5, input_tokens=10**6)
    b = estimate(0.0, 0.0, [(10.0, 0.09)])  # late already
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
                     tpot=0.02)
    s.add_request(a)
    plan = s.next_step(0.0)
    s.on_step_done(StepResult(0.0, 0.02))
    assert a.first_token_at == 0.02
    # A: G = 99, target 0.02 + 0.02*99 = 2.0; alone it needs 99*(0.01 + 0.001) = 1.089 s:
    # margin 2.0 - 0.02 - 1.089 = 0.891.
    # b (tightest deadline): 1000 prompt tokens -> 1.0 > 0.891: skipped.
    # c (G = 32, finishes before A): 10 tokens -> 0.01 fits.
    s.add_request(make_request("b", 0.02, input_tokens=1000, ttft=0.1))
    s.add_request(make_request("c", 0.02, input_tokens=10, ttft=0.2))
    plan = s.next_step(0.02)
    assert [c.request_id for c in plan.prefill] == ["c"]
    assert plan.decode == ["a"]
    assert s.num_waiting == 1
    assert plan.deferred == 1 and plan.slowdown == s.cost.scale == 1.0  # what it costed b with


def test_fcfs_admits_the_same_request_regardless_of_slos():
    s = Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(scheduling="fcfs", planner="all"))
    s.add_request(make_request("a", 0.0, input_tokens=10, output_tokens=200, ttft=0.5, tpot=0.01))
    s.next_step(0.0)
    s.on_step_done(StepResult(0.0, 0.02))
    s.add_request(make_request("b", 0.02, input_tokens=1000, ttft=0.1))
    plan = s.next_step(0.02)
    assert [c.request_id for c in plan.prefill] == ["b"]
    assert plan.deferred == 0 and plan.slowdown is None  # fcfs costs nothing


def test_admission_counters_weigh_eq3s_slowdown_by_the_seconds_of_its_steps():
    counters = AdmissionCounters()
    counters.record(StepPlan(deferred=2, slowdown=1.5), 0.1)
    counters.record(StepPlan(deferred=1, slowdown=2.0), 0.3)
    counters.record(StepPlan(), 0.5)  # no estimate: not in the slowdown
    earlier = dataclasses.replace(counters)
    counters.record(StepPlan(deferred=4, slowdown=3.0), 0.2)
    assert counters.deferred == 7
    assert counters.slowdown == pytest.approx((1.5 * 0.1 + 2.0 * 0.3 + 3.0 * 0.2) / 0.6)
    later = counters.since(earlier)
    assert (later.deferred, later.slowdown) == (4, pytest.approx(3.0))
    assert AdmissionCounters().slowdown is None


@pytest.mark.parametrize("scheduling", ["fcfs", "emoe"])
def test_nothing_running_admits_anything_that_fits(scheduling):
    s = Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(scheduling=scheduling, planner="all"))
    s.add_request(make_request("a", 0.0, input_tokens=3000, ttft=0.001))
    assert s.next_step(0.0).prefill


@pytest.mark.parametrize("deadline, admitted", [(4.6 + 1e-9, True), (4.59, False)])
def test_eq3_in_the_papers_form(deadline, admitted):
    # running i arrived at 0, now 2 (r_i = 2), G_i = 20, n_i = 3 (itself and two that outlive it)
    # t_i = dE + (W + n_i G_i) c + r_i = 1 + (100 + 3*20) * 0.01 + 2 = 4.6
    b = estimate(2.0, 1.0, [(20.0, deadline), (30.0, 1e9), (40.0, 1e9)])
    assert b.protects_slos_with(remaining=5, input_tokens=100) is admitted


def eq3_by_hand(now, cost, load_s, members, new_input_tokens, remaining, input_tokens):
    """Eq. 3 member by member, straight from its definition."""
    delay = load_s + (new_input_tokens + input_tokens) * cost.c_prefill
    for g, target in members:
        n = sum(other >= g for other, _ in members)
        if now + g * (cost.iteration_overhead_s + n * cost.c_decode) > target:
            continue  # misses its target already
        n += remaining >= g
        if now + delay + g * (cost.iteration_overhead_s + n * cost.c_decode) > target + 1e-12:
            return False
    return True


def test_batch_estimate_agrees_with_eq3_member_by_member():
    rng = np.random.default_rng(11)
    hw = HardwareSpec("h", 10**6, 100.0, 0.0, step_overhead_s=0.003, prefill_s_per_token=1e-4,
                      decode_s_per_token=2e-4, predictor_s=0.3)
    cost = CostEstimate(MODEL, hw)
    disagreements = decisions = 0
    for _ in range(300):
        now, load_s = float(rng.uniform(0, 10)), float(rng.choice([0.0, 0.05, 0.4]))
        size = int(rng.integers(0, 30))
        members = [(float(rng.choice([rng.integers(1, 200), 0.4, 9.6])),
                    now + float(rng.uniform(-1, 3))) for _ in range(size)]
        b = BatchEstimate(now, cost, load_s, [g for g, _ in members], [t for _, t in members])
        admitted_inputs = 0
        for _ in range(4):
            remaining, inputs = float(rng.integers(1, 200)), int(rng.integers(1, 3000))
            expected = eq3_by_hand(now, cost, load_s, members, admitted_inputs, remaining, inputs)
            got = b.protects_slos_with(remaining, inputs)
            decisions += expected
            disagreements += got != expected
            if got:
                target = now + float(rng.uniform(0, 3))
                b.add(remaining, target, inputs)
                members.append((remaining, target))
                admitted_inputs += inputs
    assert disagreements == 0
    assert 100 < decisions < 1100  # both outcomes are exercised


def test_the_lower_bound_admits_only_what_eq3_admits():
    # Loose targets: every member meets its own, so the bound (no sort) decides most checks;
    # tight delays (long prompts) leave the rest to the exact path. Both must agree with Eq. 3.
    rng = np.random.default_rng(5)
    hw = HardwareSpec("h", 10**6, 100.0, 0.0, step_overhead_s=0.003, prefill_s_per_token=1e-4,
                      decode_s_per_token=2e-4, predictor_s=0.3)
    cost = CostEstimate(MODEL, hw)
    by_bound = by_sort = 0
    for _ in range(300):
        now = float(rng.uniform(0, 10))
        size = int(rng.integers(1, 40))
        members = [(float(rng.integers(1, 200)), now + float(rng.uniform(1.5, 4)))
                   for _ in range(size)]
        b = BatchEstimate(now, cost, 0.0, [g for g, _ in members], [t for _, t in members])
        admitted_inputs = 0
        for _ in range(3):
            remaining, inputs = float(rng.integers(1, 200)), int(rng.integers(1, 12000))
            expected = eq3_by_hand(now, cost, 0.0, members, admitted_inputs, remaining, inputs)
            got = b.protects_slos_with(remaining, inputs)
            assert got == expected
            if b._sorted is None:
                by_bound += 1
            else:
                by_sort += 1
            if got:
                target = now + float(rng.uniform(1.5, 4))
                b.add(remaining, target, inputs)
                members.append((remaining, target))
                admitted_inputs += inputs
    assert by_bound > 100 and by_sort > 100


def test_a_decoding_requests_target_is_its_tpot_slo_from_its_first_token():
    s = Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(scheduling="emoe", planner="all"))
    # expected 4 tokens but runs on: once G rests at its floor (0.2), the target moves on by
    # tpot per token, so a request that keeps its TPOT keeps being protected
    a = make_request("a", 0.0, input_tokens=10, output_tokens=500, expected=4, ttft=0.5,
                     tpot=0.02)
    s.add_request(a)
    s.next_step(0.0)
    s.on_step_done(StepResult(0.0, 0.02))
    s.next_step(0.02)
    s.on_step_done(StepResult(0.02, 2.0, iterations=99))  # 100 tokens at 0.02 s each
    # target 0.02 + 0.02 * (100 + 0.2 - 1) = 2.004; margin 2.004 - 2.0 - 0.2 * 0.011 = 0.0018
    s.add_request(make_request("b", 2.0, input_tokens=10, ttft=5.0))  # delay 0.01: refused
    plan = s.next_step(2.0)
    # refused by Eq. 3 while it fits: margins move every iteration, so the next one re-checks
    assert plan.prefill == [] and plan.iterations == 1
    s.on_step_done(StepResult(2.0, 2.01))  # a token in 0.01 s: the target moves on by 0.02
    # margin 2.024 - 2.01 - 0.2 * 0.011 = 0.0118 >= 0.01
    assert [c.request_id for c in s.next_step(2.01).prefill] == ["b"]


@pytest.mark.parametrize("scheduling, order", [("emoe", ["on-time", "late"]),
                                               ("edf", ["late", "on-time"])])
def test_emoe_serves_requests_that_can_still_meet_their_ttft_first(scheduling, order):
    s = Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(scheduling=scheduling, planner="all",
                                                     max_num_seqs=1))
    s.add_request(make_request("first", 0.0, output_tokens=100, expected=100))
    s.next_step(0.0)
    s.on_step_done(StepResult(0.0, 0.1))
    s.add_request(make_request("late", 0.1, ttft=0.5))      # deadline 0.6
    s.add_request(make_request("on-time", 0.2, ttft=5.0))   # deadline 5.2
    s.next_step(0.1)
    s.on_step_done(StepResult(0.1, 1.0, iterations=99))     # "first" ends at 1.0
    admitted, now = [], 1.0
    while s.has_work:
        plan = s.next_step(now)
        admitted += [c.request_id for c in plan.prefill]
        s.on_step_done(StepResult(now, now + 0.1, iterations=plan.iterations))
        now += 0.1
    assert admitted == order
