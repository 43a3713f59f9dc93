"""No request can hurt another: a request's own failure ends it alone, an engine-wide failure is
recovered (scheduler and engine resynchronised from the engine's state), and an engine that
cannot be recovered is reported NOT_SERVING with the reason. On the real engine where it
matters (NaN logits, the expert cache), on the no-work backend where only the service acts."""

from __future__ import annotations

import asyncio

import grpc
import pytest
import torch
from grpc_health.v1 import health_pb2

from emoe.core.errors import ConfigError
from emoe.core.policy_file import PolicyConfig
from emoe.rpc import cli, service
from emoe.rpc.fake import FakeBackend
from emoe.rpc.local import LocalEngineBackend
from emoe.rpc.text import IncrementalDetokenizer

from .conftest import connected, serving
from .test_engine_e2e import checkpoint  # noqa: F401 - the module-scoped model fixture
from .test_offload_serve import PROMPTS, parse, policy_file, run_prompts

pytestmark = pytest.mark.anyio

INNOCENT_TOKENS = 8


def innocents(client, n: int = 5):
    return [client.complete([5, 40 + i, 7], max_tokens=INNOCENT_TOKENS, temperature=0.0,
                            ignore_eos=True, request_id=f"innocent-{i}") for i in range(n)]


def assert_innocents_finished(results) -> None:
    for result in results:
        assert not isinstance(result, BaseException), result
        assert result.completion.output_tokens == INNOCENT_TOKENS


async def test_a_request_whose_logits_turn_nan_fails_alone(checkpoint):  # noqa: F811
    backend = LocalEngineBackend(checkpoint, max_batch_size=8)
    async with serving([backend]) as server, connected(server) as client:
        poison = 77  # a token whose embedding is NaN: any request that contains it
        with torch.no_grad():
            backend._engine.model.embed_tokens.weight[poison] = float("nan")
        results = await asyncio.gather(
            *innocents(client), client.complete([5, poison, 7], max_tokens=4, request_id="nan"),
            return_exceptions=True)
        again = await asyncio.gather(*innocents(client), return_exceptions=True)  # its slot reused
        stats = await client.stats()
        engine = backend._engine
    assert_innocents_finished(results[:-1] + again)
    error = results[-1]
    assert isinstance(error, grpc.aio.AioRpcError) and error.code() == grpc.StatusCode.INTERNAL
    assert "NaN" in error.details() and "others were unaffected" in error.details()
    assert sum(t.failed for t in stats.tasks) == 1
    assert engine.num_requests == 0 and engine.cache.num_free == 8


async def test_a_request_whose_sampling_or_stop_handling_raises_fails_alone(checkpoint,  # noqa: F811
                                                                            monkeypatch):
    from emoe.engine.engine import Engine

    advance = Engine._advance

    def failing(self, seq, token):
        if seq.request_id.endswith("/victim"):
            raise ValueError("stop handling broke")
        return advance(self, seq, token)

    monkeypatch.setattr(Engine, "_advance", failing)
    async with serving([LocalEngineBackend(checkpoint, max_batch_size=8)]) as server, \
            connected(server) as client:
        results = await asyncio.gather(
            *innocents(client), client.complete([5, 6, 7], max_tokens=4, request_id="victim"),
            return_exceptions=True)
    assert_innocents_finished(results[:-1])
    assert results[-1].code() == grpc.StatusCode.INTERNAL
    assert "ValueError: stop handling broke" in results[-1].details()


async def test_a_request_whose_text_cannot_be_decoded_fails_alone(monkeypatch):
    class Failing(IncrementalDetokenizer):
        def add(self, token_ids, final=False):
            if 33 in token_ids:  # the fake engine's first token for a 30-token prompt
                raise UnicodeError("broken bytes")
            return super().add(token_ids, final)

    monkeypatch.setattr(service, "IncrementalDetokenizer", Failing)
    async with serving([FakeBackend(step_delay_s=0.005)]) as server, connected(server) as client:
        results = await asyncio.gather(
            *innocents(client), client.complete([3] * 30, max_tokens=4, request_id="victim"),
            return_exceptions=True)
        stats = await client.stats()
    assert_innocents_finished(results[:-1])
    assert results[-1].code() == grpc.StatusCode.INTERNAL
    assert "into text failed: UnicodeError" in results[-1].details()
    assert sum(t.failed for t in stats.tasks) == 1 and server.service.in_flight == 0


