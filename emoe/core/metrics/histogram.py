"""Streaming quantiles in bounded memory: exact up to a number of samples, then a log-spaced
histogram whose estimates have bounded relative error."""

from __future__ import annotations

import math

import numpy as np


class QuantileSketch:
    """Quantiles of a stream of non-negative values.

    Up to ``exact_limit`` samples are kept and quantiles are exact. Past that, only a
    histogram of log-spaced buckets remains (a DDSketch-style layout): bucket i holds values in
    (g^(i-1), g^i] * min_value with g = (1 + rel_error) / (1 - rel_error), and a value is
    estimated by the point of its bucket that is within ``rel_error`` of every value in it.
    Every quantile in [min_value, max_value] is then within ``rel_error`` (relative) of the
    exact one. Values below ``min_value`` count as 0; values above ``max_value`` as
    ``max_value``. Memory: one counter per bucket, ~2,800 at the defaults, whatever the count.

    Quantiles interpolate linearly between order statistics (numpy's default ``linear``
    method), in both modes; interpolation keeps the relative error bound.
    """

    def __init__(self, rel_error: float = 0.005, min_value: float = 1e-6,
                 max_value: float = 1e6, exact_limit: int = 4096):
        if not 0.0 < rel_error < 1.0:
            raise ValueError(f"rel_error {rel_error}; expected 0 < rel_error < 1")
        self.rel_error = rel_error
        self.min_value, self.max_value = min_value, max_value
        self.exact_limit = exact_limit
        self._log_gamma = math.log((1.0 + rel_error) / (1.0 - rel_error))
        self._offset = math.log(min_value) / self._log_gamma
        self._counts = [0] * (self._bucket(max_value) + 1)
        self._exact: list[float] | None = []
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, value: float) -> None:
        if value < 0.0 or math.isnan(value):
            raise ValueError(f"quantile sketch takes values >= 0, got {value}")
        self.count += 1
        self.total += value
        if value > self.max:
            self.max = value
        self._counts[self._bucket(value)] += 1
        if self._exact is not None:
            self._exact.append(value)
            if len(self._exact) > self.exact_limit:
                self._exact = None

    @property
    def exact(self) -> bool:
        return self._exact is not None

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else math.nan

    def quantile(self, q: float) -> float:
        """The q-quantile (0 <= q <= 1); NaN when empty."""
        if not 0.0 <= q <= 1.0:
            raise ValueError(f"quantile {q}; expected 0 <= q <= 1")
        if not self.count:
            return math.nan
        if self._exact is not None:
            return float(np.quantile(self._exact, q))
        rank = q * (self.count - 1)
        lower = math.floor(rank)
        low_value, high_value = self._ranked(lower), self._ranked(min(lower + 1, self.count - 1))
        return low_value + (rank - lower) * (high_value - low_value)

    def quantiles(self, qs: "list[float]") -> list[float]:
        """``quantile(q)`` for each q (vectorised; an empty sketch gives NaNs)."""
        if not self.count:
            return [math.nan] * len(qs)
        if self._exact is not None:
            return np.quantile(self._exact, qs).tolist()
        cumulative = np.cumsum(self._counts)
        last = self.count - 1
        values = []
        for q in qs:
            if not 0.0 <= q <= 1.0:
                raise ValueError(f"quantile {q}; expected 0 <= q <= 1")
            rank = q * last
            lower = math.floor(rank)
            low = self._ranked(lower, cumulative)
            high = self._ranked(min(lower + 1, last), cumulative)
            values.append(low + (rank - lower) * (high - low))
        return values

    def _bucket(self, value: float) -> int:
        if value <= self.min_value:
            return 0
        value = min(value, self.max_value)
        return max(1, math.ceil(math.log(value) / self._log_gamma - self._offset))

    def _ranked(self, rank: int, cumulative: np.ndarray | None = None) -> float:
        """Estimate of the value with zero-based rank ``rank`` in sorted order
        (``cumulative``: the bucket counts' cumulative sum, if already computed)."""
        if cumulative is None:
            cumulative = np.cumsum(self._counts)
        bucket = int(np.searchsorted(cumulative, rank, side="right"))
        if bucket == 0:
            return 0.0
        upper = self.min_value * math.exp(bucket * self._log_gamma)
        return min(upper * (1.0 - self.rel_error), self.max_value)
