"""The simulator and the server make the same admission and planning decisions for the same
inputs: one scripted arrival sequence through both loops.

- simulated: ``emoe.sim.runner.build`` (model folder + engine profile + policy file, as
  ``emoe sim --model DIR --profile P --policy F``) and the SimPy ``World``, macro-stepping;
- served: the server's engine loop (``emoe.rpc.replica.Replica``) over the scheduler that
  ``emoe serve`` builds (``scheduler_factory``), stepping one iteration at a time, on a virtual
  clock; its engine is the simulator's backend behind the server's ``Backend`` interface, so
  both sides see the same step times and the only difference left is the loop.

Every request must get the same fate, at the same times; every expert load/evict list and
predictor run must come at the same moment; Eq. 3 must hold back the same waiting requests,
counted alike on both sides (``AdmissionCounters``, as ``emoe fidelity`` compares them).
"""

from __future__ import annotations

import asyncio
import json
import math
from pathlib import Path

import pytest

from emoe.core.metrics import AdmissionCounters
from emoe.core.plan import StepPlan, StepResult
from emoe.core.policy_file import PolicyConfig
from emoe.core.predictor import FrequencyPredictor, register_predictor_loader
from emoe.core.request import SLO, Request
from emoe.rpc import replica as replica_module
from emoe.rpc.backend import BackendInfo, SamplingParams
from emoe.rpc.metrics import ServiceMetrics
from emoe.rpc.replica import Replica, Submission
from emoe.rpc.server import scheduler_factory
from emoe.sim.runner import SimConfig, build
from emoe.sim.world import World

pytestmark = pytest.mark.anyio

CONTEXT, SLOTS, LAYER_SLOTS = 64, 4, 2
# arrival s, task, prompt tokens, output tokens, TTFT SLO s, TPOT SLO s
ARRIVALS = [
    (0.000, "qa", 20, 8, 1.0, 0.1), (0.004, "classification", 40, 3, 0.3, 0.1),
    (0.010, "conversation", 30, 20, 2.0, 0.1), (0.011, "summarization", 50, 10, 4.0, 0.1),
    (0.015, "qa", 60, 10, 1.0, 0.1),  # over the context: rejected with the server's reason
    (0.030, "similarity", 10, 2, 0.05, 0.1), (0.031, "qa", 12, 30, 0.2, 0.04),
    (0.050, "conversation", 25, 25, 2.0, 0.1), (0.090, "classification", 35, 4, 0.4, 0.1),
    (0.091, "qa", 8, 12, 0.3, 0.05), (0.092, "summarization", 45, 15, 4.0, 0.1),
    (0.200, "qa", 16, 6, 1.0, 0.1), (0.300, "similarity", 33, 5, 0.5, 0.1),
    (0.301, "conversation", 14, 40, 2.0, 0.1), (0.302, "qa", 9, 9, 0.08, 0.02),
    # alone later: "emoe" refuses the second while the first's TPOT margin is thin (Eq. 3),
    # and the margin grows a little with every iteration until it admits it
    (1.000, "qa", 10, 50, 1.0, 0.0026), (1.010, "conversation", 20, 5, 2.0, 0.1),
]


def requests() -> list[Request]:
    return [Request(str(i), t, task, n_in, n_out, SLO(ttft, tpot))
            for i, (t, task, n_in, n_out, ttft, tpot) in enumerate(ARRIVALS)]


@pytest.fixture(scope="module")
def served_model(tmp_path_factory) -> tuple[Path, Path]:
    """A model folder (config.json) and the engine profile of its served engine."""
    folder = tmp_path_factory.mktemp("tiny-moe")
    (folder / "config.json").write_text(json.dumps({
        "model_type": "mixtral", "vocab_size": 64, "hidden_size": 16, "intermediate_size": 32,
        "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
        "num_local_experts": 4, "num_experts_per_tok": 2, "max_position_embeddings": CONTEXT,
        "torch_dtype": "float32"}))
    profile = folder / "profile.json"
    profile.write_text(json.dumps({
        "format": "emoe-engine-profile", "version": 1, "model": folder.name,
        "step_time": {"step_overhead_s": 0.002, "prefill_s_per_token": 1e-4,
                      "decode_s_per_token": 3e-4, "attention_s_per_context_token": 1e-6},
        "pcie": {"bandwidth_bytes_per_s": 2e8, "latency_s": 1e-4}, "predictor_s": 0.001,
        "offload": {"step_s": 1e-4, "decode_s": 1e-5, "prefill_token_s": 1e-6},
        "engine": {"model": folder.name, "num_layers": 2, "num_experts": 4, "top_k": 2,
                   "hidden_size": 16, "threads": 1, "device": "cpu", "dtype": "float32",
                   "max_batch_size": SLOTS, "max_seq_len": CONTEXT}}))
    return folder, profile


