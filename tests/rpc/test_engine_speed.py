"""A served engine's steps against its profile's step model (GetStats engine_speed)."""

from __future__ import annotations

import pytest

from emoe.core.plan import PrefillChunk, RequestStepOutput, StepPlan, StepResult
from emoe.core.profile import HandlerOverhead, ServingCosts, StepTimes, attended_pairs
from emoe.rpc.engine_speed import EngineSpeed, fetch_cost_s

STEPS = StepTimes(tokens=(1, 64, 256), seconds=(1e-3, 4e-3, 16e-3), per_decode_s=5e-5,
                  per_context_token_s=2e-7, per_pair_s=1e-8, per_chunk_s=5e-4)
HANDLER = HandlerOverhead(step_s=1e-4, decode_s=1e-5, prefill_token_s=1e-6)
SERVING = ServingCosts(step_s=1e-3, token_s=2e-4, ingress_s=1e-3, egress_s=5e-4,
                       engine_scale=1.1)


def plan() -> StepPlan:
    return StepPlan(prefill=[PrefillChunk("a", 10, 20), PrefillChunk("b", 0, 30)],
                    decode=["c", "d"])


def test_a_step_is_costed_by_its_chunks_decodes_context_and_the_handler():
    pairs = attended_pairs(10, 20) + attended_pairs(0, 30)
    expected = STEPS.step_s(52, 2, 70, pairs, 2)
    assert EngineSpeed(STEPS).profiled(plan(), 70) == pytest.approx(expected)
    assert EngineSpeed(STEPS, HANDLER).profiled(plan(), 70) == pytest.approx(
        expected + HANDLER.seconds(50, 2))
    decode_only = StepPlan(decode=["c"])
    assert EngineSpeed(STEPS).profiled(decode_only, 40) == pytest.approx(STEPS.step_s(1, 1, 40))


def test_steps_that_fetched_on_a_miss_are_summed_apart_and_give_the_fetch_cost():
    speed = EngineSpeed(STEPS)
    modelled = speed.profiled(plan(), 70)
    speed.observe(plan(), StepResult(0.0, 0.0, compute_s=1.5 * modelled), 70, 0.0)
    speed.observe(plan(), StepResult(0.0, 0.0, compute_s=0.0), 70, 0.0)  # nothing ran
    fetched = [(0, 1), (1, 3)]  # two experts, 400 us each beyond the step at that speed
    speed.observe(plan(), StepResult(0.0, 0.0, compute_s=1.5 * modelled + 8e-4,
                                     fetched_on_miss=fetched), 70, 0.0)
    assert (speed.counted, speed.fetch_steps, speed.fetched) == (1, 1, 2)
    ratio = speed.compute_s / speed.profiled_s
    assert ratio == pytest.approx(1.5)
    assert fetch_cost_s(ratio, speed.fetched, speed.fetch_compute_s,
                        speed.fetch_profiled_s) == pytest.approx(4e-4)
    assert fetch_cost_s(ratio, 0, 0.0, 0.0) is None


def test_the_loop_cycles_against_the_profiles_model_of_them():
    """A cycle runs from a step's start to the next one's while the loop goes straight on;
    its model is the profile's: engine_scale x the step model + step_s + token_s per token
    the step streamed. A cycle that the loop idled in, or that a fetch on a miss or a failed
    step ended, is not counted."""
    speed = EngineSpeed(STEPS, serving=SERVING)
    decode = StepPlan(decode=["c", "d"])
    tokens = [RequestStepOutput("c", new_tokens=1), RequestStepOutput("d", new_tokens=1)]
    modelled = 1.1 * speed.profiled(decode, 70) + 1e-3 + 2 * 2e-4

    def step(started: float, **result) -> None:
        speed.observe(decode, StepResult(started, started, compute_s=1e-3, outputs=tokens,
                                         **result), 70, started)

    step(10.0)
    step(10.0 + 1.2 * modelled)  # went straight on: one cycle, 1.2x its model
    speed.idle()                  # nothing to run: the open cycle is not counted
    step(20.0)
    step(20.0 + 1.4 * modelled, fetched_on_miss=[(0, 1)])  # ends the cycle from 20.0
    step(30.0)                    # the fetch step opened none
    assert speed.cycles == 2
    assert speed.cycle_s == pytest.approx(2.6 * modelled)
    assert speed.cycle_profiled_s == pytest.approx(2 * modelled)
    speed.idle()
    assert EngineSpeed(STEPS).cycles == 0  # without the profile's serving costs, no cycles


