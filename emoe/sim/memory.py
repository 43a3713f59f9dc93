"""GPU memory, accounted in bytes: non-expert weights, resident experts and the KV cache."""

from __future__ import annotations

from emoe.core.specs import ModelSpec


class CapacityExceeded(RuntimeError):
    """The simulation tried to use more GPU memory than the card has: a scheduler bug."""


class GpuMemory:
    """Byte accounting with a hard capacity, its peak and its time-weighted mean.

    Expert memory is taken when a copy is issued (its destination buffer) and freed on
    eviction; KV memory follows the tokens held by running requests.
    """

    def __init__(self, capacity_bytes: int, model: ModelSpec):
        self.capacity = capacity_bytes
        self._expert_bytes = model.expert_bytes
        self._kv_bytes_per_token = model.kv_bytes_per_token
        self.weights = model.non_expert_bytes
        self.experts = 0
        self.kv_tokens = 0
        self.peak = self.weights
        self._since = 0.0
        self._integral = 0.0
        if self.weights > capacity_bytes:
            raise CapacityExceeded(f"non-expert weights need {self.weights} B, capacity is "
                                   f"{capacity_bytes} B")

    @property
    def used(self) -> int:
        return (self.weights + self.experts * self._expert_bytes
                + self.kv_tokens * self._kv_bytes_per_token)

    def change(self, now: float, *, experts: int = 0, kv_tokens: int = 0) -> None:
        """Add (or with negatives, free) experts and KV tokens at time ``now``; a change that
        would exceed the capacity raises and leaves the accounting as it was."""
        before = self.used
        used = (before + experts * self._expert_bytes + kv_tokens * self._kv_bytes_per_token)
        if used > self.capacity:
            raise CapacityExceeded(
                f"t={now:.3f}s: {used} B would be in use ({self.experts + experts} experts, "
                f"{self.kv_tokens + kv_tokens} KV tokens), over the {self.capacity} B capacity")
        self._integral += before * (now - self._since)
        self._since = now
        self.experts += experts
        self.kv_tokens += kv_tokens
        if used > self.peak:
            self.peak = used

    def mean(self, now: float) -> float:
        integral = self._integral + self.used * (now - self._since)
        return integral / now if now > 0 else float(self.used)
