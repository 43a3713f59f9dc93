"""Host-side expert store: every expert's weights in one contiguous host buffer.

An expert of a Mixtral block is three matrices, w1 and w3 [F, H] and w2 [H, F]. The store packs
them, in that order, into one flat row of ``ExpertLayout.numel`` elements, so loading an
expert onto the device is a single copy. All rows live in one [L, E, N] tensor, pinned when
CUDA is present so host-to-device copies can run asynchronously.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from emoe.core.errors import ConfigError


@dataclass(frozen=True, slots=True)
class ExpertLayout:
    """Where w1, w3 and w2 sit inside one packed expert row."""

    hidden_size: int
    ffn_size: int
    dtype: torch.dtype

    @property
    def numel(self) -> int:
        return 3 * self.hidden_size * self.ffn_size

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()

    def views(self, rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """w1 [S, F, H], w3 [S, F, H], w2 [S, H, F] views of packed rows [S, N]."""
        s, h, f = rows.shape[0], self.hidden_size, self.ffn_size
        w1 = rows[:, : f * h].view(s, f, h)  # [S, F, H]
        w3 = rows[:, f * h : 2 * f * h].view(s, f, h)  # [S, F, H]
        w2 = rows[:, 2 * f * h :].view(s, h, f)  # [S, H, F]
        return w1, w3, w2


class ExpertStore:
    """All experts of all MoE layers, resident in host memory."""

    def __init__(self, rows: torch.Tensor, layout: ExpertLayout):
        if rows.dim() != 3 or rows.shape[2] != layout.numel:
            raise ConfigError(f"expert store rows must be [layers, experts, {layout.numel}], "
                              f"got {list(rows.shape)}")
        self.rows = rows  # [L, E, N]
        self.layout = layout

    @classmethod
    def from_stacked(cls, layers: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
                     pin: bool | None = None) -> "ExpertStore":
        """Pack per-layer stacked experts (w1 [E, F, H], w3 [E, F, H], w2 [E, H, F])."""
        if not layers:
            raise ConfigError("expert store: no MoE layers given")
        w1, _, _ = layers[0]
        num_experts, ffn, hidden = w1.shape
        layout = ExpertLayout(hidden_size=hidden, ffn_size=ffn, dtype=w1.dtype)
        pin = torch.cuda.is_available() if pin is None else pin
        rows = torch.empty((len(layers), num_experts, layout.numel), dtype=layout.dtype,
                           pin_memory=pin)  # [L, E, N]
        for i, (w1, w3, w2) in enumerate(layers):
            if w1.shape != (num_experts, ffn, hidden) or w3.shape != w1.shape \
                    or w2.shape != (num_experts, hidden, ffn):
                raise ConfigError(f"expert store: layer {i} has expert shapes w1 {list(w1.shape)} "
                                  f"w3 {list(w3.shape)} w2 {list(w2.shape)}; expected "
                                  f"[{num_experts}, {ffn}, {hidden}] and [{num_experts}, {hidden}, {ffn}]")
            v1, v3, v2 = layout.views(rows[i])
            v1.copy_(w1)
            v3.copy_(w3)
            v2.copy_(w2)
        return cls(rows, layout)

    @property
    def num_layers(self) -> int:
        return self.rows.shape[0]

    @property
    def num_experts(self) -> int:
        return self.rows.shape[1]

    @property
    def expert_bytes(self) -> int:
        return self.layout.nbytes

    @property
    def total_bytes(self) -> int:
        return self.num_layers * self.num_experts * self.expert_bytes

    @property
    def pinned(self) -> bool:
        return self.rows.is_pinned()

    def row(self, layer: int, expert: int) -> torch.Tensor:
        """The packed host buffer of one expert, [N]."""
        return self.rows[layer, expert]
