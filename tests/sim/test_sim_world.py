"""Simulator invariants on small workloads: capacity, termination, PCIe time, determinism."""

import dataclasses
import numpy as np
import pytest

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.request import SLO, Request, RequestStatus
from emoe.core.workload import synthetic_requests
from emoe.sim.runner import SimConfig, build
from emoe.sim.world import World

PLANNERS = ["lru", "static", "predict-every", "emoe"]
GIB = 1024**3


def run(config: SimConfig, requests, max_iterations=None):
    scheduler, backend = build(config)
    ended: list[Request] = []
    world = World(scheduler, backend, requests, ended.append, max_iterations=max_iterations)
    elapsed = world.run()
    return elapsed, ended, backend, world


def workload(n=160, rate=12.0, seed=1):
    return list(synthetic_requests(rate=rate, num_requests=n, seed=seed))


@pytest.mark.parametrize("planner", PLANNERS)
def test_invariants_hold_under_every_planner(planner):
    # A tight budget: 4 experts per layer and ~9 GiB of KV, so admission has to wait.
    config = SimConfig(planner=planner, scheduling="fcfs", experts_per_layer=4,
                       memory_budget_bytes=58 * GIB)
    requests = workload()
    elapsed, ended, backend, world = run(config, requests)
    assert sorted(r.id for r in ended) == sorted(r.id for r in requests)
    for r in ended:
        assert r.status in (RequestStatus.FINISHED, RequestStatus.REJECTED)
        if r.status is RequestStatus.FINISHED:
            assert r.generated_tokens == r.output_tokens
            assert r.arrival <= r.admitted_at <= r.first_token_at <= r.finished_at <= elapsed
            assert r.expert_hits + r.expert_misses == (r.input_tokens + r.output_tokens - 1) * 2 * 32
        else:
            assert r.reason
    memory = backend.memory
    assert memory.peak <= memory.capacity == 58 * GIB
    assert memory.kv_tokens == 0 and memory.experts == backend.resident.sum()
    assert 0 < backend.link.busy_s(elapsed) <= elapsed
    assert backend.link.bytes_copied > 0


def test_same_seed_same_result_and_another_seed_differs():
    config = SimConfig(planner="emoe", scheduling="emoe")

    def outcome(seed):
        elapsed, ended, backend, _ = run(dataclasses.replace(config, seed=seed), workload())
        return elapsed, [(r.id, r.first_token_at, r.finished_at, r.expert_hits) for r in ended]

    assert outcome(3) == outcome(3)
    assert outcome(3)[1] != outcome(4)[1]


@pytest.mark.parametrize("planner", ["emoe", "lru"])
def test_macro_steps_match_single_iteration_steps(planner):
    """Running many identical decode iterations per step changes nothing but the speed."""
    config = SimConfig(planner=planner, scheduling="fcfs")
    requests = workload(n=60, rate=4.0)
    macro = run(config, [dataclasses.replace(r) for r in requests])
    single = run(config, [dataclasses.replace(r) for r in requests], max_iterations=1)
    assert macro[3].steps < single[3].steps
    if planner == "lru":
        # fetches are drawn per iteration from the same seeded stream in both runs only when
        # the steps line up; compare the aggregate within a small tolerance instead
        assert macro[0] == pytest.approx(single[0], rel=0.05)
        return
    assert macro[0] == pytest.approx(single[0])
    by_id = {r.id: r for r in single[1]}
    for r in macro[1]:
        other = by_id[r.id]
        assert r.first_token_at == pytest.approx(other.first_token_at)
        assert r.finished_at == pytest.approx(other.finished_at)
        assert r.expert_hits == pytest.approx(other.expert_hits, abs=1)


def test_a_prompt_that_can_never_fit_is_rejected_and_the_run_goes_on():
    requests = workload(n=20, rate=5.0)
    for i, (rid, tokens) in enumerate((("huge", 30_000), ("too-long", 500_000))):
        requests.insert(6 + i, Request(id=rid, arrival=requests[5].arrival, task="qa",
                                       input_tokens=tokens, output_tokens=10, slo=SLO(2.0, 0.15)))
    # 58 GiB leave ~2.7 GB of KV cache beside the weights and 5 experts per layer: 20k tokens
    _, ended, _, _ = run(SimConfig(memory_budget_bytes=58 * GIB), requests)
    status = {r.id: r for r in ended}
    assert status["huge"].status is RequestStatus.REJECTED
    assert "KV cache" in status["huge"].reason
    assert status["too-long"].status is RequestStatus.REJECTED
    assert "leave no room in the model's context of 32768 tokens" in status["too-long"].reason
    assert sum(r.status is RequestStatus.FINISHED for r in ended) == 20


def test_expert_loads_cost_time_and_the_predictor_is_charged():
    requests = workload(n=80, rate=2.0)
    every = run(SimConfig(planner="predict-every", scheduling="fcfs"), requests)
    periodic = run(SimConfig(planner="emoe", scheduling="fcfs"),
                   [dataclasses.replace(r) for r in requests])
    assert every[2].predictor_invocations > 10 * periodic[2].predictor_invocations > 0
    ttft = [np.mean([r.first_token_at - r.arrival for r in out[1]]) for out in (every, periodic)]
    assert ttft[0] > ttft[1] + 0.2  # 0.35 s of predictor time before most prefills


def test_impossible_configurations_are_clear_errors():
    with pytest.raises(ConfigError, match="cannot hold the non-expert weights"):
        build(SimConfig(memory_budget_bytes=2 * GIB))
    with pytest.raises(ConfigError, match="'all' planner's experts"):
        build(SimConfig(planner="all"))  # Mixtral-8x7B does not fit one 80 GiB card
    with pytest.raises(UnknownNameError, match="valid: all, emoe, lru, predict-every, random, static"):
        build(SimConfig(planner="fifo"))
    with pytest.raises(UnknownNameError, match="valid: a100-40gb, h100-80gb, h200-141gb"):
        build(SimConfig(gpu="v100"))


def test_a_memory_budget_beyond_the_card_is_an_error():
    with pytest.raises(ConfigError, match="exceeds the 80.0 GiB of h100-80gb"):
        build(SimConfig(memory_budget_bytes=120 * GIB))


def test_with_a_profiled_bigger_card_all_experts_fit_and_never_miss(tmp_path):
    from emoe.core.profile import EngineProfile, write_profile

    profile = tmp_path / "big.json"
    write_profile(EngineProfile(device="hypothetical 192 GiB card", provenance="test",
                                memory={"gpu_memory_bytes": 192 * GIB}), profile)
    _, ended, backend, _ = run(SimConfig(planner="all", scheduling="fcfs", profile=profile),
                               workload(n=30))
    finished = [r for r in ended if r.status is RequestStatus.FINISHED]
    assert len(finished) == 30
    assert all(r.expert_misses == 0 and r.weighted_hits == r.weighted_choices for r in finished)
    assert backend.memory.experts == 256
