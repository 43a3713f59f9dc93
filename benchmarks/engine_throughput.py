"""Decode and prefill throughput of the emoe engine vs transformers' generate() on one checkpoint.

    .venv/bin/python benchmarks/engine_throughput.py [--checkpoint DIR | --random] [--threads 2]

Without --checkpoint it uses the reference model in emoe/engine/reference/emoe-tiny when that
exists (--random skips it), else a random Mixtral-layout model (6 layers, hidden 256, 8 experts
of 512, top-2, vocab 4096) saved to a temp folder. Both sides run float32 on CPU, greedy, the
same prompts and number of new tokens; transformers with its KV cache and default (sdpa)
attention. Each number is the median of --repeats timed runs (interleaved emoe/transformers)
after a warm-up of each. The prefill prompt is cut to the model's context when that is shorter.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from emoe.engine.checkpoint import load_model, save_hf
from emoe.engine.config import MoEConfig
from emoe.engine.engine import Engine
from emoe.engine.model import MoEModel
from emoe.engine.reference import REFERENCE_MODEL_DIR as REFERENCE
from emoe.engine.sampling import SamplingParams

RANDOM = MoEConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=6, num_heads=4,
                   num_kv_heads=2, num_experts=8, top_k=2, max_position_embeddings=2048)


def _median_times(ours, theirs, repeats: int) -> tuple[float, float]:
    """Median seconds of each, runs interleaved so that load from other jobs hits both alike."""
    ours(), theirs()
    a, b = [], []
    for _ in range(repeats):
        for fn, times in ((ours, a), (theirs, b)):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--random", action="store_true", help="use the random model even if the reference exists")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--prefill-len", type=int, default=512)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    warnings.simplefilter("ignore")
    from transformers import AutoModelForCausalLM

    folder = args.checkpoint
    if folder is None and not args.random and (REFERENCE / "config.json").is_file():
        folder = REFERENCE
    if folder is None:
        folder = Path(tempfile.mkdtemp()) / "random-moe"
        save_hf(MoEModel(RANDOM).init_weights(generator=torch.Generator().manual_seed(0)), folder)
        what = "random model " + str(RANDOM)
    else:
        what = f"checkpoint {folder}"
    model = load_model(folder, dtype="float32")
    cfg = model.config
    hf = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    print(f"{what}\n{cfg.num_params() / 1e6:.1f}M parameters, torch {torch.__version__}, "
          f"{args.threads} threads, hf attention {hf.config._attn_implementation}")

    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in (1, 8):
        prompts = torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), generator=g)
        sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        engine = Engine(model, max_batch_size=batch, max_seq_len=args.prompt_len + args.new_tokens)
        with torch.inference_mode():
            ours, theirs = _median_times(
                lambda: engine.generate(prompts.tolist(), sampling),
                lambda: hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                                    max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                    do_sample=False, use_cache=True, pad_token_id=0), args.repeats)
        tokens = batch * args.new_tokens
        rows.append((f"decode batch {batch} ({args.prompt_len}-token prompts, {args.new_tokens} new)",
                     tokens / ours, tokens / theirs))

    prefill_len = min(args.prefill_len, cfg.max_position_embeddings - 1)
    prompt = torch.randint(3, cfg.vocab_size, (1, prefill_len), generator=g)
    engine = Engine(model, max_batch_size=1, max_seq_len=prefill_len + 1, prefill_chunk=prefill_len)
    with torch.inference_mode():
        ours, theirs = _median_times(
            lambda: engine.generate(prompt.tolist(), SamplingParams(max_new_tokens=1, ignore_eos=True)),
            lambda: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1,
                                do_sample=False, use_cache=True, pad_token_id=0), args.repeats)
    rows.append((f"prefill {prefill_len}-token prompt (+1 token)", prefill_len / ours, prefill_len / theirs))

    print(f"{'':52s} {'emoe tok/s':>11s} {'hf tok/s':>10s} {'speedup':>8s}")
    for name, a, b in rows:
        print(f"{name:52s} {a:11.1f} {b:10.1f} {a / b:7.2f}x")


if __name__ == "__main__":
    main()