def test_cycles_of_steps_that_ran_a_prompt_chunk_are_also_summed_apart():
    speed = EngineSpeed(STEPS, serving=SERVING)
    decode = StepPlan(decode=["c", "d"])
    tokens = [RequestStepOutput("c", new_tokens=1), RequestStepOutput("d", new_tokens=1)]
    prefill_model = speed.serving.cycle_s(speed.profiled(plan(), 70), 2)
    decode_model = speed.serving.cycle_s(speed.profiled(decode, 70), 2)
    speed.observe(plan(), StepResult(0.0, 0.0, compute_s=1e-3, outputs=tokens), 70, 0.0)
    t = 1.3 * prefill_model
    speed.observe(decode, StepResult(t, t, compute_s=1e-3, outputs=tokens), 70, t)
    speed.observe(decode, StepResult(t, t, compute_s=1e-3, outputs=tokens), 70,
                  t + 0.9 * decode_model)
    assert (speed.cycles, speed.prefill_cycles) == (2, 1)
    assert speed.prefill_cycle_s / speed.prefill_cycle_profiled_s == pytest.approx(1.3)
    decode_s = speed.cycle_s - speed.prefill_cycle_s
    assert decode_s / (speed.cycle_profiled_s - speed.prefill_cycle_profiled_s) == \
        pytest.approx(0.9)


def test_prompt_step_cycles_are_summed_by_their_tokens_in_the_tables_segments():
    """Segment i holds the prompt steps of more than tokens[i - 1] and up to tokens[i] prompt
    tokens of the profile's table (1, 64, 256), the last one those past it."""
    speed = EngineSpeed(STEPS, serving=SERVING)
    assert speed.prefill_segment_tokens == (1, 64, 256)
    decode = StepPlan(decode=["c"])
    out = [RequestStepOutput("c", new_tokens=1)]
    t, modelled = 0.0, {}
    for prompt, multiple in ((64, 1.2), (65, 1.5), (300, 2.0), (50, 1.0)):
        step = StepPlan(prefill=[PrefillChunk("p", 0, prompt)], decode=["c"])
        speed.observe(step, StepResult(t, t, compute_s=1e-3, outputs=out), 10, t)
        modelled[prompt] = speed.serving.cycle_s(speed.profiled(step, 10), 1)
        t += multiple * modelled[prompt]
        speed.observe(decode, StepResult(t, t, compute_s=1e-3, outputs=out), 10, t)
        t += 0.01
        speed.idle()
    cycles, models = speed.prefill_segment_cycle_s, speed.prefill_segment_cycle_profiled_s
    assert models == pytest.approx([0.0, modelled[64] + modelled[50], modelled[65],
                                    modelled[300]])
    assert cycles == pytest.approx([0.0, 1.2 * modelled[64] + modelled[50],
                                    1.5 * modelled[65], 2.0 * modelled[300]])
    assert sum(cycles) == pytest.approx(speed.prefill_cycle_s)
    assert sum(models) == pytest.approx(speed.prefill_cycle_profiled_s)


def test_each_cycles_log_ratio_is_summed_with_its_square_and_consecutive_products():
    """The sums the simulator's step scatter is measured from: log(cycle / model), its square
    and, over consecutive cycles of one kind, their product; a cycle of the other kind or
    an idle loop between two breaks the pair."""
    import math

    speed = EngineSpeed(STEPS, serving=SERVING)
    decode = StepPlan(decode=["c", "d"])
    tokens = [RequestStepOutput("c", new_tokens=1), RequestStepOutput("d", new_tokens=1)]
    prefill_model = speed.serving.cycle_s(speed.profiled(plan(), 70), 2)
    decode_model = speed.serving.cycle_s(speed.profiled(decode, 70), 2)
    t = 0.0
    # the step at t, then how long its cycle ran against its model (None: the loop idles)
    for step, ratio in ((decode, 1.2), (decode, 0.9), (plan(), 1.5), (decode, 1.1),
                        (decode, None), (decode, 1.3), (decode, 0.8)):
        speed.observe(step, StepResult(t, t, compute_s=1e-3, outputs=tokens), 70, t)
        if ratio is None:
            speed.idle()
            t += 1.0
        else:
            t += ratio * (prefill_model if step.prefill else decode_model)
    speed.observe(decode, StepResult(t, t, compute_s=1e-3, outputs=tokens), 70, t)
    logs = [math.log(r) for r in (1.2, 0.9, 1.5, 1.1, 1.3, 0.8)]
    assert speed.cycles == 6 and speed.prefill_cycles == 1
    assert speed.cycle_log_sum == pytest.approx(sum(logs))
    assert speed.cycle_log_sq_sum == pytest.approx(sum(x * x for x in logs))
    assert speed.prefill_cycle_log_sum == pytest.approx(logs[2])
    assert speed.prefill_cycle_log_sq_sum == pytest.approx(logs[2] ** 2)
    # decode pairs: 1.2 -> 0.9 and 1.3 -> 0.8 (the prefill cycle and the idle loop break)
    assert speed.cycle_lag_pairs == 2 and speed.prefill_cycle_lag_pairs == 0
    assert speed.cycle_lag_sum == pytest.approx(logs[0] * logs[1] + logs[4] * logs[5])


