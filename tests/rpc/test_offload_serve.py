"""`emoe serve`/`emoe worker` with the expert cache: a policy's planner on the real engine.

The engine is built the way the CLI builds it (``cli._local_backend`` from parsed flags) over
the reference model (or the tiny random one of test_engine_e2e), at a 50% expert budget.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import pytest

from emoe.core.errors import ConfigError
from emoe.core.policy_file import PolicyConfig
from emoe.core.specs import get_hardware
from emoe.rpc import cli, convert
from emoe.rpc.backend import BackendInfo
from emoe.core.serving import EngineLimits, serving_scheduler_policy
from emoe.rpc.server import Listen, WorkerServer, scheduler_factory
from emoe.rpc.remote import RemoteBackend
from emoe.rpc.v1 import scheduler_pb2 as pb

from .conftest import connected, serving
from .test_engine_e2e import checkpoint  # noqa: F401 - the module-scoped model fixture

pytestmark = pytest.mark.anyio

PROMPTS = [  # several tasks (named explicitly, the scheduler plans by task)
    ("summarization", "Summarize: the cat sat on the mat and then it slept all day."),
    ("qa", "Question: what colour is the sky on a clear day?"),
    ("classification", "Classify the sentiment: I loved this film."),
    ("similarity", "Are these similar: a dog runs; a hound sprints."),
    ("conversation", "Hello, how are you today?"),
    ("summarization", "Summarize: rain fell on the town for three days."),
    ("qa", "What is the capital of France?"),
    ("conversation", "Hi there, tell me a story."),
]


def parse(command: str, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers())
    return parser.parse_args([command, *flags])


def policy_file(tmp_path, planner: str, model: str, **fields) -> str:
    path = tmp_path / f"{planner}.json"
    path.write_text(json.dumps(PolicyConfig(planner=planner, model=model, **fields).to_dict()))
    return str(path)


class Watched:
    """Wraps a backend's execute: records the engine's real resident set after every step."""

    def __init__(self, backend):
        self.backend, self.max_resident, self.steps = backend, 0, 0
        execute = backend.execute

        async def watched(plan):
            result = await execute(plan)
            self.steps += 1
            self.max_resident = max(self.max_resident, len(backend.experts.cache.resident()))
            return result

        backend.execute = watched


async def run_prompts(client) -> list[list[pb.GenerateResponse]]:
    async def one(task: str, text: str) -> list[pb.GenerateResponse]:
        return [r async for r in client.generate(text, task=task, max_tokens=6, temperature=0.0,
                                                 ignore_eos=True, timeout=120)]
    return await asyncio.gather(*(one(t, p) for t, p in PROMPTS))


@pytest.mark.parametrize("planner,miss", [("emoe", "reroute"), ("lru", "fetch")])
async def test_serve_runs_the_planner_on_the_expert_cache(tmp_path, checkpoint, planner, miss):  # noqa: F811
    args = parse("serve", "--checkpoint", str(checkpoint), "--max-batch-size", "4",
                 "--policy", policy_file(tmp_path, planner, checkpoint.name),
                 "--expert-budget", "50%")
    policy = PolicyConfig.from_file(args.policy)
    backend = cli._local_backend(args, policy)
    watched = Watched(backend)
    async with serving([backend], policy=policy) as server, connected(server) as client:
        results = await run_prompts(client)
        stats = await client.stats()
        info = await client.server_info()
        replica_resident = set(server.service.replicas[0]._resident)
        registry = server.metrics.registry
        loads_metric = registry.get_sample_value("emoe_expert_loads_total")
        hit_rate_metric = registry.get_sample_value("emoe_expert_hit_rate")
        memory_metric = registry.get_sample_value("emoe_expert_memory_bytes")

    experts = backend.experts
    assert experts is not None and experts.miss.value == miss
    total = info.model.num_layers * info.model.num_experts
    slots = experts.cache.num_slots
    assert slots == round(0.5 * total)
    assert experts.cache.budget_bytes == slots * experts.cache.store.expert_bytes
    assert info.model.name == checkpoint.name

    # every request streamed tokens and reached a terminal status
    for responses in results:
        assert sum(len(r.token_ids) for r in responses) == 6
        assert len([r for r in responses if r.token_ids]) >= 2  # streamed, not one message
        c = responses[-1].completion
        assert c.finish_reason == pb.FINISH_REASON_LENGTH and c.output_tokens == 6
        assert c.expert_hits + c.expert_misses > 0
    assert sum(t.finished for t in stats.tasks) == len(PROMPTS)
    assert {t.task for t in stats.tasks if t.finished} == {t for t, _ in PROMPTS}

    # the real engine's expert activity reaches stats and metrics
    e = stats.experts
    assert e.loads > 0 and loads_metric == e.loads
    assert e.hits > 0 and 0.0 < e.hit_rate <= 1.0 and hit_rate_metric == pytest.approx(e.hit_rate)
    assert e.hits + e.misses == sum(r[-1].completion.expert_hits + r[-1].completion.expert_misses
                                    for r in results)
    # residency: never above the budget; what the service reports is the engine's real set
    assert watched.steps > 0 and 0 < watched.max_resident <= slots
    assert replica_resident == experts.cache.resident()
    assert e.resident == len(replica_resident) <= slots
    assert e.resident_bytes == memory_metric == e.resident * experts.cache.store.expert_bytes
    if miss == "fetch":
        assert experts.fetches > 0 and e.misses > 0  # loads came from fetch-on-miss


async def test_worker_serves_the_planner_to_a_remote_scheduler(tmp_path, checkpoint):  # noqa: F811
    path = policy_file(tmp_path, "lru", checkpoint.name)
    args = parse("worker", "--checkpoint", str(checkpoint), "--max-batch-size", "4",
                 "--policy", path, "--expert-budget", "0.5")
    backend = cli._local_backend(args, PolicyConfig.from_file(path))
    worker = WorkerServer(backend, Listen(port=0))
    await worker.start()  # returns once the engine is warm
    try:
        target = f"127.0.0.1:{worker.port}"
        async with serving([RemoteBackend(target)], policy=PolicyConfig.from_file(path),
                           remote_workers=(target,)) as server, connected(server) as client:
            results = await run_prompts(client)
            stats = await client.stats()
            replica_resident = set(server.service.replicas[0]._resident)
    finally:
        await worker.stop()
    assert all(r[-1].completion.output_tokens == 6 for r in results)
    assert stats.experts.loads > 0 and 0.0 < stats.experts.hit_rate <= 1.0
    # fetches/evictions on miss travel over the worker protocol
    assert replica_resident == backend.experts.cache.resident()


async def test_a_remote_workers_planner_learns_from_generated_tokens(tmp_path,
                                                                    checkpoint):  # noqa: F811
    """`serve --worker`: the routing of each finished request's generated tokens crosses the
    worker protocol (ExecuteStepResponse.decode_routing) and reaches the scheduler's planner,
    as with an in-process engine, not only its prompt's routing."""
    path = policy_file(tmp_path, "emoe", checkpoint.name)
    args = parse("worker", "--checkpoint", str(checkpoint), "--max-batch-size", "4",
                 "--policy", path, "--expert-budget", "0.5")
    worker = WorkerServer(cli._local_backend(args, PolicyConfig.from_file(path)), Listen(port=0))
    await worker.start()
    observed: list[tuple[str, str, object]] = []
    try:
        target = f"127.0.0.1:{worker.port}"
        async with serving([RemoteBackend(target)], policy=PolicyConfig.from_file(path),
                           remote_workers=(target,)) as server, connected(server) as client:
            planner = server.service.replicas[0]._scheduler.planner
            observe = planner.observe_routing

            def recording(task, routing, phase="prefill"):
                observed.append((task, phase, routing))
                observe(task, routing, phase)

            planner.observe_routing = recording
            await asyncio.gather(*(client.complete(
                [3 + i, 40, 50, 7], task=task, max_tokens=6, ignore_eos=True, temperature=0.0)
                for i, task in enumerate(("qa", "summarization"))))
            info = server.service.replicas[0].info.model
    finally:
        await worker.stop()
    decode = {task: routing for task, phase, routing in observed if phase == "decode"}
    assert sorted(decode) == ["qa", "summarization"]
    assert sorted(task for task, phase, _ in observed if phase == "prefill") == sorted(decode)
    for routing in decode.values():  # 5 generated tokens fed back, top-k experts in each layer
        assert routing.shape == (info.num_layers, info.num_experts)
        assert (routing.sum(axis=1) == 5 * info.top_k).all()


