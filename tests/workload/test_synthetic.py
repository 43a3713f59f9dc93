import tracemalloc
from collections import Counter
from itertools import islice

import numpy as np
import pytest

from emoe.core.errors import ConfigError
from emoe.core.tasks import DEFAULT_TASKS
from emoe.core.workload import (DEFAULT_INPUT_LENGTHS, DEFAULT_TRACE, LengthDist, TaskMix,
                                make_default_trace, read_trace, synthetic_requests)


def gaps(requests):
    arrivals = np.array([r.arrival for r in requests])
    return np.diff(arrivals, prepend=0.0)


def test_poisson_arrivals_have_the_requested_mean_rate_and_cv_1():
    g = gaps(synthetic_requests(rate=4.0, num_requests=40_000, seed=1))
    assert g.mean() == pytest.approx(0.25, rel=0.02)
    assert g.std() / g.mean() == pytest.approx(1.0, rel=0.03)


@pytest.mark.parametrize("cv", [0.5, 3.0])
def test_gamma_arrivals_have_the_requested_cv(cv):
    g = gaps(synthetic_requests(rate=2.0, num_requests=40_000, cv=cv, seed=2))
    assert g.mean() == pytest.approx(0.5, rel=0.05)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.08)


def test_duration_bounds_the_trace_and_arrivals_are_ordered():
    requests = list(synthetic_requests(rate=10.0, duration_s=60.0, seed=3))
    assert len(requests) == pytest.approx(600, abs=4 * 600**0.5)
    assert requests[-1].arrival < 60.0
    assert all(a.arrival <= b.arrival for a, b in zip(requests, requests[1:]))
    assert len(list(synthetic_requests(rate=10.0, duration_s=60.0, num_requests=100))) == 100


def test_task_mix_and_per_task_lengths():
    mix = TaskMix.parse("classification=1,summarization=1")
    requests = list(synthetic_requests(rate=1.0, num_requests=20_000, mix=mix, seed=4))
    by_task = {t: [r for r in requests if r.task == t] for t in mix.names}
    assert len(by_task["classification"]) / len(requests) == pytest.approx(0.5, abs=0.02)
    for task, rs in by_task.items():
        mean_in = np.mean([r.input_tokens for r in rs])
        mean_out = np.mean([r.output_tokens for r in rs])
        assert mean_in == pytest.approx(DEFAULT_INPUT_LENGTHS[task].mean, rel=0.05)
        assert mean_out == pytest.approx(DEFAULT_TASKS[task].mean_output_tokens, rel=0.1)
        assert all(r.expected_output_tokens == DEFAULT_TASKS[task].mean_output_tokens for r in rs)
        assert all(r.slo == DEFAULT_TASKS[task].slo for r in rs)


def test_custom_lengths_are_clipped_and_seeded():
    lengths = {"qa": LengthDist(100, cv=2.0, low=10, high=200)}
    make = lambda: list(synthetic_requests(  # noqa: E731
        rate=1.0, num_requests=5000, mix=TaskMix.parse("qa=1"), input_lengths=lengths,
        output_lengths=lengths, seed=5))
    requests = make()
    tokens = [r.input_tokens for r in requests] + [r.output_tokens for r in requests]
    assert min(tokens) == 10 and max(tokens) == 200
    assert [(r.arrival, r.input_tokens) for r in requests] == \
           [(r.arrival, r.input_tokens) for r in make()]


def test_bad_synthetic_arguments():
    with pytest.raises(ConfigError, match="num_requests or duration_s"):
        synthetic_requests(rate=1.0)
    with pytest.raises(ConfigError, match="rate"):
        synthetic_requests(rate=0.0, num_requests=1)
    with pytest.raises(ConfigError, match="no input length distribution for task 'qa'"):
        synthetic_requests(rate=1.0, num_requests=1, mix=TaskMix.parse("qa=1"),
                           input_lengths={"similarity": LengthDist(10)})


def test_a_huge_synthetic_trace_streams_in_constant_memory():
    requests = synthetic_requests(rate=100.0, num_requests=10**12, seed=6)
    tracemalloc.start()
    try:
        for request in islice(requests, 20_000):
            pass
        _, peak_small = tracemalloc.get_traced_memory()
        tracemalloc.reset_peak()
        for request in islice(requests, 200_000):
            pass
        _, peak_large = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert request.id == str(220_000 - 1)
    assert peak_large < 4 * 2**20
    assert peak_large < 2 * peak_small + 2**20


def test_window_and_rate_scale_stream_over_synthetic_requests():
    from emoe.core.workload import scale_rate, window
    requests = scale_rate(window(synthetic_requests(rate=5.0, num_requests=10**12, seed=7),
                                 100.0, 50.0), 2.0)
    arrivals = [r.arrival for r in requests]  # terminates: the window stops reading
    assert 0.0 <= min(arrivals) and max(arrivals) < 25.0
    assert len(arrivals) == pytest.approx(250, abs=4 * 250**0.5)


def test_shipped_default_trace_is_what_the_generator_makes(tmp_path):
    assert DEFAULT_TRACE.stat().st_size < 200_000
    assert make_default_trace(tmp_path / "again.csv") == 1200
    assert (tmp_path / "again.csv").read_bytes() == DEFAULT_TRACE.read_bytes()
    requests = list(read_trace(DEFAULT_TRACE))
    assert len(requests) == 1200 and 60.0 < requests[-1].arrival < 3600.0
    assert set(Counter(r.task for r in requests)) == set(DEFAULT_TASKS)


def test_shipped_study_trace_is_what_the_generator_makes(tmp_path):
    from emoe.core.workload import STUDY_TRACE, make_study_trace

    assert make_study_trace(tmp_path / "again.csv") == 2000
    assert (tmp_path / "again.csv").read_bytes() == STUDY_TRACE.read_bytes()
    requests = list(read_trace(STUDY_TRACE))
    gaps = np.diff([r.arrival for r in requests])
    assert 2000 / requests[-1].arrival == pytest.approx(14, rel=0.1)
    assert np.std(gaps) / np.mean(gaps) == pytest.approx(3, rel=0.2)  # bursty: CV 3
    assert set(Counter(r.task for r in requests)) == set(DEFAULT_TASKS)
