"""Per-request sampling parameters and the batched sampler.

Every sampled request owns a ``torch.Generator`` seeded from its ``seed``, so its tokens do
not depend on which other requests share the batch. A row that cannot be sampled (its logits
hold NaN or inf) gives a :class:`SamplingError` for that row alone.

Temperature rule: 0 is greedy, and so is any temperature below ``GREEDY_BELOW`` (1e-5): at
such a temperature every token but the most likely has probability below e^-100000 per unit
of logit gap, so sampling is the argmax in all but exact ties, and dividing by it overflows
float32. Other temperatures divide the logits after their maximum is subtracted, so no
accepted temperature can make inf or NaN out of finite logits.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

from emoe.core.errors import ConfigError, EmoeError

GREEDY_BELOW = 1e-5


class SamplingError(EmoeError):
    """One row of a batch could not be sampled; the other rows are unaffected."""


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 (or below ``GREEDY_BELOW``) = greedy; top_k 0 = off; top_p 1 = off;
    seed None = nondeterministic."""

    max_new_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ConfigError(f"sampling.max_new_tokens: must be an integer >= 1, got {self.max_new_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise ConfigError(f"sampling.temperature: must be a finite number >= 0 (0 = greedy), "
                              f"got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ConfigError(f"sampling.top_p: must be in (0, 1], got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ConfigError(f"sampling.top_k: must be an integer >= 0 (0 = off), got {self.top_k!r}")
        if self.seed is not None and not (isinstance(self.seed, int) and 0 <= self.seed < 2**63):
            raise ConfigError(f"sampling.seed: must be an integer in [0, 2**63) or None, got {self.seed!r}")
        stops = tuple(self.stop_token_ids)
        if any(not isinstance(t, int) or t < 0 for t in stops):
            raise ConfigError(f"sampling.stop_token_ids: must be non-negative integers, got {list(stops)}")
        object.__setattr__(self, "stop_token_ids", stops)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW or self.top_k == 1

    def generator(self, device: torch.device) -> torch.Generator | None:
        if self.greedy:
            return None
        g = torch.Generator(device=device)
        if self.seed is None:
            g.seed()
        else:
            g.manual_seed(self.seed)
        return g


def sample(logits: Tensor, params: list[SamplingParams],
           generators: list[torch.Generator | None]) -> list[int | SamplingError]:
    """logits [B, V] -> one token id per row, row i drawn with params[i] and generators[i];
    a :class:`SamplingError` for a row whose logits are not all finite."""
    tokens: list[int | SamplingError] = logits.argmax(dim=-1).tolist()
    finite = torch.isfinite(logits).all(dim=-1).tolist()  # [B]
    for i, p in enumerate(params):
        if not finite[i]:
            tokens[i] = SamplingError("sampling: the request's logits hold NaN or inf (the "
                                      "model's numerics failed on its tokens)")
        elif not p.greedy:
            tokens[i] = _sample_row(logits[i].float(), p, generators[i])
    return tokens


def _sample_row(logits: Tensor, p: SamplingParams, generator: torch.Generator) -> int:
    logits = (logits - logits.max()) / p.temperature  # [V], <= 0: no overflow to +inf
    if p.top_k and p.top_k < logits.shape[0]:
        kth = logits.topk(p.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, -math.inf)
    if p.top_p < 1:
        sorted_logits, order = logits.sort(descending=True)  # [V] x2
        probs = sorted_logits.softmax(dim=-1)
        drop = probs.cumsum(dim=-1) - probs > p.top_p  # [V]: mass before this token already > top_p
        logits = logits.scatter(0, order, sorted_logits.masked_fill(drop, -math.inf))
    probs = logits.softmax(dim=-1)  # [V]
    return int(torch.multinomial(probs, 1, generator=generator))
