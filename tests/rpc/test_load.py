"""Load: many concurrent streaming clients; every request ends once, the server stays healthy."""

from __future__ import annotations

import asyncio
import random
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2

from emoe.rpc.client import generate_request
from emoe.rpc.fake import FakeBackend
from emoe.rpc.v1 import scheduler_pb2 as pb

from .conftest import connected, serving

pytestmark = pytest.mark.anyio

CLIENTS = 64
DURATION_S = 3.0


async def test_64_concurrent_streaming_clients_every_request_ends_exactly_once():
    backend = FakeBackend(step_delay_s=0.002, max_running=24)
    outcomes: dict[str, str] = {}
    tokens_seen: dict[str, int] = {}

    async def client_loop(n: int, client) -> None:
        rng = random.Random(n)
        deadline = time.monotonic() + DURATION_S
        i = 0
        while time.monotonic() < deadline:
            request_id = f"c{n}-{i}"
            i += 1
            max_tokens = rng.randint(1, 24)
            kind = rng.random()
            call = client.stream(generate_request(
                [rng.randint(3, 258) for _ in range(rng.randint(1, 64))], request_id=request_id,
                max_tokens=max_tokens), timeout=0.05 if kind < 0.05 else None)
            count, completion = 0, None
            try:
                while (response := await call.read()) is not grpc.aio.EOF:
                    assert response.request_id == request_id
                    count += len(response.token_ids)
                    if response.HasField("completion"):
                        completion = response.completion
                    if kind > 0.95 and count:
                        call.cancel()
                        break
            except grpc.aio.AioRpcError as exc:
                outcome = exc.code().name
            except asyncio.CancelledError:
                outcome = "CANCELLED"
            else:
                if completion is None:
                    outcome = "CANCELLED"
                else:
                    assert completion.output_tokens == count == max_tokens
                    outcome = pb.FinishReason.Name(completion.finish_reason)
            assert request_id not in outcomes, "a request ended twice"
            outcomes[request_id] = outcome
            tokens_seen[request_id] = count

    async with serving([backend], max_queue=10_000) as server, connected(server) as client:
        await asyncio.wait_for(
            asyncio.gather(*(client_loop(n, client) for n in range(CLIENTS))), DURATION_S + 30)
        for _ in range(500):
            if server.service.load()[:2] == (0, 0) and backend.num_requests == 0:
                break
            await asyncio.sleep(0.01)
        stats = await client.stats()
        health = await client.health()
        after = await client.complete([3], max_tokens=2)

    assert len(outcomes) >= CLIENTS * 2
    assert set(outcomes.values()) <= {"FINISH_REASON_LENGTH", "DEADLINE_EXCEEDED", "CANCELLED"}
    assert list(outcomes.values()).count("FINISH_REASON_LENGTH") > len(outcomes) * 0.8
    submitted = sum(t.submitted for t in stats.tasks)
    ended = sum(t.finished + t.aborted + t.failed for t in stats.tasks)
    assert submitted == ended
    # A call whose deadline passed before the server read it was never submitted.
    expired = list(outcomes.values()).count("DEADLINE_EXCEEDED")
    assert len(outcomes) - expired <= submitted <= len(outcomes)
    # A call cancelled (or past its deadline) as its last token went out finished on the server.
    finished = list(outcomes.values()).count("FINISH_REASON_LENGTH")
    assert finished <= sum(t.finished for t in stats.tasks) <= len(outcomes)
    assert sum(t.failed for t in stats.tasks) == 0
    assert (stats.waiting, stats.running, backend.num_requests) == (0, 0, 0)
    assert health == health_pb2.HealthCheckResponse.SERVING
    assert after.completion.output_tokens == 2
