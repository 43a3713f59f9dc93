"""Per-request output files, written one row at a time: CSV, JSONL or Parquet by suffix."""

from __future__ import annotations

import csv
import json
import os
from typing import Any, Protocol

from emoe.core.errors import ConfigError

REQUEST_COLUMNS: tuple[str, ...] = (
    "id", "task", "status", "reason",
    "arrival_s", "admitted_at_s", "first_token_at_s", "finished_at_s",
    "input_tokens", "output_tokens", "generated_tokens",
    "queueing_s", "ttft_s", "tpot_s", "e2e_s",
    "ttft_slo_s", "tpot_slo_s", "slo_met",
    "expert_hits", "expert_misses", "weighted_hits", "weighted_choices",
)
"""The per-request columns, in order, of every emoe results file (simulator and replay).
Times are seconds from the trace start; a time that never happened is empty (CSV), null
(JSONL, Parquet)."""

_STRING_COLUMNS = {"id", "task", "status", "reason"}
_INT_COLUMNS = {"input_tokens", "output_tokens", "generated_tokens", "expert_hits",
                "expert_misses"}


class RowSink(Protocol):
    def write(self, row: dict[str, Any]) -> None: ...
    def close(self) -> None: ...


def open_sink(path: str | os.PathLike) -> RowSink:
    """A sink for ``path``: ``.csv``, ``.jsonl`` or ``.parquet`` (Parquet needs pyarrow)."""
    suffix = os.fspath(path).rsplit(".", 1)[-1].lower()
    sinks = {"csv": _CsvSink, "jsonl": _JsonlSink, "parquet": _ParquetSink}
    if suffix not in sinks:
        raise ConfigError(f"per-request output {os.fspath(path)!r}: unknown suffix; "
                          "expected .csv, .jsonl or .parquet")
    return sinks[suffix](path)


class _CsvSink:
    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "w", newline="")
        self._writer = csv.writer(self._file, lineterminator="\n")
        self._writer.writerow(REQUEST_COLUMNS)

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow(["" if row[c] is None else row[c] for c in REQUEST_COLUMNS])

    def close(self) -> None:
        self._file.close()


class _JsonlSink:
    def __init__(self, path: str | os.PathLike):
        self._file = open(path, "w")

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")

    def close(self) -> None:
        self._file.close()


class _ParquetSink:
    """Buffers rows and writes a row group every ``batch_rows``: memory stays bounded."""

    def __init__(self, path: str | os.PathLike, batch_rows: int = 8192):
        import pyarrow as pa
        import pyarrow.parquet as pq

        self._pa = pa
        self._schema = pa.schema([
            (c, pa.string() if c in _STRING_COLUMNS else pa.int64() if c in _INT_COLUMNS
             else pa.bool_() if c == "slo_met" else pa.float64())
            for c in REQUEST_COLUMNS])
        self._writer = pq.ParquetWriter(path, self._schema)
        self._batch_rows = batch_rows
        self._rows: list[dict[str, Any]] = []

    def write(self, row: dict[str, Any]) -> None:
        self._rows.append(row)
        if len(self._rows) >= self._batch_rows:
            self._flush()

    def close(self) -> None:
        self._flush()
        self._writer.close()

    def _flush(self) -> None:
        if self._rows:
            table = self._pa.Table.from_pylist(self._rows, schema=self._schema)
            self._writer.write_table(table)
            self._rows = []

