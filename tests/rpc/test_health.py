"""Health that tells the truth: Check and Watch through the standard grpc_health client, a hung
worker marked down within seconds (its streams UNAVAILABLE) and back once it answers, an
in-process engine hung in a step likewise (and back once the step returns), and a worker that
drains its requests within its grace on SIGTERM."""

from __future__ import annotations

import asyncio
import signal
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from emoe.rpc.client import generate_request
from emoe.rpc.fake import FakeBackend
from emoe.rpc.local import LocalEngineBackend
from emoe.rpc.remote import RemoteBackend
from emoe.rpc.v1 import scheduler_pb2 as pb

from .conftest import connected, emoe_process, free_port, serving, stop_process
from .test_engine_e2e import checkpoint  # noqa: F401 - the module-scoped model fixture

pytestmark = pytest.mark.anyio

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Slow(FakeBackend):
    """Takes ``ready`` before it reports itself warm."""

    def __init__(self) -> None:
        super().__init__()
        self.ready = asyncio.Event()

    async def start(self):
        await self.ready.wait()
        return await super().start()


async def test_watch_and_check_follow_the_server_with_the_standard_client():
    backend = Slow()
    async with serving([backend], wait=False) as server, connected(server) as client:
        health = health_pb2_grpc.HealthStub(client.channel)
        watches = {name: health.Watch(health_pb2.HealthCheckRequest(service=name))
                   for name in ("", "emoe.v1.SchedulerService")}
        first = {name: (await w.read()).status for name, w in watches.items()}
        checked = (await health.Check(health_pb2.HealthCheckRequest(service=""))).status
        backend.ready.set()
        second = {name: (await asyncio.wait_for(w.read(), 10)).status for name, w in watches.items()}
        drain = asyncio.create_task(server.drain(grace_s=1))
        third = {name: (await asyncio.wait_for(w.read(), 10)).status for name, w in watches.items()}
        await drain
    assert checked == NOT_SERVING
    assert set(first.values()) == {NOT_SERVING}
    assert set(second.values()) == {SERVING}
    assert set(third.values()) == {NOT_SERVING}


async def _read_all(call) -> list[pb.GenerateResponse]:
    responses = []
    while (response := await call.read()) is not grpc.aio.EOF:
        responses.append(response)
    return responses


async def _until(predicate, timeout: float) -> float:
    start = time.monotonic()
    while not await predicate():
        assert time.monotonic() - start < timeout, "timed out"
        await asyncio.sleep(0.02)
    return time.monotonic() - start


def start_worker(port: int, *flags: str):
    return emoe_process("worker", "--backend", "fake", "--fake-step-delay", "0.01",
                        "--port", str(port), "--log-level", "WARNING", *flags)


async def test_a_hung_worker_is_marked_down_within_seconds_and_back_when_it_answers():
    port = free_port()
    worker = start_worker(port)
    try:
        target = f"127.0.0.1:{port}"
        async with serving([RemoteBackend(target, liveness_timeout_s=1.0)], wait=False,
                           remote_workers=(target,)) as server, connected(server) as client:
            await asyncio.wait_for(server.wait_serving(), 30)
            calls = [client.stream(generate_request([3, 4], max_tokens=4000)) for _ in range(3)]
            for call in calls:
                assert (await call.read()).token_ids
            worker.send_signal(signal.SIGSTOP)
            stopped_at = time.monotonic()
            ended = []
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(_read_all(call), 15)
                ended.append(time.monotonic() - stopped_at)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
                assert "health check" in err.value.details()
            await _until(lambda: _is(client, NOT_SERVING), 5)
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.complete([3], max_tokens=1, timeout=5)

            worker.send_signal(signal.SIGCONT)
            await client.wait_serving(timeout=15)
            after = await client.complete([3, 4], max_tokens=5, timeout=10)
    finally:
        worker.send_signal(signal.SIGCONT)
        stop_process(worker)
    # liveness 1 s + a probe every 0.5 s; the bound leaves room for a loaded machine
    assert max(ended) < 10
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert after.completion.output_tokens == 5


async def _is(client, status) -> bool:
    return await client.health() == status


async def test_an_idle_worker_that_hangs_is_reported_not_serving():
    port = free_port()
    worker = start_worker(port)
    try:
        target = f"127.0.0.1:{port}"
        async with serving([RemoteBackend(target, liveness_timeout_s=1.0)], wait=False,
                           remote_workers=(target,)) as server, connected(server) as client:
            await asyncio.wait_for(server.wait_serving(), 30)
            worker.send_signal(signal.SIGSTOP)
            await _until(lambda: _is(client, NOT_SERVING), 10)
            reason = server.service.health()[1]
            info = await client.server_info()
            worker.send_signal(signal.SIGCONT)
            await _until(lambda: _is(client, SERVING), 15)
            info_after = await client.server_info()
    finally:
        worker.send_signal(signal.SIGCONT)
        stop_process(worker)
    assert "health check" in reason
    assert not info.serving and info.not_serving_reason == reason
    assert info_after.serving and info_after.not_serving_reason == ""


