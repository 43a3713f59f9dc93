"""What-if search: capacity bisection against a hand-checked answer, the Pareto set of a
hand-made table, the best-configuration rule, identical-configuration merging, and the same
results from one process, two worker processes and Ray."""

import dataclasses
import json
import math

import pytest

from emoe.cli import main
from emoe.core.specs import HARDWARE_PRESETS, MODEL_PRESETS, HardwareSpec, ModelSpec
from emoe.sim.runner import SimConfig, Workload, simulate
from emoe.sim.search import (CapacitySearch, Result, capacity_search, distinct, freed_memory,
                             mark_pareto, pareto, pick_best)
from emoe.sim.world import HAND_OVER_EVERY

TINY = ModelSpec("tiny-search", num_layers=2, num_experts=2, top_k=1, expert_bytes=1,
                 non_expert_bytes=1000, kv_bytes_per_token=1)
# Every step takes 0.1 s: no per-token, attention, weight-read or predictor cost, and expert
# copies of 1 byte at 1e12 B/s.
FLAT = HardwareSpec("flat-search", gpu_memory_bytes=10**6, pcie_bandwidth_bytes_per_s=1e12,
                    pcie_latency_s=0.0, step_overhead_s=0.1, prefill_s_per_token=0.0,
                    decode_s_per_token=0.0)


@pytest.fixture
def tiny(monkeypatch):
    monkeypatch.setitem(MODEL_PRESETS, TINY.name, TINY)
    monkeypatch.setitem(HARDWARE_PRESETS, FLAT.name, FLAT)
    return SimConfig(model=TINY.name, gpu=FLAT.name, scheduling="fcfs", planner="all",
                     experts_per_layer=None)


def two_requests(tmp_path):
    """A at 0 s and B at 1 s (before rate scaling), one prompt token and one output token each
    (so each is one 0.1 s step); B's TTFT SLO is 0.15 s, A's is loose."""
    trace = tmp_path / "two.csv"
    trace.write_text("arrival_s,input_tokens,output_tokens,task,ttft_slo_s,tpot_slo_s\n"
                     "0.0,1,1,qa,10,1\n1.0,1,1,qa,0.15,1\n")
    return Workload(trace=trace)


def test_capacity_bisection_matches_the_hand_checked_answer(tiny, tmp_path):
    # At rate scale r, B arrives at 1/r. If A's step (0 to 0.1 s) is over, B's TTFT is 0.1 s;
    # else B waits for it and its TTFT is 0.2 - 1/r, within 0.15 s iff r <= 20. So both meet
    # their SLO iff r <= 20: capacity 20 at target 1.0. Bisection from 1: 1, 2, 4, 8, 16 meet,
    # 32 misses, then geometric midpoints until the bracket is within 5%.
    workload = two_requests(tmp_path)
    result = capacity_search(tiny, workload, CapacitySearch(slo_target=1.0, tolerance=0.05), 2)
    met, missed = result.bracket
    assert met == result.capacity and met <= 20 < missed and missed / met <= 1.05
    rates = [p.rate_scale for p in result.probes]
    assert rates[:6] == [1, 2, 4, 8, 16, 32]
    assert rates[6] == pytest.approx(math.sqrt(16 * 32), rel=1e-3)
    assert all(p.meets == (p.rate_scale <= 20) for p in result.probes)
    assert result.outcome.config.rate_scale == met and result.outcome.summary.slo_met == 2
    assert not result.outcome.stopped

    # The answer is the rule itself: just below 20 both meet, just above B misses.
    for rate, met_count in ((19.9, 2), (20.1, 1)):
        outcome = simulate(dataclasses.replace(tiny, rate_scale=rate), workload)
        assert outcome.summary.slo_met == met_count


