"""Servers for the rpc tests: in the test's event loop (anyio plugin, asyncio backend)."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from emoe.core.policy_file import PolicyConfig
from emoe.core.specs import get_hardware
from emoe.rpc.backend import Backend
from emoe.rpc.client import EmoeClient
from emoe.rpc.fake import FakeBackend
from emoe.rpc.server import Listen, SchedulerServer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(autouse=True)
def _events_for_closed_loops_dropped(request: pytest.FixtureRequest) -> None:
    if "anyio_backend" in request.fixturenames:
        request.getfixturevalue("_drop_events_for_closed_loops")


@pytest.fixture
async def _drop_events_for_closed_loops() -> AsyncIterator[None]:
    """grpc.aio keeps one completion queue per process and hands each event to the loop of
    the call it belongs to. An event that completes after that call's test closed its loop
    (a cancelled stream's last op, a deadline) reaches a later test's loop, which fails it
    with "Event loop is closed" (grpc/grpc#25364 and its kin). The event is for nobody alive,
    so only that exact case is dropped; every other callback error still fails the test."""
    loop = asyncio.get_running_loop()
    forward = loop.get_exception_handler()

    def handle(loop: asyncio.AbstractEventLoop, context: dict) -> None:
        error = context.get("exception")
        if (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"
                and "PollerCompletionQueue._handle_events" in repr(context.get("handle"))):
            return
        if forward is None:
            loop.default_exception_handler(context)
        else:
            forward(loop, context)

    loop.set_exception_handler(handle)
    yield
    loop.set_exception_handler(forward)


@asynccontextmanager
async def serving(backends: list[Backend] | None = None, *, listen: Listen | None = None,
                  policy: PolicyConfig | None = None, wait: bool = True,
                  **kwargs) -> AsyncIterator[SchedulerServer]:
    server = SchedulerServer(backends or [FakeBackend()], policy or PolicyConfig(),
                             get_hardware("a100-40gb"), listen or Listen(port=0), **kwargs)
    await server.start()
    try:
        if wait:
            await server.wait_serving()
        yield server
    finally:
        await server.stop()


@asynccontextmanager
async def connected(server: SchedulerServer, **kwargs) -> AsyncIterator[EmoeClient]:
    async with EmoeClient(f"127.0.0.1:{server.port}", **kwargs) as client:
        yield client


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def emoe_process(*args: str) -> subprocess.Popen:
    """``emoe ARGS`` in a child process (stderr captured for failure messages)."""
    return subprocess.Popen([sys.executable, "-m", "emoe", *args], cwd=REPO,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_process(process: subprocess.Popen, timeout: float = 10.0) -> None:
    if process.poll() is None:
        process.kill()
    process.wait(timeout)


@contextmanager
def threaded_server(make_backends, **kwargs):
    """A server on an event loop of its own thread, for sync clients (hypothesis, threads):
    yields ``(server, "127.0.0.1:PORT")``. ``make_backends()`` runs on that loop."""
    ready, stop = threading.Event(), threading.Event()
    started: list = []

    async def run() -> None:
        try:
            async with serving(make_backends(), **kwargs) as server:
                started.append(server)
                ready.set()
                while not stop.is_set():
                    await asyncio.sleep(0.02)
        finally:
            ready.set()

    thread = threading.Thread(target=asyncio.run, args=(run(),), daemon=True)
    thread.start()
    assert ready.wait(120) and started, "server did not start"
    try:
        yield started[0], f"127.0.0.1:{started[0].port}"
    finally:
        stop.set()
        thread.join(30)


@dataclass
class StreamRecord:
    code: grpc.StatusCode
    tokens: int = 0
    completion: object = None
    max_gap_s: float = 0.0
    details: str = ""


def stream_once(stub, request, timeout: float = 60.0) -> StreamRecord:
    """One Generate call, read to its end: status, tokens, completion, largest gap between
    two messages."""
    record = StreamRecord(grpc.StatusCode.OK)
    last = time.perf_counter()
    try:
        for response in stub.Generate(request, timeout=timeout):
            now = time.perf_counter()
            record.max_gap_s = max(record.max_gap_s, now - last)
            last = now
            record.tokens += len(response.token_ids)
            if response.HasField("completion"):
                record.completion = response.completion
    except grpc.RpcError as exc:
        record.code, record.details = exc.code(), exc.details()
    return record


class Innocents:
    """Valid greedy requests of ``max_tokens`` sent back to back on ``streams`` threads while a
    test does its worst beside them; ``stop()`` returns every record."""

    def __init__(self, address: str, streams: int = 4, max_tokens: int = 8):
        self._address, self._streams, self.max_tokens = address, streams, max_tokens
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self.records: list[StreamRecord] = []

    def __enter__(self) -> "Innocents":
        for n in range(self._streams):
            thread = threading.Thread(target=self._loop, args=(n,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)

    def _loop(self, n: int) -> None:
        from emoe.rpc.client import generate_request
        from emoe.rpc.v1 import scheduler_pb2_grpc

        with grpc.insecure_channel(self._address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)
            i = 0
            while not self._stop.is_set():
                request = generate_request([5 + n, 40 + i % 50, 7], request_id=f"innocent-{n}-{i}",
                                           max_tokens=self.max_tokens, temperature=0.0,
                                           ignore_eos=True)
                self.records.append(stream_once(stub, request))
                i += 1

    def failures(self) -> list[StreamRecord]:
        return [r for r in self.records
                if r.code != grpc.StatusCode.OK or r.tokens != self.max_tokens
                or r.completion is None or r.completion.output_tokens != self.max_tokens]
