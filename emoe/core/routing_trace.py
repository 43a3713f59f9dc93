"""Routing trace: which experts the router chose, per request, token, phase and MoE layer.

Recorded by the engine on real prompts (``RoutingTraceWriter``); read by the simulator to count
expert hits and misses exactly, and by predictor training (``read_routing_trace``). One Parquet
row per (request, token, layer), long format; see docs/routing-trace.md for the schema.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from emoe.core.errors import ConfigError, TraceFormatError
from emoe.core.paths import resolve_path

if TYPE_CHECKING:
    from emoe.core.specs import ModelSpec

ROUTING_TRACE_VERSION = "1"
PHASES = ("prefill", "decode")
_META_KEYS = ("version", "model", "num_layers", "num_experts", "top_k")


def routing_trace_schema(top_k: int, metadata: dict[str, str] | None = None) -> pa.Schema:
    return pa.schema(
        [
            pa.field("request_id", pa.string(), nullable=False),
            pa.field("task", pa.string(), nullable=False),
            pa.field("phase", pa.dictionary(pa.int8(), pa.string()), nullable=False),
            pa.field("token_index", pa.int32(), nullable=False),
            pa.field("layer", pa.int16(), nullable=False),
            pa.field("expert_ids", pa.list_(pa.int16(), top_k), nullable=False),
            pa.field("gate_scores", pa.list_(pa.float32(), top_k), nullable=False),
        ],
        metadata={f"emoe.routing_trace.{k}": v for k, v in (metadata or {}).items()},
    )


class RoutingTraceWriter:
    """Streams routing decisions to a Parquet file, one row group per ``row_group_rows`` rows.

    ``add`` takes a block of consecutive tokens of one request and phase:
    ``expert_ids`` and ``gate_scores`` are ``[tokens, layers, top_k]``, best-ranked expert first.
    """

    def __init__(self, path: "str | Path", *, num_layers: int, num_experts: int, top_k: int,
                 model: str = "", row_group_rows: int = 1 << 20):
        self.path = Path(path)
        self.num_layers, self.num_experts, self.top_k = num_layers, num_experts, top_k
        self.schema = routing_trace_schema(top_k, {
            "version": ROUTING_TRACE_VERSION, "model": model, "num_layers": str(num_layers),
            "num_experts": str(num_experts), "top_k": str(top_k)})
        self._writer = pq.ParquetWriter(self.path, self.schema)
        self._row_group_rows = row_group_rows
        self._pending: list[pa.RecordBatch] = []
        self._pending_rows = 0

    def add(self, request_id: str, task: str, phase: str, expert_ids: np.ndarray,
            gate_scores: np.ndarray, start_token: int = 0) -> None:
        if phase not in PHASES:
            raise ConfigError(f"routing trace: phase {phase!r} is not one of {', '.join(PHASES)}")
        ids = np.asarray(expert_ids)
        scores = np.asarray(gate_scores, dtype=np.float32)
        expected = (ids.shape[0], self.num_layers, self.top_k) if ids.ndim == 3 else None
        if ids.shape != expected or scores.shape != ids.shape:
            raise ConfigError(
                f"routing trace: request {request_id!r}: expert_ids {ids.shape} and gate_scores "
                f"{scores.shape} must both be [tokens, {self.num_layers}, {self.top_k}]")
        if ids.size and (ids.min() < 0 or ids.max() >= self.num_experts):
            raise ConfigError(f"routing trace: request {request_id!r}: expert id outside "
                              f"[0, {self.num_experts})")
        tokens, layers = ids.shape[0], self.num_layers
        rows = tokens * layers
        if rows == 0:
            return
        token_index = np.repeat(np.arange(start_token, start_token + tokens, dtype=np.int32), layers)
        layer = np.tile(np.arange(layers, dtype=np.int16), tokens)
        k = self.top_k
        batch = pa.RecordBatch.from_arrays(
            [
                pa.array(np.full(rows, request_id, dtype=object), pa.string()),
                pa.array(np.full(rows, task, dtype=object), pa.string()),
                pa.DictionaryArray.from_arrays(
                    pa.array(np.full(rows, PHASES.index(phase), dtype=np.int8)),
                    pa.array(PHASES, pa.string())),
                pa.array(token_index),
                pa.array(layer),
                pa.FixedSizeListArray.from_arrays(pa.array(ids.astype(np.int16).ravel()), k),
                pa.FixedSizeListArray.from_arrays(pa.array(scores.ravel()), k),
            ],
            schema=self.schema,
        )
        self._pending.append(batch)
        self._pending_rows += rows
        if self._pending_rows >= self._row_group_rows:
            self._flush()

    def _flush(self) -> None:
        if self._pending:
            self._writer.write_table(pa.Table.from_batches(self._pending, self.schema))
            self._pending, self._pending_rows = [], 0

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def __enter__(self) -> "RoutingTraceWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


@dataclass(slots=True)
class RequestRouting:
    """One request's routing: ids and gate scores ``[tokens, layers, top_k]`` per phase."""

    request_id: str
    task: str
    prefill_ids: np.ndarray
    prefill_scores: np.ndarray
    decode_ids: np.ndarray
    decode_scores: np.ndarray

    def counts(self, phase: str, num_experts: int) -> np.ndarray:
        """Token choices per layer and expert, ``[layers, experts]``."""
        ids = self.prefill_ids if phase == "prefill" else self.decode_ids
        layers = ids.shape[1]
        flat = (np.arange(layers)[None, :, None] * num_experts + ids).ravel()
        return np.bincount(flat, minlength=layers * num_experts).reshape(layers, num_experts)


