"""Trace replay against a live scheduler service.

Each trace request is sent at its recorded arrival time (divided by ``rate_scale``) as token
ids: ``input_tokens`` random non-special ids, ``max_tokens = output_tokens`` with EOS ignored,
so the service generates exactly the trace's output length. A request that does not fit the
model's context is shortened to fit, prompt first, then output (counted and reported). Results
are the simulator's per-request columns (emoe.core.metrics) and its summary table, times in seconds
from the replay's start:

    arrival_s         when the request was sent
    admitted_at_s     arrival + the server's measured queueing time
    first_token_at_s  when the client received the first token
    finished_at_s     when the client received the completion (or the error)
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import sys
import time
import uuid
from collections.abc import Iterable
from pathlib import Path

import grpc

from emoe.core.metrics import MetricsCollector, SystemCounters, format_summary
from emoe.core.request import Request, RequestStatus
from emoe.rpc.client import EmoeClient, generate_request
from emoe.rpc.v1 import scheduler_pb2 as pb

log = logging.getLogger(__name__)

FIRST_NON_SPECIAL_ID = 3


class _Replay:
    def __init__(self, client: EmoeClient, model: pb.ModelInfo, seed: int):
        self.client = client
        self.model = model
        self.rng = random.Random(seed)
        self.prefix = f"replay-{uuid.uuid4().hex[:8]}-"
        self.shortened = 0
        self.start = 0.0

    def prompt(self, request: Request) -> list[int]:
        context = self.model.max_context
        if request.input_tokens + request.output_tokens > context:
            request.output_tokens = min(request.output_tokens, context - 1)
            request.input_tokens = min(request.input_tokens, context - request.output_tokens)
            self.shortened += 1
        high = max(self.model.vocab_size - 1, FIRST_NON_SPECIAL_ID)
        return [self.rng.randint(FIRST_NON_SPECIAL_ID, high)
                for _ in range(request.input_tokens)]

    async def send(self, request: Request, prompt: list[int]) -> Request:
        message = generate_request(
            prompt, request_id=self.prefix + request.id, task=request.task,
            ttft_s=request.slo.ttft_s, tpot_s=request.slo.tpot_s,
            max_tokens=request.output_tokens, ignore_eos=True)
        clock = time.monotonic
        try:
            async for response in self.client.stream(message):
                if response.token_ids and request.first_token_at is None:
                    request.first_token_at = clock() - self.start
                request.generated_tokens += len(response.token_ids)
                if response.HasField("completion"):
                    self._complete(request, response.completion, clock() - self.start)
        except grpc.aio.AioRpcError as exc:
            request.finished_at = clock() - self.start
            request.status = RequestStatus.REJECTED
            request.reason = f"{exc.code().name}: {exc.details()}"
        return request

    @staticmethod
    def _complete(request: Request, c: pb.Completion, at: float) -> None:
        request.finished_at = at
        request.admitted_at = request.arrival + c.timings.queue_s
        request.expert_hits, request.expert_misses = c.expert_hits, c.expert_misses
        if c.finish_reason == pb.FINISH_REASON_ABORTED:
            request.status, request.reason = RequestStatus.ABORTED, "aborted"
        else:
            request.status = RequestStatus.FINISHED
            request.reason = pb.FinishReason.Name(c.finish_reason).removeprefix("FINISH_REASON_").lower()


async def replay(requests: Iterable[Request], client: EmoeClient, metrics: MetricsCollector,
                 seed: int = 0) -> float:
    """Replays ``requests`` (arrival order); adds each to ``metrics`` as it ends. Returns the
    wall-clock seconds from the first send to the last answer."""
    info = await client.server_info()
    run = _Replay(client, info.model, seed)
    run.start = time.monotonic()
    pending: set[asyncio.Task] = set()

    def done(task: asyncio.Task) -> None:
        pending.discard(task)
        metrics.add(task.result())

    for request in requests:
        prompt = run.prompt(request)
        delay = run.start + request.arrival - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        request.arrival = time.monotonic() - run.start
        task = asyncio.create_task(run.send(request, prompt))
        pending.add(task)
        task.add_done_callback(done)
    while pending:
        await asyncio.wait(set(pending))
    if run.shortened:
        log.warning("%d requests were shortened (prompt first, then output) to fit the "
                    "model's context of %d tokens",
                    run.shortened, info.model.max_context)
    return time.monotonic() - run.start


def check_trace(trace: Path, *, rate_scale: float = 1.0, limit: int | None = None,
                seed: int = 0) -> None:
    """Read the requests a replay would send: a malformed row is then one clear error
    (file:line: column) before anything is sent, not a failure half-way through a replay with
    requests in flight."""
    from emoe.core.workload import read_trace

    requests = read_trace(trace, seed=seed, rate_scale=rate_scale)
    for _ in requests if limit is None else itertools.islice(requests, limit):
        pass


async def replay_file(trace: Path, client: EmoeClient, *, rate_scale: float = 1.0,
                      limit: int | None = None, seed: int = 0, out: Path | None = None) -> int:
    """``emoe replay``: prints the summary table; writes per-request rows to ``out``."""
    from emoe.core.workload import read_trace

    check_trace(trace, rate_scale=rate_scale, limit=limit, seed=seed)
    requests = read_trace(trace, seed=seed, rate_scale=rate_scale)
    if limit is not None:
        requests = itertools.islice(requests, limit)
    async with client:
        with MetricsCollector(out) as metrics:
            elapsed = await replay(requests, client, metrics, seed=seed)
            summary = metrics.summary(SystemCounters(elapsed_s=elapsed), name=f"replay {trace.name}")
    print(format_summary(summary))
    if out is not None:
        print(f"per-request results: {out}", file=sys.stderr)
    return 0
