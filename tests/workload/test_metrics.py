import csv
import dataclasses
import json
import math

import numpy as np
import pytest

from emoe.core.errors import ConfigError
from emoe.core.metrics import (REQUEST_COLUMNS, MetricsCollector, QuantileSketch, SystemCounters,
                               format_comparison, format_summary, request_row)
from emoe.core.request import Request, RequestStatus
from emoe.core.tasks import DEFAULT_TASKS


def make(id, task, arrival, status=RequestStatus.FINISHED, admitted=None, first=None,
         finished=None, generated=0, reason="", hits=0, misses=0, w_hits=0.0, w_choices=0.0):
    r = Request(id, arrival, task, 100, generated, DEFAULT_TASKS[task].slo)
    r.status, r.admitted_at, r.first_token_at, r.finished_at = status, admitted, first, finished
    r.generated_tokens, r.reason = generated, reason
    r.expert_hits, r.expert_misses, r.weighted_hits, r.weighted_choices = hits, misses, w_hits, w_choices
    return r


# qa SLO: TTFT 2.0 s, TPOT 0.15 s; classification: TTFT 1.5 s, TPOT 0.2 s.
REQUESTS = [
    make("r1", "qa", 0.0, admitted=0.5, first=1.0, finished=2.0, generated=11,
         hits=30, misses=10, w_hits=20.0, w_choices=25.0),              # TTFT 1, TPOT .1: met
    make("r2", "qa", 1.0, admitted=1.5, first=4.0, finished=5.0, generated=5),  # TTFT 3: miss
    make("r3", "classification", 2.0, admitted=2.0, first=2.5, finished=2.5, generated=1,
         hits=10),                                                      # one token: met
    make("r4", "classification", 3.0, admitted=3.2, first=3.4, finished=5.4, generated=5),
    make("r5", "qa", 4.0, status=RequestStatus.REJECTED, reason="over memory budget"),
    make("r6", "qa", 5.0, status=RequestStatus.ABORTED, admitted=5.5, first=6.0, finished=6.5,
         generated=3, reason="client cancelled", hits=5, misses=5, w_hits=5.0, w_choices=10.0),
]


def summarise(counters=SystemCounters(elapsed_s=10.0), sink=None):
    with MetricsCollector(sink) as metrics:
        for r in REQUESTS:
            metrics.add(r)
        return metrics.summary(counters, name="hand")


def test_counts_attainment_goodput_and_throughput():
    s = summarise()
    assert (s.requests, s.finished, s.rejected, s.aborted, s.slo_met) == (6, 4, 1, 1, 2)
    assert s.slo_attainment == pytest.approx(2 / 6)
    assert (s.goodput_rps, s.throughput_rps) == pytest.approx((0.2, 0.4))
    assert s.output_tokens_per_s == pytest.approx((11 + 5 + 1 + 5) / 10)
    assert s.tokens_per_s == pytest.approx((4 * 100 + 22) / 10)
    assert {t: (ts.requests, ts.finished, ts.slo_met) for t, ts in s.per_task.items()} == \
           {"classification": (2, 2, 1), "qa": (4, 2, 1)}
    assert s.per_task["qa"].slo_attainment == 0.25
    assert s.not_finished == {"over memory budget": 1, "client cancelled": 1}


def test_latency_percentiles_by_hand():
    s = summarise()
    # TTFT of finished requests, sorted: 0.4, 0.5, 1.0, 3.0 (linear interpolation).
    assert (s.ttft.count, s.ttft.p50, s.ttft.p90, s.ttft.p99) == \
           (4, pytest.approx(0.75), pytest.approx(2.4), pytest.approx(2.94))
    assert (s.ttft.mean, s.ttft.max) == (pytest.approx(1.225), 3.0)
    # TPOT only where more than one token was generated: 0.1, 0.25, 0.5.
    assert (s.tpot.count, s.tpot.p50, s.tpot.mean) == (3, pytest.approx(0.25), pytest.approx(0.85 / 3))
    # E2E: 0.5, 2.0, 2.4, 4.0; queueing over every admitted request: 0, 0.2, 0.5, 0.5, 0.5.
    assert (s.e2e.count, s.e2e.p50, s.e2e.max) == (4, pytest.approx(2.2), pytest.approx(4.0))
    assert (s.queueing.count, s.queueing.p50, s.queueing.p90) == \
           (5, pytest.approx(0.5), pytest.approx(0.5))
    assert s.quantile_rel_error == 0.0


def test_expert_hit_rate_and_accuracy_proxy():
    s = summarise()
    assert (s.expert_hits, s.expert_misses) == (45, 15)
    assert s.hit_rate == pytest.approx(0.75)
    assert s.accuracy_proxy == pytest.approx(25 / 35)


