"""The scheduler service over the fake backend: streaming, abort, deadlines, bad input."""

from __future__ import annotations

import asyncio
import math
import urllib.request

import anyio
import grpc
import pytest
from grpc_health.v1 import health_pb2

from emoe.rpc.client import generate_request
from emoe.rpc.errors import FIELD_METADATA_KEY
from emoe.rpc.fake import FakeBackend, byte_tokenizer
from emoe.rpc.v1 import scheduler_pb2 as pb

from .conftest import connected, serving

pytestmark = pytest.mark.anyio


async def rest_of(call) -> list[pb.GenerateResponse]:
    """The remaining responses of a call already read from with ``read()``."""
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def wait_for(predicate, timeout: float = 5.0) -> None:
    with anyio.fail_after(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_stream_delivers_tokens_text_and_completion():
    prompt = "Please summarize this report in one line."
    async with serving() as server, connected(server) as client:
        responses = [r async for r in client.generate(prompt, max_tokens=12, request_id="r1")]
    assert all(r.request_id == "r1" for r in responses)
    assert [r.HasField("completion") for r in responses] == [False] * (len(responses) - 1) + [True]
    tokens = [t for r in responses for t in r.token_ids]
    assert len(tokens) == 12
    assert "".join(r.text for r in responses) == byte_tokenizer().decode(tokens)
    c = responses[-1].completion
    assert c.finish_reason == pb.FINISH_REASON_LENGTH
    assert c.task == "summarization"
    assert c.prompt_tokens == len(byte_tokenizer().encode(prompt).ids)
    assert c.output_tokens == 12
    assert 0 <= c.timings.queue_s <= c.timings.ttft_s <= c.timings.total_s
    assert c.timings.tpot_s >= 0


async def test_request_id_generated_when_empty_and_unique():
    async with serving() as server, connected(server) as client:
        a = await client.complete([5, 6, 7], max_tokens=2)
        b = await client.complete([5, 6, 7], max_tokens=2)
    assert a.request_id and b.request_id and a.request_id != b.request_id


@pytest.mark.parametrize("prompt, task", [
    ("Classify the sentiment of: great film", "classification"),
    ("Are these two sentences similar? a / b", "similarity"),
    ("no keyword at all here", "conversation"),
    ([9, 10, 11], "conversation"),
])
async def test_task_detected_from_prompt_keywords(prompt, task):
    async with serving() as server, connected(server) as client:
        result = await client.complete(prompt, max_tokens=1)
    assert result.completion.task == task


async def test_given_task_and_slo_are_used():
    async with serving() as server, connected(server) as client:
        result = await client.complete("Summarize: x", task="qa", ttft_s=30.0, tpot_s=30.0,
                                       max_tokens=3)
    assert result.completion.task == "qa"
    assert result.completion.slo_met


async def test_eos_stops_unless_ignored_and_stop_tokens_stop():
    async with serving([FakeBackend(emit_eos_after=2)]) as server, connected(server) as client:
        eos = await client.complete([4, 5], max_tokens=10)
        ignored = await client.complete([4, 5], max_tokens=10, ignore_eos=True)
        first_three = ignored.token_ids[:3]
        stopped = await client.complete([4, 5], max_tokens=10, ignore_eos=True,
                                        stop_token_ids=[first_three[1]])
    assert eos.completion.finish_reason == pb.FINISH_REASON_STOP
    assert len(eos.token_ids) == 3 and eos.token_ids[-1] == 1
    assert ignored.completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert len(ignored.token_ids) == 10 and 1 not in ignored.token_ids
    assert stopped.completion.finish_reason == pb.FINISH_REASON_STOP
    assert stopped.token_ids == first_three[:2]


async def test_abort_ends_stream_and_frees_the_engine():
    backend = FakeBackend(step_delay_s=0.01)
    async with serving([backend]) as server, connected(server) as client:
        call = client.stream(generate_request([3, 4], request_id="long", max_tokens=4000))
        first = await call.read()
        assert first.request_id == "long"
        await client.abort("long")
        rest = await rest_of(call)
        assert rest[-1].completion.finish_reason == pb.FINISH_REASON_ABORTED
        assert await call.code() == grpc.StatusCode.OK
        await wait_for(lambda: backend.num_requests == 0)
        stats = await client.stats()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.abort("long")
    assert err.value.code() == grpc.StatusCode.NOT_FOUND
    assert sum(t.aborted for t in stats.tasks) == 1
    assert stats.waiting == stats.running == 0


@pytest.mark.parametrize("how", ["deadline", "cancel"])
async def test_deadline_and_cancel_free_the_batch_slot_and_kv(how):
    backend = FakeBackend(step_delay_s=0.01)
    async with serving([backend]) as server, connected(server) as client:
        call = client.stream(generate_request([3, 4], max_tokens=4000),
                             timeout=0.3 if how == "deadline" else None)
        await call.read()
        assert backend.num_requests == 1
        if how == "cancel":
            call.cancel()
        with pytest.raises((grpc.aio.AioRpcError, asyncio.CancelledError)):
            await rest_of(call)
        if how == "deadline":
            assert await call.code() == grpc.StatusCode.DEADLINE_EXCEEDED
        await wait_for(lambda: backend.num_requests == 0)
        await wait_for(lambda: server.service.load()[:2] == (0, 0))
        stats = await client.stats()
        # the slot is free: a new request runs to completion
        after = await client.complete([3, 4], max_tokens=3)
    assert sum(t.aborted for t in stats.tasks) == 1
    assert after.completion.output_tokens == 3


BAD_INPUTS = [
    (dict(prompt=""), "text"),
    (dict(prompt="   "), "text"),
    (dict(prompt=[]), "token_ids.ids"),
    (dict(prompt=[3, 100_000]), "token_ids.ids[1]"),
    (dict(task="poetry"), "task"),
    (dict(ttft_s=0.0), "slo.ttft_s"),
    (dict(tpot_s=-1.0), "slo.tpot_s"),
    (dict(ttft_s=math.nan), "slo.ttft_s"),
    (dict(max_tokens=0), "sampling.max_tokens"),
    (dict(max_tokens=4096), "sampling.max_tokens"),  # prompt + max_tokens beyond the context
    (dict(temperature=-0.5), "sampling.temperature"),
    (dict(top_p=0.0), "sampling.top_p"),
    (dict(top_p=1.5), "sampling.top_p"),
    (dict(seed=2**63), "sampling.seed"),
    (dict(stop_token_ids=[999_999]), "sampling.stop_token_ids"),
    (dict(request_id="x" * 300), "request_id"),
]


@pytest.mark.parametrize("fields, field", BAD_INPUTS, ids=[f for _, f in BAD_INPUTS])
async def test_bad_input_is_invalid_argument_naming_the_field(fields, field):
    fields = dict(fields)
    prompt = fields.pop("prompt", "Summarize: the cat sat")
    async with serving() as server, connected(server) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete(prompt, **fields)
        stats = await client.stats()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith(field)
    assert (FIELD_METADATA_KEY, field) in tuple(err.value.trailing_metadata())
    assert sum(t.submitted for t in stats.tasks) == 0


async def test_missing_prompt_is_invalid():
    async with serving() as server, connected(server) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.stream(pb.GenerateRequest(task="qa")).read()
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("prompt")


async def test_prompt_filling_the_context_is_invalid():
    async with serving([FakeBackend(max_context=16)]) as server, connected(server) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete(list(range(3, 19)))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details().startswith("token_ids")


async def test_duplicate_in_flight_id_is_already_exists():
    async with serving([FakeBackend(step_delay_s=0.01)]) as server, connected(server) as client:
        call = client.stream(generate_request([3], request_id="dup", max_tokens=20))
        await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete([3], request_id="dup", max_tokens=1)
        assert err.value.code() == grpc.StatusCode.ALREADY_EXISTS
        await rest_of(call)
        again = await client.complete([3], request_id="dup", max_tokens=1)  # free once finished
    assert again.completion.finish_reason == pb.FINISH_REASON_LENGTH


async def test_full_queue_is_resource_exhausted():
    backend = FakeBackend(step_delay_s=0.01, max_running=1)
    async with serving([backend], max_queue=2) as server, connected(server) as client:
        running = client.stream(generate_request([3], max_tokens=4000))
        await running.read()
        waiting = [client.stream(generate_request([3], max_tokens=1)) for _ in range(2)]
        await wait_for(lambda: server.service.load()[0] == 2)
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete([3], max_tokens=1)
        running.cancel()
        results = [[r async for r in call] for call in waiting]
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert all(r[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH for r in results)


async def test_server_info_and_stats():
    async with serving() as server, connected(server) as client:
        info = await client.server_info()
        for _ in range(3):
            await client.complete("Classify: good", max_tokens=4, ttft_s=60, tpot_s=60)
        stats = await client.stats()
    assert info.model.name == "fake-moe" and info.model.vocab_size == 259
    assert info.policy == "fcfs" and info.default_task == "conversation"
    assert {t.name for t in info.tasks} >= {"qa", "classification", "summarization"}
    by_task = {t.task: t for t in stats.tasks}
    c = by_task["classification"]
    assert (c.submitted, c.finished, c.slo_met, c.output_tokens) == (3, 3, 3, 12)
    assert c.slo_attainment == 1.0
    assert c.ttft.count == 3 and 0 < c.ttft.p50_s <= c.total.max_s
    assert stats.experts.resident == 32  # the "all" planner keeps every expert resident


async def test_metrics_endpoint_exports_the_service_metrics():
    async with serving(metrics_port=0) as server, connected(server) as client:
        await client.complete("Summarize: a b c", max_tokens=3)
        url = f"http://127.0.0.1:{server.metrics_port}/metrics"
        text = await anyio.to_thread.run_sync(lambda: urllib.request.urlopen(url).read().decode())
    for name in ('emoe_requests_waiting ', 'emoe_requests_running ',
                 'emoe_ttft_seconds_bucket{le="0.001",task="summarization"}',
                 'emoe_tpot_seconds_count{task="summarization"} 1.0',
                 'emoe_e2e_latency_seconds_count{task="summarization"} 1.0',
                 'emoe_slo_attainment{task="summarization"} 1.0',
                 'emoe_requests_total{outcome="finished",task="summarization"} 1.0',
                 'emoe_expert_loads_total 32.0', 'emoe_expert_hit_rate ',
                 'emoe_expert_memory_bytes 3.3554432e+07'):
        assert name in text, name


class SlowStart(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def start(self):
        await self.go.wait()
        return await super().start()


async def test_health_not_serving_until_the_engine_is_warm():
    backend = SlowStart()
    async with serving([backend], wait=False) as server, connected(server) as client:
        assert await client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete([3], max_tokens=1)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        backend.go.set()
        await client.wait_serving(timeout=5)
        assert await client.health("emoe.v1.SchedulerService") == health_pb2.HealthCheckResponse.SERVING
        assert (await client.complete([3], max_tokens=1)).completion.output_tokens == 1


class FailingOnce(FakeBackend):
    def __init__(self) -> None:
        super().__init__()
        self.failed = False

    async def execute(self, plan):
        if not self.failed:
            self.failed = True
            raise RuntimeError("boom: a bug in the engine")
        return await super().execute(plan)


async def test_engine_bug_is_internal_without_a_trace_and_service_survives():
    async with serving([FailingOnce()]) as server, connected(server) as client:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete([3], max_tokens=2)
        after = await client.complete([3], max_tokens=2)
        stats = await client.stats()
    assert err.value.code() == grpc.StatusCode.INTERNAL
    assert "boom" not in err.value.details() and "Traceback" not in err.value.details()
    assert after.completion.output_tokens == 2
    assert sum(t.failed for t in stats.tasks) == 1


async def test_drain_refuses_new_requests_and_finishes_streams_in_flight():
    async with serving([FakeBackend(step_delay_s=0.01)]) as server, connected(server) as client:
        call = client.stream(generate_request([3], max_tokens=30))
        await call.read()
        drain = asyncio.create_task(server.drain(grace_s=10))
        await wait_for(lambda: server.service.serving is False)
        assert await client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await client.complete([3], max_tokens=1)
        rest = await rest_of(call)
        await drain
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rest[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].completion.output_tokens == 30
