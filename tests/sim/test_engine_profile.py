import json

import pytest

from emoe.core.errors import ConfigError
from emoe.core.profile import (EngineProfile, StepSample, StepTimes, attended_pairs,
                               load_profile, write_profile)
from emoe.core.specs import HARDWARE_PRESETS, MODEL_PRESETS

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
    steps = StepTimes((1, 64, 255), (0.002, 0.006, 0.02), 1e-4, 1e-7, 2e-7, 8e-4, 4e-5)
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
])
def test_bad_profiles_name_the_file_and_field(tmp_path, doc, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(doc))
    with pytest.raises(ConfigError, match=message) as info:
        load_profile(path)
    assert str(path) in str(info.value)
