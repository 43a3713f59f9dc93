"""The commands as a user runs them: serve, submit, replay, and SIGTERM draining."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

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
        # once up, what it held was moved out of the garbage collector's full scans
        assert "objects moved out of the garbage collector's scans" in server.stderr.read()
    finally:
        stop_process(server)


def test_serve_without_a_checkpoint_says_what_to_do(tmp_path):
    result = emoe("serve", "--checkpoint", str(tmp_path), "--port", str(free_port()))
    assert result.returncode == 2
    assert "--checkpoint" in result.stderr and "config.json" in result.stderr


def test_submit_waits_for_a_server_that_is_still_starting():
    port = free_port()
    server = emoe_process("serve", "--backend", "fake", "--port", str(port), "--metrics-port", "0")
    try:  # submitted at once: the server process has not even bound its port yet
        submitted = emoe("submit", "hello", "--target", f"127.0.0.1:{port}", "--max-tokens", "3",
                         "--wait-ready", "50")
    finally:
        stop_process(server)
    assert submitted.returncode == 0, submitted.stderr
    assert "output_tokens=3" in submitted.stderr


def test_submit_to_no_server_fails_after_its_wait():
    target = f"127.0.0.1:{free_port()}"
    result = emoe("submit", "hello", "--target", target, "--wait-ready", "0.5")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"emoe submit: error: --target {target}: not ready within 0.5 s (--wait-ready); "
        "last answer: no answer (UNAVAILABLE)"]


def _one_error_line(result: subprocess.CompletedProcess, *expected: str) -> None:
    assert result.returncode == 2, result.stderr
    lines = [line for line in result.stderr.splitlines() if " INFO " not in line]
    assert len(lines) == 1 and lines[0].startswith("emoe "), result.stderr
    for text in expected:
        assert text in lines[0]


def test_startup_errors_are_one_clear_line(tmp_path):
    import shutil
    import socket

    from emoe.rpc.local import REFERENCE_CHECKPOINT

    garbage = tmp_path / "bad.pem"
    garbage.write_text("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
    tokens = tmp_path / "tokens"
    tokens.write_text("alice a\nbob a\n")
    broken = tmp_path / "broken"
    shutil.copytree(REFERENCE_CHECKPOINT, broken)
    (broken / "tokenizer.json").write_text("{not json")
    truncated = tmp_path / "truncated"
    shutil.copytree(REFERENCE_CHECKPOINT, truncated)
    with open(truncated / "model.safetensors", "r+b") as f:
        f.truncate(1000)
    fake = ("--backend", "fake", "--metrics-port", "0")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = str(taken.getsockname()[1])
        cases = [
            (("serve", *fake, "--port", busy), ("--port: cannot listen on", "in use")),
            (("serve", "--backend", "fake", "--port", "0", "--metrics-port", busy),
             ("--metrics-port: cannot listen on",)),
            (("serve", *fake, "--tls-cert", str(tmp_path / "none.pem"), "--tls-key",
              str(garbage)), ("--tls-cert: cannot read",)),
            (("serve", *fake, "--tls-cert", str(garbage), "--tls-key", str(garbage)),
             ("are not a PEM certificate and its private key",)),
            (("serve", *fake, "--auth-token-file", str(tokens)), (f"{tokens}:2: this token",)),
            (("serve", "--checkpoint", str(broken), "--port", "0", "--metrics-port", "0"),
             ("tokenizer.json: not a tokenizer.json",)),
            (("serve", "--checkpoint", str(truncated), "--port", "0", "--metrics-port", "0"),
             ("model.safetensors: unreadable safetensors file",)),
            (("worker", "--checkpoint", str(truncated), "--port", "0"),
             ("model.safetensors: unreadable safetensors file",)),
        ]
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda case: emoe(*case[0]), cases))
    for (_, expected), result in zip(cases, results):
        _one_error_line(result, *expected)
