"""An ``emoe serve`` in a child process, for the commands that measure a live server
(``emoe profile``'s serving path, ``emoe fidelity``).

A child process, not a server in the caller's event loop: the server then has its own
interpreter (its own GIL, as in a deployment), and the measuring client does not steal its
event loop. ``start`` waits until health says SERVING and fails within seconds, with the
server's own last words, when the process exits first (a bad checkpoint, a taken port).
"""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from emoe.core.errors import ConfigError

START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServeProcess:
    """``emoe serve ARGS`` on a free local port; ``async with`` starts and stops it."""

    def __init__(self, args: list[str], timeout_s: float = START_TIMEOUT_S):
        self.port = free_port()
        self.target = f"127.0.0.1:{self.port}"
        self.args = ["serve", "--port", str(self.port), "--metrics-port", "0",
                     "--log-level", "WARNING", *args]
        self.timeout_s = timeout_s
        self._process: subprocess.Popen | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")

    async def __aenter__(self) -> "ServeProcess":
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.stop()
        self._stderr.close()

    async def start(self) -> None:
        from emoe.rpc.client import EmoeClient

        env = dict(os.environ, PYTHONUNBUFFERED="1")
        self._process = subprocess.Popen([sys.executable, "-m", "emoe", *self.args],
                                         stdout=subprocess.DEVNULL, stderr=self._stderr, env=env)
        deadline = time.monotonic() + self.timeout_s
        async with EmoeClient(self.target) as client:
            while True:
                if self._process.poll() is not None:
                    raise ConfigError(f"emoe serve {' '.join(self.args[7:])}: exited with code "
                                      f"{self._process.returncode} before it came up: "
                                      f"{self.last_words()}")
                try:
                    await client.wait_serving(timeout=0.5)
                    return
                except TimeoutError:
                    pass
                except Exception:  # noqa: BLE001 - not up yet (connection refused, ...)
                    await asyncio.sleep(0.2)
                if time.monotonic() > deadline:
                    self.stop()
                    raise ConfigError(f"emoe serve: not SERVING after {self.timeout_s:.0f} s: "
                                      f"{self.last_words() or 'no output'}")

    def last_words(self) -> str:
        """The server's own error line (``emoe serve: error: ...``), else its last line."""
        self._stderr.seek(0)
        lines = [line.strip() for line in self._stderr.read().splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("emoe serve: error:")]
        return (errors or lines or [""])[-1]

    def stop(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(10)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(5)


def serve_args(checkpoint: Path, threads: int, max_batch_size: int, max_seq_len: int | None,
               dtype: str | None = None, policy: Path | None = None,
               profile: Path | None = None) -> list[str]:
    """``emoe serve`` arguments for an in-process engine configured like this."""
    args = ["--checkpoint", str(checkpoint), "--threads", str(threads),
            "--max-batch-size", str(max_batch_size)]
    if max_seq_len:
        args += ["--max-seq-len", str(max_seq_len)]
    if dtype:
        args += ["--dtype", dtype]
    if policy is not None:
        args += ["--policy", str(policy)]
    if profile is not None:
        args += ["--profile", str(profile)]
    return args
