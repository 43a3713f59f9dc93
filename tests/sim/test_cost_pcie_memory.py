import numpy as np
import pytest

from emoe.core.experts import MissMode
from emoe.core.plan import PrefillChunk, StepPlan
from emoe.core.profile import HandlerOverhead, StepTimes, attended_pairs
from emoe.core.request import SLO, Request
from emoe.core.specs import HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec
from emoe.sim.backend import SimBackend
from emoe.sim.cost import CostModel
from emoe.sim.routing import SyntheticRouting
from emoe.sim.memory import CapacityExceeded, GpuMemory
from emoe.sim.pcie import PcieLink

MIXTRAL = MODEL_PRESETS["mixtral-8x7b"]
HW = HardwareSpec(name="t", gpu_memory_bytes=10**11, pcie_bandwidth_bytes_per_s=1e9,
                  pcie_latency_s=1e-3, step_overhead_s=0.01, prefill_s_per_token=1e-4,
                  decode_s_per_token=2e-4, attention_s_per_context_token=1e-6)


def test_single_iteration_is_the_linear_model():
    cost = CostModel(HW, MIXTRAL)
    t = cost.step_s(prefill_tokens=100, decode_tokens=4, context_tokens=1000, resident_experts=0)
    assert t == pytest.approx(0.01 + 100e-4 + 4 * 2e-4 + 1000e-6)


# measured steps whose attended pairs and extra prompts cost something
STEPS = StepTimes((1, 64, 128, 255), (0.002, 0.006, 0.011, 0.022), 1e-4, 1e-7, 2e-7, 8e-4)


def test_measured_steps_cost_each_prefill_chunk_its_own_pairs():
    cost = CostModel(HW, MIXTRAL, STEPS)
    kw = dict(prefill_tokens=750, decode_tokens=4, context_tokens=600, resident_experts=0)
    three = cost.step_s(**kw, prefill_chunks=3, prefill_pairs=3 * attended_pairs(0, 250))
    assert three == pytest.approx(STEPS.step_s(754, 4, 600, 3 * attended_pairs(0, 250), 3))
    assert three < cost.step_s(**kw)  # by default: one prompt of 750 tokens


def profiled_backend(miss_mode: MissMode) -> SimBackend:
    """A simulated backend of Mixtral's shape with measured steps (``STEPS``)."""
    return SimBackend(model=MIXTRAL, hardware=HW, memory_bytes=10**12,
                      routing=SyntheticRouting(MIXTRAL, {}), miss_mode=miss_mode,
                      slots_per_layer=np.full(MIXTRAL.num_layers, MIXTRAL.num_experts),
                      steps=STEPS)


@pytest.mark.parametrize("miss_mode", [MissMode.NONE, MissMode.FETCH])
def test_the_simulated_backend_charges_a_step_of_several_chunks_by_their_pairs(miss_mode):
    backend = profiled_backend(miss_mode)
    requests = [Request(f"r{i}", 0.0, "qa", n, 8, SLO(1.0, 0.1))
                for i, n in enumerate((250, 250, 400))]
    for request in requests:
        backend.admit(request)
    chunks = [PrefillChunk("r0", 0, 250), PrefillChunk("r1", 0, 250), PrefillChunk("r2", 150, 250)]
    result = backend.execute(StepPlan(prefill=chunks), now=0.0)
    pairs = 2 * attended_pairs(0, 250) + attended_pairs(150, 250)
    computed = result.compute_s - result.load_wait_s  # as the engine times it: stalls included
    assert computed == pytest.approx(STEPS.step_s(750, 0, 0, pairs, 3))
    assert computed < STEPS.step_s(750, 0, 0)
    assert (result.load_wait_s > 0) == (miss_mode is MissMode.FETCH)  # an empty cache fetches


@pytest.mark.parametrize("miss_mode", [MissMode.NONE, MissMode.FETCH])
def test_the_simulated_backend_pads_a_profiled_engines_decodes_to_the_longest(miss_mode):
    """As the engine computes a decode batch: every decode attends the longest context."""
    backend = profiled_backend(miss_mode)
    for request in (Request("long", 0.0, "qa", 200, 50, SLO(1.0, 0.1)),
                    Request("short", 0.0, "qa", 20, 50, SLO(1.0, 0.1))):
        backend.admit(request)
    backend.execute(StepPlan(prefill=[PrefillChunk("long", 0, 200)]), now=0.0)
    backend.execute(StepPlan(prefill=[PrefillChunk("short", 0, 20)], decode=["long"]), now=1.0)
    result = backend.execute(StepPlan(decode=["long", "short"], iterations=3), now=2.0)
    # the long prompt's first token, its decode in the step before, and this step's: 202
    expected = sum(STEPS.step_s(2, 2, 2 * (202 + i)) for i in range(result.iterations))
    assert result.iterations == 3
    assert result.compute_s - result.load_wait_s == pytest.approx(expected)
    summed = sum(STEPS.step_s(2, 2, 202 + 21 + 2 * i) for i in range(3))
    assert expected > summed


