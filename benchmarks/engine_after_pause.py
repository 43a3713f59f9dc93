"""Does a prefill right after the engine sat idle run slower than one in a busy stream?

    .venv/bin/python benchmarks/engine_after_pause.py [--rounds 30] [--tokens 64,255]
        [--pauses 0,0.1,0.5] [--threads 1]

docs/fidelity.md limit 12: as served, the time from admission to the first token of a prompt
admitted to an idle loop is longer than simulated, more so for longer prompts, while the
window's prefill speed is measured over every prompt step of the window, most of them in a
busy stream. This times one prompt step of the reference model in each of three situations,
interleaved round by round: right after two steps of the same size (pause 0), and after the
engine sat idle for each pause. It prints the median per prompt size and pause, and the
difference from pause 0. A standalone engine, no serving loop: what the pause alone costs the
engine's compute.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--tokens", default="64,255", help="prompt sizes, comma-separated")
    parser.add_argument("--pauses", default="0,0.1,0.5", help="seconds idle, comma-separated")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    tokens = [int(t) for t in args.tokens.split(",")]
    pauses = [float(p) for p in args.pauses.split(",")]

    import torch

    from emoe.engine.checkpoint import load_model
    from emoe.engine.engine import Engine
    from emoe.engine.profile import _Steps, _time_prefill
    from emoe.rpc.local import REFERENCE_CHECKPOINT

    torch.set_num_threads(args.threads)
    engine = Engine(load_model(REFERENCE_CHECKPOINT, device="cpu"), max_batch_size=16,
                    max_seq_len=256)
    steps = _Steps(engine, repeats=1)  # the profile's own timed prompt steps, fresh prompts

    def prefill(n: int) -> float:
        return _time_prefill(steps, n)

    times: dict[tuple[int, float], list[float]] = {}
    with torch.inference_mode():
        engine.warm_up()
        for _ in range(args.rounds):
            for n in tokens:
                for pause in pauses:
                    if pause > 0:
                        time.sleep(pause)
                    else:
                        prefill(n)
                        prefill(n)
                    times.setdefault((n, pause), []).append(prefill(n))
    print(f"one prompt step of {REFERENCE_CHECKPOINT.name}, {args.threads} thread(s), median of "
          f"{args.rounds} rounds")
    for n in tokens:
        busy = statistics.median(times[(n, pauses[0])])
        for pause in pauses:
            median = statistics.median(times[(n, pause)])
            print(f"{n:4d} tokens after {pause:4.2f} s idle: {median * 1e3:6.2f} ms "
                  f"({(median - busy) * 1e3:+.2f} ms, {median / busy - 1:+.0%})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
