"""The expert budget: how many experts the GPU keeps, spelled the same in every command.

``--expert-budget`` of ``emoe sim``, ``emoe serve``/``emoe worker`` and ``emoe eval`` is one of

- ``5/layer``: experts per MoE layer;
- ``62.5%`` or ``0.625``: a fraction of all experts (a bare number <= 1 is a fraction, so ``1``
  is 100%);
- a size in bytes: ``40GiB``, ``64MiB``, ``2GB``, ``3.5e10``, ``1048576`` (decimal ``k M G T``
  and binary ``Ki Mi Gi Ti`` units, the ``B`` optional, case ignored).

A budget becomes a whole number of expert slots, rounded down (a budget is a cap): a fraction
of ``layers x experts``, or the bytes over one expert's size. Too few slots for one expert per
layer is an error that says how many are needed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from emoe.core.errors import ConfigError

ACCEPTED = ("experts per layer (5/layer), a fraction of all experts (62.5%, 0.625) or a size "
            "(40GiB, 64MiB, 2GB, 3.5e10 bytes)")

_PER_LAYER = re.compile(r"^\s*(\d+)\s*/\s*layer\s*$", re.IGNORECASE)
_PERCENT = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*%\s*$")
_SIZE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:e[+-]?[0-9]+)?)\s*([kmgt]i?b?|b)?\s*$",
                   re.IGNORECASE)
_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
          "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}


class ExpertBudgetError(ConfigError):
    """An expert budget that cannot be parsed, or is too small for the model (or device)."""


def _prefix(flag: str | None) -> str:
    return f"{flag} " if flag else ""


def _size(text: str) -> float | None:
    match = _SIZE.match(text)
    if not match:
        return None
    return float(match.group(1)) * _UNITS[(match.group(2) or "").lower().removesuffix("b")]


def parse_size(text: str, flag: str | None = None) -> int:
    """Bytes from ``80GiB``, ``40GB``, ``64M``, ``3.5e9``, ``1048576``. ``flag`` names the
    option in the error."""
    value = _size(str(text))
    if value is None:
        raise ConfigError(f"{_prefix(flag)}{text!r} is not a size; e.g. 48GiB, 40GB, 64MiB, "
                          f"3.5e9 (bytes)")
    if value != int(value):
        raise ConfigError(f"{_prefix(flag)}{text!r}: a byte count must be whole")
    return int(value)


@dataclass(frozen=True, slots=True)
class ExpertBudget:
    """A budget as given: experts per layer, a fraction of all experts, or bytes (one set)."""

    per_layer: int | None = None
    fraction: float | None = None
    bytes: int | None = None

    @classmethod
    def parse(cls, text: str | float | int, flag: str | None = "--expert-budget") -> "ExpertBudget":
        """Any accepted spelling (module docstring); errors name ``flag`` and what is
        accepted."""
        text = str(text)
        per_layer = _PER_LAYER.match(text)
        if per_layer:
            value = int(per_layer.group(1))
            if value < 1:
                raise ExpertBudgetError(f"{_prefix(flag)}{text!r}: at least 1 expert per layer")
            return cls(per_layer=value)
        percent = _PERCENT.match(text)
        if percent:
            return cls.of_fraction(float(percent.group(1)) / 100.0, flag, text)
        try:
            value = float(text)
        except ValueError:
            value = None
        if value is not None and value <= 1.0:
            return cls.of_fraction(value, flag, text)
        size = _size(text)
        if size is None:
            raise ExpertBudgetError(f"{_prefix(flag)}{text!r} is not an expert budget; "
                                    f"expected {ACCEPTED}")
        if size != int(size):
            raise ExpertBudgetError(f"{_prefix(flag)}{text!r}: a byte count must be whole")
        return cls(bytes=int(size))

    @classmethod
    def of_fraction(cls, fraction: float, flag: str | None = "--expert-budget",
                    text: str | None = None) -> "ExpertBudget":
        if not 0.0 < fraction <= 1.0:
            given = text if text is not None else f"{fraction:g}"
            raise ExpertBudgetError(f"{_prefix(flag)}{given!r}: a fraction of all experts must "
                                    f"be in (0%, 100%], i.e. (0, 1]")
        return cls(fraction=fraction)

    @property
    def label(self) -> str:
        """The budget as a user writes it: ``5/layer``, ``62.5%``, ``40GiB``."""
        if self.per_layer is not None:
            return f"{self.per_layer}/layer"
        if self.fraction is not None:
            return f"{100 * self.fraction:g}%"
        return size_label(self.bytes or 0)

    def slots(self, num_layers: int, num_experts: int, expert_bytes: int) -> int:
        """Expert slots this budget buys on a model (at most every expert), unchecked."""
        total = num_layers * num_experts
        if self.per_layer is not None:
            return min(total, self.per_layer * num_layers)
        if self.fraction is not None:
            return min(total, int(self.fraction * total + 1e-9))
        return min(total, (self.bytes or 0) // expert_bytes)

    def num_slots(self, num_layers: int, num_experts: int, expert_bytes: int,
                  non_expert_bytes: int = 0, device_memory_bytes: int | None = None,
                  flag: str = "--expert-budget") -> int:
        """Slots this budget buys, checked against the model (and the device, where known).

        The budget must hold one expert per MoE layer, so every layer can compute; when the
        device's memory is known, the slots and the non-expert weights must fit in it together.
        """
        total = num_layers * num_experts
        slots = self.slots(num_layers, num_experts, expert_bytes)
        if self.per_layer is not None and self.per_layer > num_experts:
            raise ExpertBudgetError(f"{flag} {self.label}: the model has {num_experts} experts "
                                    f"per layer")
        described = (f"{self.fraction:.0%} of {total} experts" if self.fraction is not None
                     else self.label if self.per_layer is not None else f"{self.bytes} bytes")
        if slots < num_layers:
            raise ExpertBudgetError(
                f"{flag} {described} holds {slots} experts of {expert_bytes} bytes; "
                f"at least one per MoE layer is needed: {num_layers} experts = "
                f"{num_layers * expert_bytes} bytes ({num_layers / total:.1%} of experts)")
        if device_memory_bytes is not None and \
                slots * expert_bytes + non_expert_bytes > device_memory_bytes:
            raise ExpertBudgetError(
                f"{flag} {described}: {slots} expert slots ({slots * expert_bytes} bytes) "
                f"plus non-expert weights ({non_expert_bytes} bytes) exceed the device's "
                f"{device_memory_bytes} bytes")
        return slots


def size_label(nbytes: int) -> str:
    """``80GiB``, ``40.5GiB``, ``512MiB``: the shortest binary unit that keeps 3 digits."""
    for unit, size in (("TiB", 1024**4), ("GiB", 1024**3), ("MiB", 1024**2), ("KiB", 1024)):
        if nbytes >= size:
            return f"{nbytes / size:.4g}{unit}"
    return f"{nbytes}B"