HANDLER = HandlerOverhead(step_s=2e-4, decode_s=5e-6, prefill_token_s=2e-6)
COSTS = {"linear": lambda: CostModel(HW, MIXTRAL),
         "linear+handler": lambda: CostModel(HW, MIXTRAL, offload=HANDLER),
         "table+handler": lambda: CostModel(HW, MIXTRAL, STEPS, offload=HANDLER)}


@pytest.mark.parametrize("costs", COSTS)
def test_macro_step_equals_sum_of_iterations_with_growing_context(costs):
    cost = COSTS[costs]()
    one = [cost.step_s(prefill_tokens=0, decode_tokens=8, context_tokens=500 + 8 * i,
                       resident_experts=0) for i in range(37)]
    many = cost.step_s(prefill_tokens=0, decode_tokens=8, context_tokens=500, resident_experts=0,
                       iterations=37)
    assert many == pytest.approx(sum(one))


@pytest.mark.parametrize("costs", COSTS)
@pytest.mark.parametrize("budget", [0.001, 0.0123, 0.5, 3.0])
def test_iterations_within_finds_the_iteration_an_event_falls_in(budget, costs):
    cost = COSTS[costs]()
    kw = dict(decode_tokens=16, context_tokens=2000, resident_experts=0)
    n = cost.iterations_within(budget, **kw)
    assert cost.step_s(prefill_tokens=0, iterations=n, **kw) >= budget
    if n > 1:
        assert cost.step_s(prefill_tokens=0, iterations=n - 1, **kw) < budget


def test_the_handler_adds_its_overhead_to_each_iteration_and_the_prompt():
    plain, handled = CostModel(HW, MIXTRAL, STEPS), CostModel(HW, MIXTRAL, STEPS, offload=HANDLER)
    kw = dict(prefill_tokens=100, decode_tokens=4, context_tokens=1000, resident_experts=0,
              iterations=3)
    assert handled.step_s(**kw) - plain.step_s(**kw) == pytest.approx(
        3 * (2e-4 + 4 * 5e-6) + 100 * 2e-6)


def test_weight_read_scales_with_resident_experts():
    hw = HARDWARE_PRESETS["h100-80gb"]
    cost = CostModel(hw, MIXTRAL)
    few, many = cost.fixed_s(64), cost.fixed_s(256)
    assert many - few == pytest.approx(192 * MIXTRAL.expert_bytes / hw.hbm_bandwidth_bytes_per_s)


def test_presets_have_provenance_and_sane_decode_time():
    for hw in HARDWARE_PRESETS.values():
        assert "[published]" in hw.provenance and "[roofline]" in hw.provenance
        # a batch-16 decode of Mixtral-8x7B with every expert resident: tens of milliseconds
        step = CostModel(hw, MIXTRAL).step_s(prefill_tokens=0, decode_tokens=16,
                                             context_tokens=16 * 1000, resident_experts=256)
        assert 0.01 < step < 0.2


def test_pcie_link_is_fifo_and_busy_time_is_bounded_by_elapsed():
    link = PcieLink(1e9, 1e-3)
    first = link.copy(0.0, 10**9)  # 1.001 s
    second = link.copy(0.5, 10**9)  # queued behind the first
    assert first == pytest.approx(1.001)
    assert second == pytest.approx(2.002)
    assert link.busy_s(1.5) == pytest.approx(1.5)
    assert link.busy_s(5.0) == pytest.approx(2.002)
    late = link.copy(10.0, 0)
    assert late == pytest.approx(10.001)
    assert link.busy_s(10.001) == pytest.approx(2.003)
    assert link.bytes_copied == 2 * 10**9 and link.copies == 3


def test_memory_refuses_to_exceed_capacity_and_tracks_peak_and_mean():
    mem = GpuMemory(MIXTRAL.non_expert_bytes + 2 * MIXTRAL.expert_bytes, MIXTRAL)
    mem.change(1.0, experts=2)
    assert mem.peak == mem.capacity
    with pytest.raises(CapacityExceeded):
        mem.change(2.0, kv_tokens=1)
    mem.change(2.0, experts=-1)
    assert mem.mean(3.0) == pytest.approx(
        (MIXTRAL.non_expert_bytes * 1 + mem.capacity * 1 + (mem.capacity - MIXTRAL.expert_bytes)) / 3)


def test_memory_rejects_weights_larger_than_the_card():
    with pytest.raises(CapacityExceeded):
        GpuMemory(MIXTRAL.non_expert_bytes - 1, MIXTRAL)
