"""Engine profile: step-time, PCIe, memory and serving-path figures measured on a real engine.

``emoe profile`` (the torch engine) writes one; the simulator's cost model uses it in place of a
hardware preset's derived coefficients. The file is JSON, documented in docs/profile-format.md.
Every section is optional: a field present replaces the preset's value, a field absent keeps it.
Step-time coefficients are either given directly or fitted here from raw step samples.

Three sections describe the engine as served, so the simulator can predict it:
``engine`` (the model, threads, device, dtype, KV slots and context it was measured with),
``step_table`` (measured step times by tokens, attended pairs, prompts, decode requests and
context: ``StepTimes``) and
``serving`` (what the serving path adds per step, per streamed token and per request:
``ServingCosts``); ``offload`` says what the expert handler adds to each step when the engine
serves a planner other than ``all`` (``HandlerOverhead``). A profile of one model or thread count is refused for another
(``check_model``, ``check_threads``), naming the difference.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from emoe.core.errors import ConfigError
from emoe.core.plan import PrefillChunk
from emoe.core.specs import HardwareSpec, ModelSpec

PROFILE_FORMAT = "emoe-engine-profile"
PROFILE_VERSION = 1

STEP_TIME_FIELDS = ("step_overhead_s", "prefill_s_per_token", "decode_s_per_token",
                    "attention_s_per_context_token")
_PCIE_FIELDS = {"bandwidth_bytes_per_s": "pcie_bandwidth_bytes_per_s",
                "latency_s": "pcie_latency_s"}
_MEMORY_FIELDS = ("gpu_memory_bytes", "non_expert_bytes", "expert_bytes", "kv_bytes_per_token")


def attended_pairs(start: int, tokens: int) -> int:
    """Query-key pairs a prefill chunk of ``tokens`` prompt tokens from token ``start`` of its
    prompt attends: each token attends to the ``start`` before the chunk and to the chunk's
    tokens up to itself."""
    return tokens * start + tokens * (tokens + 1) // 2


def chunk_pairs(chunks: Iterable[PrefillChunk]) -> int:
    """Query-key pairs a step's prefill chunks attend in all."""
    return sum(attended_pairs(c.start, c.num_tokens) for c in chunks)


def decode_context(contexts: Sequence[int]) -> int:
    """The context tokens a step's decodes attend as the engine computes them: one batched
    attention whose every row is padded to the longest (``emoe.engine.kv_cache.StepBatch``),
    so a batch of B decodes costs B x its longest context, not their sum; ``contexts``: each
    decode's tokens, the one it adds included."""
    return len(contexts) * max(contexts, default=0)


@dataclass(frozen=True, slots=True)
class StepSample:
    """One measured engine step. ``chunks``: its prefill chunks as (start, tokens), when they
    are not one prompt of ``prefill_tokens`` from its start (a step of several prompts, or a
    chunk continuing one)."""

    prefill_tokens: int
    decode_tokens: int
    context_tokens: int
    seconds: float
    chunks: tuple[tuple[int, int], ...] = ()

    def prefill_chunks(self) -> tuple[tuple[int, int], ...]:
        if self.chunks:
            return self.chunks
        return ((0, self.prefill_tokens),) if self.prefill_tokens else ()

    def to_json(self) -> dict:
        doc: dict[str, object] = {"prefill_tokens": self.prefill_tokens,
                                  "decode_tokens": self.decode_tokens,
                                  "context_tokens": self.context_tokens, "seconds": self.seconds}
        if self.chunks:
            doc["chunks"] = [list(c) for c in self.chunks]
        return doc


@dataclass(frozen=True, slots=True)
class EngineSetup:
    """What the profile was measured on: the model's shape and the engine's configuration."""

    model: str
    num_layers: int
    num_experts: int
    top_k: int
    hidden_size: int
    threads: int
    device: str
    dtype: str
    max_batch_size: int
    max_seq_len: int

    def shape(self) -> str:
        return (f"{self.num_layers} layers x {self.num_experts} experts, top-{self.top_k}, "
                f"hidden {self.hidden_size}")