def recorded(backend, log: list) -> None:
    """Log every plan's expert changes and predictor runs with the time they were issued."""
    execute = backend.execute

    def logged(plan: StepPlan, now: float, *args) -> StepResult:
        if plan.load or plan.evict or plan.run_predictor:
            log.append((round(now, 9), sorted(plan.load), sorted(plan.evict), plan.run_predictor))
        return execute(plan, now, *args)

    backend.execute = logged


def simulate(config: SimConfig) -> tuple[dict[str, Request], list, AdmissionCounters]:
    scheduler, backend = build(config)
    log: list = []
    recorded(backend, log)
    ended: list[Request] = []
    world = World(scheduler, backend, requests(), ended.append)
    world.run()  # macro steps, as emoe sim
    return {r.id: r for r in ended}, log, world.admission


class Clock:
    now = 0.0

    def monotonic(self) -> float:
        return self.now


class SimulatedEngine:
    """The simulator's backend as the server's engine, on a virtual clock: each step advances
    the clock to the step's simulated end, submitting the requests that arrive meanwhile."""

    name = "simulated-engine"
    draining = False

    def __init__(self, sim_backend, model, clock: Clock, due):
        self.sim, self.model, self.clock, self.due = sim_backend, model, clock, due
        self.requests: dict[str, Request] = {}
        self.replica: Replica | None = None

    async def start(self) -> BackendInfo:
        return BackendInfo(model=self.model, vocab_size=64, max_context=CONTEXT, eos_token_id=1,
                           tokenizer_json="", max_running=SLOTS,
                           expert_slots=0 if self.due.planner == "all"
                           else LAYER_SLOTS * self.model.num_layers)

    def add_request(self, request_id: str, prompt: list[int], sampling: SamplingParams) -> None:
        request = self.due.by_id[request_id]
        self.requests[request_id] = request
        self.sim.admit(request)

    def remove_request(self, request_id: str) -> None:
        request = self.requests.pop(request_id, None)
        if request is not None:
            self.sim.finish([request], self.clock.now)

    async def execute(self, plan: StepPlan) -> StepResult:
        result = self.sim.execute(plan, self.clock.now, math.inf)
        for chunk in plan.prefill:  # the KV the simulator's memory frees at finish
            request = self.requests[chunk.request_id]
            request.prefilled_tokens = chunk.start + chunk.num_tokens
            if request.prefilled_tokens == request.input_tokens:
                request.generated_tokens = 1
        for rid in plan.decode:
            self.requests[rid].generated_tokens += 1
        end = result.finished_at + result.serving_s  # the server's loop delivers, then plans
        self.due.submit_until(end)
        self.clock.now = end
        await asyncio.sleep(0)
        return result

    async def check(self) -> None:
        pass

    async def recover(self):
        raise AssertionError("a simulated step never fails")

    async def close(self) -> None:
        pass


class Arrivals:
    """The scripted arrivals, submitted to the replica at their times (accepted then)."""

    def __init__(self, planner: str):
        self.planner = planner
        self.pending = requests()
        self.by_id = {r.id: r for r in requests()}  # the engine's own copies
        self.replica: Replica | None = None

    def submit_until(self, t: float) -> None:
        while self.pending and self.pending[0].arrival <= t:
            r = self.pending.pop(0)
            self.replica.submit(Submission(
                key=r.id, request_id=r.id, owner="", task=r.task, prompt=[3] * r.input_tokens,
                sampling=SamplingParams(max_tokens=r.output_tokens, ignore_eos=True),
                slo=r.slo, priority=0, accepted_at=r.arrival))


async def serve(config: SimConfig, monkeypatch
                ) -> tuple[dict[str, Request], list, AdmissionCounters]:
    clock = Clock()
    monkeypatch.setattr(replica_module, "time", clock)
    model, hardware = config.specs()
    policy = PolicyConfig.from_file(config.policy_file)
    sim_scheduler, sim_backend = build(config)  # a fresh simulated engine, same routing seed
    log: list = []
    recorded(sim_backend, log)
    arrivals = Arrivals(policy.planner)
    engine = SimulatedEngine(sim_backend, sim_scheduler.model, clock, arrivals)
    seen: dict[str, Request] = {}
    make = scheduler_factory(policy, hardware)

    def make_scheduler(info):
        scheduler = make(info)
        add = scheduler.add_request
        scheduler.add_request = lambda r: (seen.__setitem__(r.id, r), add(r))
        return scheduler

    metrics = ServiceMetrics(list(policy.tasks), lambda: (0,) * 4)
    replica = Replica(engine, make_scheduler, metrics)
    arrivals.replica = replica
    await replica.start()
    while not replica.healthy:
        await asyncio.sleep(0)
    while arrivals.pending or replica.in_flight:
        if not replica.in_flight:  # idle: the clock jumps to the next arrival
            clock.now = max(clock.now, arrivals.pending[0].arrival)
            arrivals.submit_until(clock.now)
        await asyncio.sleep(0)
    await replica.close()
    sim_backend.flush()
    for rid, request in seen.items():  # the simulated engine's hit counters
        request.expert_hits = engine.due.by_id[rid].expert_hits
    return seen, log, metrics.admission