class RefusingFake(FakeBackend):
    def add_request(self, request_id, prompt, sampling):
        if prompt == [9, 9, 9]:
            raise ConfigError("prompt_ids holds a forbidden sequence")
        super().add_request(request_id, prompt, sampling)


async def test_a_request_the_engine_refuses_fails_alone():
    async with serving([RefusingFake(step_delay_s=0.005)]) as server, connected(server) as client:
        results = await asyncio.gather(*innocents(client), client.complete([9, 9, 9], max_tokens=2),
                                       return_exceptions=True)
    assert_innocents_finished(results[:-1])
    assert results[-1].code() == grpc.StatusCode.INVALID_ARGUMENT
    assert results[-1].details().startswith("prompt: the engine refused the request")


@pytest.mark.parametrize("planner,miss", [("lru", "fetch"), ("emoe", "reroute")])
async def test_engine_failure_under_an_expert_cache_is_recovered(tmp_path, checkpoint,  # noqa: F811
                                                                 planner, miss):
    """A step that raises part-way (here: in the third MoE layer, after the cache changed in
    the first two) fails the requests it ran; scheduler and engine then agree again on the
    resident experts, and later requests are served."""
    args = parse("serve", "--checkpoint", str(checkpoint), "--max-batch-size", "4",
                 "--policy", policy_file(tmp_path, planner, checkpoint.name),
                 "--expert-budget", "50%")
    policy = PolicyConfig.from_file(args.policy)
    backend = cli._local_backend(args, policy)
    async with serving([backend], policy=policy) as server, connected(server) as client:
        experts = backend.experts
        call = type(experts).__call__
        calls = {"n": 0}

        def failing(self, hidden, router_logits, layer):
            calls["n"] += 1
            if calls["n"] == 4 * 6 + 3:  # the seventh step, layer 2
                raise RuntimeError("injected: device error mid-step")
            return call(self, hidden, router_logits, layer)

        type(experts).__call__ = failing
        try:
            first = await asyncio.gather(*(client.complete(text, task=task, max_tokens=6,
                                                           ignore_eos=True, temperature=0.0)
                                           for task, text in PROMPTS), return_exceptions=True)
        finally:
            type(experts).__call__ = call
        failed = [r for r in first if isinstance(r, BaseException)]
        after = await run_prompts(client)  # normal requests after the failure
        stats = await client.stats()
        health = await client.health()
        replica = server.service.replicas[0]
        engine = backend._engine
        resident_seen = set(replica._resident)
        planner_resident = {(int(layer), int(e)) for layer, e in
                            zip(*replica._scheduler.planner.resident.nonzero())}
    assert calls["n"] >= 4 * 6 + 3 and 1 <= len(failed) <= 4  # a running batch of at most 4
    for error in failed:
        assert error.code() == grpc.StatusCode.INTERNAL and "server recovered" in error.details()
        assert "injected" not in error.details()
    for result in first:
        if not isinstance(result, BaseException):
            assert result.completion.output_tokens == 6
    assert all(r[-1].completion.output_tokens == 6 for r in after)
    assert resident_seen == planner_resident == experts.cache.resident()
    experts.cache.check_invariants()
    assert sum(t.failed for t in stats.tasks) == len(failed)
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert engine.num_requests == 0


class Unrecoverable(FakeBackend):
    async def execute(self, plan):
        raise RuntimeError("the device is gone")

    async def recover(self):
        raise RuntimeError("cannot reset the device")


async def test_an_engine_that_cannot_recover_is_not_serving_and_says_why():
    async with serving([Unrecoverable()]) as server, connected(server) as client:
        with pytest.raises(grpc.aio.AioRpcError) as first:
            await client.complete([3], max_tokens=2)
        for _ in range(100):
            if await client.health() == health_pb2.HealthCheckResponse.NOT_SERVING:
                break
            await asyncio.sleep(0.02)
        health = await client.health()
        with pytest.raises(grpc.aio.AioRpcError) as later:
            await client.complete([3], max_tokens=2)
    assert first.value.code() == grpc.StatusCode.INTERNAL
    assert health == health_pb2.HealthCheckResponse.NOT_SERVING
    assert later.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot recover" in later.value.details()
    assert "RuntimeError: cannot reset the device" in later.value.details()
    assert server.service.health() == (False, later.value.details().split("no engine can serve: ")[1])