@dataclass(frozen=True, slots=True)
class StepTimes:
    """Measured engine step time. A step of T tokens (prefill chunks and D decodes) whose
    chunks attend ``pairs`` query-key pairs in all (``attended_pairs``), with D decodes
    attending to C context tokens, takes

    ``step_s`` = ``base(T) + per_pair_s * pairs + per_chunk_s * max(0, chunks - 1)
    + per_decode_s * D + per_context_token_s * C``.

    ``table`` interpolates linearly between measured steps of one prompt of ``tokens[i]``
    tokens (no context) taking ``seconds[i]``: it holds the kernels' crossovers that a straight
    line misses (e.g. the fused expert kernel up to 64 tokens). ``base(T)``, the step without
    attended pairs, is ``table(T) - per_pair_s * T (T + 1) / 2`` within the table, so one
    prompt from its start costs exactly the table; past the table's last point (only steps of
    several prompts get there) it is a line from there rising ``beyond_s_per_token`` per
    token, not the table's convex part. ``per_pair_s`` (what an attended pair costs, so k
    prompts of n tokens cost less than one of k n), ``per_chunk_s`` (what each prompt beyond
    the first adds) and ``beyond_s_per_token`` are non-negative least-squares fits of
    multi-prompt steps (``fit_prompt_costs``). Profiles without them: no pair or chunk costs,
    and past the table the base extends its last segment (the whole table's slope where that
    one falls, never below flat), so every step costs the table of its tokens.
    ``per_decode_s`` is what each decoding request adds over the base's token (its attention
    over its KV and its sampled row), ``per_context_token_s`` what each token of context a
    decode attends to adds; both are least-squares fits of decode steps (no attended pairs)
    of equal contexts, so C is the context as padded (``decode_context``).

    A decode-only step (T = D) costs ``decode_base(D) + per_context_token_s * C`` where the
    profile measured decode steps by their batch (``decode_batches``, ``decode_base_s``: each
    batch's steps less their context, interpolated between batches, past the last one its
    last segment's slope): a decode of one request runs on a faster path than the one-prompt
    table's token, and the line through the others misses both. Profiles without them cost
    decode-only steps by the formula above.
    """

    tokens: tuple[int, ...]
    seconds: tuple[float, ...]
    per_decode_s: float
    per_context_token_s: float
    per_pair_s: float = 0.0
    per_chunk_s: float = 0.0
    beyond_s_per_token: float | None = None
    decode_batches: tuple[int, ...] = ()
    decode_base_s: tuple[float, ...] = ()

    def table(self, tokens: float) -> float:
        xs, ys = self.tokens, self.seconds
        if len(xs) == 1:
            return ys[0]
        if tokens >= xs[-1]:
            return _extrapolate(xs, ys, tokens)
        return float(np.interp(tokens, xs, ys))

    def base(self, tokens: float) -> float:
        """The step of ``tokens`` tokens without any attended pairs."""
        xs, ys, p = self.tokens, self.seconds, self.per_pair_s
        last = xs[-1]
        if tokens <= last:
            return self.table(tokens) - p * _one_prompt(tokens)
        if self.beyond_s_per_token is not None:
            return ys[-1] - p * _one_prompt(last) + self.beyond_s_per_token * (tokens - last)
        if len(xs) == 1:
            return ys[0] - p * _one_prompt(last)
        return _extrapolate(xs, [y - p * _one_prompt(x) for x, y in zip(xs, ys)], tokens)

    def step_s(self, tokens: int, decode: int, context: float, pairs: float | None = None,
               chunks: int = 1) -> float:
        """A step of ``tokens`` tokens, ``decode`` of them decodes over ``context`` tokens of
        context, the rest prefill chunks (``chunks`` of them) attending ``pairs`` pairs;
        ``pairs`` by default: the prefill tokens as one prompt from its start."""
        if decode and tokens == decode and self.decode_batches:
            return self.decode_base(decode) + self.per_context_token_s * context
        if pairs is None:
            pairs = _one_prompt(tokens - decode)
        return (self.base(tokens) + self.per_pair_s * pairs
                + self.per_chunk_s * max(0, chunks - 1) + self.per_decode_s * decode
                + self.per_context_token_s * context)

    def decode_base(self, batch: int) -> float:
        """A decode-only step of ``batch`` requests without its context (``decode_batches``
        measured)."""
        xs, ys = self.decode_batches, self.decode_base_s
        if len(xs) > 1 and batch >= xs[-1]:
            return _extrapolate(xs, ys, batch)
        return float(np.interp(batch, xs, ys))


