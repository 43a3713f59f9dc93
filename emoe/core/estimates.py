"""The paper's two formulas: expected tokens per expert (Eq. 2) and a running request's expected
latency if a new request joins (Eq. 3), plus the cost coefficients Eq. 3 needs.

Eq. 2, per layer and expert i, summed over the tasks in play:

    N_i = sum_tasks (input tokens of the task's requests + T * W_o) * s * f_i

Eq. 3, for running request i when a request with W input tokens is admitted:

    t_i = dE + (W + n_i * G_i) * c + r_i

implemented (in ``emoe.core.policies.BatchEstimate``) as
``dE + W * c_prefill + G_i * (o + n_i * c_decode) + r_i``: with the per-iteration overhead
``o = 0`` and ``c_prefill = c_decode = c`` this is the paper's formula; a non-zero ``o``
accounts for the fixed cost of each decode iteration that a per-token cost alone misses.
``DecodeTargets`` holds G_i and each decoding request's SLO target for it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from emoe.core.specs import HardwareSpec, ModelSpec

REMAINING_FLOOR = 0.05
"""G_i is reset to this fraction of its initial value once it counts down to zero (paper)."""


@dataclass(frozen=True, slots=True)
class TaskDemand:
    """What one task brings to Eq. 2: T requests with these input tokens, W_o output each."""

    requests: int
    input_tokens: int
    expected_output_tokens: float

    @property
    def tokens(self) -> float:
        return self.input_tokens + self.requests * self.expected_output_tokens


def expected_expert_tokens(demand: Mapping[str, TaskDemand],
                           frequencies: Mapping[str, np.ndarray],
                           sensitivity: Mapping[str, np.ndarray],
                           shape: tuple[int, int],
                           decode_frequencies: Mapping[str, np.ndarray] | None = None
                           ) -> np.ndarray:
    """Eq. 2: ``[layers, experts]`` expected tokens per expert over the tasks in ``demand``.

    ``frequencies[task]`` is ``[layers, experts]`` (rows sum to 1); ``sensitivity[task]`` is
    ``[layers]`` (0 = the task tolerates wrong routing in that layer). With
    ``decode_frequencies`` the input tokens are spread by ``frequencies`` (the prompt's
    routing) and the expected output tokens by the decode frequencies (the generated tokens'
    routing, which differs from the prompt's); without, by ``frequencies`` alone (the paper).
    """
    total = np.zeros(shape)
    if decode_frequencies is not None:
        for task, tokens in expert_tokens(demand, frequencies, decode_frequencies).items():
            total += sensitivity[task][:, None] * tokens
        return total
    for task, d in demand.items():
        if d.requests:
            total += d.tokens * sensitivity[task][:, None] * frequencies[task]
    return total


def expert_tokens(demand: Mapping[str, TaskDemand], frequencies: Mapping[str, np.ndarray],
                  decode_frequencies: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per task with requests in ``demand``, Eq. 2 without s: ``[layers, experts]`` expected
    tokens, input tokens spread by ``frequencies`` and output tokens by the decode ones."""
    return {task: d.input_tokens * frequencies[task]
            + (d.requests * d.expected_output_tokens) * decode_frequencies[task]
            for task, d in demand.items() if d.requests}


def top_experts(scores: np.ndarray, slots_per_layer: np.ndarray) -> np.ndarray:
    """``[layers, experts]`` bool mask of the ``slots_per_layer[l]`` best-scored experts of each
    layer; ties go to the lower expert index."""
    order = np.argsort(-scores, axis=1, kind="stable")
    ranks = np.argsort(order, axis=1)  # the inverse permutation: each expert's rank
    return ranks < slots_per_layer[:, None]


class DecodeTargets:
    """G_i and the SLO target of every decoding request, as arrays for Eq. 3.

    A request that produced its first token at F with TPOT SLO ``tpot`` meets its SLO (its TTFT
    is settled by then) when it ends by ``F + tpot * (tokens - 1)``. With ``g`` tokens generated
    and G still expected, that target is ``F + tpot * (g + G - 1)``: fixed while G counts down,
    ``tpot`` later per token once G rests at its floor. ``join``/``leave`` are O(1).
    """

    def __init__(self) -> None:
        self._slot: dict[str, int] = {}
        self._ids: list[str] = []
        self._data = np.empty((5, 64))  # per request: join, expected, first, tpot, floor of G

    def __len__(self) -> int:
        return len(self._ids)

    def join(self, request_id: str, join_iter: int, expected_output: float,
             first_token_at: float, tpot_s: float) -> None:
        """A request produced its first token at ``first_token_at``, in global decode
        iteration ``join_iter`` (its token count is ``1 + iterations - join_iter``)."""
        size = len(self._ids)
        if size == self._data.shape[1]:
            self._data = np.concatenate([self._data, np.empty_like(self._data)], axis=1)
        self._data[:, size] = (join_iter, expected_output, first_token_at, tpot_s,
                               REMAINING_FLOOR * expected_output)
        self._slot[request_id] = size
        self._ids.append(request_id)

    def leave(self, request_id: str) -> None:
        slot = self._slot.pop(request_id)
        last = self._ids.pop()
        if last != request_id:
            self._data[:, slot] = self._data[:, len(self._ids)]
            self._ids[slot] = last
            self._slot[last] = slot

    def at(self, iterations: int) -> tuple[np.ndarray, np.ndarray]:
        """(G, SLO target time) per decoding request after ``iterations`` decode iterations."""
        join, expected, first, tpot, floor = self._data[:, :len(self._ids)]
        generated = (iterations + 1) - join
        left = expected - generated
        remaining = np.where(left > 0, left, floor)
        target = generated  # first + tpot * (generated + remaining - 1), in place
        target += remaining
        target -= 1
        target *= tpot
        target += first
        return remaining, target


class CostEstimate:
    """c, o and dE for Eq. 3, from the hardware and model specs, refined by observed steps.

    The step-time model is the simulator's (see ``HardwareSpec``) without the attention and
    weight-read terms; ``observe_step`` keeps an exponentially weighted ratio of measured to
    modelled step time and scales c and o by it, so a slower real engine tightens admission.
    The scheduler measures a step from its plan to the next plan (the loop went straight on):
    the engine's step and the serving loop's work around it, which a client waits for too,
    and the one time the simulator and the server both have.
    """

    def __init__(self, model: ModelSpec, hardware: HardwareSpec, smoothing: float = 0.05):
        self._c_prefill = hardware.prefill_s_per_token
        self._c_decode = hardware.decode_s_per_token
        self._overhead = hardware.step_overhead_s
        self.expert_load_s = (hardware.pcie_latency_s
                              + model.expert_bytes / hardware.pcie_bandwidth_bytes_per_s)
        self.predictor_s = hardware.predictor_s
        self._smoothing = smoothing
        self.scale = 1.0

    @property
    def c_prefill(self) -> float:
        return self._c_prefill * self.scale

    @property
    def c_decode(self) -> float:
        return self._c_decode * self.scale

    @property
    def iteration_overhead_s(self) -> float:
        return self._overhead * self.scale

    def modelled_step_s(self, prefill_tokens: int, decode_tokens: int) -> float:
        return (self._overhead + prefill_tokens * self._c_prefill
                + decode_tokens * self._c_decode)

    def observe_step(self, prefill_tokens: int, decode_tokens: int, iterations: int,
                     seconds: float, last_s: float = 0.0) -> None:
        """Fold in a measured step: ``seconds`` for ``iterations`` iterations, the first with
        ``prefill_tokens`` prompt tokens, each with ``decode_tokens`` decode tokens. A step of n
        iterations counts as n observations of its mean ratio, so a simulator's macro step
        moves the scale as an engine's n single steps do; ``last_s`` of ``seconds`` (the
        loop's work at its end: new requests accepted) belongs to its last iteration alone,
        as it would to an engine's last single step."""
        one = self.modelled_step_s(0, decode_tokens)
        modelled = self.modelled_step_s(prefill_tokens, decode_tokens) + (iterations - 1) * one
        if modelled <= 0 or seconds <= 0:
            return
        keep = 1.0 - self._smoothing
        if iterations > 1 and 0 < last_s < seconds and one > 0:
            ratio = (seconds - last_s) / modelled
            self.scale = ratio + keep ** (iterations - 1) * (self.scale - ratio)
            last = ratio + last_s / one
            self.scale = last + keep * (self.scale - last)
            return
        ratio = seconds / modelled
        self.scale = ratio + keep ** iterations * (self.scale - ratio)

    def load_s(self, experts: int) -> float:
        """dE for loading ``experts`` experts one after another over the host link."""
        return experts * self.expert_load_s
