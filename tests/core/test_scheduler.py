import math

import numpy as np
import pytest

from emoe.core.errors import ConfigError, RequestError, UnknownNameError
from emoe.core.plan import RequestStepOutput, StepResult
from emoe.core.policy_file import PolicyConfig
from emoe.core.request import RequestStatus
from emoe.core.scheduler import Scheduler

from tests.core.loop import TINY_GPU, TINY_MODEL, LoopBackend, make_request, run


def scheduler(**policy):
    policy.setdefault("planner", "all")
    return Scheduler(TINY_MODEL, TINY_GPU, PolicyConfig(**policy))


def step(s, now, iterations=1, finished=(), routing=None):
    plan = s.next_step(now)
    outputs = [RequestStepOutput(rid, finished=True) for rid in finished]
    done = s.on_step_done(StepResult(now, now + 1, iterations=iterations, outputs=outputs,
                                     routing=routing or {}))
    return plan, done


# -- the step contract ----------------------------------------------------------------------

def test_prefill_then_macro_decode_until_max_tokens():
    s = scheduler()
    r = make_request("a", output_tokens=50)
    s.add_request(r)
    plan, _ = step(s, 0.0)
    assert [(c.request_id, c.start, c.num_tokens) for c in plan.prefill] == [("a", 0, 10)]
    assert plan.iterations == 1 and sorted(plan.load) == sorted(
        (layer, e) for layer in range(4) for e in range(4))
    assert r.first_token_at == 1.0 and r.generated_tokens == 1
    plan = s.next_step(1.0)
    assert plan.decode == ["a"] and plan.iterations == 49 and not plan.load
    done = s.on_step_done(StepResult(1.0, 2.0, iterations=49))
    assert done == [r] and r.status is RequestStatus.FINISHED and r.reason == "length"
    assert r.generated_tokens == 50 and r.finished_at == 2.0
    assert not s.has_work and s.next_step(2.0).empty


def test_max_iterations_caps_the_plan():
    s = scheduler()
    s.add_request(make_request("a", output_tokens=50))
    step(s, 0.0)
    assert s.next_step(1.0, max_iterations=1).iterations == 1


def test_backend_stopping_early_keeps_token_counts():
    s = scheduler()
    s.add_request(make_request("a", output_tokens=50))
    step(s, 0.0)
    assert s.next_step(1.0).iterations == 49
    s.on_step_done(StepResult(1.0, 1.5, iterations=20))
    assert s.generated_tokens("a") == 21
    assert s.next_step(1.5).iterations == 29


def test_end_of_sequence_finish_reported_by_backend():
    s = scheduler()
    r = make_request("a", output_tokens=50)
    s.add_request(r)
    step(s, 0.0)
    _, done = step(s, 1.0, iterations=4, finished=["a"])
    assert done == [r] and r.reason == "stop" and r.generated_tokens == 5


def test_single_token_request_finishes_at_prefill():
    s = scheduler()
    r = make_request("a", output_tokens=1)
    s.add_request(r)
    _, done = step(s, 0.0)
    assert done == [r] and r.generated_tokens == 1


def test_plan_in_flight_must_be_answered():
    s = scheduler()
    s.add_request(make_request("a"))
    s.next_step(0.0)
    with pytest.raises(RuntimeError, match="on_step_done"):
        s.next_step(0.0)
    s.on_step_done(StepResult(0.0, 1.0))
    with pytest.raises(RuntimeError, match="no plan in flight"):
        s.on_step_done(StepResult(1.0, 2.0))


def test_result_reporting_more_iterations_than_planned_is_an_error():
    s = scheduler()
    s.add_request(make_request("a"))
    s.next_step(0.0)
    with pytest.raises(ValueError, match="iterations 2 outside 1..1"):
        s.on_step_done(StepResult(0.0, 1.0, iterations=2))


