"""emoe: memory-efficient, task-aware inference for Mixture-of-Experts LLMs."""

__version__ = "0.1.0"