def test_elapsed_defaults_to_first_arrival_to_last_event_and_counters_pass_through():
    s = summarise(SystemCounters())
    assert s.elapsed_s == pytest.approx(6.5)
    counters = SystemCounters(elapsed_s=8.0, peak_gpu_bytes=3 << 30, mean_gpu_bytes=2.0 * 2**30,
                              pcie_bytes=5 << 30, pcie_busy_s=1.5, predictor_invocations=7,
                              synthetic_routing=True)
    assert summarise(counters).system == counters


def test_empty_run_summarises_without_dividing_by_zero():
    s = MetricsCollector().summary()
    assert s.requests == 0 and math.isnan(s.slo_attainment) and math.isnan(s.ttft.p50)
    assert s.hit_rate is None and s.accuracy_proxy is None
    assert json.loads(json.dumps(s.to_dict()))["ttft"]["p50"] is None


def test_to_dict_is_json_ready():
    d = json.loads(json.dumps(summarise().to_dict()))
    assert d["slo_met"] == 2 and d["ttft"]["p50"] == pytest.approx(0.75)
    assert d["per_task"]["qa"] == {"requests": 4, "finished": 2, "slo_met": 1,
                                   "slo_attainment": 0.25}
    assert d["system"]["elapsed_s"] == 10.0 and d["not_finished"]["client cancelled"] == 1


def test_request_rows_follow_the_column_list():
    row = request_row(REQUESTS[0])
    assert tuple(row) == REQUEST_COLUMNS
    assert (row["queueing_s"], row["ttft_s"], row["tpot_s"], row["e2e_s"], row["slo_met"]) == \
           (0.5, 1.0, pytest.approx(0.1), 2.0, True)
    rejected = request_row(REQUESTS[4])
    assert (rejected["status"], rejected["reason"], rejected["ttft_s"], rejected["slo_met"]) == \
           ("rejected", "over memory budget", None, False)
    assert request_row(REQUESTS[5])["e2e_s"] is None


def test_csv_jsonl_and_parquet_sinks_hold_one_row_per_request(tmp_path):
    for name in ("rows.csv", "rows.jsonl", "rows.parquet"):
        summarise(sink=tmp_path / name)
    with open(tmp_path / "rows.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == REQUEST_COLUMNS
    assert [r["id"] for r in rows] == [r.id for r in REQUESTS]
    assert rows[4]["ttft_s"] == "" and rows[0]["slo_met"] == "True"
    lines = (tmp_path / "rows.jsonl").read_text().splitlines()
    assert [json.loads(line)["slo_met"] for line in lines] == [True, False, True, False, False, False]
    import pyarrow.parquet as pq
    table = pq.read_table(tmp_path / "rows.parquet")
    assert tuple(table.column_names) == REQUEST_COLUMNS
    assert table.column("ttft_s").to_pylist()[:4] == pytest.approx([1.0, 3.0, 0.5, 0.4])
    with pytest.raises(ConfigError, match="expected .csv, .jsonl or .parquet"):
        MetricsCollector(tmp_path / "rows.xlsx")


def test_summary_table_and_side_by_side_comparison():
    s = summarise()
    text = format_summary(s)
    assert "6 requests over 10.0 s: 4 finished, 1 rejected, 1 aborted" in text
    assert "SLO attainment 33.3%" in text and "goodput 0.200 req/s" in text
    assert "over memory budget 1" in text
    other = summarise(SystemCounters(elapsed_s=20.0, peak_gpu_bytes=2 << 30))
    other = dataclasses.replace(other, name="slower")
    lines = format_comparison([s, other]).splitlines()
    assert len(lines) == 4 and len({len(line) for line in lines}) == 1
    assert lines[0].split()[:3] == ["run", "requests", "SLO"]
    assert lines[2].split()[:4] == ["hand", "6", "33.3", "0.200"]
    assert lines[3].split()[:4] == ["slower", "6", "33.3", "0.100"]
    assert lines[3].split()[-3:] == ["2.00", "-", "-"]  # PCIe and predictor not measured


def test_histogram_quantiles_stay_within_the_relative_error_bound():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.lognormal(-2.0, 1.5, 50_000), rng.exponential(30.0, 50_000)])
    rng.shuffle(values)
    sketch = QuantileSketch(rel_error=0.01, exact_limit=1000)
    for v in values.tolist():
        sketch.add(v)
    assert not sketch.exact and sketch.count == len(values)
    for q in (0.0, 0.01, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0):
        exact = float(np.quantile(values, q))
        assert abs(sketch.quantile(q) - exact) <= 0.01 * exact + 1e-12, q
    assert sketch.mean == pytest.approx(values.mean()) and sketch.max == values.max()


def test_histogram_is_exact_while_small():
    values = [0.3, 0.1, 7.0, 2.5, 0.2]
    sketch = QuantileSketch(exact_limit=len(values))
    for v in values:
        sketch.add(v)
    assert sketch.exact
    assert [sketch.quantile(q) for q in (0.1, 0.5, 0.95)] == \
           pytest.approx([float(np.quantile(values, q)) for q in (0.1, 0.5, 0.95)], abs=0)
    with pytest.raises(ValueError):
        sketch.add(-1.0)
