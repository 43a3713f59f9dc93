"""Malformed traces through ``emoe sim``: one ``file:line: column`` message and exit code 2,
never a traceback, whether the run is in this process or in worker processes."""

import pickle

import pytest

from emoe.cli import main
from emoe.core.errors import TraceFormatError, UnknownNameError

GENERIC = "arrival_s,input_tokens,output_tokens,task\n0.0,10,5,qa\n"
AZURE = "TIMESTAMP,ContextTokens,GeneratedTokens\n2023-11-16 18:15:46.6805900,374,44\n"

# (file name, text, line of the error, column named in the message)
MALFORMED = [
    ("arrival-text.csv", GENERIC + "soon,10,5,qa\n", 3, "arrival_s"),
    ("arrival-negative.csv", GENERIC + "-1,10,5,qa\n", 3, "arrival_s"),
    ("arrival-nan.csv", GENERIC + "nan,10,5,qa\n", 3, "arrival_s"),
    ("arrival-inf.csv", GENERIC + "inf,10,5,qa\n", 3, "arrival_s"),
    ("arrival-backwards.csv", GENERIC + "1.0,10,5,qa\n0.5,10,5,qa\n", 4, "arrival_s"),
    ("input-zero.csv", GENERIC + "1,0,5,qa\n", 3, "input_tokens"),
    ("input-negative.csv", GENERIC + "1,-3,5,qa\n", 3, "input_tokens"),
    ("input-fraction.csv", GENERIC + "1,1.5,5,qa\n", 3, "input_tokens"),
    ("input-text.csv", GENERIC + "1,many,5,qa\n", 3, "input_tokens"),
    ("output-zero.csv", GENERIC + "1,10,0,qa\n", 3, "output_tokens"),
    ("output-empty.csv", GENERIC + "1,10,,qa\n", 3, "output_tokens"),
    ("too-few-cells.csv", GENERIC + "1,10\n", 3, "output_tokens"),
    ("too-many-cells.csv", GENERIC + "1,10,5,qa,extra\n", 3, "-"),
    ("unknown-task.csv", GENERIC + "1,10,5,poetry\n", 3, "task"),
    ("unknown-column.csv", "arrival_s,input_tokens,output_tokens,ttft_slo\n0,1,1,1\n", 1,
     "ttft_slo"),
    ("missing-column.csv", "arrival_s,input_tokens\n0,1\n", 1, "output_tokens"),
    ("slo-zero.csv", "arrival_s,input_tokens,output_tokens,ttft_slo_s\n0,1,1,0\n", 2,
     "ttft_slo_s"),
    ("slo-text.csv", "arrival_s,input_tokens,output_tokens,tpot_slo_s\n0,1,1,fast\n", 2,
     "tpot_slo_s"),
    ("expected-zero.csv", "arrival_s,input_tokens,output_tokens,expected_output_tokens\n"
     "0,1,1,0\n", 2, "expected_output_tokens"),
    ("not-json.jsonl", '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1}\n{oops\n', 2,
     "-"),
    ("json-list.jsonl", "[1, 2, 3]\n", 1, "-"),
    ("json-missing.jsonl", '{"arrival_s": 0, "input_tokens": 1}\n', 1, "output_tokens"),
    ("json-bool.jsonl", '{"arrival_s": 0, "input_tokens": true, "output_tokens": 1}\n', 1,
     "input_tokens"),
    ("json-string-tokens.jsonl", '{"arrival_s": 0, "input_tokens": "x", "output_tokens": 1}\n',
     1, "input_tokens"),
    ("json-unknown-task.jsonl",
     '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1, "task": "poetry"}\n', 1, "task"),
    ("json-unknown-field.jsonl",
     '{"arrival_s": 0, "input_tokens": 1, "output_tokens": 1, "color": "red"}\n', 1, "color"),
    ("azure-timestamp.csv", AZURE + "yesterday,374,44\n", 3, "TIMESTAMP"),
    ("azure-fraction.csv", AZURE + "2023-11-16 18:15:47.12345678901,374,44\n", 3, "TIMESTAMP"),
    ("azure-hour.csv", AZURE + "2023-11-16 25:15:47,374,44\n", 3, "TIMESTAMP"),
    ("azure-backwards.csv", AZURE + "2023-11-16 18:15:45,374,44\n", 3, "TIMESTAMP"),
    ("azure-context.csv", AZURE + "2023-11-16 18:15:47,0,44\n", 3, "ContextTokens"),
    ("azure-generated.csv", AZURE + "2023-11-16 18:15:47,374,lots\n", 3, "GeneratedTokens"),
    ("azure-cells.csv", AZURE + "2023-11-16 18:15:47,374\n", 3, "GeneratedTokens"),
]


@pytest.mark.parametrize("name, text, line, column", MALFORMED, ids=[m[0] for m in MALFORMED])
def test_a_malformed_trace_is_one_file_line_message(tmp_path, capsys, name, text, line, column):
    trace = tmp_path / name
    trace.write_text(text)
    rc = main(["sim", "--trace", str(trace), "--scheduler", "fcfs", "--experts", "emoe",
               "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{trace}:{line}: column {column!r}" in err, err
    assert "Traceback" not in err and "TypeError" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("extra", [["--jobs", "2"], ["--search", "capacity", "--jobs", "2"]])
def test_the_message_is_the_same_from_worker_processes(tmp_path, capsys, extra):
    trace = tmp_path / "late.csv"
    trace.write_text(GENERIC + "".join(f"{i},10,5,qa\n" for i in range(1, 30))
                     + "31,10,0,qa\n")
    rc = main(["sim", "--trace", str(trace), "--scheduler", "fcfs,emoe", "--experts", "emoe",
               "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{trace}:32: column 'output_tokens'" in err and "Traceback" not in err


def test_errors_survive_pickling_with_their_fields():
    error = pickle.loads(pickle.dumps(TraceFormatError("t.csv", 7, "arrival_s", "bad")))
    assert str(error) == "t.csv:7: column 'arrival_s': bad"
    assert (error.path, error.line, error.column) == ("t.csv", 7, "arrival_s")
    error = pickle.loads(pickle.dumps(UnknownNameError("task", "x", ["qa"], "t.csv:2")))
    assert str(error) == "t.csv:2: unknown task 'x'; valid: qa" and error.valid == ["qa"]


@pytest.mark.parametrize("name, text, line, column", MALFORMED[::4], ids=[m[0] for m in MALFORMED[::4]])
def test_replay_of_a_malformed_trace_is_one_message_before_anything_is_sent(
        tmp_path, capsys, name, text, line, column):
    trace = tmp_path / name
    trace.write_text(text)
    rc = main(["replay", "--trace", str(trace), "--target", "127.0.0.1:9"])  # nothing listens
    err = capsys.readouterr().err
    assert rc == 2
    assert f"{trace}:{line}: column {column!r}" in err and "Traceback" not in err, err
    assert len(err.strip().splitlines()) == 1