def _one_prompt(tokens: float) -> float:
    return tokens * (tokens + 1) / 2


def _extrapolate(xs: "Sequence[int]", ys: "Sequence[float]", x: float) -> float:
    """ys beyond xs[-1] with the last segment's slope (the whole table's where that one
    falls, never below flat: a noisy last point on a loaded machine)."""
    slope = (ys[-1] - ys[-2]) / (xs[-1] - xs[-2])
    if slope < 0:
        slope = max(0.0, (ys[-1] - ys[0]) / (xs[-1] - xs[0]))
    return ys[-1] + slope * (x - xs[-1])


def fit_prompt_costs(table: StepTimes, samples: "Sequence[StepSample]"
                     ) -> tuple[float, float, float | None]:
    """``(per_pair_s, per_chunk_s, beyond_s_per_token)`` >= 0, least squares over prefill-only
    ``samples`` (several prompts, or a chunk continuing one) given ``table``'s one-prompt
    steps: a sample's time less ``table``'s at its tokens (at its last point for samples past
    it) is ``per_pair_s * (its pairs - one prompt's of its tokens up to the last point) +
    per_chunk_s * (chunks - 1) + beyond_s_per_token * (its tokens past the last point)``.
    ``beyond_s_per_token`` is None without samples past the table, all 0 without samples."""
    if not samples:
        return 0.0, 0.0, None
    from scipy.optimize import nnls

    last = table.tokens[-1]
    rows, residual = [], []
    for s in samples:
        chunks, n = s.prefill_chunks(), s.prefill_tokens
        rows.append((sum(attended_pairs(a, b) for a, b in chunks) - _one_prompt(min(n, last)),
                     max(0, len(chunks) - 1), max(0, n - last)))
        residual.append(s.seconds - table.table(min(n, last)))
    a = np.asarray(rows, dtype=np.float64)
    beyond = bool(a[:, 2].any())
    coef, _ = nnls(a if beyond else a[:, :2], np.asarray(residual))
    return float(coef[0]), float(coef[1]), float(coef[2]) if beyond else None


@dataclass(frozen=True, slots=True)
class ServingCosts:
    """What the serving path (scheduler loop, step hand-off, token fan-out, streaming, gRPC)
    adds to the engine, measured in a live serving session (``emoe.rpc.serving_profile``).

    ``step_s`` per engine step and ``token_s`` per token streamed in it are added to the step's
    duration; ``ingress_s`` + ``ingress_per_stream_s`` x the streams running pass between a
    client sending a request and the server accepting it (``ingress``), ``egress_s`` +
    ``egress_per_stream_s`` x the tokens the step streamed between the end of the step that
    made a token and the client receiving it (``egress``). ``engine_scale``: a served step takes this times the standalone step model (the engine
    shares its interpreter with the serving path).
    """

    step_s: float
    token_s: float
    ingress_s: float
    egress_s: float
    engine_scale: float = 1.0
    ingress_per_stream_s: float = 0.0
    egress_per_stream_s: float = 0.0

    def cycle_s(self, step_model_s: float, streamed: int) -> float:
        """A served cycle (a step's start to the next one's) of a step the standalone step
        model puts at ``step_model_s`` that streamed ``streamed`` tokens."""
        return self.engine_scale * step_model_s + self.step_s + self.token_s * streamed

    def ingress(self, streams: int) -> float:
        """Send to acceptance of a request that arrives while a step runs ``streams``
        requests: their Generate coroutines share the event loop (and the interpreter) that
        accepts it."""
        return self.ingress_s + self.ingress_per_stream_s * streams

    def egress(self, streamed: int) -> float:
        """Step end to the client's receipt of a token made in a step that streamed
        ``streamed`` tokens: it goes out behind the others."""
        return self.egress_s + self.egress_per_stream_s * streamed


