"""Hardening, measured against the real engine on the reference model (issue 11's goal).

    .venv/bin/python benchmarks/rpc_hardening.py [--requests 10000] [--innocent-streams 4]

Starts `emoe serve` (the reference model, in-process engine, `--default-max-tokens 8`) in a
child process and, from this process:
1. fuzz: `--requests` fuzzed Generate calls, drawn by hypothesis from the tests' strategies
   (tests/rpc/test_fuzz.py: any field any value; tests/rpc/test_fuzz_engine.py: values at the
   edges of valid) in concurrent batches of 16, while `--innocent-streams` valid greedy
   streams of 8 tokens run back to back. Counts the fuzzed calls' status codes and the
   innocent requests that did not finish with their 8 tokens.
   Goal: 0 INTERNAL, 0 UNKNOWN, 0 innocent failures.
2. oversize: the innocent streams alone for 5 s, then a 16 MiB and a 1 MiB text prompt, each
   sent 20 times one after another (the message is serialised beforehand: the time is the
   call's, from send to status) while they run; the innocents' largest gap between two
   messages in either phase. Goal: the 16 MiB prompt refused within 50 ms, the other streams
   not stalled (a gap like the one without the prompts).
3. memory: N = 4, 16, 64 clients, each on a connection of its own, send a 16 MiB prompt at
   once, while the innocent streams run (their requests wait for a receive slot like any
   other); the server's peak resident memory for each N (VmHWM, reset before each through
   /proc/PID/clear_refs), the innocents' failures and largest gap. Then a flood: 16 clients at once send each of: text of 4 MiB less
   1 KiB (just inside the message limit), 20 MiB less 1 KiB (just inside the transport limit,
   the most a receive slot holds), 16, 64 and 256 MiB, and 1,000,000 token ids, 3 times each.
   Goal: the server's peak over the whole run under 1 GiB.
Prints one table with the machine's load average (timings on a shared machine are noisy).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import grpc  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from emoe.rpc.client import generate_request  # noqa: E402
from emoe.rpc.v1 import scheduler_pb2_grpc  # noqa: E402
from tests.rpc.conftest import Innocents, stream_once  # noqa: E402
from tests.rpc.test_fuzz import requests  # noqa: E402
from tests.rpc.test_fuzz_engine import FUZZ_MAX_TOKENS, plausible  # noqa: E402

BATCH = 16
MiB = 1 << 20


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def peak_rss(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process, bytes."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


def largest_gap(innocents: Innocents) -> float:
    return max(r.max_gap_s for r in innocents.records)


class Memory:
    """A process's resident memory, and its peak over every stretch measured."""

    def __init__(self, pid: int):
        self.pid, self.peak = pid, 0

    def row(self, label: str) -> tuple[str, str]:
        rss, hwm = peak_rss(self.pid)
        self.peak = max(self.peak, hwm)
        return label, f"{rss / MiB:.0f} MiB (peak so far {self.peak / MiB:.0f} MiB)"

    def stretch(self, work) -> int:
        """The peak while ``work()`` runs (since the start where VmHWM cannot be reset)."""
        self.row("")
        with contextlib.suppress(OSError):
            Path(f"/proc/{self.pid}/clear_refs").write_text("5")  # resets VmHWM
        work()
        hwm = peak_rss(self.pid)[1]
        self.peak = max(self.peak, hwm)
        return hwm


def wait_serving(address: str, timeout: float) -> None:
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    end = time.monotonic() + timeout
    with grpc.insecure_channel(address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < end:
            try:
                if health.Check(health_pb2.HealthCheckRequest(), timeout=1).status == 1:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise SystemExit(f"server at {address} not serving after {timeout} s")


def fuzz(stub, total: int) -> dict[str, int]:
    codes: dict[str, int] = {}
    pool = ThreadPoolExecutor(BATCH)

    @settings(max_examples=total // BATCH, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(batch=st.lists(requests(max_tokens=FUZZ_MAX_TOKENS) | plausible(),
                          min_size=BATCH, max_size=BATCH))
    def run(batch) -> None:
        for record in pool.map(lambda r: stream_once(stub, r), batch):
            codes[record.code.name] = codes.get(record.code.name, 0) + 1

    run()
    pool.shutdown()
    return codes


def timed_refusals(channel, raw: bytes, times: int) -> tuple[list[float], set[str]]:
    call = channel.unary_stream("/emoe.v1.SchedulerService/Generate")
    samples, codes = [], set()
    for _ in range(times):
        start = time.perf_counter()
        try:
            for _ in call(raw, timeout=60):
                pass
            codes.add("OK")
        except grpc.RpcError as exc:
            codes.add(exc.code().name)
        samples.append(time.perf_counter() - start)
    return samples, codes


