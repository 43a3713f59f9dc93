"""Fitting a workload to a model's context, the same way for the simulator and trace replay.

A request whose prompt plus output exceed the context cannot be served as recorded. The rule
(``FIT_MODES``) decides what both sides do with it, so they see the same workload:

- ``reject`` (default): sent as recorded; the server refuses it (INVALID_ARGUMENT) and the
  simulator's scheduler rejects it with the same reason (``emoe.core.serving.context_error``);
- ``skip``: left out of the workload;
- ``scale``: prompt and output both scaled by ``context / (prompt + output)`` (rounded down, at
  least one token each), keeping their ratio.

Either way the count and share of such requests is reported (``ContextFit.describe``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

from emoe.core.errors import ConfigError
from emoe.core.request import Request

FIT_MODES = ("reject", "skip", "scale")


class ContextFit:
    """Streams requests through the rule for a ``context``-token model (0: no limit) and counts
    what it met: ``requests`` seen, ``over`` the context, of those ``changed`` (skipped or
    scaled)."""

    def __init__(self, context: int, mode: str = "reject"):
        if mode not in FIT_MODES:
            raise ConfigError(f"--fit: unknown rule {mode!r}; valid: {', '.join(FIT_MODES)}")
        self.context, self.mode = context, mode
        self.requests = self.over = 0

    def __call__(self, requests: Iterable[Request]) -> Iterator[Request]:
        context = self.context
        for request in requests:
            self.requests += 1
            if context and request.input_tokens + request.output_tokens > context:
                self.over += 1
                if self.mode == "skip":
                    continue
                if self.mode == "scale":
                    factor = context / (request.input_tokens + request.output_tokens)
                    request.input_tokens = max(1, math.floor(request.input_tokens * factor))
                    request.output_tokens = max(1, math.floor(request.output_tokens * factor))
            yield request

    @property
    def share(self) -> float:
        return self.over / self.requests if self.requests else 0.0

    def describe(self) -> str:
        """One line: how many requests exceeded the context and what happened to them."""
        if not self.context:
            return "context: not checked (the model's context is unknown)"
        what = {"reject": "sent as recorded and rejected (INVALID_ARGUMENT: the server's "
                          "reason, on both sides)",
                "skip": "skipped", "scale": "scaled down to fit (prompt and output alike)"}
        if not self.over:
            return (f"context: all {self.requests} requests fit the model's context of "
                    f"{self.context} tokens")
        return (f"context: {self.over} of {self.requests} requests ({self.share:.1%}) exceed the "
                f"model's context of {self.context} tokens (prompt + output): "
                f"{what[self.mode]}; --fit reject|skip|scale chooses")