async def test_planner_all_keeps_every_expert_resident(checkpoint):  # noqa: F811
    args = parse("serve", "--checkpoint", str(checkpoint), "--max-batch-size", "4")
    policy = PolicyConfig()
    backend = cli._local_backend(args, policy)
    async with serving([backend], policy=policy) as server, connected(server) as client:
        results = await run_prompts(client)
        stats = await client.stats()
        info = server.service.replicas[0].info
    assert backend.experts is None and info.expert_slots == 0
    assert stats.experts.resident == info.model.num_layers * info.model.num_experts
    assert stats.experts.misses == 0 and stats.experts.evictions == 0
    assert all(r[-1].completion.output_tokens == 6 for r in results)
    assert serving_scheduler_policy(policy, info.model, EngineLimits(4, 256))[0].planner == "all"


def test_scheduler_plans_for_the_engines_slots_kv_and_model():
    from emoe.core.specs import ModelSpec

    model = ModelSpec(name="tiny", num_layers=2, num_experts=4, top_k=2, expert_bytes=1000,
                      non_expert_bytes=5000, kv_bytes_per_token=10, hidden_size=8)
    info = BackendInfo(model=model, vocab_size=10, max_context=100, eos_token_id=0,
                       tokenizer_json="", max_running=4, expert_slots=4)
    policy = PolicyConfig(planner="emoe", experts_per_layer=3, model="tiny")
    scheduler = scheduler_factory(policy, get_hardware("a100-40gb"))(info)
    assert scheduler.planner.capacity_bytes == 4 * 1000  # the engine's 4 slots, not 2 x 3
    # non-expert + slots + KV (4 x 100 x 10 = 4000)
    assert scheduler.memory_budget_bytes == 5000 + 4000 + 4000
    with pytest.raises(ConfigError, match="tuned for 'other'"):
        scheduler_factory(PolicyConfig(planner="emoe", model="other"),
                          get_hardware("a100-40gb"))(info)


