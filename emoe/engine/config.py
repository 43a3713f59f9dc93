"""The engine's name for the model configuration: :class:`MoEConfig` lives in
``emoe.core.model_config`` (plain JSON, no torch), so the simulator reads the same config.json
the engine loads and computes the same byte counts."""

from emoe.core.model_config import SUPPORTED_MODEL_TYPES, MoEConfig

__all__ = ["SUPPORTED_MODEL_TYPES", "MoEConfig"]