def test_routing_of_completed_prefills_reaches_the_predictor():
    s = scheduler(planner="emoe", experts_per_layer=2, predictor="last-prompt")
    s.add_request(make_request("a"))
    counts = np.arange(16).reshape(4, 4)
    step(s, 0.0, routing={"a": counts})
    np.testing.assert_allclose(s.planner.predictor.predict("qa"),
                               counts / counts.sum(axis=1, keepdims=True))


# -- budgets ----------------------------------------------------------------------------------

def test_token_budget_chunks_prefill():
    s = scheduler(max_batch_tokens=16, max_num_seqs=8)
    for rid in "abc":
        s.add_request(make_request(rid, input_tokens=10, output_tokens=20))
    plan, _ = step(s, 0.0)
    assert [(c.request_id, c.start, c.num_tokens) for c in plan.prefill] == [("a", 0, 10),
                                                                               ("b", 0, 6)]
    plan, _ = step(s, 1.0)
    # a decodes (1 token), b finishes its prompt (4), c gets the remaining 11 >= 10
    assert plan.decode == ["a"]
    assert [(c.request_id, c.start, c.num_tokens) for c in plan.prefill] == [("b", 6, 4),
                                                                               ("c", 0, 10)]
    assert s.next_step(2.0).decode == ["a", "b", "c"]


def test_sequence_budget():
    s = scheduler(max_num_seqs=2)
    for rid in "abc":
        s.add_request(make_request(rid, output_tokens=20))
    plan, _ = step(s, 0.0)
    assert [c.request_id for c in plan.prefill] == ["a", "b"]
    plan = s.next_step(1.0)
    assert not plan.prefill and s.num_waiting == 1
    s.on_step_done(StepResult(1.0, 2.0, outputs=[RequestStepOutput("a", finished=True)]))
    assert [c.request_id for c in s.next_step(2.0).prefill] == ["c"]


def test_memory_budget_holds_kv_reservations():
    # weights 1000 + all 16 experts 1600 -> 400 B of KV; each request reserves 10 + 100 = 110
    s = scheduler(memory_budget_bytes=3_000)
    assert s.kv_capacity_bytes == 400
    for rid in "abcd":
        s.add_request(make_request(rid, output_tokens=100))
    plan, _ = step(s, 0.0)
    assert len(plan.prefill) == 3 and s.kv_used_bytes == 330
    assert s.memory_used_bytes == 2_930
    step(s, 1.0, finished=["a"])
    assert s.kv_used_bytes == 220
    assert [c.request_id for c in s.next_step(2.0).prefill] == ["d"]


def test_request_that_can_never_fit_is_rejected_with_a_reason():
    s = scheduler(memory_budget_bytes=3_000)
    r = make_request("big", input_tokens=300, output_tokens=101)
    s.add_request(r)
    assert r.status is RequestStatus.REJECTED and "401 B of KV cache" in r.reason
    plan = s.next_step(0.0)
    assert plan.rejected == [("big", r.reason)] and plan.empty
    assert not s.has_work


def test_memory_budget_below_weights_is_a_config_error():
    with pytest.raises(ConfigError, match="memory_budget_bytes: 999 B cannot hold the non-expert"):
        scheduler(memory_budget_bytes=999)
    with pytest.raises(ConfigError, match="'all' planner's experts"):
        scheduler(memory_budget_bytes=2_000)
    scheduler(memory_budget_bytes=2_000, planner="emoe", experts_per_layer=2)


def test_policy_tuned_for_another_model_is_refused():
    with pytest.raises(ConfigError, match="field 'model'"):
        scheduler(model="mixtral-8x7b")


