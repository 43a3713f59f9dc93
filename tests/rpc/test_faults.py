"""Remote engine workers: a worker killed mid-stream, and one that comes back."""

from __future__ import annotations

import asyncio
import signal

import grpc
import pytest
from grpc_health.v1 import health_pb2

from emoe.rpc.client import generate_request
from emoe.rpc.remote import RemoteBackend

from .conftest import connected, emoe_process, free_port, serving, stop_process

pytestmark = pytest.mark.anyio


def start_worker(port: int):
    return emoe_process("worker", "--backend", "fake", "--fake-step-delay", "0.01",
                        "--port", str(port), "--log-level", "WARNING")


async def test_killed_worker_ends_streams_unavailable_and_service_recovers():
    port = free_port()
    worker = start_worker(port)
    try:
        async with serving([RemoteBackend(f"127.0.0.1:{port}")], wait=False,
                           remote_workers=(f"127.0.0.1:{port}",)) as server, \
                connected(server) as client:
            await asyncio.wait_for(server.wait_serving(), 30)
            calls = [client.stream(generate_request([3, 4], max_tokens=4000)) for _ in range(3)]
            for call in calls:
                assert (await call.read()).token_ids
            worker.send_signal(signal.SIGKILL)
            for call in calls:
                with pytest.raises(grpc.aio.AioRpcError) as err:
                    await asyncio.wait_for(_drain(call), 5)
                assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            await asyncio.wait_for(_until(lambda: not server.service.serving), 5)
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete([3], max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            for _ in range(100):  # health follows the replicas within a poll interval
                if await client.health() == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.02)
            assert await client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            stop_process(worker)

            worker = start_worker(port)
            await client.wait_serving(timeout=30)
            result = await client.complete([3, 4], max_tokens=5)
            stats = await client.stats()
            info = await client.server_info()
    finally:
        stop_process(worker)
    assert result.completion.output_tokens == 5
    assert sum(t.failed for t in stats.tasks) == 3
    assert list(info.workers) == [f"127.0.0.1:{port}"]


async def _drain(call) -> None:
    while await call.read() is not grpc.aio.EOF:
        pass


async def _until(predicate) -> None:
    while not predicate():
        await asyncio.sleep(0.01)
