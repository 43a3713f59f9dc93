from collections import Counter

import pytest

from emoe.core.errors import TraceFormatError
from emoe.core.tasks import DEFAULT_TASKS
from emoe.core.workload import TaskMix, read_azure, read_trace

from .conftest import CODE, CONV

pytestmark = pytest.mark.skipif(not CONV.exists(), reason="shared Azure traces not present")

# Seconds between the first and last TIMESTAMP of each file, computed by hand:
# conv: 18:15:46.6805900 -> 19:14:08.4025270; code: 18:17:03.9799600 -> 19:14:19.9280160.
CONV_SPAN = 58 * 60 + 21.7219370
CODE_SPAN = 57 * 60 + 15.9480560


@pytest.mark.parametrize("path, rows, span, first, last", [
    (CONV, 19366, CONV_SPAN, (374, 44), (197, 183)),
    (CODE, 8819, CODE_SPAN, (4808, 10), (549, 173)),
])
def test_reads_every_row_with_arrivals_from_trace_start(path, rows, span, first, last):
    requests = list(read_trace(path))
    assert len(requests) == rows
    assert requests[0].arrival == 0.0
    assert requests[-1].arrival == pytest.approx(span, abs=1e-6)
    assert (requests[0].input_tokens, requests[0].output_tokens) == first
    assert (requests[-1].input_tokens, requests[-1].output_tokens) == last
    assert all(a.arrival <= b.arrival for a, b in zip(requests, requests[1:]))
    assert [r.id for r in requests[:3]] == ["0", "1", "2"]


def test_second_row_keeps_seven_fractional_digits():
    second = list(read_azure(CONV))[1]
    assert second.arrival == pytest.approx(50.9951690 - 46.6805900, abs=1e-9)


def test_tasks_and_slos_come_from_the_mix_and_task_profiles():
    mix = TaskMix.parse("classification=1,summarization=3")
    requests = list(read_trace(CONV, mix=mix, seed=7))
    counts = Counter(r.task for r in requests)
    assert set(counts) == {"classification", "summarization"}
    assert counts["summarization"] / len(requests) == pytest.approx(0.75, abs=0.02)
    for r in requests[:50]:
        assert r.slo == DEFAULT_TASKS[r.task].slo
        assert r.expected_output_tokens == DEFAULT_TASKS[r.task].mean_output_tokens


def test_task_assignment_is_deterministic_per_seed():
    tasks = lambda seed: [r.task for r in read_trace(CODE, seed=seed)]  # noqa: E731
    assert tasks(3) == tasks(3)
    assert tasks(3) != tasks(4)


def test_window_keeps_and_rebases_the_requested_span():
    everything = list(read_trace(CONV))
    inside = [r for r in everything if 600.0 <= r.arrival < 900.0]
    window = list(read_trace(CONV, start_s=600.0, duration_s=300.0))
    assert [r.id for r in window] == [r.id for r in inside]
    assert [r.arrival for r in window] == pytest.approx([r.arrival - 600.0 for r in inside])
    assert 0.0 <= window[0].arrival and window[-1].arrival < 300.0


def test_rate_scaling_compresses_arrivals():
    base = list(read_trace(CODE, duration_s=600.0))
    fast = list(read_trace(CODE, duration_s=600.0, rate_scale=4.0))
    assert [r.id for r in fast] == [r.id for r in base]
    assert [r.arrival for r in fast] == pytest.approx([r.arrival / 4.0 for r in base])
    assert len(base) / base[-1].arrival * 4 == pytest.approx(len(fast) / fast[-1].arrival)


@pytest.mark.parametrize("row, column, problem", [
    ("2023-11-16 18:15:47.1,12x,5", "ContextTokens", "not an integer"),
    ("2023-11-16 18:15:47.1,12,-5", "GeneratedTokens", "expected an integer >= 1"),
    ("2023-11-16 18:15:47.1,0,5", "ContextTokens", "expected an integer >= 1"),
    ("2023-11-16 18:15:47.1,12,5.5", "GeneratedTokens", "not an integer"),
    ("2023-11-16 18:75:47.1,12,5", "TIMESTAMP", "bad timestamp"),
    ("2023-11-16 18:15:47.1234567890,12,5", "TIMESTAMP", "bad timestamp"),
    ("2023-13-16 18:15:47.1,12,5", "TIMESTAMP", "bad timestamp"),
    ("16/11/2023 18:15:47,12,5", "TIMESTAMP", "bad timestamp"),
    ("2023-11-16 18:15:45.9,12,5", "TIMESTAMP", "before the previous row"),
    ("2023-11-16 18:15:47.1,12", "GeneratedTokens", "row has 2 cells"),
])
def test_malformed_azure_rows_name_file_line_and_column(write, row, column, problem):
    path = write("bad.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                            "2023-11-16 18:15:46.6805900,374,44\n"
                            "2023-11-16 18:15:46.9,10,2\n" + row + "\n")
    with pytest.raises(TraceFormatError) as caught:
        list(read_azure(path))
    err = caught.value
    assert (err.path, err.line, err.column) == (str(path), 4, column)
    assert f"{path}:4: column {column!r}" in str(err) and problem in str(err)


def test_azure_header_without_a_column_is_an_error(write):
    path = write("bad.csv", "TIMESTAMP,ContextTokens\n2023-11-16 18:15:46.6805900,374\n")
    with pytest.raises(TraceFormatError, match="column 'GeneratedTokens': missing"):
        list(read_azure(path))


def test_timestamps_across_midnight_and_without_fraction(write):
    path = write("t.csv", "TIMESTAMP,ContextTokens,GeneratedTokens\n"
                          "2023-11-16 23:59:59.5000000,1,1\n2023-11-17 00:00:01,1,1\n")
    assert [r.arrival for r in read_azure(path)] == pytest.approx([0.0, 1.5])
