"""Scheduler service overhead with a backend that does no model work.

    .venv/bin/python benchmarks/rpc_service.py [--concurrency 64] [--seconds 10]

Starts `emoe serve --backend fake` in a child process and measures, from this process:
1. throughput: `--concurrency` callers issue Generate calls (max_tokens=1: one token and the
   completion) back to back for `--seconds`; completed calls per second;
2. latency: sequential Generate calls (one in flight); p50/p90/p99 of the call time, which is
   all service overhead since the backend does no work. Targets: >= 1,000 calls/s and
   <= 2 ms at p50.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emoe.rpc.client import EmoeClient, generate_request  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def call(client: EmoeClient, request) -> None:
    async for _ in client.stub.Generate(request):
        pass


async def throughput(client: EmoeClient, concurrency: int, seconds: float) -> tuple[int, float]:
    request = generate_request([3, 4, 5, 6], max_tokens=1)
    done = 0
    end = time.perf_counter() + seconds

    async def worker() -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call(client, request)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return done, time.perf_counter() - start


async def latency(client: EmoeClient, n: int) -> list[float]:
    request = generate_request([3, 4, 5, 6], max_tokens=1)
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call(client, request)
        samples.append(time.perf_counter() - t0)
    return samples


async def main(args: argparse.Namespace) -> None:
    port = free_port()
    server = subprocess.Popen([sys.executable, "-m", "emoe", "serve", "--backend", "fake",
                               "--port", str(port), "--metrics-port", "0", "--log-level",
                               "WARNING", "--max-queue", "100000", "--max-batch-size", "256"],
                              cwd=REPO)
    try:
        async with EmoeClient(f"127.0.0.1:{port}") as client:
            await client.wait_serving(timeout=60)
            await latency(client, 200)  # warm-up
            done, elapsed = await throughput(client, args.concurrency, args.seconds)
            samples = await latency(client, args.latency_calls)
    finally:
        server.terminate()
        server.wait(30)
    q = statistics.quantiles(samples, n=100)
    print(f"throughput: {done} Generate calls in {elapsed:.1f} s = {done / elapsed:,.0f} calls/s "
          f"({args.concurrency} concurrent callers)")
    print(f"latency, one call in flight ({len(samples)} calls): p50 {q[49] * 1e3:.2f} ms, "
          f"p90 {q[89] * 1e3:.2f} ms, p99 {q[98] * 1e3:.2f} ms")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency-calls", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
