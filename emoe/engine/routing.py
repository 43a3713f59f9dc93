"""Recording routing traces from the engine: the router's top-k per request, token, phase, layer.

``RoutingRecorder.install(model)`` wraps every MoE layer's executor with a tap that keeps the
router's choice for each token row of the current forward (before any miss handling: what the
router wanted, not what an offloading executor did). After each engine step,
``end_step(plan, tasks)`` splits the rows by request (the engine's batch order: one row per
decode request, then each prefill chunk) and appends them to a ``RoutingTraceWriter``
(schema: ``emoe.core.routing_trace``, documented in docs/offloading.md).

Row fields: ``token_index`` is the position of the token in its sequence (prompt positions
0..n-1 in prefill; n, n+1, ... for the generated tokens fed back in decode); ``expert_ids`` are
the router's top-k, best first; ``gate_scores`` their router softmax probabilities over all
experts (before top-k renormalisation).
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from emoe.core.plan import StepPlan
from emoe.core.request import Request
from emoe.core.routing_trace import RoutingTraceWriter

if TYPE_CHECKING:  # torch is imported only when recording runs
    from torch import Tensor

    from emoe.engine.model import ExpertExecutor, MoEModel


class _Tap:
    """An executor wrapper that records the router's top-k and delegates the compute."""

    def __init__(self, inner: ExpertExecutor, recorder: "RoutingRecorder"):
        self.inner, self.recorder = inner, recorder

    def __call__(self, hidden: Tensor, router_logits: Tensor, layer: int) -> Tensor:
        self.recorder.observe(router_logits, layer)
        return self.inner(hidden, router_logits, layer)


class RoutingRecorder:
    """Collects the router's top-k of each engine step and writes them per request."""

    def __init__(self, writer: RoutingTraceWriter, top_k: int):
        self.writer, self.top_k = writer, top_k
        self._layers: dict[int, tuple[Tensor, Tensor]] = {}
        self._positions: dict[str, int] = {}  # decode position of each request's next token

    @classmethod
    def open(cls, path: str | Path, model: MoEModel, model_name: str) -> "RoutingRecorder":
        cfg = model.config
        writer = RoutingTraceWriter(path, num_layers=cfg.num_layers, num_experts=cfg.num_experts,
                                    top_k=cfg.top_k, model=model_name)
        recorder = cls(writer, cfg.top_k)
        recorder.install(model)
        return recorder

    def install(self, model: MoEModel) -> None:
        """Wrap every layer's current executor (install after any offloading executor)."""
        for layer in model.layers:
            layer.moe.executor = _Tap(layer.moe.executor, self)

    def observe(self, router_logits: Tensor, layer: int) -> None:
        probs = router_logits.float().softmax(dim=-1)  # [T, E]
        scores, ids = probs.topk(self.top_k, dim=-1)  # [T, K] x2
        self._layers[layer] = (ids, scores)

    def end_step(self, plan: StepPlan, tasks: Mapping[str, str],
                 prompt_lengths: Mapping[str, int]) -> None:
        """Write the step's rows. ``prompt_lengths`` gives each decoding request's prompt length
        (a decode row's position is prompt length + tokens decoded before it)."""
        if not self._layers:
            return
        import torch

        ids = torch.stack([self._layers[l][0] for l in sorted(self._layers)], dim=1)  # [T, L, K]
        scores = torch.stack([self._layers[l][1] for l in sorted(self._layers)], dim=1)  # [T, L, K]
        self._layers = {}
        ids_np, scores_np = ids.cpu().numpy(), scores.cpu().numpy()
        row = 0
        for rid in plan.decode:
            position = self._positions.get(rid, prompt_lengths[rid])
            self.writer.add(rid, tasks[rid], "decode", ids_np[row:row + 1],
                            scores_np[row:row + 1], start_token=position)
            self._positions[rid] = position + 1
            row += 1
        for chunk in plan.prefill:
            n = chunk.num_tokens
            self.writer.add(chunk.request_id, tasks[chunk.request_id], "prefill",
                            ids_np[row:row + n], scores_np[row:row + n], start_token=chunk.start)
            row += n
        if row != ids_np.shape[0]:
            raise RuntimeError(f"routing recorder: plan has {row} token rows, the forward ran "
                               f"{ids_np.shape[0]}")

    def close(self) -> None:
        self.writer.close()


