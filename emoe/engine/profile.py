"""``emoe profile``: measure the engine on this machine, as served, for the simulator.

By default it profiles the reference model with the thread count ``emoe serve`` uses (torch's
default unless ``--threads``) and the server's KV slots (``--max-batch-size``). Measured:

- **engine steps** with every expert resident (the median of ``repeats`` runs each, fresh
  random prompts each run): steps of one prompt of N tokens over a grid of N (the
  ``step_table``: the kernels' crossovers make a straight line miss by 30-50% here), decode
  steps over batch sizes and contexts (fitted as a cost per context token and, for
  decode-only steps, a base per batch size; for mixed steps a cost per decode request),
  prefill steps of several prompts and of chunks continuing a prompt (fitted as a
  cost per attended query-key pair, per extra prompt and per token past the table), and mixed
  steps (prefill + decodes) to check the model; all raw steps go to ``samples``, whose linear
  fit (of all but the multi-prompt steps) gives the scheduler its cost coefficients;
- **the serving path** in a live serving session of the same model, threads and slots, driven
  from a client process (``emoe.rpc.serving_profile``): what it adds per step, per streamed
  token and per request, and how much slower the engine steps when served (``--no-serving``
  skips it);
- **the expert handler's overhead** (``offload``): what an engine serving a planner other
  than ``all`` spends in its expert handler with nothing fetched, from interleaved rounds of
  the same steps on the plain engine and on engines whose handler (miss policy reroute) keeps
  5/8 and all of the experts resident, fitted per step, per decode request and per prompt token;
- **expert copies** host -> device through the engine's own copy stream, for buffers of 1/8 to
  2 experts: a least-squares line gives the bandwidth (1 / slope); on CUDA the host side is
  pinned, on CPU a "device copy" is a host memcpy. The per-copy latency is what an expert
  fetched on a miss costs the engine beyond its bytes / bandwidth and the handler's overhead
  (the cache's bookkeeping and wait included), from decode steps of an engine whose cache
  holds 5/8 of the experts;
- **the expert predictor**: one ``predict`` + top-L per task in play, as the planner runs it;
- bytes per expert, non-expert weights and KV per token, from the model as loaded.

The file (format: emoe.core.profile, docs/profile-format.md) records the machine, the date, the
load average and how each number was obtained.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from emoe.core.plan import PrefillChunk, StepPlan
from emoe.core.profile import (EngineProfile, EngineSetup, HandlerOverhead, StepSample,
                               StepTimes, attended_pairs, fit_prompt_costs)
from emoe.core.profile import decode_context as padded_context  # beside the grid of that name

if TYPE_CHECKING:  # torch is imported only when the command runs
    import torch

    from emoe.engine.engine import Engine
    from emoe.engine.model import MoEModel

PREFILL_TOKENS = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512)
DECODE_BATCH = (1, 2, 4, 8, 12, 16)
DECODE_CONTEXT = (16, 64, 160)
MIXED = ((64, 8, 64), (128, 4, 96), (32, 16, 32), (200, 2, 40))  # prefill, decodes, context
# decode-only steps whose requests hold unequal contexts, as served: to check the model
# of a batch padded to its longest context
UNEQUAL_DECODES = ((16, 160), (16, 48, 96, 160), (24, 32, 40, 200),
                   (16, 40, 64, 88, 112, 136, 160, 184), (16, 16, 16, 16, 16, 16, 16, 200))
# what a timed decode of a prompt of c tokens attends at the median: c + its first token, + the
# warm-up's and + the median run's of three (``_timed``)
ATTENDED_BEYOND_PROMPT = 3
# prefill-only steps of k prompts of n tokens, and of one chunk continuing a prompt: their
# chunks as (start, tokens)
MULTI_PROMPT = (*(((0, n),) * k for k, n in ((2, 32), (2, 128), (2, 250), (3, 64), (3, 250),
                                              (4, 64), (4, 160), (8, 32), (8, 64))),
                ((128, 127),), ((192, 63),))
COPY_FRACTIONS = (0.125, 0.25, 0.5, 1.0, 2.0)
HANDLER_DECODES = ((1, 32), (4, 32), (16, 32), (8, 96))  # decode requests, context
HANDLER_PREFILLS = (32, 128, 255)


def machine_description(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda}), host {platform.node()}"
    return (f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores), "
            f"{torch.get_num_threads()} torch threads, host {platform.node()}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        import torch

        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, repeats: int,
           setup: Callable[[], object] = lambda: None) -> float:
    """The median of ``repeats`` runs of ``fn`` (after one warm-up), each after an untimed
    ``setup``."""
    setup()
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        setup()
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


class _Steps:
    """Runs timed engine steps on fresh random prompts."""

    def __init__(self, engine: Engine, repeats: int, seed: int = 0):
        import torch

        from emoe.engine.sampling import SamplingParams

        self.engine, self.repeats = engine, repeats
        self._g = torch.Generator().manual_seed(seed)
        self._ids = iter(range(1 << 30))
        self._sampling = SamplingParams(max_new_tokens=engine.max_seq_len, ignore_eos=True)

    def add(self, n: int) -> str:
        import torch

        rid = f"profile-{next(self._ids)}"
        prompt = torch.randint(3, self.engine.config.vocab_size, (n,), generator=self._g).tolist()
        self.engine.add_request(rid, prompt, self._sampling)
        return rid

    def prefilled(self, contexts: Sequence[int]) -> list[str]:
        """Requests whose prompts of ``contexts`` tokens an untimed step ran."""
        rids = [self.add(n) for n in contexts]
        self.engine.execute(StepPlan(prefill=[PrefillChunk(r, 0, n)
                                              for r, n in zip(rids, contexts)]))
        return rids

    def release(self, rids: Sequence[str]) -> None:
        for rid in rids:
            self.engine.abort(rid)

    def prefill(self, n: int) -> float:
        """A step of one n-token prompt."""
        def run() -> None:
            rid = self.add(n)
            self.engine.execute(StepPlan(prefill=[PrefillChunk(rid, 0, n)]))
            self.engine.abort(rid)
        return _timed(run, self.engine.device, self.repeats)

    def prompts(self, chunks: Sequence[tuple[int, int]]) -> float:
        """A step of prefill chunks, (start, tokens) each: a chunk from start > 0 continues a
        prompt whose first ``start`` tokens an untimed step ran."""
        plan = StepPlan()

        def setup() -> None:
            nonlocal plan
            rids = [self.add(start + n) for start, n in chunks]
            begun = [PrefillChunk(r, 0, start) for r, (start, _) in zip(rids, chunks) if start]
            if begun:
                self.engine.execute(StepPlan(prefill=begun))
            plan = StepPlan(prefill=[PrefillChunk(r, start, n)
                                     for r, (start, n) in zip(rids, chunks)])

        def run() -> None:
            self.engine.execute(plan)
            self.release([c.request_id for c in plan.prefill])
        return _timed(run, self.engine.device, self.repeats, setup)

    def step(self, prefill: int, contexts: Sequence[int]) -> float:
        """A step of decodes at ``contexts`` tokens each (+ one ``prefill``-token prompt when
        > 0)."""
        rids = self.prefilled(contexts)

        def run() -> None:
            new = [self.add(prefill)] if prefill else []
            self.engine.execute(StepPlan(prefill=[PrefillChunk(r, 0, prefill) for r in new],
                                         decode=rids))
            self.release(new)
        seconds = _timed(run, self.engine.device, self.repeats)
        self.release(rids)
        return seconds


def measure_engine(engine: Engine, repeats: int, prefill_tokens: Sequence[int] = PREFILL_TOKENS,
                   decode_batch: Sequence[int] = DECODE_BATCH,
                   decode_context: Sequence[int] = DECODE_CONTEXT,
                   mixed: Sequence[tuple[int, int, int]] = MIXED,
                   multi_prompt: Sequence[Sequence[tuple[int, int]]] = MULTI_PROMPT,
                   unequal_decodes: Sequence[Sequence[int]] = UNEQUAL_DECODES
                   ) -> tuple[StepTimes, list[StepSample], str]:
    """The step model, the raw samples, and a line on how well the model predicts
    multi-prompt, mixed and unequal-context decode steps.

    Every grid point is measured once per round (the median of three runs) and ``repeats``
    rounds run one after another, each over the whole grid: on a shared machine a burst of
    load then spreads over all points instead of skewing a few; each point's time is the
    median of its rounds.
    """
    steps = _Steps(engine, 3)
    limit, slots = engine.max_seq_len, engine.cache.num_slots
    prefills = [n for n in prefill_tokens if n < limit]
    if prefills and prefills[-1] < limit - 1:  # up to the longest prompt the engine takes
        prefills.append(limit - 1)
    decodes = [(b, c) for c in decode_context if c + 8 < limit
               for b in decode_batch if b <= slots]
    mixes = [(p, b, c) for p, b, c in mixed if b <= slots - 1 and p < limit and c + 8 < limit]
    multis = [tuple(chunks) for chunks in multi_prompt
              if len(chunks) <= slots and all(start + n < limit for start, n in chunks)]
    unequal = [tuple(contexts) for contexts in unequal_decodes
               if len(contexts) <= slots and max(contexts) + 8 < limit]
    rounds: dict[tuple, list[float]] = {}
    for _ in range(repeats):
        for n in prefills:
            rounds.setdefault(("p", n), []).append(steps.prefill(n))
        for batch, context in decodes:
            rounds.setdefault(("d", batch, context), []).append(steps.step(0, [context] * batch))
        for prefill, batch, context in mixes:
            rounds.setdefault(("m", prefill, batch, context), []).append(
                steps.step(prefill, [context] * batch))
        for chunks in multis:
            rounds.setdefault(("k", chunks), []).append(steps.prompts(chunks))
        for contexts in unequal:
            rounds.setdefault(("u", contexts), []).append(steps.step(0, contexts))
    t = {key: statistics.median(values) for key, values in rounds.items()}
    past_prompt = ATTENDED_BEYOND_PROMPT
    samples = [StepSample(n, 0, 0, t["p", n]) for n in prefills]
    tokens, seconds = tuple(prefills), tuple(t["p", n] for n in prefills)
    table = StepTimes(tokens, seconds, 0.0, 0.0)
    multi_samples = [StepSample(sum(n for _, n in chunks), 0, 0, t["k", chunks], chunks)
                     for chunks in multis]
    per_pair, per_chunk, beyond = fit_prompt_costs(table, multi_samples)
    prompts = StepTimes(tokens, seconds, 0.0, 0.0, per_pair, per_chunk, beyond)
    rows, residual = [], []
    for batch, context in decodes:
        attended = batch * (context + past_prompt)
        samples.append(StepSample(0, batch, attended, t["d", batch, context]))
        rows.append((batch, attended))
        residual.append(t["d", batch, context] - prompts.base(batch))
    per_decode, per_context = _nonnegative_fit(rows, residual)
    line = StepTimes(tokens, seconds, per_decode, per_context, per_pair, per_chunk, beyond)
    batches = tuple(sorted({batch for batch, _ in decodes}))
    decode_base = tuple(statistics.median(t["d", b, c] - per_context * b * (c + past_prompt)
                                          for b, c in decodes if b == batch)
                        for batch in batches)
    model = dataclasses.replace(line, decode_batches=batches, decode_base_s=decode_base)
    samples += multi_samples
    model_errors, table_errors = [], []
    for s in multi_samples:
        pairs = sum(attended_pairs(start, n) for start, n in s.chunks)
        modelled = model.step_s(s.prefill_tokens, 0, 0, pairs, len(s.chunks))
        model_errors.append(abs(modelled / s.seconds - 1))
        table_errors.append(abs(table.table(s.prefill_tokens) / s.seconds - 1))
    errors = []
    for prefill, batch, context in mixes:
        attended = batch * (context + past_prompt)
        measured = t["m", prefill, batch, context]
        samples.append(StepSample(prefill, batch, attended, measured))
        errors.append(abs(model.step_s(prefill + batch, batch, attended) / measured - 1))
    check = (f"multi-prompt prefill steps predicted within {statistics.median(model_errors):.0%} "
             f"(median of {len(model_errors)}, the steps fitted: as one prompt of their tokens "
             f"{statistics.median(table_errors):.0%})" if multi_samples
             else "no multi-prompt steps measured")
    check += (f", mixed prefill+decode steps within {statistics.median(errors):.0%} "
              f"(median of {len(errors)})" if errors else ", no mixed steps measured")
    if decodes:
        by_batch, by_line = ([abs(m.step_s(b, b, b * (c + past_prompt)) / t["d", b, c] - 1)
                              for b, c in decodes] for m in (model, line))
        check += (f", decode steps by their batch within {statistics.median(by_batch):.0%} "
                  f"(median of {len(by_batch)}, the steps fitted; the line through them "
                  f"{statistics.median(by_line):.0%})")
    if unequal:
        seen = [[c + past_prompt for c in cs] for cs in unequal]
        padded, summed = ([abs(model.step_s(len(cs), len(cs), attended(s)) / t["u", cs] - 1)
                           for cs, s in zip(unequal, seen)] for attended in (padded_context, sum))
        samples += [StepSample(0, len(cs), padded_context(s), t["u", cs])
                    for cs, s in zip(unequal, seen)]
        check += (f", decode steps of unequal contexts within {statistics.median(padded):.0%} "
                  f"as the engine pads them to the longest (median of {len(padded)}; by "
                  f"their contexts' sum {statistics.median(summed):.0%})")
    return model, samples, check


def _nonnegative_fit(rows: list[tuple[int, int]], values: list[float]) -> tuple[float, float]:
    if not rows:
        return 0.0, 0.0
    from scipy.optimize import nnls

    coef, _ = nnls(np.asarray(rows, dtype=np.float64), np.asarray(values))
    return float(coef[0]), float(coef[1])


def handler_engine(model: MoEModel, resident: int, max_batch_size: int,
                   max_seq_len: int | None) -> Engine:
    """An engine of a copy of ``model`` served as a planner other than ``all`` serves it: an
    expert handler (miss policy reroute) whose cache holds experts 0 .. ``resident`` - 1 of
    every layer."""
    import copy

    from emoe.core.budget import ExpertBudget
    from emoe.engine.engine import Engine
    from emoe.engine.offload.executor import MissPolicy, OffloadedExperts

    model = copy.deepcopy(model)
    cfg = model.config
    expert_bytes = cfg.expert_params * model.embed_tokens.weight.element_size()
    handler = OffloadedExperts.install(
        model, ExpertBudget(bytes=resident * cfg.num_layers * expert_bytes), MissPolicy.REROUTE,
        slots_per_layer=[resident] * cfg.num_layers)
    handler.apply([(layer, e) for layer in range(cfg.num_layers) for e in range(resident)], [])
    handler.cache.synchronize()
    return Engine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                  expert_handler=handler)


def measure_handler(plain: Engine, handled: dict[int, Engine], repeats: int, runs: int = 3,
                    decodes: Sequence[tuple[int, int]] = HANDLER_DECODES,
                    prefills: Sequence[int] = HANDLER_PREFILLS
                    ) -> tuple[dict[int, HandlerOverhead], int]:
    """Per entry of ``handled`` (resident experts per layer -> engine with a handler), what its
    handler adds to the plain engine's steps, and how many step shapes that was fitted to.

    Each of ``repeats`` rounds takes every step shape in turn: each engine prefills the same
    prompts (one seed per engine) and then runs the shape's step ``runs`` times, one engine
    after another (the order rotating), so a burst of load hits both sides of a difference. A
    shape's overhead is the median of the handled step's time less the plain one's in the same
    run, and the overheads of all shapes are fitted per step, per decode request and per
    prompt token (``fit_handler_overhead``).
    """
    limit = plain.max_seq_len
    slots = min([plain.cache.num_slots] + [e.cache.num_slots for e in handled.values()])
    shapes = ([(0, b, c) for b, c in decodes if b <= slots and c + runs + 2 < limit]
              + [(n, 0, 0) for n in prefills if n < limit])
    engines = {0: plain, **handled}
    steps = {key: _Steps(engine, 1, seed=2) for key, engine in engines.items()}
    order = list(engines)
    differences: dict[tuple[int, tuple], list[float]] = {}
    for _ in range(repeats):
        for shape in shapes:
            prompt, batch, context = shape
            running = ({key: s.prefilled([context] * batch) for key, s in steps.items()}
                       if batch else {})
            for key in running:  # the first decode after a prefill: untimed
                engines[key].execute(StepPlan(decode=running[key]))
            for run in range(runs):
                seconds = {}
                for key in order[run % len(order):] + order[:run % len(order)]:
                    seconds[key] = (_time_step(engines[key], StepPlan(decode=running[key]))
                                    if batch else _time_prefill(steps[key], prompt))
                for key in handled:
                    differences.setdefault((key, shape), []).append(seconds[key] - seconds[0])
            for key, rids in running.items():
                steps[key].release(rids)
    fits = {}
    for key in handled:
        points = [(prompt, batch, statistics.median(differences[key, (prompt, batch, context)]))
                  for prompt, batch, context in shapes]
        fits[key] = fit_handler_overhead(points)
    return fits, len(shapes)


def _time_step(engine: Engine, plan: StepPlan) -> float:
    _sync(engine.device)
    t0 = time.perf_counter()
    engine.execute(plan)
    _sync(engine.device)
    return time.perf_counter() - t0


def _time_prefill(steps: _Steps, tokens: int) -> float:
    rid = steps.add(tokens)
    seconds = _time_step(steps.engine, StepPlan(prefill=[PrefillChunk(rid, 0, tokens)]))
    steps.engine.abort(rid)
    return seconds


def fit_handler_overhead(points: Sequence[tuple[int, int, float]]) -> HandlerOverhead:
    """``step_s + decode_s * D + prefill_token_s * P`` fitted to ``(P prompt tokens, D decode
    requests, seconds the handler added)`` per step shape, every coefficient at least 0.

    The decode steps (P = 0) give ``step_s`` and ``decode_s`` (least squares); the prompts
    give ``prefill_token_s`` over what those leave. A prompt's handler cost is small against
    its compute, which a handler holding part of the experts can make shorter than the
    table's (fewer, fuller expert groups): fitted together, the prompts would pull the
    per-step term to nothing.
    """
    from scipy.optimize import nnls

    decodes = [(d, seconds) for p, d, seconds in points if p == 0]
    step_s = decode_s = prefill_token_s = 0.0
    if decodes:
        coef, _ = nnls(np.asarray([(1.0, d) for d, _ in decodes]),
                       np.asarray([seconds for _, seconds in decodes]))
        step_s, decode_s = float(coef[0]), float(coef[1])
    prompts = [(p, seconds - step_s - decode_s * d) for p, d, seconds in points if p > 0]
    if prompts:
        coef, _ = nnls(np.asarray([(float(p),) for p, _ in prompts]),
                       np.asarray([left for _, left in prompts]))
        prefill_token_s = float(coef[0])
    return HandlerOverhead(step_s=step_s, decode_s=decode_s, prefill_token_s=prefill_token_s)


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


def measure_fetches(model: MoEModel, table: StepTimes, overhead: HandlerOverhead, slots: int,
                    max_batch_size: int, max_seq_len: int | None, repeats: int
                    ) -> tuple[float, int]:
    """Seconds one expert costs when the engine fetches it on a miss through its expert cache
    (the copy, the slot bookkeeping and the wait) beyond the handler's own ``overhead``, and
    how many fetches that was measured on.

    An engine whose cache holds ``slots`` experts per layer (miss policy fetch, as the ``lru``
    planner serves) runs decode steps of 1-16 fresh requests; each step's time beyond the
    standalone step model is fitted to the experts it fetched on top of the handler's overhead
    for that step (``fit_fetch_cost``).
    """
    import torch

    from emoe.engine.engine import Engine
    from emoe.core.budget import ExpertBudget
    from emoe.engine.offload.executor import MissPolicy, OffloadedExperts

    cfg = model.config
    expert_bytes = cfg.expert_params * model.embed_tokens.weight.element_size()
    executor = OffloadedExperts.install(
        model, ExpertBudget(bytes=slots * cfg.num_layers * expert_bytes), MissPolicy.FETCH,
        slots_per_layer=[slots] * cfg.num_layers)
    engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len,
                    expert_handler=executor)
    steps = _Steps(engine, 1, seed=1)
    extra, fetched, handler = [], [], []
    with torch.inference_mode():
        engine.warm_up()
        for _ in range(repeats):
            for batch in (b for b in (1, 2, 4, 8, 16) if b <= engine.cache.num_slots):
                rids = steps.prefilled([16] * batch)
                for _ in range(3):
                    t0 = time.perf_counter()
                    result = engine.execute(StepPlan(decode=rids))
                    seconds = time.perf_counter() - t0
                    context = padded_context([engine.seqs[r].num_tokens for r in rids])
                    extra.append(seconds - table.step_s(batch, batch, context))
                    fetched.append(len(result.fetched_on_miss))
                    handler.append(overhead.seconds(0, batch))
                steps.release(rids)
    return fit_fetch_cost(extra, fetched, handler), sum(fetched)


def fit_fetch_cost(extra_s: Sequence[float], fetches: Sequence[int],
                   overhead_s: Sequence[float]) -> float:
    """Seconds per fetch: the least-squares slope (at least 0) of each step's time beyond the
    plain step model, ``extra_s``, less the handler's ``overhead_s`` (the intercept, measured
    apart) over the experts the step fetched."""
    x = np.asarray(fetches, dtype=np.float64)
    y = np.asarray(extra_s, dtype=np.float64) - np.asarray(overhead_s, dtype=np.float64)
    return max(float(x @ y / (x @ x)), 0.0) if x @ x > 0 else 0.0


def measure_predictor(num_layers: int, num_experts: int, slots: int, repeats: int) -> float:
    """Seconds of one planner prediction: the frequency predictor's ``predict`` for each of
    the five default tasks and a top-``slots`` per layer, as the ``emoe`` planner runs it."""
    from emoe.core.estimates import top_experts
    from emoe.core.predictor import make_predictor
    from emoe.core.tasks import DEFAULT_TASKS

    rng = np.random.default_rng(0)
    predictor = make_predictor("frequency", num_layers, num_experts)
    per_layer = np.full(num_layers, slots)

    def predict() -> None:
        for task in DEFAULT_TASKS:
            predictor.observe(task, rng.integers(0, 50, (num_layers, num_experts)))
        scores = sum(predictor.predict(task) for task in DEFAULT_TASKS)
        top_experts(scores, per_layer)

    return _timed(predict, _cpu(), repeats)


def _cpu():
    import torch

    return torch.device("cpu")


def profile_model(model: MoEModel, name: str, device: torch.device | str = "cpu",
                  repeats: int = 5, max_batch_size: int = 16, max_seq_len: int | None = None,
                  prefill_tokens: Sequence[int] = PREFILL_TOKENS,
                  decode_batch: Sequence[int] = DECODE_BATCH,
                  decode_context: Sequence[int] = DECODE_CONTEXT,
                  mixed: Sequence[tuple[int, int, int]] = MIXED,
                  multi_prompt: Sequence[Sequence[tuple[int, int]]] = MULTI_PROMPT
                  ) -> EngineProfile:
    """Everything but the serving path (``emoe.rpc.serving_profile`` adds that)."""
    import copy

    import torch

    from emoe.engine.engine import Engine

    device = torch.device(device)
    model = model.to(device)
    cached = copy.deepcopy(model)  # an expert cache takes over its experts
    cfg = model.config
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    spec = cfg.to_model_spec(name, dtype=dtype)
    engine = Engine(model, max_batch_size=max_batch_size, max_seq_len=max_seq_len)
    with torch.inference_mode():
        engine.warm_up()
        table, samples, check = measure_engine(engine, repeats, prefill_tokens, decode_batch,
                                               decode_context, mixed, multi_prompt)
    slots = max(1, (5 * cfg.num_experts) // 8)
    handled = {n: handler_engine(cached, n, max_batch_size, max_seq_len)
               for n in sorted({slots, cfg.num_experts})}
    with torch.inference_mode():
        for e in handled.values():
            e.warm_up()
        overheads, shapes = measure_handler(engine, handled, repeats)
    del handled
    offload = overheads[slots]
    bandwidth, _ = measure_copies(spec.expert_bytes, device, repeats)
    per_fetch, fetches = measure_fetches(cached, table, offload, slots, max_batch_size,
                                         max_seq_len, repeats)
    latency = max(0.0, per_fetch - spec.expert_bytes / bandwidth)
    predictor_s = measure_predictor(cfg.num_layers, cfg.num_experts,
                                    max(1, cfg.num_experts // 2), repeats)
    memory = {"expert_bytes": spec.expert_bytes, "non_expert_bytes": spec.non_expert_bytes,
              "kv_bytes_per_token": spec.kv_bytes_per_token}
    if device.type == "cuda":
        memory["gpu_memory_bytes"] = torch.cuda.get_device_properties(device).total_memory
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    setup = EngineSetup(model=name, num_layers=cfg.num_layers, num_experts=cfg.num_experts,
                        top_k=cfg.top_k, hidden_size=cfg.hidden_size,
                        threads=torch.get_num_threads(), device=str(device), dtype=dtype,
                        max_batch_size=engine.cache.num_slots, max_seq_len=engine.max_seq_len)
    return EngineProfile(
        model=name, device=machine_description(device),
        provenance=(f"measured by `emoe profile` on {when}, load average {load} [measured]: "
                    f"{len(samples)} engine steps (median of {repeats} rounds over the grid, fresh "
                    f"random prompts), "
                    f"all experts resident, {dtype}; step_table from one-prompt steps, "
                    f"per-pair, per-chunk and past-the-table per-token costs fitted to "
                    f"multi-prompt steps, "
                    f"per-decode and per-context costs fitted to decode steps, decode-only "
                    f"steps by their batch; {check}; "
                    f"pcie bandwidth: copies of {COPY_FRACTIONS} x one expert "
                    f"({spec.expert_bytes} B) on the engine's copy stream"
                    + ("" if device.type == "cuda" else " (CPU: host memcpy, no PCIe)")
                    + f"; offload: the expert handler's overhead, {shapes} step shapes (decodes "
                      f"of {[b for b, _ in HANDLER_DECODES]} requests, prompts of "
                      f"{list(HANDLER_PREFILLS)} tokens) run in each of {repeats} rounds on the "
                      f"plain engine and on engines whose handler (miss policy reroute) holds "
                      + " and ".join(f"{n}" for n in overheads)
                    + f" of {cfg.num_experts} experts per layer, the median paired difference "
                      f"per shape fitted per step, per decode request and per prompt token "
                      f"(non-negative least squares): "
                    + "; ".join(f"{n}/{cfg.num_experts} {_overhead_text(o)}"
                                for n, o in overheads.items())
                    + f" (the {slots}/{cfg.num_experts} fit is the one kept)"
                    + f"; pcie latency: what an expert fetched on a miss through the engine's "
                      f"cache costs beyond the handler's overhead ({per_fetch * 1e6:.0f} us, "
                      f"{fetches} fetches at {slots} of {cfg.num_experts} experts per layer) "
                      f"less its bytes / bandwidth"
                    + "; predictor_s: the frequency predictor's predict + top-L for five tasks"),
        pcie_bandwidth_bytes_per_s=bandwidth, pcie_latency_s=latency, memory=memory,
        samples=tuple(samples), engine=setup, step_table=table, predictor_s=predictor_s,
        offload=offload)


def _overhead_text(o: HandlerOverhead) -> str:
    return (f"{o.step_s * 1e6:.0f} us per step + {o.decode_s * 1e6:.1f} us per decode + "
            f"{o.prefill_token_s * 1e9:.0f} ns per prompt token")


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("checkpoint", nargs="?", default=None,
                   help="model folder (config.json, *.safetensors); default: the reference "
                        "model emoe-tiny")
    p.add_argument("--checkpoint", dest="checkpoint_flag", metavar="DIR", default=None,
                   help="the same, as an option")
    p.add_argument("-o", "--out", "--output", dest="output", default="profile.json",
                   help="profile file to write (JSON)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: as stored; half precision runs as float32 on CPU")
    p.add_argument("--repeats", type=int, default=7,
                   help="rounds over the measurement grid (each point: the median of rounds)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: what `emoe serve` uses: torch's choice, "
                        "one per core)")
    p.add_argument("--max-batch-size", type=int, default=16,
                   help="KV slots, as `emoe serve --max-batch-size`")
    p.add_argument("--max-seq-len", type=int, default=None,
                   help="context length, as `emoe serve --max-seq-len` (default: the model's)")
    p.add_argument("--no-serving", action="store_true",
                   help="skip measuring the serving path through a live `emoe serve`")


def run(args: argparse.Namespace) -> int:
    import dataclasses

    import torch

    from emoe.core.errors import ConfigError
    from emoe.core.paths import resolve_path
    from emoe.core.profile import write_profile
    from emoe.engine.checkpoint import load_model
    from emoe.rpc.local import REFERENCE_CHECKPOINT

    if args.checkpoint and args.checkpoint_flag:
        raise ConfigError("checkpoint: give it once (as an argument or --checkpoint)")
    given = args.checkpoint or args.checkpoint_flag
    checkpoint = Path(resolve_path(given)) if given else REFERENCE_CHECKPOINT
    if args.repeats < 1:
        raise ConfigError(f"--repeats: must be >= 1, got {args.repeats}")
    if args.threads:
        torch.set_num_threads(args.threads)
    model = load_model(checkpoint, device="cpu", dtype=args.dtype)
    print(f"emoe profile: {checkpoint.name} on {args.device}, {torch.get_num_threads()} "
          f"thread(s), {args.max_batch_size} KV slots; measuring engine steps ...", flush=True)
    profile = profile_model(model, checkpoint.name, args.device, args.repeats,
                            max_batch_size=args.max_batch_size, max_seq_len=args.max_seq_len)
    if not args.no_serving:
        from emoe.rpc.serving_profile import measure_serving

        print("measuring the serving path in a live serving session ...", flush=True)
        serving, how = measure_serving(checkpoint, profile, args.dtype, args.repeats)
        profile = dataclasses.replace(profile, serving=serving,
                                      provenance=f"{profile.provenance}; serving: {how}")
    write_profile(profile, args.output)
    table = profile.step_table
    print(f"wrote {args.output}: {len(profile.samples)} engine steps; step table "
          + ", ".join(f"{n} tok {s * 1e3:.2f} ms" for n, s in zip(table.tokens, table.seconds))
          + f"; per decode request {table.per_decode_s * 1e6:.0f} us, per context token "
            f"{table.per_context_token_s * 1e9:.1f} ns, per attended pair "
            f"{table.per_pair_s * 1e9:.1f} ns, per extra prompt {table.per_chunk_s * 1e6:.0f} us"
          + ("" if table.beyond_s_per_token is None else
             f", past the table {table.beyond_s_per_token * 1e6:.1f} us per token")
          + "; decode-only steps by their batch, context aside: "
          + ", ".join(f"{b} {s * 1e3:.2f} ms" for b, s in zip(table.decode_batches,
                                                              table.decode_base_s))
          + f"; copy "
            f"{profile.pcie_bandwidth_bytes_per_s / 1e9:.2f} GB/s, latency "
            f"{profile.pcie_latency_s * 1e6:.1f} us")
    if profile.offload is not None:
        print(f"expert handler: {_overhead_text(profile.offload)}")
    if profile.serving is not None:
        s = profile.serving
        print(f"serving path: engine steps x{s.engine_scale:.2f} when served, "
              f"{s.step_s * 1e6:.0f} us per step, {s.token_s * 1e6:.0f} us per streamed token, "
              f"{s.ingress_s * 1e3:.2f} ms in + {s.ingress_per_stream_s * 1e6:.0f} us per stream "
              f"running, {s.egress_s * 1e3:.2f} ms out + {s.egress_per_stream_s * 1e6:.0f} us "
              f"per token the step streamed")
    return 0