def test_flag_errors(tmp_path, checkpoint):  # noqa: F811
    lru = policy_file(tmp_path, "lru", checkpoint.name)
    with pytest.raises(ConfigError, match="--miss reroute: planner 'lru' fetches on a miss"):
        cli._local_backend(parse("serve", "--miss", "reroute"), PolicyConfig.from_file(lru))
    with pytest.raises(ConfigError, match="--expert-budget: the policy's planner is 'all'"):
        cli._local_backend(parse("serve", "--expert-budget", "50%"), PolicyConfig())
    with pytest.raises(ConfigError, match="workers hold the experts"):
        cli._serve(parse("serve", "--worker", "127.0.0.1:1", "--expert-budget", "50%"))


def test_worker_protocol_carries_fetches_and_slots():
    from emoe.core.plan import StepResult
    from emoe.core.specs import ModelSpec

    result = StepResult(started_at=0.0, finished_at=1.0, fetched_on_miss=[(0, 1), (1, 2)],
                        evicted_on_miss=[(0, 3)])
    back = convert.result_from_proto(convert.result_to_proto(result), 0.0, 1.0)
    assert back.fetched_on_miss == [(0, 1), (1, 2)] and back.evicted_on_miss == [(0, 3)]
    model = ModelSpec(name="m", num_layers=2, num_experts=4, top_k=2, expert_bytes=1,
                      non_expert_bytes=1, kv_bytes_per_token=1, hidden_size=1)
    info = BackendInfo(model=model, vocab_size=10, max_context=100, eos_token_id=0,
                       tokenizer_json="", max_running=4, expert_slots=5)
    assert convert.info_from_proto(convert.info_to_proto(info), "w").expert_slots == 5


def test_engine_folds_expert_activity_into_every_step_once():
    import numpy as np
    import torch

    from emoe.core.plan import PrefillChunk, StepPlan
    from emoe.engine.config import MoEConfig
    from emoe.engine.engine import Engine
    from emoe.engine.model import MoEModel
    from emoe.core.budget import ExpertBudget
    from emoe.engine.offload.executor import OffloadedExperts
    from emoe.engine.sampling import SamplingParams

    config = MoEConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_layers=2,
                       num_heads=2, num_kv_heads=1, num_experts=4, top_k=2,
                       max_position_embeddings=64, bos_token_id=0, eos_token_ids=(1,))
    model = MoEModel(config).init_weights(generator=torch.Generator().manual_seed(0))
    experts = OffloadedExperts.install(model, ExpertBudget.parse("50%"))
    experts.tasks, experts.sensitivity = {"a": "qa"}, {"qa": np.array([1.0, 0.0])}
    engine = Engine(model, max_batch_size=2, expert_handler=experts)
    engine.add_request("a", [2, 3, 4, 5, 6], SamplingParams(max_new_tokens=4, ignore_eos=True))
    plan = StepPlan(prefill=[PrefillChunk("a", 0, 5)], load=[(0, 0), (1, 1)])
    result = engine.execute(plan)
    (out,) = result.outputs
    assert out.expert_hits + out.expert_misses == 5 * 2 * 2  # tokens x top_k x layers, once
    assert 0 < out.expert_hits < 20
    assert out.weighted_choices == 10.0  # only layer 0 is sensitive for qa
    step = engine.execute(StepPlan(decode=["a"]))
    assert step.outputs[0].expert_hits + step.outputs[0].expert_misses == 2 * 2