def flood(address: str, inputs: list[bytes], clients: int, repeats: int = 1) -> set[str]:
    """Each input sent by ``clients`` at once, each on a connection of its own."""
    codes: set[str] = set()
    lock = threading.Lock()
    options = [("grpc.max_send_message_length", 1 << 30), ("grpc.use_local_subchannel_pool", 1)]

    def send(raw: bytes) -> None:
        with grpc.insecure_channel(address, options=options) as channel:
            try:
                for _ in channel.unary_stream("/emoe.v1.SchedulerService/Generate")(raw, timeout=120):
                    pass
                code = "OK"
            except grpc.RpcError as exc:
                code = exc.code().name
        with lock:
            codes.add(code)

    with ThreadPoolExecutor(clients) as pool:
        for raw in inputs:
            list(pool.map(send, [raw] * (clients * repeats)))
    return codes


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=10_000)
    parser.add_argument("--innocent-streams", type=int, default=4)
    args = parser.parse_args()

    port = free_port()
    address = f"127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-m", "emoe", "serve", "--port", str(port), "--metrics-port", "0",
         "--default-max-tokens", "8", "--log-level", "ERROR"], cwd=REPO)
    rows: list[tuple[str, str]] = []
    try:
        started = time.monotonic()
        wait_serving(address, 300)
        rows.append(("server ready after", f"{time.monotonic() - started:.1f} s"))
        memory = Memory(server.pid)
        rows.append(memory.row("server RSS when ready"))
        with grpc.insecure_channel(address) as channel:
            stub = scheduler_pb2_grpc.SchedulerServiceStub(channel)

            started = time.monotonic()
            with Innocents(address, streams=args.innocent_streams) as innocents:
                codes = fuzz(stub, args.requests)
            elapsed = time.monotonic() - started
            rows.append(("fuzzed requests", f"{sum(codes.values())} in {elapsed:.0f} s: "
                         + ", ".join(f"{k} {v}" for k, v in sorted(codes.items()))))
            rows.append(("INTERNAL / UNKNOWN", f"{codes.get('INTERNAL', 0)} / "
                                               f"{codes.get('UNKNOWN', 0)}"))
            rows.append(("innocent requests (failed)",
                         f"{len(innocents.records)} ({len(innocents.failures())})"))
            rows.append(memory.row("server RSS after the fuzz"))

            with Innocents(address, streams=args.innocent_streams) as innocents:
                time.sleep(5)
            rows.append(("innocents alone for 5 s (failed)",
                         f"{len(innocents.records)} ({len(innocents.failures())}); largest gap "
                         f"between two messages {largest_gap(innocents) * 1e3:.0f} ms"))

            sixteen = generate_request("x" * (16 * MiB), max_tokens=1).SerializeToString()
            one = generate_request("x" * MiB, max_tokens=1).SerializeToString()
            with Innocents(address, streams=args.innocent_streams) as innocents:
                time.sleep(0.5)
                big, big_codes = timed_refusals(channel, sixteen, 20)
                small, small_codes = timed_refusals(channel, one, 20)
                time.sleep(0.5)
            for name, samples, got in (("16 MiB prompt refused", big, big_codes),
                                       ("1 MiB prompt refused", small, small_codes)):
                samples.sort()
                rows.append((name, f"{'/'.join(sorted(got))} in p50 {samples[10] * 1e3:.0f} ms, "
                                   f"max {samples[-1] * 1e3:.0f} ms"))
            rows.append(("innocents meanwhile (failed)",
                         f"{len(innocents.records)} ({len(innocents.failures())}); largest gap "
                         f"between two messages {largest_gap(innocents) * 1e3:.0f} ms"))
            rows.append(memory.row("server RSS after the oversized prompts"))

            for clients in (4, 16, 64):
                codes: set[str] = set()
                with Innocents(address, streams=args.innocent_streams) as innocents:
                    peak = memory.stretch(lambda: codes.update(flood(address, [sixteen], clients)))
                rows.append((f"{clients} x 16 MiB at once: server peak",
                             f"{peak / MiB:.0f} MiB ({', '.join(sorted(codes))}); innocents "
                             f"{len(innocents.records)} ({len(innocents.failures())} failed), "
                             f"largest gap {largest_gap(innocents) * 1e3:.0f} ms"))
            del sixteen, one
            inputs = [generate_request("x" * (size - 1024), max_tokens=1).SerializeToString()
                      for size in (4 * MiB, 20 * MiB)]
            inputs += [generate_request("x" * size, max_tokens=1).SerializeToString()
                       for size in (16 * MiB, 64 * MiB, 256 * MiB)]
            inputs.append(generate_request([5] * 1_000_000, max_tokens=1).SerializeToString())
            flood_codes: set[str] = set()
            peak = memory.stretch(lambda: flood_codes.update(flood(address, inputs, 16, 3)))
            del inputs
            after = stub.Generate(generate_request([5, 6, 7], max_tokens=3, ignore_eos=True))
            rows.append(("flood (16 clients at once, every size): server peak",
                         f"{peak / MiB:.0f} MiB ({', '.join(sorted(flood_codes))})"))
            rows.append(("a request after the flood", f"{sum(len(r.token_ids) for r in after)} tokens"))
        rows.append(memory.row("server RSS after the flood"))
        rows.append(("server peak over the whole run", f"{memory.peak / MiB:.0f} MiB"))
    finally:
        server.terminate()
        server.wait(60)

    load = os.getloadavg()
    print(f"emoe rpc hardening, reference model, {os.cpu_count()} CPUs, load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