@pytest.mark.parametrize("planner", ["all", "lru", "static", "predict-every", "emoe"])
@pytest.mark.parametrize("scheduling", ["fcfs", "sjf", "edf", "emoe"])
def test_random_workload_respects_every_budget(scheduling, planner):
    rng = np.random.default_rng(7)
    slots = 16 if planner == "all" else 8
    budget = TINY_MODEL.non_expert_bytes + slots * TINY_MODEL.expert_bytes + 400
    s = scheduler(scheduling=scheduling, planner=planner, experts_per_layer=2,
                  max_batch_tokens=48, max_num_seqs=5, memory_budget_bytes=budget,
                  prediction_interval=4)
    tasks = ["qa", "classification", "conversation"]
    requests = [make_request(str(i), float(t), tasks[i % 3], int(rng.integers(1, 120)),
                             int(rng.integers(1, 40)), ttft=1.0, tpot=0.1)
                for i, t in enumerate(np.cumsum(rng.exponential(0.05, 80)))]
    budget_checks = []

    class Checking(LoopBackend):
        def execute(self, plan, now, next_arrival, by_id):
            result = super().execute(plan, now, next_arrival, by_id)
            gpu_bytes = (TINY_MODEL.non_expert_bytes + s.kv_used_bytes
                         + len(self.resident) * TINY_MODEL.expert_bytes)
            budget_checks.append((
                sum(c.num_tokens for c in plan.prefill) + len(plan.decode) <= 48,
                len(plan.decode) + len(plan.prefill) <= 5,
                gpu_bytes <= budget,
                s.memory_used_bytes <= budget,
            ))
            return result

    backend = Checking(eos_at={r.id: 3 for r in requests[::5]},
                       routing={r.id: rng.integers(0, 5, (4, 4)) for r in requests})
    run(s, requests, backend)
    assert [c for c in budget_checks if not all(c)] == []
    statuses = {r.status for r in requests}
    assert statuses <= {RequestStatus.FINISHED, RequestStatus.REJECTED}
    for r in requests:
        if r.status is RequestStatus.FINISHED:
            eos = 3 if int(r.id) % 5 == 0 else math.inf
            assert r.generated_tokens == min(r.output_tokens, eos)
            assert r.arrival <= r.admitted_at <= r.first_token_at <= r.finished_at
    assert s.kv_used_bytes == 0 and not s.has_work


def test_engine_mode_runs_one_iteration_per_step():
    s = scheduler()
    requests = [make_request(str(i), i * 0.1, output_tokens=6) for i in range(4)]
    _, backend = run(s, requests, max_iterations=1)
    assert {p.iterations for p in backend.plans} == {1}
    assert all(r.generated_tokens == 6 for r in requests)


def test_the_cost_estimate_learns_from_a_steps_plan_to_the_next_plan():
    """Eq. 3's c and o scale with what a step took from its plan to the next plan (the
    engine's step and the serving loop's work around it), not with its compute alone; a step
    without model work (compute 0) teaches nothing, and neither does the wait after the last
    step when the loop has nothing to run."""
    s = scheduler(max_num_seqs=1)
    s.add_request(make_request("a", 0.0, input_tokens=10, output_tokens=3))
    modelled = s.cost.modelled_step_s(10, 0)
    s.next_step(1.0, max_iterations=1)
    s.on_step_done(StepResult(1.0, 1.0 + modelled, compute_s=0.5 * modelled))
    assert s.cost.scale == 1.0  # the cycle closes at the next plan
    s.next_step(1.0 + 3 * modelled, max_iterations=1)
    assert s.cost.scale == pytest.approx(1.0 + 0.05 * (3.0 - 1.0))
    learned = s.cost.scale
    s.on_step_done(StepResult(0.0, 0.0))  # no model work
    s.next_step(50.0, max_iterations=1)
    assert s.cost.scale == learned


def test_a_step_that_leaves_nothing_to_run_closes_its_cycle_at_its_end():
    """The loop idles after it (however long before it plans again): the step's own end
    closes the cycle, as in the simulator, whose macro step ends there too."""
    s = scheduler()
    s.add_request(make_request("a", 0.0, input_tokens=10, output_tokens=1))
    modelled = s.cost.modelled_step_s(10, 0)
    s.next_step(1.0)
    (done,) = s.on_step_done(StepResult(1.0, 1.0 + 2 * modelled, compute_s=modelled))
    assert done.id == "a" and not s.has_work
    assert s.cost.scale == pytest.approx(1.0 + 0.05 * (2.0 - 1.0))
    s.next_step(9.0)
    assert s.cost.scale == pytest.approx(1.05)


