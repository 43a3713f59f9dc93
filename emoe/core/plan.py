"""The seam between scheduler and backend: a step plan in, a step result out.

    plan = scheduler.next_step(now)
    result = backend.execute(plan)          # simulator: cost model; real: torch engine
    scheduler.on_step_done(result)

The scheduler never touches tensors or timers; the backend never decides policy.
"""

from __future__ import annotations

from dataclasses import dataclass, field

ExpertKey = tuple[int, int]
"""(layer index, expert index), both zero-based."""


@dataclass(slots=True)
class PrefillChunk:
    """Prompt tokens [start, start + num_tokens) of a request, run in this step."""

    request_id: str
    start: int
    num_tokens: int


@dataclass(slots=True)
class StepPlan:
    """What the backend does next.

    ``iterations`` is an upper bound on decode iterations this plan covers: a simulator may run
    many identical iterations at once and stops early at the first iteration in which a request
    finishes or a new request arrives (it reports how many it ran); a real engine runs one.
    ``load``/``evict`` are expert-cache changes to carry out, evictions first.
    ``rejected`` and ``aborted`` are (request id, reason) pairs: requests that left the
    scheduler since the last plan; a backend drops whatever state it holds for them.
    ``deferred`` and ``slowdown`` say how admission went, for the record (``AdmissionCounters``):
    the waiting requests that fitted in memory but the policy held back in this plan (the
    ``emoe`` policy's Eq. 3: admitting them would make a running request miss its SLO), and
    the ratio of measured to modelled step time that Eq. 3 costed them with
    (``CostEstimate.scale``; None when the policy used no estimate).
    """

    prefill: list[PrefillChunk] = field(default_factory=list)
    decode: list[str] = field(default_factory=list)
    iterations: int = 1
    load: list[ExpertKey] = field(default_factory=list)
    evict: list[ExpertKey] = field(default_factory=list)
    run_predictor: bool = False
    rejected: list[tuple[str, str]] = field(default_factory=list)
    aborted: list[tuple[str, str]] = field(default_factory=list)
    deferred: int = 0
    slowdown: float | None = None

    @property
    def empty(self) -> bool:
        return not (self.prefill or self.decode or self.load or self.evict or self.run_predictor)


@dataclass(slots=True)
class RequestStepOutput:
    """What one request did in a step. A request that failed on its own (``error``: what went
    wrong, e.g. its logits held NaN) is ``finished`` with ``finish_reason`` "error"."""

    request_id: str
    new_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)
    finished: bool = False
    finish_reason: str = ""
    expert_hits: int = 0
    expert_misses: int = 0
    weighted_hits: float = 0.0
    weighted_choices: float = 0.0
    error: str = ""


@dataclass(slots=True)
class StepResult:
    """What the backend did: timings, per-request outputs and the routing it observed.

    ``routing`` maps request id to per-layer expert-use counts (a [layers, experts] array of
    token choices made by the router, before any miss handling) for requests whose prefill
    completed in this step: what a predictor learns from. ``decode_routing`` is the same over
    the generated tokens run in decode, for requests that finished in this step (a backend
    that does not report it leaves the predictor to learn from prompts alone).
    ``fetched_on_miss``/``evicted_on_miss``: experts a backend fetched or evicted on its own
    during the step, in order (only under the ``lru`` planner's fetch-on-miss rule).
    ``compute_s``: the forward pass's wall time, its waits for experts still loading or
    fetched on a miss included (0 from a backend without model work, whose steps the
    scheduler's cost estimate then does not learn from);
    ``load_wait_s``: time spent waiting for experts (the simulator: the part of ``compute_s``
    its layers stalled; the engine: issuing the plan's loads before the forward pass).
    ``finished_at`` is when the engine's last iteration ended, as an engine reports it (the
    scheduler's first-token and finish times); ``serving_s`` is the serving loop's work after
    it, before the next plan (delivering the step's tokens): a simulator's model of it, which
    its world waits out; a real backend leaves it 0 (its server's loop spends it).
    """

    started_at: float
    finished_at: float
    iterations: int = 1
    outputs: list[RequestStepOutput] = field(default_factory=list)
    routing: dict = field(default_factory=dict)
    decode_routing: dict = field(default_factory=dict)
    compute_s: float = 0.0
    load_wait_s: float = 0.0
    serving_s: float = 0.0
    predictor_s: float = 0.0
    bytes_loaded: int = 0
    fetched_on_miss: list[ExpertKey] = field(default_factory=list)
    evicted_on_miss: list[ExpertKey] = field(default_factory=list)
