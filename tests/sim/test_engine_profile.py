import json
from pathlib import Path

import pytest

from emoe.core.errors import ConfigError
from emoe.core.profile import (EngineProfile, HandlerOverhead, StepSample, StepTimes,
                               attended_pairs, load_profile, write_profile)
from emoe.core.request import SLO, Request
from emoe.core.specs import HARDWARE_PRESETS, MODEL_PRESETS
from emoe.sim.runner import SimConfig, build
from emoe.sim.world import World

H100 = HARDWARE_PRESETS["h100-80gb"]
MIXTRAL = MODEL_PRESETS["mixtral-8x7b"]


def test_profile_round_trip_replaces_only_measured_fields(tmp_path):
    profile = EngineProfile(model="mixtral-8x7b", device="H100", provenance="test bench",
                            step_time={"step_overhead_s": 0.02, "prefill_s_per_token": 1e-4,
                                       "decode_s_per_token": 2e-4,
                                       "attention_s_per_context_token": 1e-7},
                            pcie_latency_s=2e-5, memory={"kv_bytes_per_token": 4096})
    write_profile(profile, tmp_path / "p.json")
    hw, model = load_profile(tmp_path / "p.json").apply(H100, MIXTRAL)
    assert hw.step_overhead_s == 0.02 and hw.decode_s_per_token == 2e-4
    assert hw.hbm_bandwidth_bytes_per_s == 0.0  # measured steps include the weight read
    assert hw.pcie_latency_s == 2e-5
    assert hw.pcie_bandwidth_bytes_per_s == H100.pcie_bandwidth_bytes_per_s
    assert "engine profile (H100): test bench" in hw.provenance
    assert model.kv_bytes_per_token == 4096 and model.expert_bytes == MIXTRAL.expert_bytes


def test_profile_fits_coefficients_from_samples(tmp_path):
    true = (0.01, 2e-4, 5e-4, 1e-6)
    samples = [StepSample(p, d, c, true[0] + p * true[1] + d * true[2] + c * true[3])
               for p, d, c in [(0, 1, 100), (0, 8, 4000), (512, 0, 0), (128, 4, 900),
                               (0, 32, 20000), (1024, 16, 8000)]]
    # a step of three prompts costs less than one of their tokens: not the linear model's
    samples.append(StepSample(750, 0, 0, 0.08, ((0, 250),) * 3))
    write_profile(EngineProfile(samples=tuple(samples)), tmp_path / "p.json")
    hw, _ = load_profile(tmp_path / "p.json").apply(H100, MIXTRAL)
    got = (hw.step_overhead_s, hw.prefill_s_per_token, hw.decode_s_per_token,
           hw.attention_s_per_context_token)
    assert got == pytest.approx(true, rel=1e-6)


def test_a_step_table_without_pair_and_chunk_costs_loads_and_costs_steps_as_one_prompt(tmp_path):
    path = tmp_path / "old.json"
    path.write_text(json.dumps({
        "format": "emoe-engine-profile", "version": 1,
        "step_table": {"tokens": [1, 64, 255], "seconds": [0.002, 0.006, 0.02],
                       "per_decode_s": 1e-4, "per_context_token_s": 1e-7}}))
    steps = load_profile(path).step_table
    assert (steps.per_pair_s, steps.per_chunk_s, steps.beyond_s_per_token) == (0.0, 0.0, None)
    three = steps.step_s(750, 0, 0, 3 * attended_pairs(0, 250), 3)
    assert three == pytest.approx(0.02 + (0.014 / 191) * (750 - 255))  # the table's extrapolation
    assert steps.step_s(20, 4, 300) == pytest.approx(steps.table(20) + 4e-4 + 3e-5)