@dataclass(frozen=True, slots=True)
class HandlerOverhead:
    """What the expert handler (``OffloadedExperts``, which serves every planner but ``all``)
    adds to an engine step with nothing fetched: ``step_s`` per step, ``decode_s`` per decoding
    request and ``prefill_token_s`` per prompt token, over the step table's all-resident engine.

    Measured (``emoe profile``) as interleaved rounds of the same steps on the plain engine and
    on one whose handler keeps part of the experts resident (miss policy reroute); a fetch on a
    miss costs ``pcie.latency_s`` + bytes / bandwidth on top of this.
    """

    step_s: float
    decode_s: float
    prefill_token_s: float

    def seconds(self, prefill_tokens: int, decode_tokens: int, iterations: int = 1) -> float:
        """Over ``iterations`` iterations of ``decode_tokens`` decodes, the first one with
        ``prefill_tokens`` prompt tokens too."""
        return (iterations * (self.step_s + self.decode_s * decode_tokens)
                + self.prefill_token_s * prefill_tokens)


@dataclass(frozen=True, slots=True)
class EngineProfile:
    """A parsed profile. ``None`` means "not measured: keep the preset's value"."""

    model: str = ""
    device: str = ""
    provenance: str = ""
    step_time: dict[str, float] = field(default_factory=dict)
    hbm_bandwidth_bytes_per_s: float | None = None
    pcie_bandwidth_bytes_per_s: float | None = None
    pcie_latency_s: float | None = None
    predictor_s: float | None = None
    memory: dict[str, int] = field(default_factory=dict)
    samples: tuple[StepSample, ...] = ()
    engine: EngineSetup | None = None
    step_table: StepTimes | None = None
    serving: ServingCosts | None = None
    offload: HandlerOverhead | None = None
    path: str = "profile"

    def check_model(self, model: ModelSpec) -> None:
        """Refuse a profile measured on a model of another shape than ``model``, naming
        what differs (a profile without an ``engine`` section cannot be checked)."""
        e = self.engine
        if e is None:
            return
        ours = (e.num_layers, e.num_experts, e.top_k, e.hidden_size)
        theirs = (model.num_layers, model.num_experts, model.top_k, model.hidden_size)
        names = ("layers", "experts", "top_k", "hidden_size")
        diff = [f"{n} {a} vs {b}" for n, a, b in zip(names, ours, theirs) if a != b and b]
        if diff:
            raise ConfigError(
                f"{self.path}: measured on model {e.model!r} ({e.shape()}); the model here, "
                f"{model.name!r}, differs: {', '.join(diff)} (profile vs model). Profile "
                f"this model: emoe profile --checkpoint DIR")

    def check_threads(self, threads: int, what: str = "the engine here") -> None:
        """Refuse a profile measured with another engine thread count than ``threads``."""
        if self.engine is not None and threads and self.engine.threads != threads:
            raise ConfigError(
                f"{self.path}: measured with {self.engine.threads} engine thread(s); {what} "
                f"runs {threads}. Profile with --threads {threads}, or run with "
                f"--threads {self.engine.threads}")

    def coefficients(self) -> dict[str, float]:
        """Step-time coefficients: those given, else a fit of the samples, else none."""
        if self.step_time:
            return dict(self.step_time)
        if self.samples:
            return fit_step_time(self.samples)
        return {}

    def apply(self, hardware: HardwareSpec, model: ModelSpec) -> tuple[HardwareSpec, ModelSpec]:
        """The preset pair with every measured figure substituted."""
        hw: dict[str, object] = dict(self.coefficients())
        if hw:
            # Measured step times already include the weight read at the profiled residency.
            hw["hbm_bandwidth_bytes_per_s"] = self.hbm_bandwidth_bytes_per_s or 0.0
        for name in ("pcie_bandwidth_bytes_per_s", "pcie_latency_s", "predictor_s"):
            value = getattr(self, name)
            if value is not None:
                hw[name] = value
        if "gpu_memory_bytes" in self.memory:
            hw["gpu_memory_bytes"] = self.memory["gpu_memory_bytes"]
        source = f"engine profile ({self.device or 'unknown device'}): {self.provenance}"
        hw["provenance"] = f"{source}; unmeasured fields from preset {hardware.name}"
        new_model = model
        model_fields = {k: v for k, v in self.memory.items() if k != "gpu_memory_bytes"}
        if model_fields:
            new_model = dataclasses.replace(
                model, **model_fields, provenance=f"{model.provenance}; memory from {source}")
        return dataclasses.replace(hardware, **hw), new_model

    def to_json(self) -> dict:
        doc: dict[str, object] = {"format": PROFILE_FORMAT, "version": PROFILE_VERSION,
                                  "model": self.model, "device": self.device,
                                  "provenance": self.provenance}
        if self.step_time or self.hbm_bandwidth_bytes_per_s is not None:
            doc["step_time"] = dict(self.step_time)
            if self.hbm_bandwidth_bytes_per_s is not None:
                doc["step_time"]["hbm_bandwidth_bytes_per_s"] = self.hbm_bandwidth_bytes_per_s
        if self.samples:
            doc["samples"] = [s.to_json() for s in self.samples]
        pcie = {k: getattr(self, attr) for k, attr in _PCIE_FIELDS.items()
                if getattr(self, attr) is not None}
        if pcie:
            doc["pcie"] = pcie
        if self.memory:
            doc["memory"] = dict(self.memory)
        if self.predictor_s is not None:
            doc["predictor_s"] = self.predictor_s
        if self.engine is not None:
            doc["engine"] = dataclasses.asdict(self.engine)
        if self.step_table is not None:
            doc["step_table"] = {"tokens": list(self.step_table.tokens),
                                 "seconds": list(self.step_table.seconds),
                                 "per_decode_s": self.step_table.per_decode_s,
                                 "per_context_token_s": self.step_table.per_context_token_s,
                                 "per_pair_s": self.step_table.per_pair_s,
                                 "per_chunk_s": self.step_table.per_chunk_s}
            if self.step_table.beyond_s_per_token is not None:
                doc["step_table"]["beyond_s_per_token"] = self.step_table.beyond_s_per_token
            if self.step_table.decode_batches:
                doc["step_table"]["decode_batches"] = list(self.step_table.decode_batches)
                doc["step_table"]["decode_base_s"] = list(self.step_table.decode_base_s)
        if self.serving is not None:
            doc["serving"] = dataclasses.asdict(self.serving)
        if self.offload is not None:
            doc["offload"] = dataclasses.asdict(self.offload)
        return doc