class TimedPredictor(FrequencyPredictor):
    """A predictor whose definition records its measured call time, as a learned one does."""

    name = "timed"


def timed_predictors(seconds: str):
    def factory(num_layers: int, num_experts: int) -> TimedPredictor:
        predictor = TimedPredictor(num_layers, num_experts)
        predictor.call_s = float(seconds)
        return predictor
    return factory


register_predictor_loader("timed", timed_predictors)


@pytest.mark.parametrize("scheduling, planner, predictor", [
    ("fcfs", "all", "frequency"), ("sjf", "static", "frequency"), ("edf", "lru", "frequency"),
    ("emoe", "emoe", "frequency"), ("emoe", "all", "frequency"),
    ("emoe", "emoe", "timed:0.004")])  # costlier than the profile's 1 ms: Eq. 3 sees it
async def test_simulator_and_server_decide_alike(served_model, tmp_path, monkeypatch,
                                                 scheduling, planner, predictor):
    folder, profile = served_model
    policy = PolicyConfig(scheduling=scheduling, planner=planner, prediction_interval=2,
                          experts_per_layer=None if planner == "all" else LAYER_SLOTS,
                          max_batch_tokens=48, max_num_seqs=8, model=folder.name,
                          predictor=predictor)
    policy_file = tmp_path / "policy.json"
    policy.to_file(policy_file)
    config = SimConfig(model=str(folder), profile=profile, policy_file=policy_file, seed=3)

    simulated, sim_log, sim_admission = simulate(config)
    served, served_log, served_admission = await serve(config, monkeypatch)
    if predictor.startswith("timed:"):  # one rule charges a predictor's own call time
        sim_scheduler, sim_backend = build(config)
        engine = SimulatedEngine(sim_backend, sim_scheduler.model, Clock(), Arrivals(planner))
        server_scheduler = scheduler_factory(policy, config.specs()[1])(await engine.start())
        assert (sim_scheduler.cost.predictor_s == sim_backend.hardware.predictor_s
                == server_scheduler.cost.predictor_s == 0.004)

    assert set(simulated) == set(served) == {str(i) for i in range(len(ARRIVALS))}
    fates = {}
    for rid, s in simulated.items():
        r = served[rid]
        assert (r.status, r.reason) == (s.status, s.reason), rid
        for field in ("admitted_at", "first_token_at", "finished_at"):
            a, b = getattr(s, field), getattr(r, field)
            assert (a is None and b is None) or a == pytest.approx(b, abs=1e-9), (rid, field)
        assert r.expert_hits == s.expert_hits, rid
        fates[s.status.value] = fates.get(s.status.value, 0) + 1
    assert sim_log == served_log
    # Eq. 3 held back the same requests at the same steps, costing them alike (the server's
    # scale moves within what the simulator runs as one macro step: within 0.1%)
    assert sim_admission.deferred == served_admission.deferred
    assert sim_admission.estimated_s == pytest.approx(served_admission.estimated_s, abs=1e-9)
    if scheduling == "emoe":
        assert sim_admission.deferred > 0
        assert sim_admission.slowdown == pytest.approx(served_admission.slowdown, rel=1e-3)
    else:
        assert sim_admission.slowdown is None and served_admission.slowdown is None
    assert simulated["4"].reason == ("sampling.max_tokens: prompt (60 tokens) + max_tokens (10) "
                                     "exceeds the model's context of 64 tokens")
    # the script makes the loops decide something: requests queue behind the 4 KV slots,
    # prompts are chunked, and expert planners load and predict
    assert fates == {"finished": len(ARRIVALS) - 1, "rejected": 1}
    admitted = sorted(s.admitted_at for s in simulated.values() if s.admitted_at is not None)
    assert any(s.admitted_at - s.arrival > 0.005 for s in simulated.values()
               if s.admitted_at is not None)
    assert len(admitted) == len(ARRIVALS) - 1
    if planner in ("static", "emoe"):
        assert any(load for _, load, _, _ in sim_log)
    if planner == "emoe":
        assert sum(run for *_, run in sim_log) >= 2