def test_pair_chunk_costs_and_multi_prompt_samples_round_trip(tmp_path):
    steps = StepTimes((1, 64, 255), (0.002, 0.006, 0.02), 1e-4, 1e-7, 2e-7, 8e-4, 4e-5,
                      (1, 2, 8), (0.0015, 0.0024, 0.003))
    samples = (StepSample(128, 0, 0, 0.009), StepSample(0, 4, 100, 0.003),
               StepSample(750, 0, 0, 0.03, ((0, 250),) * 3), StepSample(63, 0, 0, 0.008,
                                                                     ((192, 63),)),
               StepSample(16, 0, 0, 0.003), StepSample(0, 16, 900, 0.004))
    write_profile(EngineProfile(samples=samples, step_table=steps), tmp_path / "p.json")
    loaded = load_profile(tmp_path / "p.json")
    assert loaded.step_table == steps and loaded.samples == samples
    assert loaded.samples[2].prefill_chunks() == ((0, 250),) * 3
    assert loaded.samples[0].prefill_chunks() == ((0, 128),)
    assert loaded.samples[1].prefill_chunks() == ()


@pytest.mark.parametrize("doc, message", [
    ({"format": "nope", "version": 1}, "field 'format'"),
    ({"format": "emoe-engine-profile", "version": 9}, "field 'version'"),
    ({"format": "emoe-engine-profile", "version": 1, "step_time": {"step_overhead_s": 0.1}},
     "missing prefill_s_per_token"),
    ({"format": "emoe-engine-profile", "version": 1, "pcie": {"latency_s": -1}},
     "field 'pcie.latency_s'"),
    ({"format": "emoe-engine-profile", "version": 1,
      "samples": [{"prefill_tokens": 1, "decode_tokens": 0, "context_tokens": 0, "seconds": 1}]},
     "need at least 4 steps"),
    ({"format": "emoe-engine-profile", "version": 1, "memory": {"vram": 1}}, "unknown field"),
    ({"format": "emoe-engine-profile", "version": 1, "samples": [
        {"prefill_tokens": 64, "decode_tokens": 0, "context_tokens": 0, "seconds": 0.01,
         "chunks": [[0, 32], [0, 16]]}]}, "chunks hold 48 tokens, not prefill_tokens 64"),
    ({"format": "emoe-engine-profile", "version": 1, "samples": [
        {"prefill_tokens": 64, "decode_tokens": 0, "context_tokens": 0, "seconds": 0.01,
         "chunks": [64]}]}, r"samples\[0\].chunks' must be a list of \[start, tokens\]"),
    ({"format": "emoe-engine-profile", "version": 1, "step_table": {
        "tokens": [1], "seconds": [0.01], "per_decode_s": 0, "per_context_token_s": 0,
        "per_pair_s": -1}}, "field 'step_table.per_pair_s'"),
    ({"format": "emoe-engine-profile", "version": 1, "step_table": {
        "tokens": [1], "seconds": [0.01], "per_decode_s": 0, "per_context_token_s": 0,
        "decode_batches": [1, 4]}}, "'decode_batches' and 'decode_base_s' must be lists"),
    ({"format": "emoe-engine-profile", "version": 1, "step_table": {
        "tokens": [1], "seconds": [0.01], "per_decode_s": 0, "per_context_token_s": 0,
        "decode_batches": [4, 2], "decode_base_s": [0.01, 0.02]}},
     r"'step_table.decode_batches' must increase from 1 or more, got \[4, 2\]"),
    ({"format": "emoe-engine-profile", "version": 1,
      "offload": {"step_s": 1e-4, "decode_s": -1e-6, "prefill_token_s": 0}},
     "field 'offload.decode_s': -1e-06 is not a non-negative number"),
    ({"format": "emoe-engine-profile", "version": 1,
      "offload": {"step_s": "fast", "decode_s": 0, "prefill_token_s": 0}},
     "field 'offload.step_s': 'fast'"),
    ({"format": "emoe-engine-profile", "version": 1, "offload": {"step_s": 1e-4}},
     "offload: missing decode_s, prefill_token_s"),
    ({"format": "emoe-engine-profile", "version": 1,
      "offload": {"step_s": 0, "decode_s": 0, "prefill_token_s": 0, "per_fetch_s": 0}},
     r"offload: unknown field\(s\) \['per_fetch_s'\]"),
    ({"format": "emoe-engine-profile", "version": 1, "offload": [1e-4]},
     "field 'offload' must be an object"),
])
def test_bad_profiles_name_the_file_and_field(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)


