"""Trace replay against a live service: emoe's gRPC service, or any OpenAI-compatible HTTP
server (``emoe.rpc.http.replay``).

Each trace request is sent at its recorded arrival time (divided by ``rate_scale``) as token
ids: ``input_tokens`` random non-special ids (or, with task prompts, text of the request's task
that the reference model was trained on: ``emoe.engine.reference.prompts``, sampled greedily
so that its routing is the one ``emoe record-routing --trace`` records), ``max_tokens =
output_tokens`` with EOS ignored, so the service generates exactly the trace's output length (an HTTP server that cannot be
told to ignore EOS may stop sooner: the actual lengths are reported). A request that does not
fit the model's context is sent as recorded (and refused), skipped or scaled to fit, by the
rule the simulator applies too (``emoe.core.workload.fit``; counted and reported).
Results are the simulator's per-request columns (emoe.core.metrics) and its summary table,
times in seconds from the replay's start:

    arrival_s         when the request was sent
    admitted_at_s     arrival + the server's measured queueing time (empty where the server
                      does not report it)
    first_token_at_s  when the client received the first token
    finished_at_s     when the client received the completion (or the error)

The client's own stalls are in these times: while its event loop is blocked, it sends nothing
and receives nothing. Replay freezes the objects its process holds when it starts
(``gc.freeze``), so that no full garbage collection scans them mid-replay (one took 130-415
ms in a process with torch and pandas loaded, and every request in flight then received its
tokens that much later), and it warns when it sent requests late. Every prompt is made before
the clock starts (as 4-byte ids): made as the replay ran, the next request's prompt (up to
~1 ms of task text and tokenizer) held up the event loop while the request just sent was on its
way, and every request reached the server ~0.8 ms later (docs/fidelity.md, limit 12).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import grpc
import numpy as np

from emoe.core.metrics import MetricsCollector, SystemCounters, format_summary
from emoe.core.request import Request, RequestStatus
from emoe.core.workload.fit import ContextFit
from emoe.rpc.client import EmoeClient, generate_request
from emoe.rpc.v1 import scheduler_pb2 as pb

log = logging.getLogger(__name__)

FIRST_NON_SPECIAL_ID = 3
LATE_SEND_S = 0.010
"""A request sent this much after its time is reported: the client stalled."""


@dataclass(frozen=True, slots=True)
class TargetModel:
    """What replay needs to know of the served model (``max_context`` None: not known)."""

    name: str
    max_context: int | None
    vocab_size: int


class ReplayTarget(Protocol):
    """A server that replay sends requests to."""

    async def model(self) -> TargetModel: ...

    async def send(self, request: Request, prompt: list[int], start: float) -> Request:
        """Sends ``request`` and fills in its outcome (times in seconds from ``start``, a
        ``time.monotonic()`` value)."""

    async def close(self) -> None: ...


class GrpcTarget:
    """emoe's gRPC scheduler service. ``temperature`` None: the server's default sampling."""

    def __init__(self, client: EmoeClient, temperature: float | None = None):
        self.client = client
        self.temperature = temperature
        self.prefix = f"replay-{uuid.uuid4().hex[:8]}-"

    async def model(self) -> TargetModel:
        info = await self.client.server_info()
        return TargetModel(info.model.name, info.model.max_context, info.model.vocab_size)

    async def close(self) -> None:
        await self.client.close()

    async def send(self, request: Request, prompt: list[int], start: float) -> Request:
        message = generate_request(
            prompt, request_id=self.prefix + request.id, task=request.task,
            ttft_s=request.slo.ttft_s, tpot_s=request.slo.tpot_s,
            max_tokens=request.output_tokens, ignore_eos=True, temperature=self.temperature)
        clock = time.monotonic
        try:
            async for response in self.client.stream(message):
                if response.token_ids and request.first_token_at is None:
                    request.first_token_at = clock() - start
                request.generated_tokens += len(response.token_ids)
                if response.HasField("completion"):
                    self._complete(request, response.completion, clock() - start)
        except grpc.aio.AioRpcError as exc:
            request.finished_at = clock() - start
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


def as_target(target: ReplayTarget | EmoeClient) -> ReplayTarget:
    """A target; an EmoeClient is emoe's gRPC service (``GrpcTarget``)."""
    return GrpcTarget(target) if isinstance(target, EmoeClient) else target


