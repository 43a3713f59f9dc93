"""Iteration-level continuous batching over :class:`MoEModel`: the real backend of a StepPlan.

The engine holds requests (prompt ids + sampling) and a slot KV cache; ``execute(plan)`` runs
exactly what the plan says - the listed prefill chunks and one decode token for each listed
request, in one forward - and reports tokens, finishes and router statistics. It decides no
policy: :func:`fcfs_plan` is the trivial planner behind :meth:`Engine.generate`.
"""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from pathlib import Path
from collections.abc import Callable, Sequence
from typing import Protocol

import numpy as np
import torch

from emoe.core.errors import ConfigError, EmoeError
from emoe.core.plan import ExpertKey, PrefillChunk, RequestStepOutput, StepPlan, StepResult
from emoe.engine import cpu_kernels
from emoe.engine.kv_cache import SlotKVCache, StepBatch
from emoe.engine.model import MoEModel
from emoe.engine.sampling import SamplingError, SamplingParams, sample


class PlanError(EmoeError):
    """A plan the engine cannot execute: unknown request, chunk out of order, no free slot."""


class ExpertPlanHandler(Protocol):
    """Carries out a plan's expert loads/evictions (an offloading executor's cache).

    A handler may also have ``finish_step(plan, result)`` (``OffloadedExperts`` does): the
    engine calls it at the end of every step, so the step's per-request expert hits/misses,
    fetches/evictions on miss and load waits are in the ``StepResult`` it returns.
    """

    def apply(self, load: list[ExpertKey], evict: list[ExpertKey]) -> tuple[int, float]:
        """Evict then load; returns (bytes loaded, seconds waited for loads)."""
        ...


@dataclass
class EngineRequest:
    """One request inside the engine."""

    request_id: str
    prompt: list[int]
    sampling: SamplingParams
    generator: torch.Generator | None
    stop_ids: frozenset[int]
    slot: int | None = None
    prefilled: int = 0
    output: list[int] = field(default_factory=list)
    routing: torch.Tensor | None = None  # [L, E] router top-k counts over the prompt
    decode_routing: torch.Tensor | None = None  # [L, E] the same over the decoded tokens

    @property
    def prefill_done(self) -> bool:
        return self.prefilled == len(self.prompt)

    @property
    def num_tokens(self) -> int:
        return len(self.prompt) + len(self.output)


@dataclass
class Generation:
    request_id: str
    prompt_ids: list[int]
    token_ids: list[int]
    finish_reason: str
    error: str = ""  # why the request failed, when finish_reason is "error"


