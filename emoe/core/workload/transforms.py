"""Streaming transforms of a request stream in arrival order. They re-time the requests they
are given in place (readers and generators hand out fresh Request objects)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from emoe.core.errors import ConfigError
from emoe.core.request import Request


def window(requests: Iterable[Request], start_s: float = 0.0,
           duration_s: float | None = None) -> Iterator[Request]:
    """Requests arriving in [start_s, start_s + duration_s), re-based so the window starts at 0.

    Stops reading at the first request past the window (the input is in arrival order).
    """
    if not (math.isfinite(start_s) and start_s >= 0.0):
        raise ConfigError(f"window start {start_s!r} s; expected a finite number >= 0")
    if duration_s is not None and not duration_s > 0.0:
        raise ConfigError(f"window duration {duration_s!r} s; expected a number > 0")
    end = math.inf if duration_s is None else start_s + duration_s
    for request in requests:
        if request.arrival < start_s:
            continue
        if request.arrival >= end:
            return
        request.arrival -= start_s
        yield request


def scale_rate(requests: Iterable[Request], factor: float) -> Iterator[Request]:
    """Compress arrival times by ``factor``: 2.0 doubles the request rate, 0.5 halves it."""
    if not (math.isfinite(factor) and factor > 0.0):
        raise ConfigError(f"rate scale {factor!r}; expected a finite number > 0")
    for request in requests:
        request.arrival /= factor
        yield request
