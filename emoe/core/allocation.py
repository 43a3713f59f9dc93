"""Per-layer slot allocation: one byte budget of expert slots, split by measured marginal value.

Eq. 2 with graded sensitivity scores every (layer, expert) by the sensitivity-weighted tokens
it is expected to serve: ``N[l, i] = sum_tasks tokens * s[task, l] * f[task, l, i]``. With s
in units of loss per missed routing mass (``emoe.core.sensitivity``) these scores compare
across layers, so the value of a layer's next slot is the score of its best expert not yet
kept: sensitivity x expected coverage. ``allocate_slots`` keeps ``floor`` experts in every
layer (top-k by default, so every token can still use k experts), then gives each remaining
slot to the highest-valued expert left in any layer. Within a layer values only fall as it
grows, so this greedy choice maximises the total score kept under the budget.

Ties rank by ``prefer`` (experts already resident, so a tie never costs a load: a layer no
task in play is sensitive in keeps what it holds, as the paper leaves such layers alone), then
by ``usage`` (Eq. 2 without s: the experts its tokens use most), then by the lower expert
index; between layers, the layer nearer the output.
"""

from __future__ import annotations

import numpy as np

from emoe.core.errors import ConfigError


def layer_floor(total: int, num_layers: int, num_experts: int, floor: int) -> int:
    """Experts every layer keeps: ``floor`` (top-k unless forced lower) when the budget holds
    that many in every layer, else an even share of the budget (at least 1)."""
    if total < num_layers:
        raise ConfigError(f"expert slots: {total} cannot give each of {num_layers} layers one")
    return max(1, min(floor, num_experts, total // num_layers))


def allocate_slots(scores: np.ndarray, total: int, floor: int,
                   usage: np.ndarray | None = None,
                   prefer: np.ndarray | None = None) -> np.ndarray:
    """``[layers, experts]`` bool mask of ``min(total, layers * experts)`` kept experts: each
    layer's best ``layer_floor(...)``, the rest by value across layers (see module)."""
    scores = np.asarray(scores, dtype=np.float64)
    layers, experts = scores.shape
    total = min(int(total), layers * experts)
    base = layer_floor(total, layers, experts, floor)
    usage = np.zeros_like(scores) if usage is None else np.asarray(usage, dtype=np.float64)
    prefer = np.zeros(scores.shape, dtype=bool) if prefer is None else np.asarray(prefer, bool)
    index = np.broadcast_to(np.arange(experts), scores.shape)
    # within a layer: score, prefer, usage descending, then index ascending
    order = np.lexsort((index, -usage, ~prefer, -scores), axis=1)  # [layers, experts]
    rank = np.argsort(order, axis=1)  # each expert's rank in its layer
    mask = rank < base
    extra = total - base * layers
    if extra:
        rest = ~mask
        layer = np.broadcast_to(np.arange(layers)[:, None], scores.shape)
        candidates = np.lexsort((rank[rest], -layer[rest], -usage[rest], ~prefer[rest],
                                 -scores[rest]))
        chosen = np.flatnonzero(rest)[candidates[:extra]]
        mask.flat[chosen] = True
    return mask
