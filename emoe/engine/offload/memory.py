"""Where device memory goes: expert slots, KV cache, and everything else.

On CUDA the total comes from the caching allocator (``torch.cuda.memory_allocated``), so "the
rest" is what is really held beyond experts and KV: non-expert weights, activations and
workspace. On CPU there is no device allocator to ask; the total is the sum of the tensors the
engine holds (weights, slot pool, KV cache), and activations are not counted.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from emoe.engine.offload.cache import SlotCache


@dataclass(frozen=True, slots=True)
class MemoryReport:
    device: str
    source: str                # "cuda-allocator" or "tensors"
    allocated_bytes: int       # everything held on the device
    expert_bytes: int          # the slot pool (or, without offloading, the stacked experts)
    expert_budget_bytes: int   # what --expert-budget allows (the pool never exceeds it)
    kv_bytes: int
    host_expert_bytes: int     # the host-side expert store (0 without offloading)

    @property
    def other_bytes(self) -> int:
        return self.allocated_bytes - self.expert_bytes - self.kv_bytes

    def as_dict(self) -> dict[str, int | str]:
        return {**asdict(self), "other_bytes": self.other_bytes}


def _nbytes(tensors) -> int:
    seen, total = set(), 0
    for t in tensors:
        if t.device.type != "meta" and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


def measure_memory(model: nn.Module, kv: list[torch.Tensor],
                   cache: SlotCache | None = None) -> MemoryReport:
    """Bytes held for experts, KV (``kv``: the cache tensors) and the rest on the model's device."""
    device = next(model.parameters()).device
    kv_bytes = _nbytes(kv)
    if cache is not None:
        expert_bytes, budget, host = cache.budget_bytes, cache.budget_bytes, \
            cache.store.total_bytes
    else:
        expert_bytes = _nbytes(p for n, p in model.named_parameters() if ".experts." in n)
        budget, host = expert_bytes, 0
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        allocated, source = torch.cuda.memory_allocated(device), "cuda-allocator"
    else:
        pool = [cache.pool] if cache is not None else []
        allocated = _nbytes([*model.parameters(), *model.buffers(), *pool, *kv])
        source = "tensors"
    return MemoryReport(device=str(device), source=source, allocated_bytes=allocated,
                        expert_bytes=expert_bytes, expert_budget_bytes=budget, kv_bytes=kv_bytes,
                        host_expert_bytes=host)
