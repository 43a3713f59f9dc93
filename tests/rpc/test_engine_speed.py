"""A served engine's steps against its profile's step model (GetStats engine_speed)."""

from __future__ import annotations

import pytest

from emoe.core.plan import PrefillChunk, StepPlan, StepResult
from emoe.core.profile import HandlerOverhead, StepTimes, attended_pairs
from emoe.rpc.engine_speed import EngineSpeed, fetch_cost_s

STEPS = StepTimes(tokens=(1, 64, 256), seconds=(1e-3, 4e-3, 16e-3), per_decode_s=5e-5,
                  per_context_token_s=2e-7, per_pair_s=1e-8, per_chunk_s=5e-4)
HANDLER = HandlerOverhead(step_s=1e-4, decode_s=1e-5, prefill_token_s=1e-6)


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
    speed.observe(plan(), StepResult(0.0, 0.0, compute_s=1.5 * modelled), 70)
    speed.observe(plan(), StepResult(0.0, 0.0, compute_s=0.0), 70)  # nothing ran
    fetched = [(0, 1), (1, 3)]  # two experts, 400 us each beyond the step at that speed
    speed.observe(plan(), StepResult(0.0, 0.0, compute_s=1.5 * modelled + 8e-4,
                                     fetched_on_miss=fetched), 70)
    assert (speed.counted, speed.fetch_steps, speed.fetched) == (1, 1, 2)
    ratio = speed.compute_s / speed.profiled_s
    assert ratio == pytest.approx(1.5)
    assert fetch_cost_s(ratio, speed.fetched, speed.fetch_compute_s,
                        speed.fetch_profiled_s) == pytest.approx(4e-4)
    assert fetch_cost_s(ratio, 0, 0.0, 0.0) is None
