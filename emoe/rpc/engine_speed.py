"""The engine's speed as served, against its profile: every step's measured compute beside
what the profile's step model says for the same step (its tokens, decodes, the context they
attend, its prefill chunks' pairs; the expert handler's overhead where the engine has one).

``emoe serve --profile`` keeps the sums (GetStats ``engine_speed``); their ratio over a window
is how fast the engine ran then against the profile, which already counts the serving path's
own slowdown (``serving.engine_scale``). ``emoe fidelity`` reads the sums before and after a
replay. Steps that fetched an expert on a miss are summed apart (their compute includes the
fetches' stalls, which the step model does not): with the speed of the others they give what
a fetch cost as served (``fetch_cost_s``).

The serving loop's cycles are summed too (a step's start to the next one's, while the loop went
straight on), against the profile's model of a cycle: the step model x ``serving.engine_scale``
+ ``serving.step_s`` + ``serving.token_s`` per token streamed, the very fit ``emoe profile``
makes in its serving session and the simulator replays. That ratio is the machine's speed as
the simulator sees it: the engine's compute alone also carries, on small steps, the serving
path's share of the interpreter that the profile's fit books as ``step_s`` and ``token_s``
(decode steps ran x1.50 their step model where their cycles ran x1.24; prefill steps x1.22
and x1.16), so scaling the simulated engine by the compute ratio counted that share twice.
The cycles of steps that ran a prompt chunk are also summed apart (``prefill_cycle_*``): how
the profile's fit splits a cycle between engine and loop moves with the minute it was taken
in, and prefill steps are mostly engine, decode steps mostly loop.

Each cycle's log(cycle / model) is summed too, with its square and, over pairs of consecutive
cycles of one kind, their product (``cycle_log_*``, ``cycle_lag_*``; of prefill cycles apart):
from two samples of the sums, how the cycles scatter around their model within the window and
how alike consecutive ones are, which the simulator draws its steps with
(``emoe.sim.speed.StepScatter``).

Decode-only cycles also sum the tokens they streamed n, n^2, and n times the cycle c and its
model m (``decode_streamed*``, ``decode_cycle_streamed``, ``decode_model_streamed``): what a
line of a window's cycles on their tokens needs, beside its model (``SpeedTimeline``'s
``decode_token_s``). A window's one speed scales a cycle's whole model; as served, a bigger
decode batch cost more than that.

The cycles of steps that ran a prompt chunk are also summed by the step's prompt tokens, in the
segments of the profile's step table (``prefill_segment_*``; segment i holds steps of more than
``tokens[i - 1]`` and up to ``tokens[i]`` prompt tokens, the last one those past the table):
against the run's prefill cycles they say how far the table's shape is off as served
(``emoe.sim.speed.PrefillShape``). A table measured in one minute of a machine whose speed
wanders carries each point's own minute (in fifteen profiles of one VM its 256-token point ran
0.94-1.41x its 192-token one).

Cycles in which the loop accepted new requests (their Generate handlers and the hand-over to
the scheduler run in the loop's interpreter, before the next step) are summed apart too, with
the requests they accepted (``arrival_*``; ``prefill_arrivals``: of those, in cycles of steps
that ran a prompt chunk): against the window's other cycles they give what accepting a request
costs the loop (``SpeedTimeline.arrival_s``). That cost lands in the cycle just before the step
that admits the request, the one Eq. 3 decides on: as served (code trace, emoe/all) the
decode-only cycle before a prompt-chunk step ran x1.38 Eq. 3's model against x1.13 for the
others.

The cycles of steps that fetched experts on a miss are kept out of all the sums above and
summed apart (``fetch_cycle_*``; ``prefill_fetch_cycle_*``: of those, of steps that ran a
prompt chunk), with the experts they fetched and the requests the loop accepted in them.
Under ``lru`` most steps fetch (every prompt chunk, ~90% of decode-only steps on the reference
model), so the cycles without a fetch leave its speed, and its prompt steps' speed in
particular, unmeasured; beside the decode-only cycles without a fetch, these give what a
fetch cost the loop and the speed of every cycle (``SpeedTimeline.fetch_s``).
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass, field

from emoe.core.plan import StepPlan, StepResult
from emoe.core.profile import HandlerOverhead, ServingCosts, StepTimes, chunk_pairs


@dataclass
class EngineSpeed:
    steps: StepTimes
    handler: HandlerOverhead | None = None
    serving: ServingCosts | None = None
    counted: int = 0
    compute_s: float = 0.0
    profiled_s: float = 0.0
    fetch_steps: int = 0
    fetched: int = 0
    fetch_compute_s: float = 0.0
    fetch_profiled_s: float = 0.0
    cycles: int = 0
    cycle_s: float = 0.0
    cycle_profiled_s: float = 0.0
    prefill_cycles: int = 0
    prefill_cycle_s: float = 0.0
    prefill_cycle_profiled_s: float = 0.0
    cycle_log_sum: float = 0.0
    cycle_log_sq_sum: float = 0.0
    cycle_lag_pairs: int = 0
    cycle_lag_sum: float = 0.0
    prefill_cycle_log_sum: float = 0.0
    prefill_cycle_log_sq_sum: float = 0.0
    prefill_cycle_lag_pairs: int = 0
    prefill_cycle_lag_sum: float = 0.0
    decode_streamed: int = 0
    decode_streamed_sq: int = 0
    decode_cycle_streamed: float = 0.0
    decode_model_streamed: float = 0.0
    arrivals: int = 0
    arrival_cycles: int = 0
    arrival_cycle_s: float = 0.0
    arrival_cycle_profiled_s: float = 0.0
    prefill_arrivals: int = 0
    fetch_cycle_s: float = 0.0
    fetch_cycle_profiled_s: float = 0.0
    fetch_cycle_fetched: int = 0
    fetch_cycle_arrivals: int = 0
    prefill_fetch_cycle_s: float = 0.0
    prefill_fetch_cycle_profiled_s: float = 0.0
    prefill_fetch_cycle_fetched: int = 0
    prefill_fetch_cycle_arrivals: int = 0
    prefill_segment_tokens: tuple[int, ...] = field(init=False)
    prefill_segment_cycle_s: list[float] = field(init=False)
    prefill_segment_cycle_profiled_s: list[float] = field(init=False)
    # the last step's start, its modelled cycle, its prompt tokens, the tokens it streamed and
    # the experts it fetched on a miss, while the loop goes straight on from it
    _open: tuple[float, float, int, int, int] | None = field(default=None, repr=False)
    # the last cycle counted, its kind and log ratio, while the loop went straight on after it
    _last: tuple[bool, float] | None = field(default=None, repr=False)
    # requests the loop accepted during the open cycle
    _accepted: int = field(default=0, repr=False)

    def __post_init__(self) -> None:
        self.prefill_segment_tokens = tuple(self.steps.tokens)
        segments = len(self.prefill_segment_tokens) + 1
        self.prefill_segment_cycle_s = [0.0] * segments
        self.prefill_segment_cycle_profiled_s = [0.0] * segments

    def profiled(self, plan: StepPlan, context_tokens: int) -> float:
        """The profile's compute for ``plan`` as one step whose decodes attend
        ``context_tokens`` tokens in all."""
        prefill = sum(c.num_tokens for c in plan.prefill)
        decode = len(plan.decode)
        pairs = chunk_pairs(plan.prefill)
        seconds = self.steps.step_s(prefill + decode, decode, context_tokens, pairs,
                                    max(1, len(plan.prefill)))
        if self.handler is not None:
            seconds += self.handler.seconds(prefill, decode)
        return seconds

    def idle(self) -> None:
        """The loop found nothing to run (or a step failed): the open cycle ends uncounted."""
        self._open = self._last = None
        self._accepted = 0

    def accepted(self, requests: int) -> None:
        """The loop handed ``requests`` new requests to the scheduler before its next step:
        they arrived during the open cycle."""
        self._accepted += requests

    def observe(self, plan: StepPlan, result: StepResult, context_tokens: int,
                started: float) -> None:
        """A step that started at ``started`` (monotonic seconds) and ran ``result``."""
        if self._open is not None:
            opened, modelled, prompt, streamed, fetched = self._open
            if fetched:
                self._close_fetch(started - opened, modelled, bool(prompt), fetched)
            else:
                self._close(started - opened, modelled, prompt, streamed)
            self._open = None
        self._accepted = 0
        if result.compute_s <= 0 or result.iterations != 1:
            self._last = None
            return
        profiled = self.profiled(plan, context_tokens)
        fetched = len(result.fetched_on_miss)
        if fetched:
            self.fetch_steps += 1
            self.fetched += fetched
            self.fetch_compute_s += result.compute_s
            self.fetch_profiled_s += profiled
            self._last = None
        else:
            self.counted += 1
            self.compute_s += result.compute_s
            self.profiled_s += profiled
        if self.serving is not None:
            streamed = sum(o.new_tokens for o in result.outputs)
            self._open = (started, self.serving.cycle_s(profiled, streamed),
                          sum(c.num_tokens for c in plan.prefill), streamed, fetched)

    def _close(self, cycle_s: float, modelled: float, prompt: int, streamed: int) -> None:
        """Counts a cycle whose step fetched nothing and ran ``prompt`` prompt tokens."""
        prefill = prompt > 0
        self.cycles += 1
        self.cycle_s += cycle_s
        self.cycle_profiled_s += modelled
        if self._accepted:
            self.arrivals += self._accepted
            self.arrival_cycles += 1
            self.arrival_cycle_s += cycle_s
            self.arrival_cycle_profiled_s += modelled
            if prefill:
                self.prefill_arrivals += self._accepted
        if prefill:
            self.prefill_cycles += 1
            self.prefill_cycle_s += cycle_s
            self.prefill_cycle_profiled_s += modelled
            segment = bisect.bisect_left(self.prefill_segment_tokens, prompt)
            self.prefill_segment_cycle_s[segment] += cycle_s
            self.prefill_segment_cycle_profiled_s[segment] += modelled
        else:
            self.decode_streamed += streamed
            self.decode_streamed_sq += streamed * streamed
            self.decode_cycle_streamed += cycle_s * streamed
            self.decode_model_streamed += modelled * streamed
        self._scatter(prefill, cycle_s, modelled)

    def _close_fetch(self, cycle_s: float, modelled: float, prefill: bool, fetched: int) -> None:
        """Counts a cycle whose step fetched ``fetched`` experts on a miss (its model has none)."""
        self.fetch_cycle_s += cycle_s
        self.fetch_cycle_profiled_s += modelled
        self.fetch_cycle_fetched += fetched
        self.fetch_cycle_arrivals += self._accepted
        if prefill:
            self.prefill_fetch_cycle_s += cycle_s
            self.prefill_fetch_cycle_profiled_s += modelled
            self.prefill_fetch_cycle_fetched += fetched
            self.prefill_fetch_cycle_arrivals += self._accepted

    def _scatter(self, prefill: bool, cycle_s: float, modelled_s: float) -> None:
        if cycle_s <= 0 or modelled_s <= 0:
            self._last = None
            return
        x = math.log(cycle_s / modelled_s)
        lag = self._last is not None and self._last[0] == prefill
        self.cycle_log_sum += x
        self.cycle_log_sq_sum += x * x
        if lag:
            self.cycle_lag_pairs += 1
            self.cycle_lag_sum += x * self._last[1]
        if prefill:
            self.prefill_cycle_log_sum += x
            self.prefill_cycle_log_sq_sum += x * x
            if lag:
                self.prefill_cycle_lag_pairs += 1
                self.prefill_cycle_lag_sum += x * self._last[1]
        self._last = (prefill, x)


def fetch_cost_s(speed: float, fetched: int, fetch_compute_s: float,
                 fetch_profiled_s: float) -> float | None:
    """Seconds per expert fetched on a miss as served: the fetch steps' compute beyond their
    step model at the engine's ``speed`` (that of the steps without fetches), per fetch."""
    if fetched <= 0:
        return None
    return (fetch_compute_s - speed * fetch_profiled_s) / fetched
