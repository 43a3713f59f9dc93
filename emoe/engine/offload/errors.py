"""What can go wrong with offloaded experts; each message names the expert, slot or budget."""

from __future__ import annotations

from emoe.core.errors import EmoeError


class UnknownExpertError(EmoeError):
    """A plan or call names a (layer, expert) the model does not have."""

    def __init__(self, layer: int, expert: int, num_layers: int, num_experts: int, where: str):
        self.layer, self.expert = layer, expert
        super().__init__(f"{where}: expert (layer {layer}, expert {expert}) does not exist; the "
                         f"model has layers 0..{num_layers - 1} and experts 0..{num_experts - 1}")


class ExpertInUseError(EmoeError):
    """An eviction of an expert that a layer is computing with."""


class CacheFullError(EmoeError):
    """A load with no slot free: every slot holds an expert that may not be evicted."""