def test_capacity_at_the_ends_of_the_range(tiny, tmp_path):
    workload = two_requests(tmp_path)
    # A alone meets a 50% target at any rate: the search stops at the top of the range
    easy = capacity_search(tiny, workload, CapacitySearch(slo_target=0.5, high=8.0), 2)
    assert easy.capacity == 8.0 and easy.bracket == (8.0, None)
    assert [p.rate_scale for p in easy.probes] == [1, 2, 4, 8]
    # B's SLO below one step time can never be met: nothing meets a 100% target, the search
    # halves down to the floor and reports capacity 0
    impossible = tmp_path / "impossible.csv"
    impossible.write_text("arrival_s,input_tokens,output_tokens,task,ttft_slo_s,tpot_slo_s\n"
                          "0.0,1,1,qa,0.05,1\n1.0,1,1,qa,0.05,1\n")
    none = capacity_search(tiny, Workload(trace=impossible), CapacitySearch(
        slo_target=1.0, low=0.25), 2)
    assert none.capacity == 0.0 and none.bracket == (None, 0.25)
    assert [p.rate_scale for p in none.probes] == [1, 0.5, 0.25]
    assert all(p.stopped for p in none.probes)  # the first miss decides a 100% target


def test_a_probe_stops_once_the_target_is_out_of_reach():
    workload = Workload(synthetic_requests=1000, synthetic_rate=200.0)
    config = SimConfig(scheduling="fcfs", planner="predict-every")
    full = simulate(config, workload)
    stopped = simulate(config, workload, stop_after_misses=10)
    assert full.summary.requests == 1000 and full.summary.requests - full.summary.slo_met > 10
    # checked as ended requests are handed over (every 256) and every 64 steps, counting the
    # live requests that can no longer meet their SLO
    assert stopped.stopped and stopped.summary.requests < HAND_OVER_EVERY + 10
    assert stopped.steps < full.steps / 4


def test_certain_misses_are_requests_that_cannot_meet_their_slo_whatever_happens():
    from emoe.core.request import SLO, Request
    from emoe.sim.runner import certain_misses

    def request(arrival=0.0, first=None, output=11):
        r = Request("r", arrival, "qa", 10, output, SLO(ttft_s=1.0, tpot_s=0.1))
        r.first_token_at = first
        return r

    now = 3.0
    assert certain_misses([request(arrival=1.9)], now) == 1  # waiting past its TTFT SLO
    assert certain_misses([request(arrival=2.1)], now) == 0  # can still get a token in time
    assert certain_misses([request(first=1.5)], now) == 1    # its first token came too late
    assert certain_misses([request(first=1.0)], now) == 1    # 2 s > 10 tokens x 0.1 s
    assert certain_misses([request(first=1.0, output=30)], now) == 0  # 2 s < 29 x 0.1 s
    assert certain_misses([request(first=0.5, output=1)], now) == 0   # one token: TTFT only
    assert certain_misses([request(arrival=1.9), request(first=1.0)], now) == 2


def test_pareto_set_of_a_hand_made_table():
    # (capacity, accuracy, memory): higher, higher, lower is better
    table = [
        (2.0, 0.70, 50),  # A: fastest
        (1.5, 0.85, 60),  # B: a trade-off
        (1.5, 0.80, 60),  # C: dominated by B (same capacity and memory, less accurate)
        (1.0, 0.99, 80),  # D: most accurate
        (1.0, 0.99, 80),  # E: equal to D: kept with it
        (0.5, 0.99, 90),  # F: dominated by D
        (0.5, 0.60, 40),  # G: least memory
        (1.9, 0.69, 55),  # H: dominated by A
    ]
    assert pareto(table, (True, True, False)) == [True, True, False, True, True, False, True,
                                                  False]
    assert pareto([(1.0, 0.5)], (True, True)) == [True]


def results_from(table):
    """Results with the given (capacity, accuracy proxy, experts per layer)."""
    outcome = simulate(SimConfig(scheduling="fcfs", planner="static"),
                       Workload(synthetic_requests=3, synthetic_rate=1.0))
    results = []
    for capacity, accuracy, per_layer in table:
        config = dataclasses.replace(outcome.config, experts_per_layer=per_layer)
        summary = dataclasses.replace(outcome.summary, accuracy_proxy=accuracy)
        results.append(Result(config=config, capacity=capacity,
                              outcome=dataclasses.replace(outcome, summary=summary,
                                                          config=config)))
    return results