@dataclass(slots=True)
class RoutingTrace:
    model: str
    num_layers: int
    num_experts: int
    top_k: int
    requests: dict[str, RequestRouting]

    def check_model(self, model: "ModelSpec", source: str) -> None:
        """Refuse a trace recorded on a model of another routing shape than ``model``."""
        if (self.num_layers, self.num_experts, self.top_k) != (
                model.num_layers, model.num_experts, model.top_k):
            raise ConfigError(
                f"{source}: recorded for {self.num_layers} layers x {self.num_experts} experts, "
                f"top-{self.top_k}; model {model.name} has {model.num_layers} x "
                f"{model.num_experts}, top-{model.top_k}")

    def by_task(self) -> dict[str, list[RequestRouting]]:
        out: dict[str, list[RequestRouting]] = {}
        for routing in self.requests.values():
            out.setdefault(routing.task, []).append(routing)
        return out


def read_routing_trace(path: "str | Path") -> RoutingTrace:
    """Read and validate a routing trace (a relative path not found here is looked up in the
    repository); errors name the file, the row and the column."""
    path = Path(resolve_path(path))
    if not path.exists():
        raise ConfigError(f"{path}: routing trace not found")
    try:
        table = pq.read_table(path)
    except pa.ArrowException as exc:
        raise ConfigError(f"{path}: not a readable Parquet file: {exc}") from None
    meta = {k.decode().removeprefix("emoe.routing_trace."): v.decode()
            for k, v in (table.schema.metadata or {}).items()}
    for key in _META_KEYS:
        if key not in meta:
            raise TraceFormatError(str(path), 0, f"emoe.routing_trace.{key}",
                                   "schema metadata missing; write traces with RoutingTraceWriter")
    if meta["version"] != ROUTING_TRACE_VERSION:
        raise TraceFormatError(str(path), 0, "emoe.routing_trace.version",
                               f"{meta['version']!r} is not supported; expected {ROUTING_TRACE_VERSION}")
    layers, experts, k = int(meta["num_layers"]), int(meta["num_experts"]), int(meta["top_k"])
    for name in ("request_id", "task", "phase", "token_index", "layer", "expert_ids", "gate_scores"):
        if name not in table.column_names:
            raise TraceFormatError(str(path), 0, name, "column missing")

    rid_codes, rid_values = _codes(table.column("request_id"))
    task_codes, task_values = _codes(table.column("task"))
    phase = _codes(table.column("phase"))
    phase_idx = np.array([PHASES.index(p) if p in PHASES else -1 for p in phase[1]])[phase[0]]
    if (phase_idx < 0).any():
        row = int(np.argmax(phase_idx < 0))
        raise TraceFormatError(str(path), row, "phase", f"must be one of {', '.join(PHASES)}")
    token = table.column("token_index").to_numpy()
    layer = table.column("layer").to_numpy()
    ids = _fixed_lists(table.column("expert_ids"), k, path, "expert_ids")
    scores = _fixed_lists(table.column("gate_scores"), k, path, "gate_scores")
    bad = (ids < 0) | (ids >= experts)
    if bad.any():
        raise TraceFormatError(str(path), int(np.argmax(bad.any(axis=1))), "expert_ids",
                               f"expert id outside [0, {experts})")

    order = np.lexsort((layer, token, phase_idx, rid_codes))
    rid_codes, phase_idx, token, layer = rid_codes[order], phase_idx[order], token[order], layer[order]
    task_codes, ids, scores = task_codes[order], ids[order], scores[order]
    if len(order) and not np.array_equal(layer, np.resize(np.arange(layers), len(layer))):
        row = int(order[np.argmax(layer != np.resize(np.arange(layers), len(layer)))])
        raise TraceFormatError(str(path), row, "layer",
                               f"every (request, phase, token) needs exactly layers 0..{layers - 1}")

    requests: dict[str, RequestRouting] = {}
    starts = np.flatnonzero(np.r_[True, rid_codes[1:] != rid_codes[:-1]]) if len(order) else []
    bounds = list(starts) + [len(order)]
    for lo, hi in zip(bounds[:-1], bounds[1:]):
        split = lo + int(np.searchsorted(phase_idx[lo:hi], 1))

        def block(a: np.ndarray, s: int, e: int) -> np.ndarray:
            return a[s:e].reshape(-1, layers, k)

        rid = rid_values[rid_codes[lo]]
        requests[rid] = RequestRouting(
            request_id=rid, task=task_values[task_codes[lo]],
            prefill_ids=block(ids, lo, split), prefill_scores=block(scores, lo, split),
            decode_ids=block(ids, split, hi), decode_scores=block(scores, split, hi))
    return RoutingTrace(model=meta["model"], num_layers=layers, num_experts=experts, top_k=k,
                        requests=requests)


def _codes(column: pa.ChunkedArray) -> tuple[np.ndarray, list[str]]:
    """Integer codes and their string values for a string or dictionary column."""
    encoded = column.combine_chunks()
    if not pa.types.is_dictionary(encoded.type):
        encoded = encoded.dictionary_encode()
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def _fixed_lists(column: pa.ChunkedArray, k: int, path: Path, name: str) -> np.ndarray:
    flat = column.combine_chunks()
    if not pa.types.is_fixed_size_list(flat.type) or flat.type.list_size != k:
        raise TraceFormatError(str(path), 0, name, f"must be a fixed-size list of {k} (top_k)")
    return flat.flatten().to_numpy(zero_copy_only=False).reshape(-1, k)
