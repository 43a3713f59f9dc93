"""What the serving path adds to the engine, measured in one live serving session.

``emoe profile`` measures the engine's steps alone; a served request also waits for the
scheduler loop, the hand-off to the engine thread, the token fan-out, the Generate coroutines
and gRPC, which share the interpreter (and its lock) with the engine's Python. This serves the
model here, exactly as ``emoe serve`` does (``SchedulerServer`` over ``LocalEngineBackend``),
and drives it from a client in another process (``python -m emoe.rpc.serving_profile``) with
calibration requests (never the trace a fidelity run replays): lone prompts of several sizes
and 1..16 concurrent streams. Every step the engine loop runs is recorded in the server, every
send and receipt in the client, on the one monotonic clock both processes share, so all of it
is measured at the same moment, under the same load:

- ``engine_scale``, ``step_s``, ``token_s``: one fit of every served cycle (a step's start to
  the next one's, while the loop had work): ``engine_scale`` times the profile's standalone
  step model (the engine shares its interpreter with the loop and the streams) plus the
  loop's ``step_s`` plus ``token_s`` per token the step streamed (scheduler, bookkeeping,
  token fan-out, the Generate coroutines);
- how the cycles scatter around that fit, steps of one shape alike (``cycle_scatter``), in the
  provenance only: the simulator models no scatter (docs/fidelity.md);
- ``ingress_s``: from a client's send to the server accepting the request (median over lone
  prompts sent to an idle server);
- ``ingress_per_stream_s``: what acceptance waits beyond that per stream running, from probe
  requests sent while 1-16 streams decode (the streams' Generate coroutines share the event
  loop that accepts a request, and the engine's thread holds the interpreter lock through
  part of every step): a request that is accepted after the next step has started waits a
  whole step more;
- ``egress_s``, ``egress_per_stream_s``: from the end of the step that made a first token,
  serving time included, to the client receiving it, a line in the tokens the step streamed
  (the new token goes out behind the others).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emoe.core.profile import (EngineProfile, ServingCosts, StepTimes, chunk_pairs,
                               decode_context)

LONE_PROMPTS = (8, 32, 64, 128, 200)
BATCHES = (1, 2, 4, 8, 12, 16)
PROMPT, TOKENS = 16, 40  # concurrent streams: prompt tokens, tokens generated
PROBES_AFTER_S = (0.012, 0.027, 0.043, 0.061, 0.08)  # probes sent while the streams run
PROBE_PROMPT = 8


# -- the client (another process) ------------------------------------------------------------

async def _request(client, rid: str, prompt_tokens: int, max_tokens: int, seed: int,
                   vocab: int) -> dict:
    from emoe.rpc.client import generate_request
    from emoe.rpc.replay import FIRST_NON_SPECIAL_ID

    rng = np.random.default_rng(seed)  # random ids over the vocabulary, as replay sends them
    prompt = rng.integers(FIRST_NON_SPECIAL_ID, max(vocab, FIRST_NON_SPECIAL_ID + 1),
                          prompt_tokens).tolist()
    request = generate_request(prompt, request_id=rid,
                               task="qa", max_tokens=max_tokens, ignore_eos=True)
    sent = time.monotonic()
    receipts: list[float] = []
    async for response in client.stream(request):
        receipts.extend([time.monotonic()] * len(response.token_ids))
    return {"id": rid, "sent": sent, "receipts": receipts}


async def _calibrate(target: str, rounds: int, slots: int, context: int, vocab: int
                     ) -> list[dict]:
    """``rounds`` rounds over every batch size and prompt length (a burst of load on a shared
    machine then spreads over all of them)."""
    from emoe.rpc.client import EmoeClient

    records: list[dict] = []
    n = iter(range(1 << 30))
    async with EmoeClient(target) as client:
        for _ in range(3):  # warm the path (connection, first calls)
            await _request(client, f"warm-{next(n)}", 16, 4, 0, vocab)
        async def probe(batch: int, after: float) -> dict:
            await asyncio.sleep(after)
            return await _request(client, f"q{batch}-{next(n)}", PROBE_PROMPT, 1, next(n),
                                  vocab)

        for _ in range(rounds):
            for batch in (b for b in BATCHES if b <= slots):
                records += await asyncio.gather(
                    *(_request(client, f"b{batch}-{next(n)}", PROMPT, TOKENS, next(n), vocab)
                      for _ in range(batch)),
                    *(probe(batch, after) for after in PROBES_AFTER_S))
            for prompt in (p for p in LONE_PROMPTS if p + 8 < context):
                records.append(await _request(client, f"p{prompt}-{next(n)}", prompt, 2,
                                              next(n), vocab))
    return records


# -- the server (this process) ---------------------------------------------------------------

@dataclass
class _Step:
    start: float
    end: float
    tokens: int          # prompt + decode tokens in the step
    decode: int
    context: int         # tokens decodes attend to
    pairs: int           # query-key pairs its prefill chunks attend
    chunks: int          # its prefill chunks
    streamed: int        # tokens the step streamed (decodes + completed prompts)
    first: list[str] = field(default_factory=list)   # requests whose first token it made
    idle_before: bool = False


class _Recorder:
    """Wraps the served engine and scheduler: records every step and every acceptance."""

    def __init__(self) -> None:
        self.steps: list[_Step] = []
        self.accepted: dict[str, float] = {}  # by request id
        self.streaming: dict[str, int] = {}  # by request id: streams running at its acceptance
        self.request_id: dict[str, str] = {}  # the engine's key -> the client's request id
        self._idle = False

    def engine(self, backend) -> None:
        execute = backend.execute

        async def recorded(plan):
            engine = backend._engine
            first = [c.request_id for c in plan.prefill
                     if c.start + c.num_tokens == len(engine.seqs[c.request_id].prompt)]
            context = decode_context([engine.seqs[r].num_tokens for r in plan.decode])
            tokens = sum(c.num_tokens for c in plan.prefill) + len(plan.decode)
            pairs = chunk_pairs(plan.prefill)
            start = time.monotonic()
            result = await execute(plan)
            self.steps.append(_Step(start, time.monotonic(), tokens, len(plan.decode), context,
                                    pairs, len(plan.prefill), len(plan.decode) + len(first),
                                    first, self._idle))
            self._idle = False
            return result

        backend.execute = recorded

    def scheduler(self, make):
        def build(info):
            scheduler = make(info)
            next_step = scheduler.next_step

            def recorded(now, max_iterations=None):
                plan = next_step(now, max_iterations)
                self._idle |= plan.empty
                return plan

            scheduler.next_step = recorded
            return scheduler
        return build

    def replica(self, replica) -> None:
        submit = replica.submit

        def recorded(submission):
            self.accepted[submission.request_id] = submission.accepted_at
            self.streaming[submission.request_id] = replica.running
            self.request_id[submission.key] = submission.request_id
            return submit(submission)

        replica.submit = recorded


def _fit(steps: StepTimes, recorder: _Recorder, records: list[dict]
         ) -> tuple[ServingCosts, str]:
    """Fit every served cycle (one step's start to the next one's, while the loop had work):
    cycle = engine_scale x the standalone step model + step_s + token_s x tokens streamed,
    all >= 0, with a robust loss (a burst of load from elsewhere costs a few cycles, not the
    fit)."""
    from scipy.optimize import least_squares

    served = recorder.steps
    rows, cycles = [], []
    for step, after in zip(served, served[1:]):
        if not after.idle_before:  # the loop went straight on to the next step
            rows.append((_modelled(steps, step), 1.0, step.streamed))
            cycles.append(after.start - step.start)
    a, y = np.asarray(rows), np.asarray(cycles)
    fit = least_squares(lambda x: a @ x - y, x0=[1.0, 1e-4, 1e-5], bounds=(0.0, np.inf),
                        loss="soft_l1", f_scale=5e-4)
    engine_scale, step_s, token_s = map(float, fit.x)
    loop = ServingCosts(step_s=step_s, token_s=token_s, ingress_s=0.0, egress_s=0.0,
                        engine_scale=engine_scale)
    # Send to acceptance: at an idle server (lone prompts, median), and beyond that per
    # stream running at acceptance (probes sent while 1-16 streams decode: the streams'
    # Generate coroutines share the event loop that accepts a request)
    lone = [r for r in records if r["id"].startswith("p")]
    ingress = [recorder.accepted[r["id"]] - r["sent"] for r in lone if r["id"] in recorder.accepted]
    ingress_s = max(0.0, float(statistics.median(ingress)))
    probes = [(recorder.streaming[r["id"]], recorder.accepted[r["id"]] - r["sent"] - ingress_s)
              for r in records if r["id"].startswith("q") and r["id"] in recorder.accepted]
    ingress_per_stream = _robust_line([k for k, _ in probes], [w for _, w in probes],
                                      intercept=False)[1]
    # The modelled end of the step that made each first token to its receipt, by the tokens
    # that step streamed (the new one goes out behind the others): every request's first token
    made_at = {}  # request id -> (the step's end as the simulator has it, tokens it streamed)
    for step in served:
        end = step.start + loop.cycle_s(_modelled(steps, step), step.streamed)
        for key in step.first:
            made_at[recorder.request_id.get(key, key)] = (end, step.streamed)
    firsts = [(made_at[r["id"]][1], r["receipts"][0] - made_at[r["id"]][0]) for r in records
              if r["receipts"] and r["id"] in made_at]
    egress_s, egress_per_stream = _robust_line([k for k, _ in firsts], [e for _, e in firsts])
    shapes = [_shape(step) for step, after in zip(served, served[1:]) if not after.idle_before]
    sigma, lag1 = cycle_scatter(np.log(y / np.maximum(a @ fit.x, 1e-9)), shapes)
    costs = dataclasses.replace(loop, ingress_s=ingress_s, egress_s=egress_s,
                                ingress_per_stream_s=ingress_per_stream,
                                egress_per_stream_s=egress_per_stream)
    misfit = float(np.median(np.abs(a @ fit.x - y) / y))
    how = (f"one live serving session (SchedulerServer over the engine, as emoe serve; client "
           f"in another process): {len(records)} calibration requests (lone prompts of "
           f"{','.join(str(p) for p in LONE_PROMPTS)} tokens, 1-16 concurrent streams of "
           f"{TOKENS} tokens), {len(served)} served steps [measured]: each cycle (a step's "
           f"start to the next one's) = engine_scale x the step model + step_s + token_s x "
           f"tokens it streamed ({len(cycles)} cycles, robust least squares, median misfit "
           f"{misfit:.0%}; within a step shape log(cycle / fit) scatters by sigma {sigma:.2f} "
           f"with lag-1 correlation {lag1:.2f}, not simulated); ingress = send to acceptance "
           f"(median over {len(ingress)} lone "
           f"prompts to an idle server) + per stream running (robust fit over {len(probes)} "
           f"probes sent while streams ran); egress = modelled step end to receipt of a first "
           f"token, a line in the tokens that step streamed (robust fit over {len(firsts)} "
           f"first tokens)")
    return costs, how


def _shape(step: _Step) -> tuple[int, int]:
    """Steps alike but for the machine's scatter: decodes only by their count, steps with a
    prompt by its tokens (64-token bins)."""
    return (step.decode, -1) if not step.chunks else (-1, step.tokens // 64)


MIN_SHAPE_CYCLES = 5


def cycle_scatter(log_ratio, shapes: list) -> tuple[float, float]:
    """(sigma, lag-1 correlation) of a cycle series' ``log_ratio`` (log measured / modelled,
    in order) once each shape's own mean (the model's error for that shape) is taken out:
    what the machine adds, and how it carries over from one cycle to the next. Shapes of
    fewer than ``MIN_SHAPE_CYCLES`` cycles are left out; (0, 0) when too few are left."""
    x = np.asarray(log_ratio, dtype=np.float64)
    left = np.full(len(x), np.nan)
    groups: dict = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    for members in groups.values():
        if len(members) >= MIN_SHAPE_CYCLES:
            left[members] = x[members] - x[members].mean()
    kept = ~np.isnan(left)
    if kept.sum() < 2 * MIN_SHAPE_CYCLES:
        return 0.0, 0.0
    sigma = float(left[kept].std())
    pairs = kept[:-1] & kept[1:]
    if pairs.sum() < MIN_SHAPE_CYCLES or sigma == 0:
        return sigma, 0.0
    return sigma, float(np.corrcoef(left[:-1][pairs], left[1:][pairs])[0, 1])


def _modelled(steps: StepTimes, step: _Step) -> float:
    """The standalone step model's time for a served step."""
    return steps.step_s(step.tokens, step.decode, step.context, step.pairs, step.chunks)


