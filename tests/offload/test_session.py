"""Every expert planner of emoe.core runs on the real engine, and the engine's cache is the
planner's resident set."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from emoe.core.errors import ConfigError
from emoe.core.budget import ExpertBudgetError
from emoe.engine.offload.session import OffloadSession, SessionConfig, SessionRequest

from .conftest import TINY, tiny_model

TASKS = ("qa", "classification", "summarization", "conversation")


def requests(n: int = 10) -> list[SessionRequest]:
    g = torch.Generator().manual_seed(0)
    return [SessionRequest(f"r{i}", TASKS[i % len(TASKS)],
                           torch.randint(2, 64, (6 + 3 * i,), generator=g).tolist(), 5)
            for i in range(n)]


@pytest.fixture(scope="module")
def reference_tokens():
    stats = OffloadSession(tiny_model(1), SessionConfig(max_batch_size=3)).run(requests())
    return {rid: r.token_ids for rid, r in stats.requests.items()}


@pytest.mark.parametrize("planner", ["lru", "static", "predict-every", "emoe"])
def test_planner_runs_on_the_engine_and_cache_matches_its_resident_set(planner, reference_tokens):
    session = OffloadSession(tiny_model(1), SessionConfig(planner=planner, budget="50%",
                                                          max_batch_size=3, prediction_interval=3))
    stats = session.run(requests())
    cache = session.experts.cache
    resident = session.scheduler.planner.resident  # [L, E] bool
    assert cache.resident() == {(int(l), int(e)) for l, e in zip(*np.nonzero(resident))}
    assert len(cache.resident()) <= cache.num_slots == TINY.num_layers * TINY.num_experts // 2
    cache.check_invariants()
    assert all(r.finish_reason for r in stats.requests.values())
    tokens = {rid: r.token_ids for rid, r in stats.requests.items()}
    if planner == "lru":  # fetch on a miss computes with the chosen experts: the full model
        assert tokens == reference_tokens and stats.fetches > 0
    else:
        assert 0.0 < stats.hit_rate < 1.0 and stats.fetches == 0


def test_full_budget_emoe_reproduces_all_experts(reference_tokens):
    stats = OffloadSession(tiny_model(1), SessionConfig(planner="emoe", budget="100%",
                                                        max_batch_size=3)).run(requests())
    assert {rid: r.token_ids for rid, r in stats.requests.items()} == reference_tokens
    assert stats.hit_rate == 1.0


def test_bad_combinations_are_refused():
    with pytest.raises(ConfigError, match="fetches on a miss"):
        OffloadSession(tiny_model(), SessionConfig(planner="lru", budget="50%", miss="reroute"))
    with pytest.raises(ConfigError, match="plans loads itself"):
        OffloadSession(tiny_model(), SessionConfig(planner="emoe", budget="50%", miss="fetch"))
    with pytest.raises(ExpertBudgetError, match="needs 100%"):
        OffloadSession(tiny_model(), SessionConfig(planner="all", budget="50%"))


@pytest.mark.parametrize("planner", ["emoe", "predict-every"])
def test_all_arrivals_at_once_fill_every_layer_of_the_fixed_pool(planner):
    # the first step admits qa, classification and summarization (prompts 0-2) and runs the
    # predictor; layer 0 is insensitive for all three, yet must get its slots, never none
    session = OffloadSession(tiny_model(1), SessionConfig(planner=planner, budget="50%",
                                                          max_batch_size=3))
    assert (session.sensitivity["qa"][0], session.sensitivity["classification"][0],
            session.sensitivity["summarization"][0]) == (0.0, 0.0, 0.0)
    per_layer = []
    original = session.engine.execute

    def execute(plan):
        result = original(plan)
        per_layer.append(np.bincount([l for l, _ in session.experts.cache.resident()],
                                     minlength=TINY.num_layers).tolist())
        return result

    session.engine.execute = execute
    stats = session.run(requests(), arrivals_per_step=None)
    assert per_layer[0] == [2, 2, 2]  # every slot of every layer filled from the first step
    assert all(min(counts) >= 1 for counts in per_layer)
    assert all(r.finish_reason for r in stats.requests.values())
    session.experts.cache.check_invariants()


def test_scheduler_gets_the_engines_whole_kv_cache():
    session = OffloadSession(tiny_model(), SessionConfig(planner="emoe", budget="50%"))
    assert session.scheduler.kv_capacity_bytes == session.engine.cache.nbytes
    assert session.scheduler.planner.fixed_slots