# -- requests -------------------------------------------------------------------------------

def test_bad_requests_are_errors_naming_the_request():
    s = scheduler()
    s.add_request(make_request("a"))
    with pytest.raises(RequestError, match="request 'a': id already"):
        s.add_request(make_request("a"))
    with pytest.raises(RequestError, match="request 'b': field 'input_tokens'"):
        s.add_request(make_request("b", input_tokens=0))
    with pytest.raises(UnknownNameError, match="unknown task 'poetry'"):
        s.add_request(make_request("c", task="poetry"))


def test_abort_waiting_and_running_requests():
    s = scheduler(max_num_seqs=1)
    a, b = make_request("a", output_tokens=30), make_request("b")
    s.add_request(a)
    s.add_request(b)
    step(s, 0.0)
    assert s.abort("b", "client cancelled") and b.status is RequestStatus.ABORTED
    assert s.abort("a", "client cancelled")
    assert a.generated_tokens == 1 and s.kv_used_bytes == 0
    plan = s.next_step(1.0)
    assert plan.aborted == [("b", "client cancelled"), ("a", "client cancelled")]
    assert plan.empty and not s.has_work
    assert not s.abort("a", "again")


def test_abort_during_a_step_ignores_its_result():
    s = scheduler()
    s.add_request(make_request("a", output_tokens=30))
    s.add_request(make_request("b", output_tokens=30))
    s.next_step(0.0)
    s.abort("a")
    done = s.on_step_done(StepResult(0.0, 1.0, outputs=[RequestStepOutput("a", finished=True)],
                                     routing={"a": np.ones((4, 4))}))
    assert done == [] and s.next_step(1.0).decode == ["b"]


def test_expert_hit_counts_accumulate_on_the_request():
    s = scheduler()
    r = make_request("a", output_tokens=30)
    s.add_request(r)
    s.next_step(0.0)
    s.on_step_done(StepResult(0.0, 1.0, outputs=[
        RequestStepOutput("a", expert_hits=7, expert_misses=1, weighted_hits=0.5,
                          weighted_choices=0.75)]))
    assert (r.expert_hits, r.expert_misses, r.weighted_hits, r.weighted_choices) == (7, 1, 0.5,
                                                                                      0.75)


# -- planners through the scheduler -----------------------------------------------------------

def test_predictor_runs_every_p_prompts():
    s = scheduler(planner="emoe", experts_per_layer=2, prediction_interval=3, max_num_seqs=1)
    requests = [make_request(str(i), float(i), output_tokens=2) for i in range(10)]
    _, backend = run(s, requests)
    admitted = [p.prefill[0].request_id for p in backend.plans if p.prefill]
    predicted = [p.prefill[0].request_id for p in backend.plans if p.run_predictor]
    assert admitted == [str(i) for i in range(10)]
    assert predicted == ["1", "4", "7"]


def test_backend_residency_follows_plans():
    s = scheduler(planner="emoe", experts_per_layer=2, prediction_interval=1)
    rng = np.random.default_rng(0)
    requests = [make_request(str(i), float(i), output_tokens=2) for i in range(6)]
    backend = LoopBackend(routing={r.id: rng.integers(0, 9, (4, 4)) for r in requests})
    run(s, requests, backend)
    assert backend.resident == {tuple(k) for k in np.argwhere(s.planner.resident)}
    assert len(backend.resident) == 8


# -- bounded state ----------------------------------------------------------------------------

def held(s):
    """Items in the scheduler's per-request containers."""
    return {"waiting": len(s._waiting) + len(s._late), "max_end": len(s._max_end),
            "expected_end": len(s._expected_end), "targets": len(s._targets),
            "decoding": len(s._decoding), "entries": len(s._entries)}


