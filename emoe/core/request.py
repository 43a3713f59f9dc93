"""A request as the scheduler sees it: plain data with an explicit status."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class SLO:
    """Service-level objective: time to first token and time per output token, in seconds."""

    ttft_s: float
    tpot_s: float


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"
    REJECTED = "rejected"
    ABORTED = "aborted"

    @property
    def terminal(self) -> bool:
        return self in (RequestStatus.FINISHED, RequestStatus.REJECTED, RequestStatus.ABORTED)


@dataclass(slots=True)
class Request:
    """One inference request.

    ``output_tokens`` is the number of tokens the request will really generate where that is
    known in advance (a replayed or simulated trace) or its max_new_tokens otherwise; the
    scheduler plans with ``expected_output_tokens`` (the task's mean unless given) and learns
    the real length only when a step result reports the request finished.
    """

    id: str
    arrival: float
    task: str
    input_tokens: int
    output_tokens: int
    slo: SLO
    expected_output_tokens: int | None = None
    priority: int = 0

    status: RequestStatus = RequestStatus.WAITING
    prefilled_tokens: int = 0
    generated_tokens: int = 0
    admitted_at: float | None = None
    first_token_at: float | None = None
    finished_at: float | None = None
    reason: str = ""
    expert_hits: int = 0
    expert_misses: int = 0
    weighted_hits: float = 0.0
    weighted_choices: float = 0.0
    extra: dict = field(default_factory=dict)
