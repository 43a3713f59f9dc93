"""Request traces on disk: the Azure LLM trace CSV and emoe's generic CSV/JSONL format.

Readers stream: they yield one Request per row, in file order, and hold nothing else. Rows
must be in arrival order; a row that goes back in time is an error (docs/trace-format.md).
"""

from __future__ import annotations

import csv
import functools
import json
import math
import os
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import date
from typing import Any, NoReturn

from emoe.core.errors import ConfigError, TraceFormatError, UnknownNameError
from emoe.core.paths import resolve_path
from emoe.core.request import SLO, Request
from emoe.core.tasks import DEFAULT_TASKS, TaskProfile
from emoe.core.workload.taskmix import TaskMix
from emoe.core.workload.transforms import scale_rate, window

PathLike = str | os.PathLike

AZURE_COLUMNS = ("TIMESTAMP", "ContextTokens", "GeneratedTokens")
REQUIRED_COLUMNS = ("arrival_s", "input_tokens", "output_tokens")
OPTIONAL_COLUMNS = ("id", "task", "ttft_slo_s", "tpot_slo_s", "expected_output_tokens", "prompt")
JSONL_SUFFIXES = (".jsonl", ".ndjson")

_WHOLE_SECOND = re.compile(r"(\d{4}-\d{2}-\d{2})[ T](\d{2}):(\d{2}):(\d{2})")
_FRACTION = re.compile(r"\.\d{1,9}")


def read_trace(path: PathLike, *, tasks: Mapping[str, TaskProfile] | None = None,
               mix: TaskMix | None = None, seed: int = 0, start_s: float = 0.0,
               duration_s: float | None = None, rate_scale: float = 1.0) -> Iterator[Request]:
    """Stream a trace file of any supported format, detected from its suffix and header.

    Requests with arrival in [start_s, start_s + duration_s) are kept and re-based to the
    window's start, then arrivals are divided by ``rate_scale`` (2.0 = twice the rate).
    Rows without a task get one drawn from ``mix`` (default: uniform over ``tasks``), seeded.
    """
    path = resolve_path(path)
    if not os.path.isfile(path):
        raise ConfigError(f"trace {os.fspath(path)!r}: no such file")
    if str(path).endswith(JSONL_SUFFIXES):
        requests = read_generic_jsonl(path, tasks=tasks, mix=mix, seed=seed)
    else:
        with open(path, newline="") as f:
            header = next(csv.reader(f), [])
        azure = tuple(c.strip() for c in header) == AZURE_COLUMNS
        requests = (read_azure if azure else read_generic_csv)(path, tasks=tasks, mix=mix,
                                                                seed=seed)
    if start_s or duration_s is not None:
        requests = window(requests, start_s, duration_s)
    if rate_scale != 1.0:
        requests = scale_rate(requests, rate_scale)
    return requests


def read_azure(path: PathLike, *, tasks: Mapping[str, TaskProfile] | None = None,
               mix: TaskMix | None = None, seed: int = 0) -> Iterator[Request]:
    """Stream an Azure LLM inference trace (``TIMESTAMP,ContextTokens,GeneratedTokens``).

    Arrival is seconds since the first row's timestamp; task types are drawn from ``mix``.
    """
    tasks = DEFAULT_TASKS if tasks is None else tasks
    mix = TaskMix.uniform(tasks) if mix is None else mix
    profiles = {name: _task(name, tasks, "") for name in mix.names}
    draw = mix.draw(seed)
    path = os.fspath(path)
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = [c.strip() for c in next(rows, [])]
        its, ictx, igen = (_column_index(header, c, path) for c in AZURE_COLUMNS)
        width = len(header)
        origin: tuple[int, int, float] | None = None
        second, second_start = "", 0.0
        previous = 0.0
        for index, row in enumerate(rows):
            line = rows.line_num
            if len(row) != width:
                if not row:
                    continue
                _raise_width(path, line, header, row)
            stamp = row[its]
            if stamp[:19] != second:
                second = stamp[:19]
                day, seconds = _whole_second(second, stamp, path, line)
                if origin is None:
                    origin = (day, seconds, _fraction(stamp, path, line))
                second_start = (day - origin[0]) * 86400.0 + (seconds - origin[1]) - origin[2]
            arrival = second_start + _fraction(stamp, path, line)
            if arrival < previous:
                _raise_order(path, line, "TIMESTAMP", arrival, previous)
            previous = arrival
            try:
                input_tokens, output_tokens = int(row[ictx]), int(row[igen])
            except ValueError:
                input_tokens = output_tokens = 0
            if input_tokens < 1 or output_tokens < 1:
                input_tokens = _count(row[ictx], path, line, "ContextTokens")
                output_tokens = _count(row[igen], path, line, "GeneratedTokens")
            profile = profiles[next(draw)]
            yield Request(str(index), arrival, profile.name, input_tokens, output_tokens,
                          profile.slo, profile.mean_output_tokens)


