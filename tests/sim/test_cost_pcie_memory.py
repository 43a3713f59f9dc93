import pytest

from emoe.core.specs import HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec
from emoe.sim.cost import CostModel
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


def test_macro_step_equals_sum_of_iterations_with_growing_context():
    cost = CostModel(HW, MIXTRAL)
    one = [cost.step_s(prefill_tokens=0, decode_tokens=8, context_tokens=500 + 8 * i,
                       resident_experts=0) for i in range(37)]
    many = cost.step_s(prefill_tokens=0, decode_tokens=8, context_tokens=500, resident_experts=0,
                       iterations=37)
    assert many == pytest.approx(sum(one))


@pytest.mark.parametrize("budget", [0.001, 0.0123, 0.5, 3.0])
def test_iterations_within_finds_the_iteration_an_event_falls_in(budget):
    cost = CostModel(HW, MIXTRAL)
    kw = dict(decode_tokens=16, context_tokens=2000, resident_experts=0)
    n = cost.iterations_within(budget, **kw)
    assert cost.step_s(prefill_tokens=0, iterations=n, **kw) >= budget
    if n > 1:
        assert cost.step_s(prefill_tokens=0, iterations=n - 1, **kw) < budget


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