def fit_step_time(samples: "list[StepSample] | tuple[StepSample, ...]") -> dict[str, float]:
    """Non-negative least-squares fit of the linear step-time model to measured steps, those
    whose prefill is one prompt from its start (samples with ``chunks`` inform the step
    table's costs of several prompts, not the scheduler's per-token estimates)."""
    samples = [s for s in samples if not s.chunks]
    if len(samples) < len(STEP_TIME_FIELDS):
        raise ConfigError(f"profile samples: need at least {len(STEP_TIME_FIELDS)} steps without "
                          f"chunks to fit {', '.join(STEP_TIME_FIELDS)}; got {len(samples)}")
    from scipy.optimize import nnls

    a = np.array([[1.0, s.prefill_tokens, s.decode_tokens, s.context_tokens] for s in samples])
    b = np.array([s.seconds for s in samples])
    coef, _ = nnls(a, b)
    return dict(zip(STEP_TIME_FIELDS, map(float, coef)))


def write_profile(profile: EngineProfile, path: "str | Path") -> None:
    Path(path).write_text(json.dumps(profile.to_json(), indent=2) + "\n")


def _table_points(path: Path, table: dict, xs_name: str, ys_name: str, number,
                  least: int = 0) -> tuple[tuple[int, ...], tuple[float, ...]]:
    """``step_table``'s lists ``xs_name`` (increasing whole numbers, from ``least``) and
    ``ys_name`` (non-negative, as many), validated."""
    xs_raw, ys_raw = table.get(xs_name), table.get(ys_name)
    if not (isinstance(xs_raw, list) and isinstance(ys_raw, list) and xs_raw
            and len(xs_raw) == len(ys_raw)):
        raise ConfigError(f"{path}: field 'step_table': '{xs_name}' and '{ys_name}' must be "
                          "lists of the same length, at least one entry")
    xs = [int(number(f"step_table.{xs_name}[{i}]", x, True)) for i, x in enumerate(xs_raw)]
    if xs[0] < least or any(b <= a for a, b in zip(xs, xs[1:])):
        bound = f" from {least} or more" if least else ""
        raise ConfigError(f"{path}: field 'step_table.{xs_name}' must increase{bound}, got {xs}")
    return tuple(xs), tuple(number(f"step_table.{ys_name}[{i}]", y) for i, y in enumerate(ys_raw))