def _robust_line(xs, ys, intercept: bool = True) -> tuple[float, float]:
    """(a, b) >= 0 of y = a + b x (a = 0 without ``intercept``), robust to bursts of load."""
    from scipy.optimize import least_squares

    x, y = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
    if not len(x):
        return 0.0, 0.0
    a = np.stack([np.ones_like(x) if intercept else np.zeros_like(x), x], axis=1)
    start = max(0.0, float(np.median(y))) if intercept else 0.0  # within the bounds
    fit = least_squares(lambda p: a @ p - y, x0=[start, 1e-5],
                        bounds=(0.0, np.inf), loss="soft_l1", f_scale=5e-4)
    return float(fit.x[0]) if intercept else 0.0, float(fit.x[1])


def measure_serving(checkpoint: Path, profile: EngineProfile, dtype: str | None = None,
                    rounds: int = 5) -> tuple[ServingCosts, str]:
    """Serve ``checkpoint`` here like the profiled engine, calibrate it from a client process,
    and fit the serving costs against ``profile``'s step model."""
    engine = profile.engine
    assert engine is not None and profile.step_table is not None
    return asyncio.run(_serve_and_measure(checkpoint, profile, dtype, rounds))


async def _serve_and_measure(checkpoint: Path, profile: EngineProfile, dtype: str | None,
                             rounds: int) -> tuple[ServingCosts, str]:
    from emoe.core.errors import ConfigError
    from emoe.core.policy_file import PolicyConfig
    from emoe.core.specs import get_hardware
    from emoe.rpc.local import LocalEngineBackend
    from emoe.rpc.server import Listen, SchedulerServer

    engine = profile.engine
    backend = LocalEngineBackend(checkpoint, device=engine.device, dtype=dtype,
                                 max_batch_size=engine.max_batch_size,
                                 max_seq_len=engine.max_seq_len, threads=engine.threads)
    recorder = _Recorder()
    server = SchedulerServer([backend], PolicyConfig(), get_hardware("a100-40gb"),
                             Listen(port=0))
    replica = server.service.replicas[0]
    replica._make_scheduler = recorder.scheduler(replica._make_scheduler)
    await server.start()
    try:
        await server.wait_serving()
        recorder.engine(backend)
        recorder.replica(replica)
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "emoe.rpc.serving_profile", f"127.0.0.1:{server.port}",
            str(rounds), str(engine.max_batch_size), str(engine.max_seq_len),
            str(replica.info.vocab_size),
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        out, err = await process.communicate()
        if process.returncode:
            raise ConfigError(f"serving calibration client failed: "
                              f"{err.decode().strip().splitlines()[-1:]}")
        records = json.loads(out)
    finally:
        await server.stop()
    return _fit(profile.step_table, recorder, records)


if __name__ == "__main__":  # the calibration client: TARGET ROUNDS SLOTS CONTEXT VOCAB
    target, rounds, slots, context, vocab = sys.argv[1], *map(int, sys.argv[2:6])
    print(json.dumps(asyncio.run(_calibrate(target, rounds, slots, context, vocab))))