@pytest.mark.parametrize("scheduling", ["fcfs", "emoe"])
def test_state_is_bounded_by_live_requests(scheduling):
    rng = np.random.default_rng(3)
    s = scheduler(scheduling=scheduling, max_num_seqs=4)
    requests = [make_request(str(i), float(t), input_tokens=int(rng.integers(1, 30)),
                             output_tokens=int(rng.integers(1, 30)))
                for i, t in enumerate(np.cumsum(rng.exponential(0.02, 1500)))]
    worst = []

    class Checking(LoopBackend):
        def execute(self, plan, now, next_arrival, by_id):
            if requests[int(now * 7) % len(requests)].status is RequestStatus.WAITING:
                s.abort(requests[int(now * 7) % len(requests)].id)
            live = len(s._entries)  # waiting, prefilling or decoding
            worst.append(max(held(s).values()) - 2 * live)
            return super().execute(plan, now, next_arrival, by_id)

    run(s, requests, Checking(eos_at={r.id: 2 for r in requests[::3]}))
    assert sum(r.status is RequestStatus.ABORTED for r in requests) > 10
    assert max(worst) <= 0
    assert held(s) == dict.fromkeys(held(s), 0)


class _NoCallPredictor:
    """Fails the test if asked for a prediction; counts what it observes."""

    observed = False

    def __init__(self):
        self.seen = []

    def observe(self, task, routing, phase="prefill"):
        self.seen.append((task, phase))

    def predict(self, task, phase="prefill"):
        raise AssertionError(f"predictor called for {task!r} ({phase})")


def test_prediction_is_not_called_when_every_task_in_play_is_insensitive():
    policy = PolicyConfig(planner="emoe", experts_per_layer=2, prediction_interval=2,
                          sensitivity={"classification": [0.0] * 4, "similarity": [0.0] * 4})
    predictor = _NoCallPredictor()
    s = Scheduler(TINY_MODEL, TINY_GPU, policy, predictor=predictor)
    requests = [make_request(str(i), float(i), task=["classification", "similarity"][i % 2],
                             output_tokens=3) for i in range(9)]
    _, backend = run(s, requests)
    assert not any(p.run_predictor for p in backend.plans)
    per_layer = [sum(1 for key in backend.resident if key[0] == layer) for layer in range(4)]
    assert per_layer == [2, 2, 2, 2]  # every layer still holds experts
    # a task sensitive somewhere arrives: the set was not chosen for it, the predictor runs
    s.add_request(make_request("qa", 100.0, task="qa"))
    with pytest.raises(AssertionError, match="predictor called for 'qa'"):
        s.next_step(100.0)


def test_generated_token_routing_and_output_lengths_are_measured():
    s = scheduler(planner="emoe", experts_per_layer=2, predictor="last-prompt")
    assert s.expected_output("qa") == 32  # the task profile's default before any finish
    s.add_request(make_request("a", output_tokens=3))
    counts = np.arange(16).reshape(4, 4)
    step(s, 0.0, routing={"a": counts})
    plan = s.next_step(1.0)
    decode = np.ones((4, 4))
    decode[:, 0] = 5
    s.on_step_done(StepResult(1.0, 2.0, iterations=plan.iterations,
                              outputs=[RequestStepOutput("a", finished=True)],
                              decode_routing={"a": decode}))
    np.testing.assert_allclose(s.planner.predictor.predict("qa", "decode"), decode / 8)
    assert s.expected_output("qa") == 3  # it generated its 3 tokens: not the default 32
    # a backend that hears of the finish only afterwards reports it with the next step
    s.add_request(make_request("b", 3.0))
    s.next_step(3.0)
    s.on_step_done(StepResult(3.0, 4.0, decode_routing={"a": decode * 0 + np.eye(4)}))
    np.testing.assert_allclose(s.planner.predictor.predict("qa", "decode"), np.eye(4))