def test_decode_only_cycles_sum_their_tokens_for_a_line_on_them():
    """A decode-only cycle adds n (the tokens its step streamed), n^2, n x cycle and n x its
    model; a cycle that ran a prompt chunk adds none of them."""
    speed = EngineSpeed(STEPS, serving=SERVING)
    t = 0.0
    cycles = []
    for step, n, ratio in ((plan(), 2, 1.3), (StepPlan(decode=["c", "d", "e"]), 3, 1.1),
                           (StepPlan(decode=["c"]), 1, 0.9)):
        tokens = [RequestStepOutput(r, new_tokens=1) for r in "cde"[:n]]
        model = speed.serving.cycle_s(speed.profiled(step, 70), n)
        speed.observe(step, StepResult(t, t, compute_s=1e-3, outputs=tokens), 70, t)
        cycles.append((bool(step.prefill), n, ratio * model, model))
        t += ratio * model
    speed.observe(StepPlan(decode=["c"]), StepResult(t, t, compute_s=1e-3), 70, t)
    decode = [(n, c, m) for prefill, n, c, m in cycles if not prefill]
    assert speed.decode_streamed == 4 and speed.decode_streamed_sq == 10
    assert speed.decode_cycle_streamed == pytest.approx(sum(n * c for n, c, _ in decode))
    assert speed.decode_model_streamed == pytest.approx(sum(n * m for n, _, m in decode))


def test_cycles_in_which_the_loop_accepted_requests_are_summed_apart():
    """Requests handed to the scheduler before a step arrived during the cycle that step's
    start closes: that cycle is summed apart with them (of prefill cycles apart too); an idle
    loop forgets what it accepted, as it forgets its open cycle."""
    speed = EngineSpeed(STEPS, serving=SERVING)
    decode = StepPlan(decode=["c", "d"])
    tokens = [RequestStepOutput("c", new_tokens=1), RequestStepOutput("d", new_tokens=1)]
    decode_model = speed.serving.cycle_s(speed.profiled(decode, 70), 2)
    prefill_model = speed.serving.cycle_s(speed.profiled(plan(), 70), 2)

    def step(step_plan, t):
        speed.observe(step_plan, StepResult(t, t, compute_s=1e-3, outputs=tokens), 70, t)

    step(decode, 0.0)
    speed.accepted(2)                       # during the decode cycle from 0.0
    step(plan(), 1.5 * decode_model)        # closes it: an arrival cycle with 2 requests
    step(decode, 1.5 * decode_model + prefill_model)  # the prefill cycle: none accepted
    speed.idle()
    speed.accepted(1)                       # while idle: no cycle to charge
    step(plan(), 10.0)
    speed.accepted(3)
    step(decode, 10.0 + 1.2 * prefill_model)  # closes the prefill cycle with 3 requests
    assert (speed.arrivals, speed.arrival_cycles, speed.prefill_arrivals) == (5, 2, 3)
    assert speed.arrival_cycle_s == pytest.approx(1.5 * decode_model + 1.2 * prefill_model)
    assert speed.arrival_cycle_profiled_s == pytest.approx(decode_model + prefill_model)


def test_cycles_of_steps_that_fetched_on_a_miss_are_summed_apart_with_their_fetches():
    """A fetch step's cycle (its model without the fetches) goes to ``fetch_cycle_*`` with the
    experts it fetched and the requests accepted during it (of prompt steps apart too), and to
    none of the sums of the cycles without a fetch."""
    speed = EngineSpeed(STEPS, serving=SERVING)
    decode = StepPlan(decode=["c", "d"])
    tokens = [RequestStepOutput("c", new_tokens=1), RequestStepOutput("d", new_tokens=1)]
    decode_model = speed.serving.cycle_s(speed.profiled(decode, 70), 2)
    prefill_model = speed.serving.cycle_s(speed.profiled(plan(), 70), 2)

    def step(step_plan, t, fetched=()):
        speed.observe(step_plan, StepResult(t, t, compute_s=1e-3, outputs=tokens,
                                            fetched_on_miss=list(fetched)), 70, t)

    step(decode, 0.0)
    step(decode, 1.0 * decode_model, [(0, 1), (1, 2)])  # closes a plain decode cycle
    speed.accepted(2)
    step(plan(), 2.0 * decode_model + 1e-3, [(0, 3), (1, 3), (2, 3)])  # closes the fetch one
    step(decode, 2.0 * decode_model + 1e-3 + prefill_model + 3e-3)  # closes the prompt one
    assert (speed.cycles, speed.prefill_cycles) == (1, 0)
    assert speed.cycle_s == pytest.approx(decode_model)
    assert speed.arrivals == 0
    assert speed.fetch_cycle_s == pytest.approx(decode_model + 1e-3 + prefill_model + 3e-3)
    assert speed.fetch_cycle_profiled_s == pytest.approx(decode_model + prefill_model)
    assert (speed.fetch_cycle_fetched, speed.fetch_cycle_arrivals) == (5, 2)
    assert speed.prefill_fetch_cycle_s == pytest.approx(prefill_model + 3e-3)
    assert speed.prefill_fetch_cycle_profiled_s == pytest.approx(prefill_model)
    assert (speed.prefill_fetch_cycle_fetched, speed.prefill_fetch_cycle_arrivals) == (3, 0)
    assert (speed.fetch_steps, speed.fetched, speed.counted) == (2, 5, 2)
