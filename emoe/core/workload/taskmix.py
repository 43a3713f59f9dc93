"""Task types for unlabelled requests: a seeded draw from a weighted mix."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from emoe.core.errors import ConfigError, UnknownNameError
from emoe.core.tasks import DEFAULT_TASKS, TaskProfile

_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class TaskMix:
    """Task names and their probabilities (normalised to sum to 1)."""

    names: tuple[str, ...]
    probabilities: tuple[float, ...]

    @classmethod
    def from_weights(cls, weights: Mapping[str, float],
                     tasks: Mapping[str, TaskProfile] | None = None) -> TaskMix:
        tasks = DEFAULT_TASKS if tasks is None else tasks
        if not weights:
            raise ConfigError("task mix: empty; expected e.g. 'qa=0.5,summarization=0.5'")
        for name, weight in weights.items():
            if name not in tasks:
                raise UnknownNameError("task", name, list(tasks))
            if not weight >= 0.0 or weight == float("inf"):
                raise ConfigError(f"task mix: weight of {name!r} is {weight}; expected a finite "
                                  "number >= 0")
        total = sum(weights.values())
        if total <= 0.0:
            raise ConfigError("task mix: all weights are 0; at least one must be > 0")
        names = tuple(weights)
        return cls(names, tuple(weights[n] / total for n in names))

    @classmethod
    def parse(cls, spec: str, tasks: Mapping[str, TaskProfile] | None = None) -> TaskMix:
        """Parse ``"summarization=0.2,qa=0.3,conversation=0.5"`` (weights need not sum to 1)."""
        weights: dict[str, float] = {}
        for item in spec.split(","):
            name, sep, value = item.strip().partition("=")
            try:
                if not sep:
                    raise ValueError
                weights[name.strip()] = float(value)
            except ValueError:
                raise ConfigError(f"task mix {spec!r}: bad item {item.strip()!r}; expected "
                                  "name=weight, e.g. 'qa=0.3'") from None
        return cls.from_weights(weights, tasks)

    @classmethod
    def uniform(cls, tasks: Mapping[str, TaskProfile] | None = None) -> TaskMix:
        tasks = DEFAULT_TASKS if tasks is None else tasks
        return cls.from_weights(dict.fromkeys(tasks, 1.0), tasks)

    def draw(self, seed: int) -> Iterator[str]:
        """An endless, reproducible stream of task names, drawn i.i.d. from the mix."""
        rng = np.random.default_rng(seed)
        names, p = self.names, np.asarray(self.probabilities)
        while True:
            for index in rng.choice(len(names), size=_CHUNK, p=p).tolist():
                yield names[index]

    def __str__(self) -> str:
        return ",".join(f"{n}={p:g}" for n, p in zip(self.names, self.probabilities))
