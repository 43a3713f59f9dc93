"""Routed-expert compute strategies on CPU: why ``expert_mlp`` groups tokens by expert.

    .venv/bin/python benchmarks/engine_expert_mlp.py [--threads 2]

For T tokens with top-2 routing over 8 experts (H 256, F 512, float32) it times
``expert_mlp`` (sort token-expert pairs by expert, run each used expert once), gathering the
chosen experts' weights and using bmm, and a plain loop over (token, choice) pairs.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

from emoe.engine.model import expert_mlp, route


def gathered(x, weights, ids, w1, w3, w2):
    flat = ids.flatten()  # [T*K]
    xs = x.repeat_interleave(ids.shape[1], 0)[:, :, None]  # [T*K, H, 1]
    h = F.silu(torch.bmm(w1[flat], xs)) * torch.bmm(w3[flat], xs)  # [T*K, F, 1]
    y = torch.bmm(w2[flat], h)[:, :, 0] * weights.flatten()[:, None]  # [T*K, H]
    return y.view(*ids.shape, -1).sum(1)  # [T, H]


def per_pair(x, weights, ids, w1, w3, w2):
    out = torch.zeros_like(x)
    for t, row in enumerate(ids.tolist()):
        for k, e in enumerate(row):
            xe = x[t:t + 1]
            out[t:t + 1] += weights[t, k] * F.linear(F.silu(F.linear(xe, w1[e])) * F.linear(xe, w3[e]), w2[e])
    return out


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=100)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    e, h, f, k = 8, 256, 512, 2
    w1, w3, w2 = (torch.randn(e, f, h, generator=g) * 0.02, torch.randn(e, f, h, generator=g) * 0.02,
                  torch.randn(e, h, f, generator=g) * 0.02)
    print(f"{'tokens':>6s} {'expert_mlp us':>14s} {'gather+bmm us':>14s} {'per-pair us':>12s}")
    with torch.inference_mode():
        for tokens in (1, 8, 64):
            x = torch.randn(tokens, h, generator=g)
            weights, ids = route(torch.randn(tokens, e, generator=g), k, True)
            row = []
            for fn in (expert_mlp, gathered, per_pair):
                iters = max(5, args.iters // (20 if fn is gathered and tokens > 8 else 1))
                for _ in range(3):
                    fn(x, weights, ids, w1, w3, w2)
                start = time.perf_counter()
                for _ in range(iters):
                    fn(x, weights, ids, w1, w3, w2)
                row.append((time.perf_counter() - start) / iters * 1e6)
            print(f"{tokens:6d} {row[0]:14.0f} {row[1]:14.0f} {row[2]:12.0f}")


if __name__ == "__main__":
    main()
