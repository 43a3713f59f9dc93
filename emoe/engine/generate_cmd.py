"""``emoe generate``: run prompts through the engine and print the continuations."""

from __future__ import annotations

import argparse
import json
import sys
import time

from emoe.engine.reference import REFERENCE_MODEL_DIR


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=str(REFERENCE_MODEL_DIR),
                   help="folder with config.json, *.safetensors (and tokenizer.json for text); "
                        "default: the reference model emoe-tiny")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", help="prompt text (repeatable; needs tokenizer.json)")
    src.add_argument("--prompt-ids", action="append", metavar="IDS",
                     help="comma-separated prompt token ids (repeatable)")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: as stored; half precision runs as float32 on CPU")
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--json", action="store_true", help="print one JSON object per prompt")


def run(args: argparse.Namespace) -> int:
    from emoe.core.errors import ConfigError
    from emoe.engine.engine import Engine
    from emoe.engine.sampling import SamplingParams
    from emoe.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(args.checkpoint) if args.prompt else None
    if args.prompt:
        prompts = [tokenizer.encode(text) for text in args.prompt]
    else:
        try:
            prompts = [[int(t) for t in ids.split(",") if t.strip()] for ids in args.prompt_ids]
        except ValueError:
            raise ConfigError("--prompt-ids: expected comma-separated integers") from None
    sampling = SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                              ignore_eos=args.ignore_eos)
    engine = Engine.from_pretrained(args.checkpoint, device=args.device, dtype=args.dtype,
                                    max_batch_size=args.max_batch_size)
    start = time.perf_counter()
    outputs = engine.generate(prompts, sampling)
    elapsed = time.perf_counter() - start
    for n, out in enumerate(outputs, 1):
        record = {"prompt_ids": out.prompt_ids, "token_ids": out.token_ids, "finish_reason": out.finish_reason}
        if out.error:
            record["error"] = out.error
            print(f"emoe generate: prompt {n} failed: {out.error}", file=sys.stderr)
        if tokenizer is not None:
            record["text"] = tokenizer.decode(out.token_ids)
        print(json.dumps(record) if args.json else record.get("text", " ".join(map(str, out.token_ids))))
    total = sum(len(o.token_ids) for o in outputs)
    print(f"{total} tokens in {elapsed:.2f}s ({total / elapsed:.1f} tokens/s)", file=sys.stderr)
    return 1 if any(o.error for o in outputs) else 0
