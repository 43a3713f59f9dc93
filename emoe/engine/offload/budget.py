"""The expert budget: how many bytes of device memory expert slots may take.

``--expert-budget`` is either bytes (``8000000``, ``512MiB``, ``2GB``) or a fraction of all
experts (``0.5`` or ``50%``). It becomes a whole number of slots, each holding one expert.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from emoe.engine.offload.errors import ExpertBudgetError

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9,
          "kib": 2**10, "mib": 2**20, "gib": 2**30}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*(%|[kmg]i?b|b)?\s*$", re.I)


@dataclass(frozen=True, slots=True)
class ExpertBudget:
    """A budget as given: a fraction of all experts, or a number of bytes."""

    fraction: float | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str | float | int) -> "ExpertBudget":
        """``0.5``, ``50%`` -> fraction; ``1048576``, ``64MiB`` -> bytes."""
        match = _PATTERN.match(str(text))
        if not match:
            raise ExpertBudgetError(f"--expert-budget {text!r}: expected a fraction (0.5, 50%) "
                                    "or bytes (1048576, 64MiB, 2GB)")
        value, unit = float(match.group(1)), (match.group(2) or "").lower()
        if unit == "%":
            return cls.of_fraction(value / 100.0)
        if unit == "" and value <= 1.0:
            return cls.of_fraction(value)
        if value != int(value) and unit in ("", "b"):
            raise ExpertBudgetError(f"--expert-budget {text!r}: a byte count must be whole")
        return cls(bytes=int(value * _UNITS[unit]))

    @classmethod
    def of_fraction(cls, fraction: float) -> "ExpertBudget":
        if not 0.0 < fraction <= 1.0:
            raise ExpertBudgetError(f"--expert-budget fraction {fraction:g}: must be in (0, 1]")
        return cls(fraction=fraction)

    def num_slots(self, num_layers: int, num_experts: int, expert_bytes: int,
                  non_expert_bytes: int = 0, device_memory_bytes: int | None = None) -> int:
        """Slots this budget buys, checked against the model (and the device, where known).

        The budget must hold one expert per MoE layer, so every layer can compute; when the
        device's memory is known, the slots and the non-expert weights must fit in it together.
        """
        total = num_layers * num_experts
        if self.fraction is not None:
            slots = min(total, int(round(self.fraction * total)))
            described = f"{self.fraction:.0%} of {total} experts"
        else:
            slots = min(total, self.bytes // expert_bytes)
            described = f"{self.bytes} bytes"
        if slots < num_layers:
            raise ExpertBudgetError(
                f"--expert-budget {described} holds {slots} experts of {expert_bytes} bytes; "
                f"at least one per MoE layer is needed: {num_layers} experts = "
                f"{num_layers * expert_bytes} bytes ({num_layers / total:.1%} of experts)")
        if device_memory_bytes is not None and \
                slots * expert_bytes + non_expert_bytes > device_memory_bytes:
            raise ExpertBudgetError(
                f"--expert-budget {described}: {slots} expert slots ({slots * expert_bytes} bytes) "
                f"plus non-expert weights ({non_expert_bytes} bytes) exceed the device's "
                f"{device_memory_bytes} bytes")
        return slots