def read_generic_csv(path: PathLike, *, tasks: Mapping[str, TaskProfile] | None = None,
                     mix: TaskMix | None = None, seed: int = 0) -> Iterator[Request]:
    """Stream a trace in emoe's generic CSV format (docs/trace-format.md)."""
    path = os.fspath(path)
    with open(path, newline="") as f:
        rows = csv.reader(f)
        header = [c.strip() for c in next(rows, [])]
        for column in header:
            _check_column(column, path, 1)
        for column in REQUIRED_COLUMNS:
            _column_index(header, column, path)
        build = _RowBuilder(path, tasks, mix, seed)
        width = len(header)
        for index, row in enumerate(rows):
            if len(row) != width:
                if not row:
                    continue
                _raise_width(path, rows.line_num, header, row)
            yield build(dict(zip(header, row)), rows.line_num, index)


def read_generic_jsonl(path: PathLike, *, tasks: Mapping[str, TaskProfile] | None = None,
                       mix: TaskMix | None = None, seed: int = 0) -> Iterator[Request]:
    """Stream a trace in emoe's generic JSONL format: one JSON object per line."""
    path = os.fspath(path)
    build = _RowBuilder(path, tasks, mix, seed)
    index = 0
    with open(path) as f:
        for line, text in enumerate(f, 1):
            if not text.strip():
                continue
            try:
                fields = json.loads(text)
            except json.JSONDecodeError as exc:
                raise TraceFormatError(path, line, "-", f"not valid JSON: {exc.msg} at "
                                                        f"character {exc.colno}") from None
            if not isinstance(fields, dict):
                raise TraceFormatError(path, line, "-", "expected a JSON object per line")
            for column in fields:
                _check_column(column, path, line)
            for column in REQUIRED_COLUMNS:
                if column not in fields:
                    raise TraceFormatError(path, line, column, "missing")
            yield build(fields, line, index)
            index += 1


def write_trace(path: PathLike, requests: Iterable[Request], *, slo_columns: bool = False) -> int:
    """Write requests in the generic format (JSONL if the suffix says so, else CSV); returns
    the number of rows. SLO columns are written only when asked: without them a reader takes
    each task's current SLO."""
    columns = ["arrival_s", "input_tokens", "output_tokens", "task"]
    if slo_columns:
        columns += ["ttft_slo_s", "tpot_slo_s"]
    jsonl = str(path).endswith(JSONL_SUFFIXES)
    count = 0
    with open(path, "w", newline="") as f:
        writer = None if jsonl else csv.writer(f, lineterminator="\n")
        if writer:
            writer.writerow(columns)
        for r in requests:
            values = [round(r.arrival, 6), r.input_tokens, r.output_tokens, r.task]
            if slo_columns:
                values += [r.slo.ttft_s, r.slo.tpot_s]
            if writer:
                writer.writerow(values)
            else:
                f.write(json.dumps(dict(zip(columns, values))) + "\n")
            count += 1
    return count


class _RowBuilder:
    """Turns one generic-format row (column -> cell) into a Request, checking every field."""

    def __init__(self, path: str, tasks: Mapping[str, TaskProfile] | None,
                 mix: TaskMix | None, seed: int):
        self.path = path
        self.tasks = DEFAULT_TASKS if tasks is None else tasks
        self.mix, self.seed = mix, seed
        self._draw: Iterator[str] | None = None
        self.previous = 0.0

    def __call__(self, fields: dict[str, Any], line: int, index: int) -> Request:
        path = self.path
        arrival = _seconds(fields["arrival_s"], path, line, "arrival_s", allow_zero=True)
        if arrival < self.previous:
            _raise_order(path, line, "arrival_s", arrival, self.previous)
        self.previous = arrival
        name = fields.get("task") or self._next_task()
        profile = _task(name, self.tasks, f"{path}:{line}: column 'task'")
        ttft = _optional(fields, "ttft_slo_s", _seconds, path, line)
        tpot = _optional(fields, "tpot_slo_s", _seconds, path, line)
        slo = profile.slo if ttft is None and tpot is None else SLO(
            profile.slo.ttft_s if ttft is None else ttft,
            profile.slo.tpot_s if tpot is None else tpot)
        expected = _optional(fields, "expected_output_tokens", _count, path, line)
        request_id = fields.get("id")
        request = Request(
            str(index) if request_id in (None, "") else str(request_id), arrival, profile.name,
            _count(fields["input_tokens"], path, line, "input_tokens"),
            _count(fields["output_tokens"], path, line, "output_tokens"),
            slo, profile.mean_output_tokens if expected is None else expected)
        prompt = fields.get("prompt")
        if prompt:
            request.extra["prompt"] = str(prompt)
        return request

    def _next_task(self) -> str:
        if self._draw is None:
            mix = TaskMix.uniform(self.tasks) if self.mix is None else self.mix
            self._draw = mix.draw(self.seed)
        return next(self._draw)


