"""``emoe profile`` output loads through emoe.core.profile and feeds the simulator's specs."""

from __future__ import annotations

from emoe.core.profile import load_profile, write_profile
from emoe.core.specs import get_hardware, get_model
from emoe.engine.profile import profile_model

from .conftest import TINY, tiny_model


def test_profile_round_trips_through_core_profile(tmp_path):
    profile = profile_model(tiny_model(), "tiny", repeats=1, max_batch_size=4,
                            prefill_tokens=(4, 16, 32), decode_batch=(1, 4),
                            decode_context=(8, 24), mixed=((16, 2, 8),),
                            multi_prompt=(((0, 16),) * 2, ((32, 16),), ((0, 8),) * 5))
    path = tmp_path / "profile.json"
    write_profile(profile, path)
    loaded = load_profile(path)
    # one-prompt steps up to the context (127), decode steps, two prefill steps of several
    # prompts or a continued one (five prompts exceed the four KV slots), one mixed step
    assert len(loaded.samples) == 4 + 2 * 2 + 2 + 1
    assert {s.prefill_tokens for s in loaded.samples} == {0, 4, 16, 32, 127}
    assert {s.chunks for s in loaded.samples} == {(), ((0, 16),) * 2, ((32, 16),)}
    assert loaded.step_table.per_pair_s >= 0 and loaded.step_table.per_chunk_s >= 0
    assert "multi-prompt prefill steps predicted within" in loaded.provenance
    assert {s.decode_tokens for s in loaded.samples} == {0, 1, 2, 4}
    assert loaded.step_table.tokens == (4, 16, 32, 127)
    assert loaded.engine.model == "tiny" and loaded.engine.max_seq_len == 128
    assert loaded.engine.num_layers == TINY.num_layers and loaded.engine.max_batch_size == 4
    assert all(s.seconds > 0 for s in loaded.samples)
    assert loaded.memory["expert_bytes"] == 3 * TINY.hidden_size * TINY.intermediate_size * 4
    assert loaded.memory["kv_bytes_per_token"] == TINY.kv_bytes_per_token("float32")
    assert loaded.pcie_bandwidth_bytes_per_s > 0 and loaded.pcie_latency_s >= 0
    assert "emoe profile" in loaded.provenance and loaded.device
    coefficients = loaded.coefficients()
    assert set(coefficients) == {"step_overhead_s", "prefill_s_per_token", "decode_s_per_token",
                                 "attention_s_per_context_token"}
    hardware, model = loaded.apply(get_hardware("a100-40gb"), get_model("mixtral-8x7b"))
    assert hardware.pcie_bandwidth_bytes_per_s == loaded.pcie_bandwidth_bytes_per_s
    assert model.expert_bytes == loaded.memory["expert_bytes"]
