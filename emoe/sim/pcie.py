"""The host-to-GPU link: one FIFO copy engine with a bandwidth and a per-copy latency."""

from __future__ import annotations


class PcieLink:
    """Copies queue in issue order; each takes ``latency + bytes / bandwidth``.

    Times are absolute simulation seconds. The link is busy without a gap from any issue time
    to ``free_at``, so the busy time up to ``now`` is the total copy time issued minus what is
    still queued after ``now``.
    """

    def __init__(self, bandwidth_bytes_per_s: float, latency_s: float):
        if bandwidth_bytes_per_s <= 0:
            raise ValueError(f"PCIe bandwidth must be positive, got {bandwidth_bytes_per_s}")
        self.bandwidth = bandwidth_bytes_per_s
        self.latency = latency_s
        self.free_at = 0.0
        self.bytes_copied = 0
        self.copies = 0
        self._issued_s = 0.0

    def copy(self, now: float, nbytes: int) -> float:
        """Queue one copy issued at ``now``; returns when it lands."""
        duration = self.latency + nbytes / self.bandwidth
        self.free_at = max(now, self.free_at) + duration
        self._issued_s += duration
        self.bytes_copied += nbytes
        self.copies += 1
        return self.free_at

    def busy_s(self, now: float) -> float:
        return self._issued_s - max(0.0, self.free_at - now)