def load_profile(path: "str | Path") -> EngineProfile:
    """Parse and validate a profile file; errors name the file and the field."""
    path = Path(path)
    try:
        doc = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: profile file not found") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}:{exc.lineno}: not valid JSON: {exc.msg}") from None
    if not isinstance(doc, dict) or doc.get("format") != PROFILE_FORMAT:
        raise ConfigError(f"{path}: field 'format' must be {PROFILE_FORMAT!r}")
    if doc.get("version") != PROFILE_VERSION:
        raise ConfigError(f"{path}: field 'version': {doc.get('version')!r} is not supported; "
                          f"expected {PROFILE_VERSION}")

    def number(where: str, value: object, integer: bool = False) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if not ok or value < 0 or (integer and value != int(value)):
            kind = "a non-negative integer" if integer else "a non-negative number"
            raise ConfigError(f"{path}: field {where!r}: {value!r} is not {kind}")
        return int(value) if integer else float(value)

    def section(name: str) -> dict:
        value = doc.get(name, {})
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: field {name!r} must be an object")
        return value

    step = section("step_time")
    unknown = set(step) - set(STEP_TIME_FIELDS) - {"hbm_bandwidth_bytes_per_s"}
    if unknown:
        raise ConfigError(f"{path}: step_time: unknown field(s) {sorted(unknown)}; valid: "
                          f"{', '.join(STEP_TIME_FIELDS)}, hbm_bandwidth_bytes_per_s")
    coefficients = {k: number(f"step_time.{k}", step[k]) for k in STEP_TIME_FIELDS if k in step}
    if coefficients and len(coefficients) != len(STEP_TIME_FIELDS):
        missing = [k for k in STEP_TIME_FIELDS if k not in coefficients]
        raise ConfigError(f"{path}: step_time: missing {', '.join(missing)} "
                          "(give all four coefficients, or none and raw samples to fit)")
    hbm = step.get("hbm_bandwidth_bytes_per_s")

    raw_samples = doc.get("samples", [])
    if not isinstance(raw_samples, list):
        raise ConfigError(f"{path}: field 'samples' must be a list")
    samples = []
    for i, s in enumerate(raw_samples):
        if not isinstance(s, dict):
            raise ConfigError(f"{path}: samples[{i}] must be an object")
        for k in ("prefill_tokens", "decode_tokens", "context_tokens", "seconds"):
            if k not in s:
                raise ConfigError(f"{path}: samples[{i}]: missing field {k!r}")
        prefill = int(number(f"samples[{i}].prefill_tokens", s["prefill_tokens"], True))
        chunks = s.get("chunks", [])
        if not (isinstance(chunks, list)
                and all(isinstance(c, list) and len(c) == 2 for c in chunks)):
            raise ConfigError(f"{path}: field 'samples[{i}].chunks' must be a list of "
                              "[start, tokens] pairs")
        chunks = tuple((int(number(f"samples[{i}].chunks[{j}][0]", a, True)),
                        int(number(f"samples[{i}].chunks[{j}][1]", b, True)))
                       for j, (a, b) in enumerate(chunks))
        if chunks and sum(b for _, b in chunks) != prefill:
            raise ConfigError(f"{path}: samples[{i}]: its chunks hold "
                              f"{sum(b for _, b in chunks)} tokens, not prefill_tokens {prefill}")
        samples.append(StepSample(
            prefill_tokens=prefill,
            decode_tokens=int(number(f"samples[{i}].decode_tokens", s["decode_tokens"], True)),
            context_tokens=int(number(f"samples[{i}].context_tokens", s["context_tokens"], True)),
            seconds=number(f"samples[{i}].seconds", s["seconds"]), chunks=chunks))

    pcie = section("pcie")
    memory = section("memory")
    unknown = set(memory) - set(_MEMORY_FIELDS)
    if unknown:
        raise ConfigError(f"{path}: memory: unknown field(s) {sorted(unknown)}; valid: "
                          f"{', '.join(_MEMORY_FIELDS)}")
    profile = EngineProfile(
        model=str(doc.get("model", "")),
        device=str(doc.get("device", "")),
        provenance=str(doc.get("provenance", "")),
        step_time=coefficients,
        hbm_bandwidth_bytes_per_s=None if hbm is None else number("step_time.hbm_bandwidth_bytes_per_s", hbm),
        pcie_bandwidth_bytes_per_s=(None if "bandwidth_bytes_per_s" not in pcie else
                                    number("pcie.bandwidth_bytes_per_s", pcie["bandwidth_bytes_per_s"])),
        pcie_latency_s=None if "latency_s" not in pcie else number("pcie.latency_s", pcie["latency_s"]),
        predictor_s=None if "predictor_s" not in doc else number("predictor_s", doc["predictor_s"]),
        memory={k: int(number(f"memory.{k}", v, True)) for k, v in memory.items()},
        samples=tuple(samples),
    )
    engine = section("engine")
    if engine:
        texts = ("model", "device", "dtype")
        counts = ("num_layers", "num_experts", "top_k", "hidden_size", "threads",
                  "max_batch_size", "max_seq_len")
        missing = [k for k in (*texts, *counts) if k not in engine]
        if missing:
            raise ConfigError(f"{path}: engine: missing {', '.join(missing)}")
        values = {k: str(engine[k]) for k in texts}
        values.update({k: int(number(f"engine.{k}", engine[k], True)) for k in counts})
        profile = dataclasses.replace(profile, engine=EngineSetup(**values))
    table = section("step_table")
    if table:
        decode = ((), ())  # profiles before session 13 have no decode table
        if "decode_batches" in table or "decode_base_s" in table:
            decode = _table_points(path, table, "decode_batches", "decode_base_s", number, 1)
        profile = dataclasses.replace(profile, step_table=StepTimes(
            *_table_points(path, table, "tokens", "seconds", number),
            number("step_table.per_decode_s", table.get("per_decode_s")),
            number("step_table.per_context_token_s", table.get("per_context_token_s")),
            number("step_table.per_pair_s", table.get("per_pair_s", 0.0)),
            number("step_table.per_chunk_s", table.get("per_chunk_s", 0.0)),
            None if table.get("beyond_s_per_token") is None else
            number("step_table.beyond_s_per_token", table["beyond_s_per_token"]),
            *decode))
    def costs(name: str, kind: type, defaults: dict[str, float] | None = None):
        """Section ``name`` as a ``kind`` of non-negative numbers, one per field; without
        ``defaults`` every field is required."""
        values = section(name)
        if not values:
            return None
        fields = [f.name for f in dataclasses.fields(kind)]
        unknown = set(values) - set(fields)
        if unknown:
            raise ConfigError(f"{path}: {name}: unknown field(s) {sorted(unknown)}; valid: "
                              f"{', '.join(fields)}")
        if defaults is None:
            missing = [k for k in fields if k not in values]
            if missing:
                raise ConfigError(f"{path}: {name}: missing {', '.join(missing)}")
            defaults = {}
        return kind(**{k: number(f"{name}.{k}", values.get(k, defaults.get(k)))
                       for k in fields})

    profile = dataclasses.replace(
        profile, serving=costs("serving", ServingCosts, {"engine_scale": 1.0,
                                                         "ingress_per_stream_s": 0.0,
                                                         "egress_per_stream_s": 0.0}),
        offload=costs("offload", HandlerOverhead))
    profile = dataclasses.replace(profile, path=str(path))
    if profile.pcie_bandwidth_bytes_per_s == 0:
        raise ConfigError(f"{path}: field 'pcie.bandwidth_bytes_per_s' must be positive")
    if samples and not coefficients:
        try:
            profile.coefficients()
        except ConfigError as exc:
            raise ConfigError(f"{path}: {exc}") from None
    return profile