def test_the_handler_overhead_round_trips_and_old_profiles_have_none(tmp_path):
    overhead = HandlerOverhead(step_s=1.8e-4, decode_s=4.4e-6, prefill_token_s=1.6e-6)
    write_profile(EngineProfile(model="m", offload=overhead), tmp_path / "p.json")
    assert load_profile(tmp_path / "p.json").offload == overhead
    assert overhead.seconds(100, 4, iterations=3) == pytest.approx(
        3 * (1.8e-4 + 4 * 4.4e-6) + 100 * 1.6e-6)
    write_profile(EngineProfile(model="m"), tmp_path / "old.json")
    assert "offload" not in json.loads((tmp_path / "old.json").read_text())
    assert load_profile(tmp_path / "old.json").offload is None


REFERENCE = Path(__file__).resolve().parents[2] / "emoe/engine/reference/emoe-tiny"
OVERHEAD = {"step_s": 1.0, "decode_s": 0.01, "prefill_token_s": 0.001}
# arrival s, prompt tokens, output tokens: some decode alone, some join running ones
ARRIVALS = [(0.0, 20, 6), (0.0, 40, 3), (1.5, 12, 8), (4.0, 30, 5), (4.2, 8, 2), (30.0, 16, 4)]


def served_profile(path: Path, offload: dict | None) -> Path:
    """A profile of emoe-tiny's served engine (milliseconds a step), with ``offload`` or,
    like profiles written before it was measured, without."""
    doc = {"format": "emoe-engine-profile", "version": 1, "model": "emoe-tiny",
           "step_time": {"step_overhead_s": 0.002, "prefill_s_per_token": 6e-5,
                         "decode_s_per_token": 5e-5, "attention_s_per_context_token": 3e-7},
           "pcie": {"bandwidth_bytes_per_s": 1e10, "latency_s": 2e-4}, "predictor_s": 1e-3,
           "engine": {"model": "emoe-tiny", "num_layers": 4, "num_experts": 8, "top_k": 2,
                      "hidden_size": 128, "threads": 1, "device": "cpu", "dtype": "float32",
                      "max_batch_size": 4, "max_seq_len": 256},
           "step_table": {"tokens": [1, 64, 255], "seconds": [0.002, 0.008, 0.018],
                          "per_decode_s": 4e-5, "per_context_token_s": 3e-7}}
    if offload is not None:
        doc["offload"] = offload
    path.write_text(json.dumps(doc))
    return path


def simulated_steps(planner: str, profile: Path) -> list[tuple[int, int, int, float]]:
    """(prompt tokens, decodes, iterations, compute s) of every step a short run takes."""
    config = SimConfig(model=str(REFERENCE), profile=profile, scheduling="fcfs",
                       planner=planner, seed=1)
    scheduler, backend = build(config)
    steps = []
    execute = backend.execute

    def logged(plan, now, *args):
        result = execute(plan, now, *args)
        steps.append((sum(c.num_tokens for c in plan.prefill), len(plan.decode),
                      result.iterations, result.compute_s))
        return result

    backend.execute = logged
    requests = [Request(str(i), t, "qa", n_in, n_out, SLO(1000.0, 100.0))
                for i, (t, n_in, n_out) in enumerate(ARRIVALS)]
    World(scheduler, backend, requests, lambda request: None).run()
    return steps


@pytest.mark.parametrize("planner", ["lru", "emoe", "static"])
def test_the_simulator_charges_the_handler_overhead_to_policies_served_with_a_cache(
        tmp_path, planner):
    overhead = HandlerOverhead(**OVERHEAD)
    charged = simulated_steps(planner, served_profile(tmp_path / "p.json", OVERHEAD))
    plain = simulated_steps(planner, served_profile(tmp_path / "old.json", None))
    assert any(iterations > 1 for _, _, iterations, _ in charged)  # macro steps too
    for prefill, decode, iterations, compute in charged:
        if prefill or decode:  # the table's milliseconds per iteration on top of the overhead
            table = compute - overhead.seconds(prefill, decode, iterations)
            assert 0 < table < 0.05 * iterations, (prefill, decode, iterations, compute)
    assert all(compute < 0.05 * iterations for _, _, iterations, compute in plain)


def test_the_all_experts_policy_is_not_charged_the_handler_overhead(tmp_path):
    charged = simulated_steps("all", served_profile(tmp_path / "p.json", OVERHEAD))
    assert charged == simulated_steps("all", served_profile(tmp_path / "old.json", None))
