"""Routed-expert compute on CPU: the paths ``expert_mlp`` can take, by token count.

    .venv/bin/python benchmarks/engine_expert_mlp.py [--threads 1] [--hidden 128 --ffn 256]

For T tokens with top-2 routing over 8 experts (float32; defaults are the reference model's
shape) it times, per call:

* ``fused``: the numba kernel of emoe/engine/cpu_kernels.py (what ``expert_mlp`` runs up to
  ``FUSED_MAX_TOKENS`` tokens);
* ``grouped``: ``grouped_expert_mlp``, tokens grouped by expert into one padded batch, one
  oneDNN matmul per expert and matrix where it has at least ``ONEDNN_MIN_ROWS`` rows (what
  ``expert_mlp`` runs above ``FUSED_MAX_TOKENS``);
* ``plain torch``: the grouped path with the CPU kernels off (``EMOE_CPU_KERNELS=0``), i.e.
  one ``F.linear`` (MKL) per expert and matrix.

Each number is the best of 5 rounds after a warm-up (fresh routing per token count).
"""

from __future__ import annotations

import argparse
import time

import torch

from emoe.engine import cpu_kernels
from emoe.engine.model import expert_mlp, route


def _best_us(fn, iters: int) -> float:
    for _ in range(max(3, iters // 10)):
        fn()
    best = float("inf")
    for _ in range(5):
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        best = min(best, (time.perf_counter() - start) / iters)
    return best * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--ffn", type=int, default=256)
    p.add_argument("--iters", type=int, default=50)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    e, h, f, k = 8, args.hidden, args.ffn, 2
    w1, w3, w2 = (torch.randn(shape, generator=g) * 0.05 for shape in ((e, f, h), (e, f, h), (e, h, f)))
    print(f"8 experts, hidden {h}, ffn {f}, top-2, float32, {args.threads} thread(s)")
    print(f"{'tokens':>6s} {'fused us':>9s} {'grouped us':>11s} {'plain torch us':>15s}")
    fused_max = cpu_kernels.FUSED_MAX_TOKENS
    with torch.inference_mode():
        for tokens in (1, 8, 16, 32, 64, 128, 512):
            x = torch.randn(tokens, h, generator=g)
            weights, ids = route(torch.randn(tokens, e, generator=g), k, True)
            call = lambda: expert_mlp(x, weights, ids, w1, w3, w2)  # noqa: E731
            iters = max(5, args.iters * 8 // tokens)
            fused = _best_us(lambda: cpu_kernels.fused_expert_mlp(x, weights, ids, w1, w3, w2), iters)
            try:
                cpu_kernels.FUSED_MAX_TOKENS = 0
                grouped = _best_us(call, iters)
                cpu_kernels.ENABLED = False
                plain = _best_us(call, iters)
            finally:
                cpu_kernels.FUSED_MAX_TOKENS, cpu_kernels.ENABLED = fused_max, True
            print(f"{tokens:6d} {fused:9.0f} {grouped:11.0f} {plain:15.0f}")


if __name__ == "__main__":
    main()
