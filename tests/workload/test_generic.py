import json

import pytest

from emoe.core.errors import ConfigError, TraceFormatError, UnknownNameError
from emoe.core.request import SLO
from emoe.core.tasks import DEFAULT_TASKS, TaskProfile
from emoe.core.workload import TaskMix, read_trace, write_trace

CSV = """arrival_s,input_tokens,output_tokens,task,ttft_slo_s,tpot_slo_s,id,expected_output_tokens,prompt
0.0,100,20,qa,,,,,
0.5,200,30,summarization,1.0,0.05,req-b,25,"Summarize: a, b
and c"
0.5,50,4,classification,,0.3,,,
"""


def test_generic_csv_columns_become_request_fields(write):
    a, b, c = read_trace(write("t.csv", CSV))
    assert (a.id, a.arrival, a.task, a.input_tokens, a.output_tokens) == ("0", 0.0, "qa", 100, 20)
    assert a.slo == DEFAULT_TASKS["qa"].slo
    assert a.expected_output_tokens == DEFAULT_TASKS["qa"].mean_output_tokens
    assert (b.id, b.slo, b.expected_output_tokens) == ("req-b", SLO(1.0, 0.05), 25)
    assert b.extra["prompt"] == "Summarize: a, b\nand c"
    assert c.slo == SLO(DEFAULT_TASKS["classification"].slo.ttft_s, 0.3)
    assert c.id == "2" and "prompt" not in c.extra


def test_jsonl_reads_like_csv(write):
    rows = [{"arrival_s": 0, "input_tokens": 100, "output_tokens": 20, "task": "qa"},
            {"arrival_s": 1.25, "input_tokens": 7, "output_tokens": 3, "task": "similarity",
             "ttft_slo_s": 0.5, "id": 17, "prompt": "same meaning?"}]
    path = write("t.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    a, b = read_trace(path)
    assert (a.arrival, a.task, a.input_tokens, a.output_tokens) == (0.0, "qa", 100, 20)
    assert (b.id, b.arrival, b.slo.ttft_s, b.extra["prompt"]) == ("17", 1.25, 0.5, "same meaning?")
    assert b.slo.tpot_s == DEFAULT_TASKS["similarity"].slo.tpot_s


def test_rows_without_task_get_one_from_the_mix(write):
    text = "arrival_s,input_tokens,output_tokens\n" + "".join(f"{i},10,5\n" for i in range(200))
    path = write("t.csv", text)
    mix = TaskMix.parse("qa=1,conversation=1")
    tasks = [r.task for r in read_trace(path, mix=mix, seed=1)]
    assert set(tasks) == {"qa", "conversation"}
    assert tasks == [r.task for r in read_trace(path, mix=mix, seed=1)]


def test_custom_task_dict_is_used_for_names_and_slos(write):
    tasks = {"translate": TaskProfile("translate", 50, SLO(3.0, 0.1))}
    path = write("t.csv", "arrival_s,input_tokens,output_tokens,task\n0,10,5,translate\n")
    (request,) = read_trace(path, tasks=tasks)
    assert request.slo == SLO(3.0, 0.1) and request.expected_output_tokens == 50


def test_write_then_read_round_trips(tmp_path, write):
    original = list(read_trace(write("t.csv", CSV)))
    for name in ("copy.csv", "copy.jsonl"):
        assert write_trace(tmp_path / name, original, slo_columns=True) == 3
        again = list(read_trace(tmp_path / name))
        assert [(r.arrival, r.task, r.input_tokens, r.output_tokens, r.slo) for r in again] == \
               [(r.arrival, r.task, r.input_tokens, r.output_tokens, r.slo) for r in original]


HEADER = "arrival_s,input_tokens,output_tokens,task,ttft_slo_s,tpot_slo_s,expected_output_tokens\n"


@pytest.mark.parametrize("row, column, problem", [
    ("1.0,ten,5,qa,,,", "input_tokens", "not an integer"),
    ("1.0,10,-5,qa,,,", "output_tokens", "expected an integer >= 1"),
    ("1.0,10,5,qa,,,0", "expected_output_tokens", "expected an integer >= 1"),
    ("soon,10,5,qa,,,", "arrival_s", "not a number"),
    ("-1,10,5,qa,,,", "arrival_s", "expected a finite number >= 0"),
    ("nan,10,5,qa,,,", "arrival_s", "finite"),
    ("0.1,10,5,qa,,,", "arrival_s", "before the previous row"),
    ("1.0,10,5,qa,0,,", "ttft_slo_s", "expected a finite number > 0"),
    ("1.0,10,5,qa,,fast,", "tpot_slo_s", "not a number"),
    ("1.0,10,5", "task", "row has 3 cells"),
])
def test_malformed_generic_csv_rows_name_file_line_and_column(write, row, column, problem):
    path = write("bad.csv", HEADER + "0.5,10,5,qa,,,\n" + row + "\n")
    with pytest.raises(TraceFormatError) as caught:
        list(read_trace(path))
    err = caught.value
    assert (err.path, err.line, err.column) == (str(path), 3, column)
    assert problem in str(err)


@pytest.mark.parametrize("line, column, problem", [
    ('{"arrival_s": 1, "input_tokens": 10.5, "output_tokens": 5}', "input_tokens", "not an integer"),
    ('{"arrival_s": 1, "input_tokens": true, "output_tokens": 5}', "input_tokens", "not an integer"),
    ('{"arrival_s": "x", "input_tokens": 1, "output_tokens": 5}', "arrival_s", "not a number"),
    ('{"arrival_s": 1, "input_tokens": 10}', "output_tokens", "missing"),
    ('{"arrival_s": 1, "input_tokens": 1, "output_tokens": 5, "colour": 1}', "colour", "unknown column"),
    ('{"arrival_s": 1, "input_tokens": 1,', "-", "not valid JSON"),
    ('[1, 2, 3]', "-", "expected a JSON object"),
])
def test_malformed_jsonl_lines_name_file_line_and_column(write, line, column, problem):
    path = write("bad.jsonl", '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n\n' + line)
    with pytest.raises(TraceFormatError) as caught:
        list(read_trace(path))
    assert (caught.value.line, caught.value.column) == (3, column)
    assert problem in str(caught.value)


def test_header_problems_are_reported_on_line_1(write):
    with pytest.raises(TraceFormatError, match=r"bad.csv:1: column 'output_tokens': missing"):
        list(read_trace(write("bad.csv", "arrival_s,input_tokens\n0,1\n")))
    with pytest.raises(TraceFormatError, match=r"bad.csv:1: column 'ttft_slo': unknown column"):
        list(read_trace(write("bad.csv", "arrival_s,input_tokens,output_tokens,ttft_slo\n")))


def test_unknown_task_names_list_the_valid_ones_and_where(write):
    path = write("bad.csv", "arrival_s,input_tokens,output_tokens,task\n0,1,1,qa\n1,1,1,poetry\n")
    with pytest.raises(UnknownNameError) as caught:
        list(read_trace(path))
    assert str(caught.value).startswith(f"{path}:3: column 'task': unknown task 'poetry'; valid: ")
    assert caught.value.valid == sorted(DEFAULT_TASKS)


def test_window_and_rate_arguments_are_checked(write):
    path = write("t.csv", CSV)
    with pytest.raises(ConfigError, match="rate scale"):
        list(read_trace(path, rate_scale=0.0))
    with pytest.raises(ConfigError, match="window duration"):
        list(read_trace(path, duration_s=-1.0))


def test_a_missing_trace_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="no such file"):
        read_trace(tmp_path / "absent.csv")