class RandomPrompts:
    """``input_tokens`` random non-special ids per request, from one seeded stream."""

    def __init__(self, vocab_size: int, seed: int):
        self.high = max(vocab_size - 1, FIRST_NON_SPECIAL_ID)
        self.rng = np.random.default_rng(seed)

    def __call__(self, request: Request) -> np.ndarray:
        return self.rng.integers(FIRST_NON_SPECIAL_ID, self.high + 1, request.input_tokens,
                                 dtype=np.uint32)


class _Replay:
    def __init__(self, target: ReplayTarget, model: TargetModel, seed: int,
                 prompts: Callable[[Request], Sequence[int]] | None):
        self.target = target
        self.model = model
        self.prompt = prompts or RandomPrompts(model.vocab_size, seed)
        self.start = 0.0


async def replay(requests: Iterable[Request], target: ReplayTarget | EmoeClient,
                 metrics: MetricsCollector, seed: int = 0,
                 fit: ContextFit | None = None,
                 prompts: Callable[[Request], Sequence[int]] | None = None) -> float:
    """Replays ``requests`` (arrival order); adds each to ``metrics`` as it ends. Returns the
    wall-clock seconds from the first send to the last answer. ``fit`` (default: ``reject``)
    fits the requests to the served model's context, which it is given here, and counts what
    it met. ``prompts`` makes each request's prompt ids (default: ``RandomPrompts``; task
    prompts: ``emoe.engine.reference.prompts.TaskPrompts``)."""
    target = as_target(target)
    model = await target.model()
    fit = fit if fit is not None else ContextFit(0)
    fit.context = model.max_context or 0
    requests = list(fit(requests))
    run = _Replay(target, model, seed, prompts)
    made = [np.asarray(run.prompt(request), dtype=np.uint32) for request in requests]
    pending: set[asyncio.Task] = set()
    short = late = 0
    latest = 0.0

    def done(task: asyncio.Task) -> None:
        nonlocal short
        pending.discard(task)
        request = task.result()
        if request.status is RequestStatus.FINISHED and request.generated_tokens < request.output_tokens:
            short += 1
        metrics.add(request)

    gc.freeze()
    try:
        run.start = time.monotonic()
        for request, ids in zip(requests, made):
            prompt = ids.tolist()
            delay = run.start + request.arrival - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.monotonic() - run.start
            lag = sent - request.arrival
            late += lag > LATE_SEND_S
            latest = max(latest, lag)
            request.arrival = sent
            task = asyncio.create_task(target.send(request, prompt, run.start))
            pending.add(task)
            task.add_done_callback(done)
            await asyncio.sleep(0)  # it goes out now, before the next request is taken up
        while pending:
            await asyncio.wait(set(pending))
    finally:
        gc.unfreeze()
    if late:
        log.warning("%d requests were sent more than %.0f ms after their time (the latest %.0f "
                    "ms): this client stalled, and the times measured include its stalls",
                    late, LATE_SEND_S * 1e3, latest * 1e3)
    if short:
        log.warning("%d finished requests generated fewer tokens than the trace asks "
                    "(the server stopped them early; generated_tokens has the actual lengths)",
                    short)
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


async def replay_file(trace: Path, target: ReplayTarget | EmoeClient, *,
                      rate_scale: float = 1.0, limit: int | None = None, seed: int = 0,
                      out: Path | None = None, fit: str = "reject",
                      prompts: Callable[[Request], Sequence[int]] | None = None) -> int:
    """``emoe replay``: prints the summary table; writes per-request rows to ``out``; closes
    the target."""
    from emoe.core.workload import read_trace

    check_trace(trace, rate_scale=rate_scale, limit=limit, seed=seed)
    target = as_target(target)
    requests = read_trace(trace, seed=seed, rate_scale=rate_scale)
    if limit is not None:
        requests = itertools.islice(requests, limit)
    fitted = ContextFit(0, fit)
    try:
        with MetricsCollector(out) as metrics:
            elapsed = await replay(requests, target, metrics, seed=seed, fit=fitted,
                                   prompts=prompts)
            summary = metrics.summary(SystemCounters(elapsed_s=elapsed), name=f"replay {trace.name}")
    finally:
        await target.close()
    print(fitted.describe())
    print(format_summary(summary))
    if out is not None:
        print(f"per-request results: {out}", file=sys.stderr)
    return 0