class Engine:
    """Continuous batching with a slot KV cache of ``max_batch_size`` x ``max_seq_len`` tokens."""

    def __init__(self, model: MoEModel, max_batch_size: int = 16, max_seq_len: int | None = None,
                 prefill_chunk: int = 512, expert_handler: ExpertPlanHandler | None = None,
                 clock: Callable[[], float] = time.monotonic):
        cfg = model.config
        param = model.embed_tokens.weight
        self.model, self.config = model.eval(), cfg
        self.device, self.dtype = param.device, param.dtype
        max_seq_len = max_seq_len or cfg.max_position_embeddings
        if not 1 <= max_seq_len <= cfg.max_position_embeddings:
            raise ConfigError(f"max_seq_len: {max_seq_len} must be in [1, max_position_embeddings "
                              f"{cfg.max_position_embeddings}]")
        if max_batch_size < 1:
            raise ConfigError(f"max_batch_size: must be >= 1, got {max_batch_size}")
        if prefill_chunk < 1:
            raise ConfigError(f"prefill_chunk: must be >= 1, got {prefill_chunk}")
        self.max_seq_len, self.prefill_chunk = max_seq_len, prefill_chunk
        if self.device.type == "cpu":
            cpu_kernels.keep_freed_host_memory()
        self.cache = SlotKVCache(cfg, max_batch_size, max_seq_len, self.dtype, self.device)
        self.expert_handler, self.clock = expert_handler, clock
        self.seqs: dict[str, EngineRequest] = {}
        self._generate_ids = itertools.count()

    @classmethod
    def from_pretrained(cls, folder: str | Path, device: str = "cpu", dtype: str | None = None,
                        **kwargs) -> "Engine":
        from emoe.engine.checkpoint import load_model
        return cls(load_model(folder, device=device, dtype=dtype), **kwargs)

    # ---- requests --------------------------------------------------------------------------

    def add_request(self, request_id: str, prompt_ids: Sequence[int], sampling: SamplingParams) -> None:
        if request_id in self.seqs:
            raise ConfigError(f"request_id: {request_id!r} is already in the engine")
        prompt = [int(t) for t in prompt_ids]
        vocab = self.config.vocab_size
        if not prompt:
            raise ConfigError(f"request {request_id!r}: prompt_ids is empty")
        if len(prompt) > self.max_seq_len:
            raise ConfigError(f"request {request_id!r}: prompt_ids has {len(prompt)} tokens, longer "
                              f"than the context of {self.max_seq_len}")
        if min(prompt) < 0 or max(prompt) >= vocab:
            raise ConfigError(f"request {request_id!r}: prompt_ids holds ids outside [0, {vocab})")
        if any(t >= vocab for t in sampling.stop_token_ids):
            raise ConfigError(f"request {request_id!r}: sampling.stop_token_ids outside [0, {vocab})")
        stop = set(sampling.stop_token_ids)
        if not sampling.ignore_eos:
            stop.update(self.config.eos_token_ids)
        self.seqs[request_id] = EngineRequest(request_id, prompt, sampling, sampling.generator(self.device),
                                          frozenset(stop))

    def abort(self, request_id: str) -> None:
        seq = self.seqs.pop(request_id, None)
        if seq is not None and seq.slot is not None:
            # positions written: the prefilled prompt, then one per decoded token (a bound)
            self.cache.release(seq.slot, written=seq.prefilled + len(seq.output))

    def reset(self) -> None:
        """Drops every request, e.g. after a step that raised part-way; raises EmoeError if a
        KV slot is still held afterwards."""
        for request_id in list(self.seqs):
            self.abort(request_id)
        if self.cache.num_free != self.cache.num_slots:
            raise EmoeError(f"KV cache: {self.cache.num_slots - self.cache.num_free} slots still "
                            "held with no request in the engine")

    @property
    def num_requests(self) -> int:
        return len(self.seqs)

    # ---- one step --------------------------------------------------------------------------

    def execute(self, plan: StepPlan) -> StepResult:
        started = self.clock()
        for request_id, _ in (*plan.rejected, *plan.aborted):
            self.abort(request_id)
        bytes_loaded, load_wait = 0, 0.0
        if (plan.load or plan.evict) and self.expert_handler is not None:
            bytes_loaded, load_wait = self.expert_handler.apply(list(plan.load), list(plan.evict))
        decode = [self._decodable(rid) for rid in plan.decode]
        chunks = [self._check_chunk(c) for c in plan.prefill]
        if len({s.request_id for s in decode} | {s.request_id for s, _ in chunks}) != len(decode) + len(chunks):
            raise PlanError("a request appears twice in the plan (decode and/or prefill)")
        result = StepResult(started_at=started, finished_at=started, bytes_loaded=bytes_loaded,
                            load_wait_s=load_wait)
        if not decode and not chunks:
            self._finish_experts(plan, result)
            result.finished_at = self.clock()
            return result
        for seq, chunk in chunks:
            if seq.slot is None:
                seq.slot = self.cache.allocate()

        t0 = time.perf_counter()
        with torch.inference_mode():
            outputs, routing, decode_routing = self._run(decode, chunks)
        result.compute_s = time.perf_counter() - t0
        result.outputs, result.routing = outputs, routing
        result.decode_routing = decode_routing
        self._finish_experts(plan, result)
        result.finished_at = self.clock()
        return result

    def _finish_experts(self, plan: StepPlan, result: StepResult) -> None:
        """Expert hits of the step's requests: the handler's own accounting, or with every
        expert resident, each token's top-k choices in every layer."""
        finish = getattr(self.expert_handler, "finish_step", None)
        if finish is not None:
            finish(plan, result)
            return
        per_token = self.config.top_k * self.config.num_layers
        tokens = {rid: 1 for rid in plan.decode} | {c.request_id: c.num_tokens for c in plan.prefill}
        for out in result.outputs:
            hits = tokens.get(out.request_id, 0) * per_token
            out.expert_hits += hits
            out.weighted_hits += hits
            out.weighted_choices += hits

    def _decodable(self, request_id: str) -> EngineRequest:
        seq = self.seqs.get(request_id)
        if seq is None:
            raise PlanError(f"decode: unknown request {request_id!r}")
        if not seq.prefill_done:
            raise PlanError(f"decode: request {request_id!r} has prefilled {seq.prefilled} of "
                            f"{len(seq.prompt)} prompt tokens")
        return seq

    def _check_chunk(self, chunk: PrefillChunk) -> tuple[EngineRequest, PrefillChunk]:
        seq = self.seqs.get(chunk.request_id)
        if seq is None:
            raise PlanError(f"prefill: unknown request {chunk.request_id!r}")
        if chunk.start != seq.prefilled or chunk.num_tokens < 1 \
                or chunk.start + chunk.num_tokens > len(seq.prompt):
            raise PlanError(f"prefill: request {chunk.request_id!r} chunk [{chunk.start}, "
                            f"{chunk.start + chunk.num_tokens}) does not continue its prefill at "
                            f"{seq.prefilled} within its {len(seq.prompt)} prompt tokens")
        if seq.slot is None and self.cache.num_free == 0:
            raise PlanError(f"prefill: no free KV slot for request {chunk.request_id!r} "
                            f"({self.cache.num_slots} requests already hold one)")
        return seq, chunk

    def _run(self, decode: list[EngineRequest], chunks: list[tuple[EngineRequest, PrefillChunk]]
             ) -> tuple[list[RequestStepOutput], dict[str, np.ndarray], dict[str, np.ndarray]]:
        ids = [s.output[-1] for s in decode]
        dec = [(s.slot, s.num_tokens - 1) for s in decode]
        pre, rows, sampled = [], list(range(len(decode))), list(decode)
        for seq, c in chunks:
            ids.extend(seq.prompt[c.start:c.start + c.num_tokens])
            pre.append((seq.slot, c.start, c.num_tokens))
            if c.start + c.num_tokens == len(seq.prompt):
                rows.append(len(ids) - 1)
                sampled.append(seq)
        batch = StepBatch(self.cache, dec, pre, self.device)
        input_ids = torch.tensor(ids, dtype=torch.long, device=self.device)  # [N]
        logit_rows = None if len(rows) == len(ids) else torch.tensor(rows, dtype=torch.long, device=self.device)
        logits, router_logits = self.model.forward_step(
            input_ids, batch.positions, batch, logit_rows, return_router_logits=True)  # [M, V]
        tokens = sample(logits, [s.sampling for s in sampled], [s.generator for s in sampled])

        routing: dict[str, np.ndarray] = {}
        if decode:
            chosen = torch.stack([rl[:batch.num_decode] for rl in router_logits]).topk(
                self.config.top_k, dim=-1).indices  # [L, Nd, K]
            counts = torch.zeros(len(decode), self.config.num_layers, self.config.num_experts,
                                 dtype=torch.long, device=self.device).scatter_add_(
                2, chosen.permute(1, 0, 2), torch.ones_like(chosen).permute(1, 0, 2))  # [Nd, L, E]
            for seq, row in zip(decode, counts):
                seq.decode_routing = row if seq.decode_routing is None else seq.decode_routing + row
        if chunks:
            top_k = self.config.top_k
            prompt_ids = torch.stack([rl[batch.num_decode:] for rl in router_logits]).topk(
                top_k, dim=-1).indices  # [L, Np, K]
            for seq, segment in zip((s for s, _ in chunks), batch.segments):
                lo = segment.offset - batch.num_decode
                chosen = prompt_ids[:, lo:lo + segment.num_tokens].reshape(self.config.num_layers, -1)
                counts = torch.zeros(self.config.num_layers, self.config.num_experts, dtype=torch.long,
                                     device=self.device).scatter_add_(1, chosen, torch.ones_like(chosen))
                seq.routing = counts if seq.routing is None else seq.routing + counts
                seq.prefilled = segment.start + segment.num_tokens

        outputs, decode_routing = {}, {}
        for seq, token in zip(sampled, tokens):
            try:
                out = self._advance(seq, token)
            except Exception as exc:  # noqa: BLE001 - a request's own failure ends it alone
                out = RequestStepOutput(seq.request_id, finished=True, finish_reason="error",
                                        error=str(exc) if isinstance(exc, SamplingError)
                                        else f"{type(exc).__name__}: {exc}")
            if out.finished:
                self.abort(seq.request_id)
                if seq.decode_routing is not None:
                    decode_routing[seq.request_id] = seq.decode_routing.cpu().numpy()
            outputs[seq.request_id] = out
            if out.error:
                continue
            if seq.routing is not None and seq.prefill_done and len(seq.output) == 1:
                routing[seq.request_id] = seq.routing.cpu().numpy()
        for seq, _ in chunks:
            outputs.setdefault(seq.request_id, RequestStepOutput(seq.request_id))
        return list(outputs.values()), routing, decode_routing

    def _advance(self, seq: EngineRequest, token: int | SamplingError) -> RequestStepOutput:
        """Appends a sampled token and decides whether the request stops."""
        if isinstance(token, SamplingError):
            raise token
        seq.output.append(token)
        out = RequestStepOutput(seq.request_id, new_tokens=1, token_ids=[token])
        if token in seq.stop_ids:
            out.finished, out.finish_reason = True, "stop"
        elif len(seq.output) >= seq.sampling.max_new_tokens or seq.num_tokens > self.max_seq_len:
            out.finished, out.finish_reason = True, "length"
        return out

    # ---- convenience -----------------------------------------------------------------------

    def warm_up(self) -> None:
        """Runs one request through every path a step takes: a prefill long enough for the CPU
        prefill kernels (up to 128 tokens), then decode. Kernel compilation or cache loading
        and oneDNN's first-call costs are paid here instead of by the first long prompt
        (1.5 s on a fresh install for the reference model). Leaves no request behind."""
        length = min(self.max_seq_len - 2, 2 * cpu_kernels.FUSED_MAX_TOKENS)
        prompt = [i % self.config.vocab_size for i in range(max(1, length))]
        self.generate([prompt], SamplingParams(max_new_tokens=2, ignore_eos=True))

    def generate(self, prompts: Sequence[Sequence[int]],
                 sampling: SamplingParams | Sequence[SamplingParams] = SamplingParams()) -> list[Generation]:
        """Run ``prompts`` to completion with first-come-first-served continuous batching."""
        params = [sampling] * len(prompts) if isinstance(sampling, SamplingParams) else list(sampling)
        if len(params) != len(prompts):
            raise ConfigError(f"sampling: {len(params)} parameter sets for {len(prompts)} prompts")
        order = [f"generate-{next(self._generate_ids)}" for _ in prompts]
        for rid, prompt, p in zip(order, prompts, params):
            self.add_request(rid, prompt, p)
        results = {rid: Generation(rid, list(prompt), [], "") for rid, prompt in zip(order, prompts)}
        pending = set(order)
        while pending:
            step = self.execute(fcfs_plan(self, order, self.prefill_chunk))
            for out in step.outputs:
                gen = results[out.request_id]
                gen.token_ids.extend(out.token_ids)
                if out.finished:
                    gen.finish_reason, gen.error = out.finish_reason, out.error
                    pending.discard(out.request_id)
        return [results[rid] for rid in order]


def fcfs_plan(engine: Engine, order: Sequence[str], token_budget: int) -> StepPlan:
    """Decode every prefilled request; prefill the rest in ``order`` within ``token_budget``."""
    plan = StepPlan()
    free = engine.cache.num_free
    budget = token_budget
    for rid in order:
        seq = engine.seqs.get(rid)
        if seq is None:
            continue
        if seq.prefill_done:
            plan.decode.append(rid)
        elif budget > 0 and (seq.slot is not None or free > 0):
            n = min(budget, len(seq.prompt) - seq.prefilled)
            plan.prefill.append(PrefillChunk(rid, seq.prefilled, n))
            budget -= n
            free -= seq.slot is None
    return plan
