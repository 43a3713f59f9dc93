"""Decode throughput with offloaded experts vs every expert resident (the real engine).

    .venv/bin/python benchmarks/offload_decode.py [--checkpoint DIR] [--prompts 60]

Runs the same greedy workload (the reference tasks' prompts interleaved, arriving one per step,
batch <= 8, every request generating exactly ``--max-new-tokens``) under: ``all`` (plain model, every expert resident), ``emoe`` with 50% of
experts resident (p = 40, reroute on a miss), and ``lru`` with 50% and fetch on a miss (the
on-demand baseline). Reports decode tokens/s over decode-only steps: the median of ``--repeats`` interleaved runs
after one warm-up run of each case.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from emoe.core.routing_trace import read_routing_trace
from emoe.engine.checkpoint import load_model
from emoe.engine.offload.memory import MemoryReport
from emoe.engine.offload.session import OffloadSession, RunStats, SessionConfig, SessionRequest
from emoe.engine.reference.data import generate_examples
from emoe.engine.tokenizer import Tokenizer

ROOT = Path(__file__).resolve().parents[1]
CASES = (("all", "100%", None), ("emoe", "50%", "reroute"), ("lru", "50%", "fetch"))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", default=str(ROOT / "emoe/engine/reference/emoe-tiny"))
    p.add_argument("--calibration", default=str(ROOT / "traces/routing-emoe-tiny.parquet"))
    p.add_argument("--prompts", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (default 1: on a shared 2-core box a second OpenMP thread "
                        "waits on whatever else runs, and timings swing 10x)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    tokenizer = Tokenizer.from_folder(args.checkpoint)
    examples = generate_examples(args.prompts, seed=1)
    calibration = read_routing_trace(args.calibration) if Path(args.calibration).exists() else None
    requests = [SessionRequest(str(i), ex.task, tokenizer.encode(ex.prompt), args.max_new_tokens,
                               ignore_eos=True) for i, ex in enumerate(examples)]
    print(f"{args.checkpoint}: {len(requests)} prompts, {args.max_new_tokens} new tokens max, "
          f"device {args.device}, {torch.get_num_threads()} torch threads")
    memory: dict[str, MemoryReport] = {}

    def once(planner: str, budget: str, miss: str | None) -> RunStats:
        session = OffloadSession(load_model(args.checkpoint), SessionConfig(
            planner=planner, budget=budget, miss=miss, prediction_interval=40,
            device=args.device), calibration=calibration)
        stats = session.run(requests)
        memory[planner] = session.memory()
        return stats

    for case in CASES:  # warm-up: the first run of each batch shape pays for kernel setup
        once(*case)
    runs: dict[str, list[RunStats]] = {planner: [] for planner, _, _ in CASES}
    for _ in range(args.repeats):  # interleaved, so load from other jobs hits every case alike
        for case in CASES:
            runs[case[0]].append(once(*case))
    base = statistics.median(s.decode_tokens_per_s for s in runs["all"])
    for planner, budget, miss in CASES:
        rate = statistics.median(s.decode_tokens_per_s for s in runs[planner])
        last = runs[planner][-1]
        print(f"{planner:>6} @ {budget:>4} ({miss or 'none'}): {rate:8.1f} decode tok/s "
              f"(median of {args.repeats}; {rate / base:.2f}x all), {last.decode_tokens} decode "
              f"tokens in {last.decode_steps} steps, hit rate {last.hit_rate:.3f}, "
              f"{last.fetches} fetches, {last.bytes_loaded / 1e6:.1f} MB loaded, load wait "
              f"{last.load_wait_s:.3f} s")
        m = memory[planner]
        print(f"{'':>8}memory ({m.source}): experts {m.expert_bytes / 1e6:.2f} MB (budget "
              f"{m.expert_budget_bytes / 1e6:.2f} MB), KV {m.kv_bytes / 1e6:.2f} MB, rest "
              f"{m.other_bytes / 1e6:.2f} MB, host expert store {m.host_expert_bytes / 1e6:.2f} MB")


if __name__ == "__main__":
    t0 = time.perf_counter()
    main()
    print(f"total {time.perf_counter() - t0:.1f} s")
