"""HTTP front door overhead beside gRPC's, with a backend that does no model work.

    .venv/bin/python benchmarks/http_service.py [--concurrency 64] [--seconds 10]

Starts one `emoe serve --backend fake --http-port` in a child process and measures, from this
process, in the same sitting, the same request over both front doors (a 4-token prompt,
`max_tokens=1`: one token and the end of the stream):
1. throughput: `--concurrency` callers issue requests back to back for `--seconds`;
   completed requests per second. HTTP: streamed `POST /v1/completions` read to `data: [DONE]`
   (aiohttp client, one connection per caller); gRPC: a Generate call read to its completion.
2. latency: sequential requests (one in flight); p50/p90/p99 of the request time, which is all
   front-door overhead since the backend does no work. HTTP is measured with the aiohttp
   client and with the official `openai` client (what applications use; it costs more on the
   client side).
Targets (issue 12): HTTP streaming adds <= 2 ms at p50; >= 1,000 completions/s at 64 clients.
The client runs on the same machine as the server: on a 2-core box they share the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import aiohttp

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from emoe.rpc.client import EmoeClient, generate_request  # noqa: E402

PROMPT = [3, 4, 5, 6]
BODY = {"model": "fake-moe", "prompt": PROMPT, "max_tokens": 1, "stream": True}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def http_call(session: aiohttp.ClientSession, url: str) -> None:
    async with session.post(url, json=BODY) as response:
        assert response.status == 200, await response.text()
        done = False
        async for line in response.content:
            done = done or line.startswith(b"data: [DONE]")
        assert done


async def grpc_call(client: EmoeClient, request) -> None:
    async for _ in client.stub.Generate(request):
        pass


async def throughput(call: Callable[[int], Awaitable[None]], concurrency: int,
                     seconds: float) -> float:
    done = 0
    end = time.perf_counter() + seconds

    async def worker(n: int) -> None:
        nonlocal done
        while time.perf_counter() < end:
            await call(n)
            done += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker(n) for n in range(concurrency)))
    return done / (time.perf_counter() - start)


async def latency(call: Callable[[], Awaitable[None]], n: int) -> list[float]:
    samples = []
    for _ in range(n):
        t0 = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - t0)
    return samples


def quantiles_ms(samples: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(samples, n=100)
    return q[49] * 1e3, q[89] * 1e3, q[98] * 1e3


async def wait_healthy(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url) as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            if time.monotonic() > deadline:
                raise TimeoutError(f"{url} not healthy after {timeout} s")
            await asyncio.sleep(0.1)


async def main(args: argparse.Namespace) -> None:
    import openai

    grpc_port, http_port = free_port(), free_port()
    server = subprocess.Popen([sys.executable, "-m", "emoe", "serve", "--backend", "fake",
                               "--port", str(grpc_port), "--http-port", str(http_port),
                               "--metrics-port", "0", "--log-level", "WARNING",
                               "--max-queue", "100000", "--max-batch-size", "256"], cwd=REPO)
    url = f"http://127.0.0.1:{http_port}/v1/completions"
    rows = []
    try:
        await wait_healthy(f"http://127.0.0.1:{http_port}/health")
        load_before = os.getloadavg()
        request = generate_request(PROMPT, max_tokens=1)
        async with EmoeClient(f"127.0.0.1:{grpc_port}") as grpc_client:
            async def one_grpc(_: int = 0) -> None:
                await grpc_call(grpc_client, request)

            await latency(one_grpc, 200)  # warm-up
            grpc_rate = await throughput(one_grpc, args.concurrency, args.seconds)
            grpc_latency = quantiles_ms(await latency(one_grpc, args.latency_calls))

        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:
            async def one_http(_: int = 0) -> None:
                await http_call(session, url)

            await latency(one_http, 200)
            http_rate = await throughput(one_http, args.concurrency, args.seconds)
            http_latency = quantiles_ms(await latency(one_http, args.latency_calls))

        async with openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{http_port}/v1",
                                      api_key="none", max_retries=0) as client:
            async def one_openai() -> None:
                async for _ in await client.completions.create(
                        model="fake-moe", prompt=PROMPT, max_tokens=1, stream=True):
                    pass

            await latency(one_openai, 100)
            openai_latency = quantiles_ms(await latency(one_openai, args.latency_calls))
        load_after = os.getloadavg()
    finally:
        server.terminate()
        server.wait(30)

    rows = [("gRPC Generate", grpc_rate, grpc_latency),
            ("HTTP SSE, aiohttp client", http_rate, http_latency),
            ("HTTP SSE, openai client", None, openai_latency)]
    print(f"{'front door':<26} {'completions/s':>14} {'p50 ms':>8} {'p90 ms':>8} {'p99 ms':>8}")
    for name, rate, (p50, p90, p99) in rows:
        shown = f"{rate:,.0f}" if rate is not None else "-"
        print(f"{name:<26} {shown:>14} {p50:8.2f} {p90:8.2f} {p99:8.2f}")
    print(f"throughput: {args.concurrency} concurrent callers for {args.seconds:.0f} s each; "
          f"latency: {args.latency_calls} sequential requests")
    print(f"HTTP (aiohttp client) adds {http_latency[0] - grpc_latency[0]:+.2f} ms at p50 over "
          f"gRPC; HTTP/gRPC throughput {http_rate / grpc_rate:.2f}x")
    print("load average (1/5/15 min) before: {:.2f} {:.2f} {:.2f}; after: {:.2f} {:.2f} {:.2f}"
          .format(*load_before, *load_after))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--latency-calls", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
