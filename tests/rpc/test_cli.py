"""The commands as a user runs them: serve, submit, replay, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys

import grpc
import pytest
from grpc_health.v1 import health_pb2

from emoe.rpc.client import EmoeClient, generate_request
from emoe.rpc.v1 import scheduler_pb2 as pb

from .conftest import REPO, emoe_process, free_port, stop_process

pytestmark = pytest.mark.anyio


def emoe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "emoe", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60)


async def test_serve_submit_replay_and_sigterm_drain(tmp_path):
    port = free_port()
    server = emoe_process("serve", "--backend", "fake", "--fake-step-delay", "0.01", "--port",
                          str(port), "--metrics-port", "0", "--drain-grace", "20")
    target = f"127.0.0.1:{port}"
    try:
        async with EmoeClient(target) as client:
            await client.wait_serving(timeout=30)
            submitted = await asyncio.to_thread(
                emoe, "submit", "Summarize: the meeting", "--target", target, "--max-tokens", "5")
            assert submitted.returncode == 0, submitted.stderr
            assert "task=summarization finish=FINISH_REASON_LENGTH" in submitted.stderr
            assert "output_tokens=5" in submitted.stderr
            assert len(submitted.stdout.strip()) > 0

            bad = await asyncio.to_thread(emoe, "submit", "x", "--target", target, "--task", "nope")
            assert bad.returncode == 1 and "INVALID_ARGUMENT: task" in bad.stderr

            trace = tmp_path / "t.csv"
            trace.write_text("arrival_s,input_tokens,output_tokens,task\n0,5,3,qa\n0.01,6,2,qa\n")
            replayed = await asyncio.to_thread(emoe, "replay", "--trace", str(trace), "--target",
                                               target, "--out", str(tmp_path / "r.csv"))
            assert replayed.returncode == 0, replayed.stderr
            assert (tmp_path / "r.csv").read_text().count("\n") == 3

            call = client.stream(generate_request([3], max_tokens=60))
            await call.read()
            server.send_signal(signal.SIGTERM)
            for _ in range(200):
                if await client.health() == health_pb2.HealthCheckResponse.NOT_SERVING:
                    break
                await asyncio.sleep(0.01)
            assert await client.health() == health_pb2.HealthCheckResponse.NOT_SERVING
            with pytest.raises(grpc.aio.AioRpcError) as err:
                await client.complete([3], max_tokens=1)
            assert err.value.code() == grpc.StatusCode.UNAVAILABLE
            last = None
            while (response := await call.read()) is not grpc.aio.EOF:
                last = response
            assert last.completion.finish_reason == pb.FINISH_REASON_LENGTH
            assert last.completion.output_tokens == 60
        assert await asyncio.to_thread(server.wait, 30) == 0
    finally:
        stop_process(server)


def test_serve_without_a_checkpoint_says_what_to_do(tmp_path):
    result = emoe("serve", "--checkpoint", str(tmp_path), "--port", str(free_port()))
    assert result.returncode == 2
    assert "--checkpoint" in result.stderr and "config.json" in result.stderr
