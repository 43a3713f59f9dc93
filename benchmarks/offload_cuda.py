"""Expert loading on CUDA: slot-cache load bandwidth vs a plain pinned copy, and overlap.

    .venv/bin/python benchmarks/offload_cuda.py [--expert-mib 336] [--experts 16]

1. Bandwidth: ``SlotCache.load`` of ``--experts`` experts (side stream, non-blocking copies
   from the pinned host store, one event per layer) against a loop of plain
   ``dst.copy_(pinned_src, non_blocking=True)`` of the same bytes on the default stream.
2. Overlap: under ``torch.profiler``, loads for layer i + 1 are submitted while layer i's
   expert matmuls run; reports the share of host-to-device copy time that ran concurrently
   with compute kernels (1.0 = fully hidden).
Needs a CUDA device; exits with a message otherwise.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

from emoe.engine.offload.cache import SlotCache
from emoe.engine.offload.store import ExpertLayout, ExpertStore


def _store(layers: int, experts: int, hidden: int, ffn: int, dtype: torch.dtype) -> ExpertStore:
    layout = ExpertLayout(hidden, ffn, dtype)
    rows = torch.empty((layers, experts, layout.numel), dtype=dtype, pin_memory=True)
    rows.normal_()
    return ExpertStore(rows, layout)


def bandwidth(store: ExpertStore, n: int, device: torch.device) -> tuple[float, float]:
    keys = [(i % store.num_layers, i // store.num_layers) for i in range(n)]
    cache = SlotCache(store, num_slots=n, device=device)
    cache.load(keys)
    cache.synchronize()
    for key in keys:
        cache.evict(key)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    cache.load(keys)
    cache.synchronize()
    slot_s = time.perf_counter() - t0
    dst = torch.empty_like(cache.pool)
    srcs = [store.row(*k) for k in keys]
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i, src in enumerate(srcs):
        dst[i].copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    plain_s = time.perf_counter() - t0
    total = n * store.expert_bytes
    return total / slot_s, total / plain_s


def overlap(store: ExpertStore, device: torch.device, tokens: int = 256) -> float:
    from torch.profiler import ProfilerActivity, profile

    layers, per_layer = store.num_layers, store.num_experts // 2
    cache = SlotCache(store, num_slots=2 * layers * per_layer, device=device)
    x = torch.randn(tokens, store.layout.hidden_size, device=device, dtype=store.layout.dtype)
    cache.load([(0, e) for e in range(per_layer)])
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for layer in range(layers):
            if layer + 1 < layers:
                cache.load([(layer + 1, e) for e in range(per_layer)])
            cache.wait_layer(layer)
            for e in range(per_layer):
                s = cache.slot_of((layer, e))
                h = torch.nn.functional.silu(x @ cache.w1[s].T) * (x @ cache.w3[s].T)
                x = (h @ cache.w2[s].T) * 0.5 + x * 0.5
        torch.cuda.synchronize()
    copies, kernels = [], []
    for ev in prof.events():
        if ev.device_type.name != "CUDA":
            continue
        span = (ev.time_range.start, ev.time_range.end)
        (copies if "Memcpy HtoD" in ev.name else kernels).append(span)
    copy_total = sum(e - s for s, e in copies)
    hidden = sum(max(0, min(e, ke) - max(s, ks)) for s, e in copies for ks, ke in kernels)
    return min(1.0, hidden / copy_total) if copy_total else 0.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--expert-mib", type=float, default=336.0,
                   help="expert size (default: Mixtral-8x7B bf16, 3 x 4096 x 14336 x 2 B)")
    p.add_argument("--experts", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("offload_cuda: no CUDA device; nothing measured", file=sys.stderr)
        raise SystemExit(2)
    device = torch.device("cuda")
    hidden = 4096
    ffn = max(1, int(args.expert_mib * 2**20 / (3 * hidden * 2)))
    store = _store(args.layers, max(2, -(-args.experts // args.layers)), hidden, ffn, torch.bfloat16)
    slot_bw, plain_bw = bandwidth(store, min(args.experts, store.num_layers * store.num_experts), device)
    print(f"{torch.cuda.get_device_name(device)}: expert {store.expert_bytes / 2**20:.0f} MiB; "
          f"slot-cache load {slot_bw / 1e9:.2f} GB/s, plain pinned copy_ {plain_bw / 1e9:.2f} GB/s "
          f"({slot_bw / plain_bw:.2f}x)")
    print(f"copy time overlapped with compute: {overlap(store, device):.2f}")


if __name__ == "__main__":
    main()
