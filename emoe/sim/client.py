"""The served engine as its client sees it: the serving path around the scheduler.

A profile of a served engine measured what the path adds (``emoe.core.profile.ServingCosts``,
from ``emoe.rpc.serving_profile``). A request sent at ``arrival`` reaches the scheduler
``ingress(streams)`` later, where ``streams`` is how many requests the step in progress runs
(their Generate coroutines share the event loop that accepts it); a token made at the end of
a step reaches the client ``egress(streamed)`` later, where ``streamed`` is how many tokens
that step streamed (the new token waits behind the others on their way out). The simulator
runs on the server's clock; ``ClientView`` moves each ended request onto the client's:
arrival when sent, admission that much earlier (the server's queueing time, as replay counts
it), first token and finish when received.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from emoe.core.plan import StepPlan
from emoe.core.profile import ServingCosts
from emoe.core.request import Request


class ClientView:
    """``costs_at(t)``: the serving path's costs at time ``t`` (the machine's speed may change
    over a run: ``emoe.sim.speed``)."""

    def __init__(self, costs_at: Callable[[float], ServingCosts],
                 on_end: Callable[[Request], None]):
        self.costs_at = costs_at
        self._on_end = on_end
        self._ingress: dict[str, float] = {}  # by request id
        self._first: dict[str, float] = {}    # egress of the first token
        self._last: dict[str, float] = {}     # egress of the last token

    def accepted_at(self, request: Request, streams: int) -> float:
        """When the server accepts ``request`` (still on the client's clock), sent while a
        step runs ``streams`` requests."""
        return request.arrival + self.costs_at(request.arrival).ingress(streams)

    def accept(self, request: Request, at: float) -> None:
        """Hand ``request`` to the server's clock: it arrives there when accepted."""
        self._ingress[request.id] = at - request.arrival
        request.arrival = at

    def step_done(self, plan: StepPlan, live: Mapping[str, Request],
                  finished: list[Request], now: float, serving_s: float) -> None:
        """Note the egress of the tokens the step whose loop work ended at ``now`` made
        (first tokens of the prompts it completed, the last of the requests it finished): the
        loop's ``serving_s`` after the engine's end, which the scheduler's times stop at, and
        the way out from there (the profile's egress counts from the loop's end)."""
        firsts = [c.request_id for c in plan.prefill
                  if c.start + c.num_tokens == live[c.request_id].input_tokens]
        egress = serving_s + self.costs_at(now).egress(len(plan.decode) + len(firsts))
        for rid in firsts:
            self._first[rid] = egress
        for request in finished:
            self._last[request.id] = egress

    def ended(self, request: Request) -> None:
        """The ended request on the client's clock, to ``on_end``."""
        ingress = self._ingress.pop(request.id, 0.0)
        idle = self.costs_at(request.arrival).egress(0)  # e.g. a refusal's answer
        first, last = self._first.pop(request.id, idle), self._last.pop(request.id, idle)
        request.arrival -= ingress
        if request.admitted_at is not None:
            request.admitted_at -= ingress
        if request.first_token_at is not None:
            request.first_token_at += first
        if request.finished_at is not None:
            request.finished_at += last
        self._on_end(request)