# ---------------------------------------------------------------------- the command
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", help="model folder (config.json, *.safetensors, tokenizer.json)")
    p.add_argument("-o", "--output", required=True, help="routing trace to write (Parquet)")
    p.add_argument("--per-task", type=int, default=40, help="prompts per task (default 40)")
    p.add_argument("--seed", type=int, default=None,
                   help="prompt seed (default 2: neither training nor the eval prompts; with "
                        "--trace: 0, the default seed of emoe sim and replay)")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--max-batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu")
    w = p.add_argument_group(
        "a workload's routing (the task prompts `emoe replay --prompts tasks` sends; `emoe sim "
        "--routing-trace` then replays it request by request)")
    w.add_argument("--trace", type=Path, default=None,
                   help="record the requests of this trace (its task, prompt and output "
                        "lengths) instead of --per-task prompts")
    w.add_argument("--limit", type=int, default=None, help="the trace's first N requests")
    w.add_argument("--fit", choices=("reject", "skip", "scale"), default="reject",
                   help="requests longer than the model's context: left out (reject, skip) or "
                        "scaled down to fit, as emoe sim and replay do")


def record_workload(checkpoint: str | Path, requests: Iterable[Request], output: str | Path,
                    seed: int = 0, max_batch_size: int = 16, max_seq_len: int | None = None,
                    device: str = "cpu") -> int:
    """Record the routing of ``requests`` (already fitted to the context) on the engine, all
    experts resident, greedy: each request is sent as its ``TaskPrompts`` prompt of its input
    length and generates exactly its output length (EOS ignored), as ``emoe replay --prompts
    tasks`` sends it. Rows are keyed by the request's id. Returns the requests recorded."""
    from emoe.engine.checkpoint import load_model
    from emoe.engine.offload.session import OffloadSession, SessionConfig, SessionRequest
    from emoe.engine.reference.prompts import TaskPrompts

    prompts = TaskPrompts.for_checkpoint(checkpoint, seed)
    batch = [SessionRequest(r.id, r.task, prompts(r), r.output_tokens, ignore_eos=True)
             for r in requests if max_seq_len is None
             or r.input_tokens + r.output_tokens <= max_seq_len]  # the rest are refused
    model = load_model(checkpoint)
    session = OffloadSession(model, SessionConfig(max_batch_size=max_batch_size,
                                                  max_seq_len=max_seq_len, device=device),
                             model_name=Path(checkpoint).name)
    recorder = RoutingRecorder.open(output, model, Path(checkpoint).name)
    try:
        session.run(batch, recorder=recorder, arrivals_per_step=None)
    finally:
        recorder.close()
    return len(batch)


def run(args: argparse.Namespace) -> int:
    if args.trace is not None:
        return _record_trace(args)
    from emoe.engine.checkpoint import load_model
    from emoe.engine.offload.session import OffloadSession, SessionConfig, SessionRequest
    from emoe.engine.reference.data import TASKS, generate_examples
    from emoe.engine.tokenizer import Tokenizer

    tokenizer = Tokenizer.from_folder(args.checkpoint)
    model = load_model(args.checkpoint)
    session = OffloadSession(model, SessionConfig(max_batch_size=args.max_batch_size,
                                                  device=args.device),
                             model_name=Path(args.checkpoint).name)
    examples = generate_examples(args.per_task * len(TASKS),
                                 seed=2 if args.seed is None else args.seed)
    requests = [SessionRequest(f"{ex.task}-{i}", ex.task, tokenizer.encode(ex.prompt),
                               args.max_new_tokens) for i, ex in enumerate(examples)]
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    recorder = RoutingRecorder.open(args.output, model, Path(args.checkpoint).name)
    try:
        stats = session.run(requests, recorder=recorder)
    finally:
        recorder.close()
    tokens = sum(len(r.token_ids) for r in stats.requests.values())
    print(f"wrote {args.output}: {len(requests)} requests, {tokens} generated tokens, "
          f"{Path(args.output).stat().st_size} bytes")
    return 0


def _record_trace(args: argparse.Namespace) -> int:
    import itertools

    from emoe.core.model_config import read_model_config
    from emoe.core.workload import ContextFit, read_trace

    seed = 0 if args.seed is None else args.seed
    config, *_ = read_model_config(args.checkpoint)
    fit = ContextFit(config.max_position_embeddings, args.fit)
    requests = read_trace(args.trace, seed=seed)
    if args.limit is not None:
        requests = itertools.islice(requests, args.limit)
    recorded = record_workload(args.checkpoint, fit(requests), args.output, seed=seed,
                               max_batch_size=args.max_batch_size,
                               max_seq_len=config.max_position_embeddings, device=args.device)
    print(fit.describe())
    print(f"wrote {args.output}: the routing of {recorded} requests of {args.trace} (task "
          f"prompts, seed {seed}, greedy), {Path(args.output).stat().st_size} bytes")
    return 0