def test_best_configuration_under_the_rule_and_the_front_of_results():
    results = results_from([(2.0, 0.70, 4), (1.5, 0.85, 5), (1.5, 0.90, 6), (1.0, 0.99, 7),
                            (1.4, 0.84, 5)])
    assert pick_best(results, "capacity") is results[0]
    assert pick_best(results, "capacity", accuracy_floor=0.8) is results[2]  # tie: accuracy
    assert pick_best(results, "memory", accuracy_floor=0.8) is results[1]
    assert pick_best(results, "accuracy") is results[3]
    assert pick_best(results, "capacity", accuracy_floor=0.995) is None
    mark_pareto(results)  # memory: weights kept on the GPU (4..7 experts per layer)
    assert [r.pareto for r in results] == [True, True, True, True, False]
    model = MODEL_PRESETS["mixtral-8x7b"]
    assert results[0].weight_memory_bytes == model.non_expert_bytes + 128 * model.expert_bytes


def test_identical_configurations_are_simulated_once():
    configs = [SimConfig(planner="static", prediction_interval=p) for p in (10, 20, 40)]
    configs += [SimConfig(planner="emoe", prediction_interval=p) for p in (10, 40)]
    configs += [SimConfig(planner="emoe", experts_per_layer=None, expert_fraction=0.625),
                SimConfig(planner="emoe", experts_per_layer=None,
                          expert_budget_bytes=160 * MODEL_PRESETS["mixtral-8x7b"].expert_bytes),
                SimConfig(planner="emoe", miss_policy="drop"),
                SimConfig(planner="lru", miss_policy="fetch")]
    unique = distinct(configs)
    # static once (p ignored); emoe p=10 and p=40; 62.5% = 160 experts = 5/layer; drop is
    # simulated as reroute; lru's fetch is its own
    assert [c.name for c in unique] == [
        "emoe/static L=5/layer x1 h100-80gb", "emoe/emoe p=10 L=5/layer x1 h100-80gb",
        "emoe/emoe p=40 L=5/layer x1 h100-80gb", "emoe/lru L=5/layer x1 h100-80gb"]
    with pytest.raises(Exception, match="planner 'emoe' plans its loads itself"):
        distinct([SimConfig(planner="emoe", miss_policy="fetch")])


def test_freed_memory_against_all_experts_resident():
    model = MODEL_PRESETS["mixtral-8x7b"]
    h200 = HARDWARE_PRESETS["h200-141gb"]
    row = freed_memory(SimConfig(gpu="h200-141gb", experts_per_layer=4), model, h200, 1000.0)
    kv = h200.gpu_memory_bytes - model.non_expert_bytes - 128 * model.expert_bytes
    kv_all = h200.gpu_memory_bytes - model.non_expert_bytes - model.all_experts_bytes
    assert row["freed_bytes"] == 128 * model.expert_bytes
    assert row["max_prompt_tokens"] == kv // model.kv_bytes_per_token - 1
    assert row["max_prompt_tokens_all_resident"] == kv_all // model.kv_bytes_per_token - 1
    assert row["max_batch"] == kv // (1000 * model.kv_bytes_per_token)
    h100 = HARDWARE_PRESETS["h100-80gb"]
    row = freed_memory(SimConfig(), model, h100, 1000.0)
    assert row["max_prompt_tokens_all_resident"] is None  # 87 GiB of weights: does not fit


def search_json(tmp_path, name, *extra):
    out = tmp_path / f"{name}.json"
    assert main(["sim", "--duration", "25", "--scheduler", "fcfs,emoe", "--experts",
                 "static,emoe", "--search", "capacity", "--capacity-tolerance", "0.2",
                 "--no-progress", "--json", str(out), *extra]) == 0
    return out.read_text()


def test_two_worker_processes_give_exactly_the_sequential_results(tmp_path, capsys):
    sequential = search_json(tmp_path, "one", "--jobs", "1")
    parallel = search_json(tmp_path, "two", "--jobs", "2")
    assert parallel == sequential
    rows = json.loads(sequential)
    assert len(rows) == 4 and all(r["capacity"] > 0 for r in rows)
    for key in ("capacity", "goodput", "accuracy", "peak_memory_bytes", "pareto", "scheduler",
                "planner", "p", "expert_budget", "rate_scale", "memory_budget_bytes", "gpu"):
        assert key in rows[0]
    assert "2 local process(es)" in capsys.readouterr().out


def test_ray_gives_the_same_results(tmp_path):
    pytest.importorskip("ray", reason="ray is an optional extra (pip install 'emoe[ray]')")
    assert search_json(tmp_path, "ray", "--ray") == search_json(tmp_path, "one", "--jobs", "1")
