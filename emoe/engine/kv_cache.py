"""A pre-allocated slot KV cache and the per-step batch that attends through it.

Each running request owns one slot: ``max_seq_len`` positions of keys and values in every
layer, allocated once at engine start (``k``/``v`` [L, S, Hkv, P, D]). A request takes a slot
when its prefill starts and gives it back when it finishes, so memory is bounded by the slot
count and never fragments; nothing is allocated per step. Giving a slot back zeroes the
positions its request wrote, so every position no running request has written holds zeros:
attention gives such positions weight 0 (a shorter request in a decode batch, padded keys),
and 0 x a NaN left by an earlier request would still be NaN.

A step's tokens are flat: the batch's decode tokens first (one per request, attended together:
a view of the cache when their slots are one ascending range, with a length mask unless all have
the same length), then each prefill chunk (attended causally against its own slot's prefix).
Decode reads only the filled positions (up to the batch's longest context), never ``max_seq_len``.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from emoe.core.errors import EmoeError
from emoe.engine import cpu_kernels
from emoe.engine.config import MoEConfig


class CacheFullError(EmoeError):
    """No free KV slot: the batch already holds ``num_slots`` requests."""


class SlotKVCache:
    def __init__(self, config: MoEConfig, num_slots: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (config.num_layers, num_slots, config.num_kv_heads, max_seq_len, config.head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, Hkv, P, D]
        self.v = torch.zeros(shape, dtype=dtype, device=device)  # [L, S, Hkv, P, D]
        self.num_slots, self.max_seq_len = num_slots, max_seq_len
        self._free = list(range(num_slots))  # a min-heap: requests get the lowest free slots

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes

    def allocate(self) -> int:
        if not self._free:
            raise CacheFullError(f"all {self.num_slots} KV slots are in use")
        return heapq.heappop(self._free)

    def release(self, slot: int, written: int | None = None) -> None:
        """Give ``slot`` back, zeroing its first ``written`` positions (all if None)."""
        if slot in self._free or not 0 <= slot < self.num_slots:
            raise ValueError(f"slot {slot} is not allocated")
        self.k[:, slot, :, :written].zero_()
        self.v[:, slot, :, :written].zero_()
        heapq.heappush(self._free, slot)


@dataclass(frozen=True)
class PrefillSegment:
    """Tokens [start, start + num_tokens) of the request in ``slot``, at ``offset`` in the batch."""

    slot: int
    start: int
    num_tokens: int
    offset: int


class StepBatch:
    """The :class:`~emoe.engine.model.KVBatch` of one engine step."""

    def __init__(self, cache: SlotKVCache, decode: list[tuple[int, int]],
                 prefill: list[tuple[int, int, int]], device: torch.device | str):
        """decode: (slot, position) per decode token; prefill: (slot, start, num_tokens) per chunk."""
        self.cache = cache
        self.decode = decode
        self.num_decode = len(decode)
        positions = [pos for _, pos in decode]
        self.segments: list[PrefillSegment] = []
        for slot, start, n in prefill:
            self.segments.append(PrefillSegment(slot, start, n, len(positions)))
            positions.extend(range(start, start + n))
        self.positions = torch.tensor(positions, dtype=torch.long, device=device)  # [N]
        if self.num_decode:
            lengths = [pos + 1 for pos in positions[:self.num_decode]]
            self.context = max(lengths)
        if self.num_decode > 1:
            slots = [slot for slot, _ in decode]
            self.decode_slots = torch.tensor(slots, device=device)  # [B]
            # slots forming one ascending range (the common case: the cache hands out the lowest
            # free slot) are read through a view of the cache; any other order is gathered
            first = slots[0]
            self.decode_range = (slice(first, first + len(slots))
                                 if slots == list(range(first, first + len(slots))) else None)
            self.decode_mask = None  # equal lengths attend to the whole context
            if min(lengths) < self.context:
                limit = self.positions[:self.num_decode, None] + 1  # [B, 1]
                self.decode_mask = (torch.arange(self.context, device=device)[None, :]
                                    < limit)[:, None, None, :]  # [B, 1, 1, C]

    @property
    def num_tokens(self) -> int:
        return self.positions.shape[0]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [N, Hq, D], k/v [N, Hkv, D] -> [N, Hq, D]."""
        kc, vc = self.cache.k[layer], self.cache.v[layer]  # [S, Hkv, P, D] x2
        gqa = q.shape[1] != k.shape[1]
        nd = self.num_decode
        outs = []
        if nd == 1:  # a lone decode token sees its whole prefix: a view of its slot, no mask
            slot, pos = self.decode[0]
            kc[slot, :, pos] = k[0]
            vc[slot, :, pos] = v[0]
            outs.append(F.scaled_dot_product_attention(
                q[:1, :, None, :], kc[slot:slot + 1, :, :self.context], vc[slot:slot + 1, :, :self.context],
                enable_gqa=gqa)[:, :, 0])  # [1, Hq, D]
        elif nd:
            positions = self.positions[:nd]  # [B]
            kc[self.decode_slots, :, positions] = k[:nd]
            vc[self.decode_slots, :, positions] = v[:nd]
            if self.decode_range is not None:
                kd = kc[self.decode_range, :, :self.context]  # [B, Hkv, C, D] (a view)
                vd = vc[self.decode_range, :, :self.context]  # [B, Hkv, C, D]
            else:
                kd = kc[:, :, :self.context].index_select(0, self.decode_slots)  # [B, Hkv, C, D]
                vd = vc[:, :, :self.context].index_select(0, self.decode_slots)  # [B, Hkv, C, D]
            outs.append(F.scaled_dot_product_attention(q[:nd, :, None, :], kd, vd, attn_mask=self.decode_mask,
                                                       enable_gqa=gqa)[:, :, 0])  # [B, Hq, D]
        for s in self.segments:
            end, rows = s.start + s.num_tokens, slice(s.offset, s.offset + s.num_tokens)
            kc[s.slot, :, s.start:end] = k[rows].transpose(0, 1)
            vc[s.slot, :, s.start:end] = v[rows].transpose(0, 1)
            if cpu_kernels.prefill_attention_applies(q[rows], kc, vc):
                outs.append(cpu_kernels.prefill_attention(q[rows], kc[s.slot], vc[s.slot], s.start))  # [n, Hq, D]
                continue
            qp = q[rows].transpose(0, 1)[None]  # [1, Hq, n, D]
            kp, vp = kc[s.slot, :, :end][None], vc[s.slot, :, :end][None]  # [1, Hkv, end, D] x2
            if s.start == 0:
                op = F.scaled_dot_product_attention(qp, kp, vp, is_causal=True, enable_gqa=gqa)
            else:
                i = torch.arange(s.start, end, device=q.device)[:, None]  # [n, 1]
                mask = torch.arange(end, device=q.device)[None, :] <= i  # [n, end]
                op = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=mask, enable_gqa=gqa)
            outs.append(op[0].transpose(0, 1))  # [n, Hq, D]
        return outs[0] if len(outs) == 1 else torch.cat(outs)
