"""One engine and the loop that drives it: the server side of "the one loop, two backends".

    plan = scheduler.next_step(now)
    result = await backend.execute(plan)
    scheduler.on_step_done(result)

A single asyncio task owns the scheduler and the backend: submissions and aborts are queued
and applied by the loop between steps, so neither is ever touched while a step runs. Tokens
are fanned out to one asyncio queue per request. Every submitted request reaches a terminal
event: finished, aborted, rejected by the scheduler, or failed (its engine was lost).
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from emoe.core.errors import EmoeError
from emoe.core.plan import ExpertKey, StepPlan, StepResult
from emoe.core.request import SLO, Request
from emoe.rpc.backend import Backend, BackendInfo, BackendUnavailable, SamplingParams
from emoe.rpc.errors import (InvalidArgument, RequestFailed, ResourceExhausted, ServiceError,
                             Unavailable)
from emoe.rpc.metrics import Outcome, RequestRecord, ServiceMetrics

log = logging.getLogger(__name__)

RECONNECT_INTERVAL_S = 0.5
IDLE_POLL_S = 0.05
PROBE_INTERVAL_S = 1.0  # an idle replica asks its engine this often whether it still answers


class Scheduler(Protocol):
    """What the loop needs of ``emoe.core.scheduler.Scheduler``."""

    @property
    def has_work(self) -> bool: ...
    def add_request(self, request: Request) -> None: ...
    def next_step(self, now: float, max_iterations: int | None = None) -> StepPlan: ...
    def on_step_done(self, result: StepResult) -> list[Request]: ...
    def abort(self, request_id: str, reason: str = "aborted") -> bool: ...
    def set_resident_experts(self, resident: Iterable[ExpertKey]) -> None: ...


SchedulerFactory = Callable[[BackendInfo], Scheduler]


@dataclass(slots=True)
class Submission:
    """A validated request, ready for an engine. ``key`` names it to the scheduler and the
    engine (``owner/request_id``: unique, though two identities may use the same id)."""

    key: str
    request_id: str
    owner: str
    task: str
    prompt: list[int]
    sampling: SamplingParams
    slo: SLO
    priority: int
    accepted_at: float


class Finish:
    """The terminal event of a stream that ended normally (a finish reason)."""

    __slots__ = ("reason",)

    def __init__(self, reason: str):
        self.reason = reason


@dataclass(slots=True, eq=False)
class RequestStream:
    """A request in flight: its events (token id lists, then a Finish or a ServiceError)."""

    submission: Submission
    replica: "Replica"
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    scheduled_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    output_tokens: int = 0
    expert_hits: int = 0
    expert_misses: int = 0
    done: bool = False

    @property
    def key(self) -> str:
        return self.submission.key

    def timings(self) -> tuple[float | None, float | None, float | None, float]:
        """(queue, ttft, tpot, total) in seconds from acceptance; None where not reached."""
        start = self.submission.accepted_at
        end = self.finished_at if self.finished_at is not None else time.monotonic()
        queue = None if self.scheduled_at is None else self.scheduled_at - start
        ttft = None if self.first_token_at is None else self.first_token_at - start
        tpot = None
        if self.first_token_at is not None and self.finished_at is not None:
            tpot = ((self.finished_at - self.first_token_at) / (self.output_tokens - 1)
                    if self.output_tokens > 1 else 0.0)
        return queue, ttft, tpot, end - start

    def slo_met(self) -> bool:
        _, ttft, tpot, _ = self.timings()
        slo = self.submission.slo
        return ttft is not None and tpot is not None and ttft <= slo.ttft_s and tpot <= slo.tpot_s


class Replica:
    """One engine (in-process or a remote worker) with its own scheduler and loop.

    ``on_terminal`` (set by the service) is called once per request when it reaches its
    terminal event. ``accepting``: it takes new requests; else ``status`` says why not.
    """

    def __init__(self, backend: Backend, make_scheduler: SchedulerFactory, metrics: ServiceMetrics):
        self.backend = backend
        self._make_scheduler = make_scheduler
        self._metrics = metrics
        self.on_terminal: Callable[[RequestStream], None] = lambda stream: None
        self.info: BackendInfo | None = None
        self.healthy = False
        self.down_reason = "starting"
        self._scheduler: Scheduler | None = None
        self._streams: dict[str, RequestStream] = {}
        self._inbox: deque[RequestStream] = deque()
        self._aborts: deque[str] = deque()
        self._wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._closing = False
        self._resident: set[ExpertKey] = set()
        self.waiting = 0
        self.running = 0

    @property
    def name(self) -> str:
        return self.backend.name

    @property
    def in_flight(self) -> int:
        return len(self._streams)

    @property
    def accepting(self) -> bool:
        return self.healthy and not self.backend.draining

    @property
    def status(self) -> str:
        """Why the replica takes no new requests ("" when it does)."""
        if not self.healthy:
            return self.down_reason
        return f"engine {self.name} is draining" if self.backend.draining else ""

    @property
    def resident_experts(self) -> int:
        return len(self._resident)

    @property
    def failure(self) -> BaseException | None:
        """Why the loop stopped for good (the engine cannot start), if it did."""
        task = self._task
        if task is None or not task.done() or task.cancelled():
            return None
        return task.exception()

    async def start(self) -> None:
        """Starts the loop: it warms the engine up (retrying a remote worker until it answers),
        then runs steps; ``healthy`` turns True once the engine is warm."""
        self._task = asyncio.create_task(self._run(), name=f"engine-loop[{self.name}]")

    def submit(self, submission: Submission) -> RequestStream:
        if not self.accepting:
            raise Unavailable(f"engine {self.name} is not serving: {self.status}")
        stream = RequestStream(submission, self)
        self._streams[submission.key] = stream
        self._inbox.append(stream)
        self.waiting += 1
        self._wake.set()
        return stream

    def abort(self, stream: RequestStream, outcome: Outcome, event: object | None) -> None:
        """Ends a stream now (``event`` is its last event, if anyone still listens) and frees
        the request's batch slot and KV memory before the next step."""
        if stream.done:
            return
        self._end(stream, outcome, event)
        self._aborts.append(stream.key)
        self._wake.set()

    async def close(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except (asyncio.CancelledError, Exception):  # a startup failure: reported by `failure`
                pass
        self._fail_all(Unavailable("server shutting down"))
        await self.backend.close()

    # -- the loop --------------------------------------------------------------------------

    async def _run(self) -> None:
        while not self._closing:
            if not self.healthy:
                await self._connect()
                continue
            try:
                await self._step()
            except BackendUnavailable as exc:
                self._lost(exc)
            except Exception:  # noqa: BLE001 - a failed step must not leave streams hanging
                incident = uuid.uuid4().hex[:12]
                log.exception("engine %s: a step failed (incident %s); recovering", self.name,
                              incident)
                if not await self._recover(incident):
                    return

    async def _connect(self) -> None:
        try:
            self.info = await self.backend.start()
        except BackendUnavailable as exc:
            log.info("engine %s not available yet: %s", self.name, exc)
            self.down_reason = f"engine {self.name} not available: {exc}"
            await asyncio.sleep(RECONNECT_INTERVAL_S)
            return
        self._reset_scheduler(self.info.resident)
        self.healthy = True
        self.down_reason = ""
        log.info("engine %s serving %s", self.name, self.info.model.name)

    def _lost(self, exc: BackendUnavailable) -> None:
        log.warning("engine %s lost: %s", self.name, exc)
        self.healthy = False
        self.down_reason = f"engine {self.name} lost: {exc}"
        self._fail_all(Unavailable(self.down_reason))

    async def _recover(self, incident: str) -> bool:
        """After a step that raised: fails the requests it ran, resynchronises scheduler and
        engine from the engine's state and queues the waiting requests again. False when the
        engine cannot be brought back (the replica is then down for good)."""
        failed = ServiceError(f"internal error in an engine step (incident {incident}; see the "
                              "server log): this request was in it and did not complete; the "
                              "server recovered")
        running = [s for s in self._streams.values() if s.scheduled_at is not None]
        for stream in running:
            self._end(stream, Outcome.FAILED, failed)
        self._inbox = deque(self._streams.values())  # the waiting ones, in submission order
        self._aborts.clear()
        try:
            resident = await self.backend.recover()
        except BackendUnavailable as exc:
            self._lost(exc)
            return True
        except Exception as exc:  # noqa: BLE001 - the engine cannot be trusted any more
            log.exception("engine %s cannot recover (incident %s)", self.name, incident)
            self.healthy = False
            self.down_reason = (f"engine {self.name} cannot recover from a failed step "
                                f"(incident {incident}): {type(exc).__name__}: {exc}")
            self._fail_all(Unavailable(self.down_reason))
            return False
        self._reset_scheduler(resident)
        log.warning("engine %s recovered from incident %s: %d running requests failed, %d "
                    "waiting requests queued again", self.name, incident, len(running),
                    len(self._inbox))
        return True

    def _reset_scheduler(self, resident: Iterable[ExpertKey]) -> None:
        """A fresh scheduler over what the engine holds now."""
        assert self.info is not None
        self._scheduler = self._make_scheduler(self.info)
        self._resident = set(resident)
        if self.info.expert_slots:
            self._scheduler.set_resident_experts(self._resident)

    async def _step(self) -> None:
        scheduler = self._scheduler
        assert scheduler is not None
        accepted = self._apply_inbox(scheduler)
        speed = getattr(self.backend, "speed", None)  # emoe.rpc.engine_speed
        if speed is not None and accepted:
            speed.accepted(accepted)
        now = time.monotonic()
        plan = scheduler.next_step(now, max_iterations=1)
        for request_id, reason in plan.rejected:
            self.backend.remove_request(request_id)
            stream = self._streams.get(request_id)
            if stream is not None:
                self._end(stream, Outcome.FAILED, ResourceExhausted(f"rejected: {reason}"))
        if plan.empty:
            if speed is not None:
                speed.idle()
            self._wake.clear()
            if self._inbox or self._aborts:
                return
            idle = not scheduler.has_work
            try:
                await asyncio.wait_for(self._wake.wait(), PROBE_INTERVAL_S if idle else IDLE_POLL_S)
            except TimeoutError:
                if idle:
                    await self.backend.check()
            return
        for chunk in plan.prefill:
            stream = self._streams.get(chunk.request_id)
            if stream is not None and stream.scheduled_at is None:
                stream.scheduled_at = now
                self.waiting -= 1
                self.running += 1
        result = await self.backend.execute(plan)
        finished = scheduler.on_step_done(result)
        for key in (*plan.evict, *result.evicted_on_miss):
            self._resident.discard(key)
        self._resident.update(plan.load)
        self._resident.update(result.fetched_on_miss)
        self._metrics.step(plan, result, time.monotonic() - now)
        self._deliver(result)
        for request in finished:  # e.g. max tokens reached, which the scheduler knows itself
            stream = self._streams.get(request.id)
            if stream is not None:
                self._end(stream, Outcome.FINISHED, Finish(request.reason or "length"))
                self.backend.remove_request(request.id)
        # A backend that never suspends (no model work) must still let handlers run.
        await asyncio.sleep(0)

    def _apply_inbox(self, scheduler: Scheduler) -> int:
        """Hand aborts and new requests to the scheduler; returns how many requests it took."""
        taken = 0
        while self._aborts:
            request_id = self._aborts.popleft()
            scheduler.abort(request_id)
            self.backend.remove_request(request_id)
        while self._inbox:
            stream = self._inbox.popleft()
            if stream.done:
                continue
            s = stream.submission
            try:
                self.backend.add_request(s.key, s.prompt, s.sampling)
                scheduler.add_request(Request(
                    id=s.key, arrival=s.accepted_at, task=s.task,
                    input_tokens=len(s.prompt), output_tokens=s.sampling.max_tokens, slo=s.slo,
                    priority=s.priority))
                taken += 1
            except Exception as exc:  # noqa: BLE001 - a request the engine refuses fails alone
                log.warning("request %s refused by engine %s: %s", s.key, self.name, exc)
                self.backend.remove_request(s.key)
                self._end(stream, Outcome.FAILED,
                          InvalidArgument("prompt", f"the engine refused the request: {exc}")
                          if isinstance(exc, EmoeError) else
                          RequestFailed(f"the engine could not take the request: {exc}"))
        return taken

    def _deliver(self, result: StepResult) -> None:
        now = time.monotonic()
        for out in result.outputs:
            stream = self._streams.get(out.request_id)
            if stream is None:
                continue
            if out.error:
                log.warning("request %s failed in engine %s: %s", out.request_id, self.name,
                            out.error)
                self._end(stream, Outcome.FAILED, RequestFailed(
                    f"this request failed in the engine (the others were unaffected): {out.error}"))
                self.backend.remove_request(out.request_id)
                continue
            stream.expert_hits += out.expert_hits
            stream.expert_misses += out.expert_misses
            if out.token_ids:
                if stream.first_token_at is None:
                    stream.first_token_at = now
                stream.output_tokens += len(out.token_ids)
                stream.events.put_nowait(out.token_ids)
            if out.finished:
                stream.finished_at = now
                self._end(stream, Outcome.FINISHED, Finish(out.finish_reason or "length"))
                self.backend.remove_request(out.request_id)

    def _end(self, stream: RequestStream, outcome: Outcome, event: object | None) -> None:
        stream.done = True
        if stream.finished_at is None:
            stream.finished_at = time.monotonic()
        del self._streams[stream.key]
        if stream.scheduled_at is None:
            self.waiting -= 1
        else:
            self.running -= 1
        if event is not None:
            stream.events.put_nowait(event)
        queue, ttft, tpot, total = stream.timings()
        self._metrics.finished(RequestRecord(
            task=stream.submission.task, owner=stream.submission.owner, outcome=outcome,
            output_tokens=stream.output_tokens, queue_s=queue, ttft_s=ttft, tpot_s=tpot,
            total_s=total,
            slo_met=outcome is Outcome.FINISHED and stream.slo_met()))
        self.on_terminal(stream)

    def _fail_all(self, error: ServiceError) -> None:
        for stream in list(self._streams.values()):
            self._end(stream, Outcome.FAILED, error)
            self.backend.remove_request(stream.key)
        self._inbox.clear()
        self._aborts.clear()
