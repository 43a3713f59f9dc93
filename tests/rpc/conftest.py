"""Servers for the rpc tests: in the test's event loop (anyio plugin, asyncio backend)."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

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
