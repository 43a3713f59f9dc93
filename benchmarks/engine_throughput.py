"""Decode and prefill throughput of the emoe engine vs transformers' generate() on one checkpoint.

    .venv/bin/python benchmarks/engine_throughput.py [--checkpoint DIR | --random] [--threads 2]

Without --checkpoint it uses the reference model in emoe/engine/reference/emoe-tiny when that
exists (--random skips it), else a random Mixtral-layout model (6 layers, hidden 256, 8 experts
of 512, top-2, vocab 4096) saved to a temp folder. Both sides run float32 on CPU, greedy, the
same prompts and number of new tokens; transformers with its KV cache and default (sdpa)
attention. Each number is the median of --repeats timed runs (interleaved emoe/transformers)
after a warm-up of each.

When the model's context is shorter than --prefill-len (the reference model has 256 positions),
the prefill run uses a copy of the checkpoint whose config allows --prefill-len positions, for
both engines: a throughput measurement only, the model was not trained on positions that far.
Set EMOE_CPU_KERNELS=0 to time emoe without its CPU kernels (emoe/engine/cpu_kernels.py).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
import warnings
from pathlib import Path

import torch

from emoe.engine import cpu_kernels
from emoe.engine.checkpoint import load_model, save_hf
from emoe.engine.config import MoEConfig
from emoe.engine.engine import Engine
from emoe.engine.model import MoEModel
from emoe.engine.reference import REFERENCE_MODEL_DIR as REFERENCE
from emoe.engine.sampling import SamplingParams

RANDOM = MoEConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_layers=6, num_heads=4,
                   num_kv_heads=2, num_experts=8, top_k=2, max_position_embeddings=2048)


def _median_times(ours, theirs, make_prompts, repeats: int) -> tuple[float, float]:
    """Median seconds of ``ours(prompts)`` and ``theirs(prompts)``, fresh prompts every run.

    Both engines get the same prompts in a run, and runs alternate between them so that load
    from other jobs hits both alike. Fresh prompts route differently each time, as in serving,
    so per-expert shapes vary; one warm-up run of each comes first.
    """
    warm = make_prompts()
    ours(warm), theirs(warm)
    a, b = [], []
    for _ in range(repeats):
        prompts = make_prompts()
        for fn, times in ((ours, a), (theirs, b)):
            start = time.perf_counter()
            fn(prompts)
            times.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def _with_context(folder: Path, positions: int) -> Path:
    """A temp copy of the checkpoint in ``folder`` whose config allows ``positions`` positions."""
    copy = Path(tempfile.mkdtemp()) / folder.name
    shutil.copytree(folder, copy)
    config = json.loads((copy / "config.json").read_text())
    config["max_position_embeddings"] = positions
    (copy / "config.json").write_text(json.dumps(config, indent=2))
    return copy


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", type=Path)
    p.add_argument("--random", action="store_true", help="use the random model even if the reference exists")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--repeats", type=int, default=9)
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
          f"{args.threads} threads, hf attention {hf.config._attn_implementation}, "
          f"emoe CPU kernels {'on' if cpu_kernels.ENABLED else 'off'}")

    g = torch.Generator().manual_seed(1)
    rows = []
    for batch in (1, 8):
        sampling = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        engine = Engine(model, max_batch_size=batch, max_seq_len=args.prompt_len + args.new_tokens)
        with torch.inference_mode():
            ours, theirs = _median_times(
                lambda prompts: engine.generate(prompts.tolist(), sampling),
                lambda prompts: hf.generate(prompts, attention_mask=torch.ones_like(prompts),
                                            max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                            do_sample=False, use_cache=True, pad_token_id=0),
                lambda: torch.randint(3, cfg.vocab_size, (batch, args.prompt_len), generator=g), args.repeats)
        tokens = batch * args.new_tokens
        rows.append((f"decode batch {batch} ({args.prompt_len}-token prompts, {args.new_tokens} new)",
                     tokens / ours, tokens / theirs))

    prefill_len = args.prefill_len
    if prefill_len >= cfg.max_position_embeddings:
        longer = _with_context(folder, prefill_len + 1)
        print(f"prefill: the model's context is {cfg.max_position_embeddings}; both engines load a copy "
              f"allowing {prefill_len + 1} positions (throughput only)")
        model = load_model(longer, dtype="float32")
        hf = AutoModelForCausalLM.from_pretrained(longer, dtype=torch.float32).eval()
    engine = Engine(model, max_batch_size=1, max_seq_len=prefill_len + 1, prefill_chunk=prefill_len)
    with torch.inference_mode():
        ours, theirs = _median_times(
            lambda prompt: engine.generate(prompt.tolist(), SamplingParams(max_new_tokens=1, ignore_eos=True)),
            lambda prompt: hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=1,
                                       do_sample=False, use_cache=True, pad_token_id=0),
            lambda: torch.randint(3, cfg.vocab_size, (1, prefill_len), generator=g), args.repeats)
    rows.append((f"prefill {prefill_len}-token prompt (+1 token)", prefill_len / ours, prefill_len / theirs))

    print(f"{'':52s} {'emoe tok/s':>11s} {'hf tok/s':>10s} {'speedup':>8s}")
    for name, a, b in rows:
        print(f"{name:52s} {a:11.1f} {b:10.1f} {a / b:7.2f}x")


if __name__ == "__main__":
    main()
