"""``emoe profile`` output loads through emoe.core.profile and feeds the simulator's specs."""

from __future__ import annotations

import numpy as np
import pytest

from emoe.core.profile import HandlerOverhead, load_profile, write_profile
from emoe.core.specs import get_hardware, get_model
from emoe.engine.profile import fit_fetch_cost, fit_handler_overhead, profile_model

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
    assert loaded.offload is not None and min(vars_of(loaded.offload)) >= 0
    assert "offload: the expert handler's overhead" in loaded.provenance
    coefficients = loaded.coefficients()
    assert set(coefficients) == {"step_overhead_s", "prefill_s_per_token", "decode_s_per_token",
                                 "attention_s_per_context_token"}
    hardware, model = loaded.apply(get_hardware("a100-40gb"), get_model("mixtral-8x7b"))
    assert hardware.pcie_bandwidth_bytes_per_s == loaded.pcie_bandwidth_bytes_per_s
    assert model.expert_bytes == loaded.memory["expert_bytes"]


def vars_of(overhead: HandlerOverhead) -> list[float]:
    return [overhead.step_s, overhead.decode_s, overhead.prefill_token_s]


def test_the_handler_fit_recovers_its_line_and_ignores_prompts_made_faster():
    rng = np.random.default_rng(0)
    true = HandlerOverhead(step_s=2e-4, decode_s=6e-6, prefill_token_s=1.5e-6)
    decodes = [(0, d, true.seconds(0, d) + rng.normal(0, 2e-6)) for d in (1, 4, 8, 16)]
    prompts = [(p, 0, true.seconds(p, 0) + rng.normal(0, 2e-6)) for p in (32, 128, 255)]
    fit = fit_handler_overhead(decodes + prompts)
    assert vars_of(fit) == pytest.approx(vars_of(true), rel=0.1)
    # a handler holding part of the experts: prompts shorter than the plain engine's
    faster = [(p, 0, -5e-6 * p) for p in (32, 128, 255)]
    fit = fit_handler_overhead(decodes + faster)
    assert (fit.step_s, fit.decode_s) == pytest.approx((2e-4, 6e-6), rel=0.1)
    assert fit.prefill_token_s == 0


def test_the_fetch_fit_charges_what_a_fetch_costs_beyond_the_handler():
    rng = np.random.default_rng(1)
    per_fetch, handler = 2.3e-4, HandlerOverhead(step_s=2e-4, decode_s=1e-5, prefill_token_s=0)
    batches = rng.choice([1, 2, 4, 8, 16], size=60)
    fetches = rng.integers(0, 9, size=60)
    overhead = [handler.seconds(0, int(b)) for b in batches]
    extra = [o + per_fetch * f + rng.normal(0, 1e-5) for o, f in zip(overhead, fetches)]
    assert fit_fetch_cost(extra, fetches, overhead) == pytest.approx(per_fetch, rel=0.05)
    # without the handler's overhead as its intercept the fit smears it into every fetch
    assert fit_fetch_cost(extra, fetches, [0.0] * 60) > 1.1 * per_fetch
    assert fit_fetch_cost(extra, [0] * 60, overhead) == 0.0
