"""``emoe profile``: measure the engine on this machine for the simulator's cost model.

Measured, with every expert resident (the compute the cost model charges per step):

- step time over a grid of prefill tokens, decode batch sizes and decode context lengths (the
  median of ``repeats`` runs each), written as raw samples that ``emoe.core.profile`` fits to
  its linear step-time model;
- expert copies host -> device through the engine's own copy stream, for buffers of 1/8 to 2
  experts: a least-squares line gives the per-copy latency (intercept) and the bandwidth (1 /
  slope). On CUDA the host side is pinned; on CPU a "device copy" is a host memcpy;
- bytes per expert, non-expert weights and KV per token, from the model as loaded.

The file (format: emoe.core.profile, docs/profile-format.md) records machine and date.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

from emoe.core.plan import PrefillChunk, StepPlan
from emoe.core.profile import EngineProfile, StepSample

if TYPE_CHECKING:  # torch is imported only when the command runs
    import torch

    from emoe.engine.engine import Engine
    from emoe.engine.model import MoEModel

PREFILL_TOKENS = (8, 32, 64, 128, 192)
DECODE_BATCH = (1, 2, 4, 8, 16)
DECODE_CONTEXT = (32, 128)
COPY_FRACTIONS = (0.125, 0.25, 0.5, 1.0, 2.0)


def machine_description(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host {platform.node()}"
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} torch "
            f"threads, host {platform.node()}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_steps(engine: Engine, prefill_tokens: Sequence[int], decode_batch: Sequence[int],
                  decode_context: Sequence[int], repeats: int, seed: int = 0) -> list[StepSample]:
    """Step times of prefill-only and decode-only steps over the grid."""
    import torch

    from emoe.engine.sampling import SamplingParams

    g = torch.Generator().manual_seed(seed)
    vocab, device = engine.config.vocab_size, engine.device
    ids = iter(range(1 << 30))
    limit = engine.max_seq_len
    samples = []

    def prompt(n: int) -> list[int]:
        return torch.randint(0, vocab, (n,), generator=g).tolist()

    sampling = SamplingParams(max_new_tokens=limit, ignore_eos=True)
    for n in (n for n in prefill_tokens if n < limit):
        def prefill(n=n) -> None:
            rid = f"p{next(ids)}"
            engine.add_request(rid, prompt(n), sampling)
            engine.execute(StepPlan(prefill=[PrefillChunk(rid, 0, n)]))
            engine.abort(rid)
        samples.append(StepSample(n, 0, 0, _timed(prefill, device, repeats)))
    for context in (c for c in decode_context if c + repeats + 2 < limit):
        for batch in (b for b in decode_batch if b <= engine.cache.num_slots):
            rids = [f"d{next(ids)}" for _ in range(batch)]
            for rid in rids:
                engine.add_request(rid, prompt(context), sampling)
            engine.execute(StepPlan(prefill=[PrefillChunk(r, 0, context) for r in rids]))
            decode = StepPlan(decode=rids)
            seconds = _timed(lambda: engine.execute(decode), device, repeats)
            samples.append(StepSample(0, batch, batch * (context + 1), seconds))
            for rid in rids:
                engine.abort(rid)
    return samples


def measure_copies(expert_bytes: int, device: torch.device, repeats: int,
                   fractions: Sequence[float] = COPY_FRACTIONS) -> tuple[float, float]:
    """(bandwidth bytes/s, per-copy latency s) of host -> device copies on the copy stream."""
    import torch

    from emoe.engine.offload.loader import copy_stream_for

    stream = copy_stream_for(device)
    sizes, times = [], []
    for fraction in fractions:
        n = max(1, int(expert_bytes * fraction))
        src = torch.empty(n, dtype=torch.uint8, pin_memory=device.type == "cuda").fill_(1)
        dst = torch.empty(n, dtype=torch.uint8, device=device)

        def copy() -> None:
            stream.copy(dst, src)
            stream.record().synchronize()

        sizes.append(n)
        times.append(_timed(copy, device, repeats))
    slope, intercept = np.polyfit(np.asarray(sizes, dtype=np.float64), np.asarray(times), 1)
    bandwidth = 1.0 / slope if slope > 0 else max(sizes) / max(times)
    return float(bandwidth), float(max(intercept, 0.0))


def profile_model(model: MoEModel, name: str, device: torch.device | str = "cpu",
                  repeats: int = 5, max_batch_size: int = 16,
                  prefill_tokens: Sequence[int] = PREFILL_TOKENS,
                  decode_batch: Sequence[int] = DECODE_BATCH,
                  decode_context: Sequence[int] = DECODE_CONTEXT) -> EngineProfile:
    import torch

    from emoe.engine.engine import Engine

    device = torch.device(device)
    model = model.to(device)
    cfg = model.config
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    spec = cfg.to_model_spec(name, dtype=dtype)
    engine = Engine(model, max_batch_size=max_batch_size)
    with torch.inference_mode():
        samples = measure_steps(engine, prefill_tokens, decode_batch, decode_context, repeats)
    bandwidth, latency = measure_copies(spec.expert_bytes, device, repeats)
    memory = {"expert_bytes": spec.expert_bytes, "non_expert_bytes": spec.non_expert_bytes,
              "kv_bytes_per_token": spec.kv_bytes_per_token}
    if device.type == "cuda":
        memory["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return EngineProfile(
        model=name, device=machine_description(device),
        provenance=(f"measured by `emoe profile` on {when}: {len(samples)} steps (median of "
                    f"{repeats}), all experts resident, {dtype}; copies of {COPY_FRACTIONS} x "
                    f"one expert ({spec.expert_bytes} B) on the engine's copy stream"
                    + ("" if device.type == "cuda" else " (CPU: host memcpy, no PCIe)")),
        pcie_bandwidth_bytes_per_s=bandwidth, pcie_latency_s=latency, memory=memory,
        samples=tuple(samples))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="model folder (config.json, *.safetensors)")
    p.add_argument("-o", "--output", required=True, help="profile file to write (JSON)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: as stored; half precision runs as float32 on CPU")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's choice)")


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from emoe.core.profile import write_profile
    from emoe.engine.checkpoint import load_model

    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(args.checkpoint, device="cpu", dtype=args.dtype)
    profile = profile_model(model, Path(args.checkpoint).name, args.device, args.repeats)
    write_profile(profile, args.output)
    coefficients = profile.coefficients()
    print(f"wrote {args.output}: {len(profile.samples)} step samples; "
          + ", ".join(f"{k} {v:.3g}" for k, v in coefficients.items())
          + f"; copy {profile.pcie_bandwidth_bytes_per_s / 1e9:.2f} GB/s, "
            f"latency {profile.pcie_latency_s * 1e6:.1f} us")
    return 0