def _task(name: str, tasks: Mapping[str, TaskProfile], where: str) -> TaskProfile:
    try:
        return tasks[name]
    except KeyError:
        raise UnknownNameError("task", name, list(tasks), where) from None


@functools.lru_cache(maxsize=64)
def _day(text: str) -> int:
    return date.fromisoformat(text).toordinal()


def _whole_second(second: str, stamp: str, path: str, line: int) -> tuple[int, int]:
    """(day ordinal, whole seconds into the day) of a timestamp's first 19 characters."""
    match = _WHOLE_SECOND.fullmatch(second)
    try:
        if match is None:
            raise ValueError
        day_text, hours, minutes, seconds = match.groups()
        h, m, s = int(hours), int(minutes), int(seconds)
        if h > 23 or m > 59 or s > 60:
            raise ValueError
        return _day(day_text), h * 3600 + m * 60 + s
    except ValueError:
        _raise_timestamp(stamp, path, line)


def _fraction(stamp: str, path: str, line: int) -> float:
    """The fractional second after the 19-character prefix: '', or '.' and 1 to 9 digits."""
    fraction = stamp[19:]
    if not fraction:
        return 0.0
    if _FRACTION.fullmatch(fraction) is None:
        _raise_timestamp(stamp, path, line)
    return float(fraction)


def _raise_timestamp(stamp: str, path: str, line: int) -> NoReturn:
    raise TraceFormatError(path, line, "TIMESTAMP", f"bad timestamp {stamp!r}; expected "
                           "'YYYY-MM-DD HH:MM:SS[.fffffff]'")


def _count(value: Any, path: str, line: int, column: str) -> int:
    """A token count: an integer >= 1."""
    if isinstance(value, str):
        try:
            value = int(value)
        except ValueError:
            pass
    if not isinstance(value, int) or isinstance(value, bool):
        raise TraceFormatError(path, line, column, f"{value!r} is not an integer token count")
    if value < 1:
        raise TraceFormatError(path, line, column, f"{value} tokens; expected an integer >= 1")
    return value


def _seconds(value: Any, path: str, line: int, column: str, allow_zero: bool = False) -> float:
    """A finite number of seconds, > 0 (>= 0 with ``allow_zero``)."""
    try:
        if isinstance(value, bool):
            raise ValueError
        seconds = float(value)
    except (TypeError, ValueError):
        raise TraceFormatError(path, line, column,
                               f"{value!r} is not a number of seconds") from None
    if not math.isfinite(seconds) or seconds < 0.0 or (seconds == 0.0 and not allow_zero):
        expected = ">= 0" if allow_zero else "> 0"
        raise TraceFormatError(path, line, column,
                               f"{value!r}; expected a finite number {expected}")
    return seconds


def _optional(fields: dict[str, Any], column: str, parse: Callable[..., Any], path: str,
              line: int) -> Any:
    value = fields.get(column)
    return None if value is None or value == "" else parse(value, path, line, column)


def _check_column(column: str, path: str, line: int) -> None:
    if column not in REQUIRED_COLUMNS and column not in OPTIONAL_COLUMNS:
        raise TraceFormatError(path, line, column, "unknown column; accepted: "
                               + ", ".join(REQUIRED_COLUMNS + OPTIONAL_COLUMNS))


def _column_index(header: list[str], column: str, path: str) -> int:
    try:
        return header.index(column)
    except ValueError:
        raise TraceFormatError(path, 1, column,
                               f"missing from header {','.join(header)!r}") from None


def _raise_width(path: str, line: int, header: list[str], row: list[str]) -> None:
    column = header[len(row)] if len(row) < len(header) else "-"
    raise TraceFormatError(path, line, column,
                           f"row has {len(row)} cells, header has {len(header)}")


def _raise_order(path: str, line: int, column: str, arrival: float, previous: float) -> None:
    raise TraceFormatError(path, line, column,
                           f"arrival {arrival:.6f} s is before the previous row's {previous:.6f} s;"
                           " rows must be in arrival order (sort the file by this column)")
