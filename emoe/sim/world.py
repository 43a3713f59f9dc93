"""The SimPy world: an engine process around the shared scheduler.

    engine:    hand every request that has arrived by now to the backend and the scheduler;
               plan = scheduler.next_step(now); result = backend.execute(plan);
               wait until the engine's step ends; scheduler.on_step_done(result);
               wait out the serving loop's work after it (a served engine's);
               with nothing to run, wait until the next arrival

SimPy stays at this edge: the scheduler does not know it is simulated, and the backend is
plain computation that returns when the step ends. An error inside either process (a malformed
trace row, a broken invariant) ends the run and is re-raised as it was: SimPy's own re-raise
rebuilds the exception from its arguments, which loses the message of any error whose
constructor takes more than one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from typing import Callable

import simpy

from emoe.core.errors import EmoeError
from emoe.core.metrics.admission import AdmissionCounters
from emoe.core.request import Request
from emoe.core.scheduler import Scheduler
from emoe.sim.backend import SimBackend
from emoe.sim.client import ClientView


HAND_OVER_EVERY = 256
"""Ended requests go to ``on_end`` in batches of this many (and at the end of the run)."""
STOP_CHECK_STEPS = 64
"""``stop`` is also asked every this many steps (requests may take long to end)."""


class SimulationError(EmoeError):
    """The simulated system got stuck or broke an invariant; names the time and the state."""


class World:
    """``max_iterations`` caps each step's decode iterations (1: step like a real engine;
    None: macro-step, the fast default)."""

    def __init__(self, scheduler: Scheduler, backend: SimBackend, requests: Iterable[Request],
                 on_end: Callable[[Request], None], max_iterations: int | None = None,
                 stop: Callable[[float], bool] | None = None, client: ClientView | None = None):
        """``stop(now)``: asked as ended requests are handed over and every
        ``STOP_CHECK_STEPS`` steps; True ends the run there (``stopped`` is set).
        ``client``: the serving path of a served engine; requests reach the scheduler when
        it accepts them, and end on its clock (``on_end`` is then the client's)."""
        self.env = simpy.Environment()
        self.scheduler = scheduler
        self.backend = backend
        self._requests: Iterator[Request] = iter(requests)
        self._client = client
        self._on_end = on_end if client is None else client.ended
        self._max_iterations = max_iterations
        self.next_arrival = math.inf
        self.steps = 0
        self.admission = AdmissionCounters()
        self.stopped = False
        self._stop = stop
        self._done = self.env.event()
        self._ended: list[Request] = []
        self._error: BaseException | None = None

    def run(self) -> float:
        """Simulate until every request has ended (or ``stop`` says so); returns the simulated
        elapsed time."""
        self.env.process(self._guarded(self._engine()))
        self.env.run(until=self._done)
        if self._error is not None:
            raise self._error
        self._hand_over()
        if self.backend.live and not self.stopped:
            rid, request = next(iter(self.backend.live.items()))
            raise SimulationError(f"t={self.env.now:.3f}s: {len(self.backend.live)} requests "
                                  f"never ended, e.g. {rid!r} ({request.status.value})")
        return self.env.now

    def _guarded(self, process):
        """Run a process; its return or its error ends the run (errors kept for ``run``)."""
        try:
            yield from process
        except Exception as exc:  # re-raised by run(), outside SimPy
            self._error = exc
        if not self._done.triggered:
            self._done.succeed()

    def _engine(self):
        env, scheduler, backend, client = self.env, self.scheduler, self.backend, self._client
        requests = self._requests
        pending = next(requests, None)
        accepted = None  # when the server accepts ``pending``, once the step it is sent in is known
        streams = 0  # requests the step in progress runs
        busy = False  # the loop went straight on from a step: arrivals cost it their work
        while True:
            now = env.now
            # Hand over every request that has arrived by now: the scheduler can only act on
            # them here, between steps, so arrivals need no SimPy events of their own.
            handed = 0
            while pending is not None:
                if accepted is None:
                    accepted = self._accepted(pending, streams)
                if accepted > now:
                    break
                if client is not None:
                    client.accept(pending, accepted)
                backend.admit(pending)
                scheduler.add_request(pending)
                handed += 1
                pending, accepted = next(requests, None), None
            arrival_s = handed * backend.cost.arrival_s(now) if busy and handed else 0.0
            if arrival_s > 0:  # the loop accepts them before it plans, as a served one does
                yield env.timeout(arrival_s)
                now = env.now
            plan = scheduler.next_step(now, self._max_iterations, arrival_s)
            streams = len(plan.decode) + len(plan.prefill)
            if pending is not None and pending.arrival > now:  # sent while this step runs
                accepted = self._accepted(pending, streams)
            self.next_arrival = math.inf if pending is None else accepted
            if plan.rejected or plan.aborted:
                self._end([backend.live[rid] for rid, _ in plan.rejected + plan.aborted])
            if plan.empty:
                if pending is None:
                    if scheduler.has_work:
                        raise SimulationError(
                            f"t={now:.3f}s: the scheduler plans nothing with "
                            f"{scheduler.num_waiting} requests waiting and "
                            f"{scheduler.num_running} running")
                    return
                yield env.timeout(accepted - now)  # idle until the next arrival
                busy = False
                continue
            result = backend.execute(plan, now, self.next_arrival)
            self.steps += 1
            if self.steps % STOP_CHECK_STEPS == 0:
                self._check_stop()
                if self.stopped:
                    return
            if result.finished_at < now:
                raise SimulationError(f"t={now:.3f}s: the cost model made a step of "
                                      f"{result.finished_at - now:.6f} s ({len(plan.prefill)} prefill chunks, "
                                      f"{len(plan.decode)} decodes)")
            yield env.timeout(result.finished_at - now)
            finished = scheduler.on_step_done(result)  # at the engine's end, as served
            if result.serving_s > 0:
                yield env.timeout(result.serving_s)  # the loop delivers the step's tokens
            self.admission.record(plan, env.now - now)
            if client is not None:
                client.step_done(plan, backend.live, finished, env.now, result.serving_s)
            if finished:
                self._end(finished)
            busy = True

    def _accepted(self, request: Request, streams: int) -> float:
        """When the scheduler can see ``request``, sent while a step runs ``streams``."""
        if self._client is None:
            return request.arrival
        return self._client.accepted_at(request, streams)

    def _end(self, requests: list[Request]) -> None:
        """Free what ended requests hold now; hand them to ``on_end`` in batches (their expert
        hit counters are settled for a whole batch at once)."""
        self.backend.finish(requests, self.env.now)
        self._ended.extend(requests)
        if len(self._ended) >= HAND_OVER_EVERY:
            self._hand_over()

    def _hand_over(self) -> None:
        self.backend.flush()
        ended, self._ended = self._ended, []
        for request in ended:
            assert request.status.terminal, f"request {request.id!r} ended as {request.status}"
            self._on_end(request)
        self._check_stop()

    def _check_stop(self) -> None:
        if self._stop is not None and self._stop(self.env.now):
            self.stopped = True
            if not self._done.triggered:
                self._done.succeed()