async def test_worker_finishes_its_requests_within_its_drain_grace_on_sigterm():
    port = free_port()
    worker = start_worker(port, "--drain-grace", "20")
    try:
        target = f"127.0.0.1:{port}"
        async with serving([RemoteBackend(target)], wait=False, remote_workers=(target,)) as server, \
                connected(server) as client:
            await asyncio.wait_for(server.wait_serving(), 30)
            call = client.stream(generate_request([3, 4], max_tokens=150))  # ~1.5 s of steps
            assert (await call.read()).token_ids
            worker.send_signal(signal.SIGTERM)
            await _until(lambda: _is(client, NOT_SERVING), 5)  # it takes no new requests
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                await client.complete([3], max_tokens=1, timeout=5)
            rest = await asyncio.wait_for(_read_all(call), 20)
            exit_code = await asyncio.to_thread(worker.wait, 20)
    finally:
        stop_process(worker)
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert rest[-1].completion.finish_reason == pb.FINISH_REASON_LENGTH
    assert rest[-1].completion.output_tokens == 150
    assert exit_code == 0


class Hang:
    """Makes the engine's next step hang inside its second decoder layer until released."""

    def __init__(self, backend):
        import threading

        self.armed, self.inside, self.release = (threading.Event(), threading.Event(),
                                                 threading.Event())
        layer = backend._engine.model.layers[1]
        forward = layer.forward

        def hanging(*args, **kwargs):
            if self.armed.is_set():
                self.armed.clear()
                self.inside.set()
                self.release.wait(60)
            return forward(*args, **kwargs)

        layer.forward = hanging


async def _http_get(server, path: str) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session, \
            session.get(f"http://127.0.0.1:{server.http_port}{path}") as response:
        return response.status, await response.json(content_type=None)


async def _http_completion(server) -> tuple[int, dict]:
    import aiohttp

    async with aiohttp.ClientSession() as session, session.post(
            f"http://127.0.0.1:{server.http_port}/v1/completions",
            json={"model": "emoe-tiny", "prompt": [3, 4], "max_tokens": 2}) as response:
        return response.status, await response.json(content_type=None)


async def test_a_hung_in_process_engine_is_marked_down_and_serves_again_when_its_step_returns(
        checkpoint):  # noqa: F811
    """The real engine on the reference model, a step hung inside a layer: health and
    GetServerInfo say NOT_SERVING and why, its streams end UNAVAILABLE, new requests are
    refused (gRPC UNAVAILABLE, HTTP 503 with the reason); once the step returns the engine is
    reset and answers as before the hang."""
    backend = LocalEngineBackend(checkpoint, max_batch_size=4, stall_timeout_s=1.0)
    async with serving([backend], http_port=0) as server, connected(server) as client:
        before = await client.complete([3, 4, 5], max_tokens=6, temperature=0.0, ignore_eos=True)
        hang = Hang(backend)
        calls = [client.stream(generate_request([3 + i, 4], max_tokens=200, ignore_eos=True))
                 for i in range(3)]
        for call in calls:
            assert (await call.read()).token_ids
        hang.armed.set()
        assert await asyncio.to_thread(hang.inside.wait, 10)
        hung_at = time.monotonic()
        ended = []
        for call in calls:
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(_read_all(call), 15)
            ended.append(time.monotonic() - hung_at)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            assert "no progress" in err.value.details()
        await _until(lambda: _is(client, NOT_SERVING), 5)
        info = await client.server_info()
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.complete([3], max_tokens=1, timeout=5)
        http_health = await _http_get(server, "/health")
        http_refused = await _http_completion(server)

        hang.release.set()
        await client.wait_serving(timeout=15)
        after = await client.complete([3, 4, 5], max_tokens=6, temperature=0.0, ignore_eos=True)
        info_after = await client.server_info()
        engine = backend._engine
    assert max(ended) < 1.0 + 5  # the stall timeout, and room for a loaded machine
    assert not info.serving and "no progress" in info.not_serving_reason
    assert "local:" in info.not_serving_reason and "serves again" in info.not_serving_reason
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no progress" in refused.value.details()
    assert http_health[0] == 503 and "no progress" in http_health[1]["reason"]
    assert http_refused[0] == 503 and "no progress" in http_refused[1]["error"]["message"]
    assert info_after.serving and info_after.not_serving_reason == ""
    assert after.token_ids == before.token_ids and len(after.token_ids) == 6
    assert engine.num_requests == 0 and engine.cache.num_free == 4


async def test_a_worker_whose_engine_hangs_in_a_step_is_marked_down_and_back(
        checkpoint):  # noqa: F811
    """`serve --worker` over a worker whose engine hangs (its process still answers health):
    the worker says UNAVAILABLE and why, the scheduler fails the streams and reconnects once
    the step returns."""
    from emoe.rpc.server import Listen, WorkerServer

    backend = LocalEngineBackend(checkpoint, max_batch_size=4, stall_timeout_s=1.0)
    worker = WorkerServer(backend, Listen(port=0))
    await worker.start()
    try:
        target = f"127.0.0.1:{worker.port}"
        async with serving([RemoteBackend(target)], remote_workers=(target,)) as server, \
                connected(server) as client:
            hang = Hang(backend)
            call = client.stream(generate_request([3, 4], max_tokens=200, ignore_eos=True))
            assert (await call.read()).token_ids
            hang.armed.set()
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await asyncio.wait_for(_read_all(call), 15)
            await _until(lambda: _is(client, NOT_SERVING), 5)
            reason = (await client.server_info()).not_serving_reason
            hang.release.set()
            await client.wait_serving(timeout=15)
            after = await client.complete([3, 4], max_tokens=4, ignore_eos=True)
    finally:
        hang.release.set()
        await worker.stop()
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "no progress" in err.value.details()
    assert target in reason and "no progress" in reason
    assert after.completion.output_tokens == 4
