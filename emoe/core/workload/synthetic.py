"""Synthetic request streams: Gamma-process arrivals (CV 1 is Poisson), a task mix, and
per-task log-normal input and output lengths. Generated in fixed-size chunks: memory stays
constant however many requests are drawn."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

import numpy as np

from emoe.core.errors import ConfigError
from emoe.core.request import Request
from emoe.core.tasks import DEFAULT_TASKS, TaskProfile, get_task
from emoe.core.workload.taskmix import TaskMix

_CHUNK = 4096


@dataclass(frozen=True, slots=True)
class LengthDist:
    """A log-normal token count with the given mean and coefficient of variation, rounded and
    clipped to [low, high]."""

    mean: float
    cv: float = 0.5
    low: int = 1
    high: int = 32768

    def __post_init__(self) -> None:
        if not (self.mean > 0 and self.cv >= 0 and 1 <= self.low <= self.high):
            raise ConfigError(f"length distribution {self}: expected mean > 0, cv >= 0, "
                              "1 <= low <= high")

    def sample(self, rng: np.random.Generator, size: int) -> np.ndarray:
        sigma2 = math.log1p(self.cv * self.cv)
        values = rng.lognormal(math.log(self.mean) - sigma2 / 2, math.sqrt(sigma2), size)
        return np.clip(np.rint(values), self.low, self.high).astype(np.int64)


DEFAULT_INPUT_LENGTHS: dict[str, LengthDist] = {
    "summarization": LengthDist(1024, 0.5),
    "classification": LengthDist(64, 0.5),
    "qa": LengthDist(320, 0.5),
    "similarity": LengthDist(48, 0.5),
    "conversation": LengthDist(640, 1.0),
}
"""Prompt lengths per default task, sized after the paper's datasets (XSUM articles, financial
tweets, SQuAD passages, headline pairs, chat turns); this project's choice."""


def synthetic_requests(*, rate: float, num_requests: int | None = None,
                       duration_s: float | None = None, cv: float = 1.0,
                       mix: TaskMix | None = None,
                       tasks: Mapping[str, TaskProfile] | None = None,
                       input_lengths: Mapping[str, LengthDist] | None = None,
                       output_lengths: Mapping[str, LengthDist] | None = None,
                       seed: int = 0) -> Iterator[Request]:
    """Stream requests at mean ``rate`` per second until ``num_requests`` or ``duration_s``.

    Inter-arrival gaps are Gamma with mean 1/rate and coefficient of variation ``cv``
    (cv = 1: Poisson; cv > 1: bursty). Output lengths default to a log-normal (CV 0.5) around
    each task's ``mean_output_tokens``; ``expected_output_tokens`` is that mean.
    """
    if not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"synthetic rate {rate!r}; expected requests/s > 0")
    if not (math.isfinite(cv) and cv > 0):
        raise ConfigError(f"synthetic arrival cv {cv!r}; expected a number > 0")
    if num_requests is None and duration_s is None:
        raise ConfigError("synthetic trace: give num_requests or duration_s (or both)")
    tasks = DEFAULT_TASKS if tasks is None else tasks
    mix = TaskMix.uniform(tasks) if mix is None else mix
    inputs = DEFAULT_INPUT_LENGTHS if input_lengths is None else input_lengths
    profiles = [get_task(name, tasks) for name in mix.names]
    input_dists = [_length_for(inputs, p.name, "input") for p in profiles]
    output_dists = [LengthDist(p.mean_output_tokens) if output_lengths is None
                    else _length_for(output_lengths, p.name, "output") for p in profiles]
    return _generate(rate, num_requests, duration_s, cv, mix, profiles, input_dists,
                     output_dists, seed)


def _generate(rate: float, num_requests: int | None, duration_s: float | None, cv: float,
              mix: TaskMix, profiles: list[TaskProfile], input_dists: list[LengthDist],
              output_dists: list[LengthDist], seed: int) -> Iterator[Request]:
    rng = np.random.default_rng(seed)
    shape = 1.0 / (cv * cv)
    probabilities = np.asarray(mix.probabilities)
    limit = math.inf if num_requests is None else num_requests
    end = math.inf if duration_s is None else duration_s
    index, clock = 0, 0.0
    while True:
        gaps = rng.gamma(shape, 1.0 / (rate * shape), _CHUNK)
        arrivals = (clock + np.cumsum(gaps)).tolist()
        clock = arrivals[-1]
        which = rng.choice(len(profiles), size=_CHUNK, p=probabilities)
        input_tokens = np.empty(_CHUNK, dtype=np.int64)
        output_tokens = np.empty(_CHUNK, dtype=np.int64)
        for k in range(len(profiles)):
            mask = which == k
            n = int(mask.sum())
            input_tokens[mask] = input_dists[k].sample(rng, n)
            output_tokens[mask] = output_dists[k].sample(rng, n)
        for arrival, k, n_in, n_out in zip(arrivals, which.tolist(), input_tokens.tolist(),
                                           output_tokens.tolist()):
            if index >= limit or arrival >= end:
                return
            profile = profiles[k]
            yield Request(str(index), arrival, profile.name, n_in, n_out, profile.slo,
                          profile.mean_output_tokens)
            index += 1


def _length_for(dists: Mapping[str, LengthDist], task: str, kind: str) -> LengthDist:
    try:
        return dists[task]
    except KeyError:
        raise ConfigError(f"no {kind} length distribution for task {task!r}; "
                          f"given for: {', '.join(sorted(dists))}") from None
