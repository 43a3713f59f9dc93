"""The benchmarks' own arithmetic: what their summaries count (the benchmarks run apart)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.fidelity import draws_within_goal, scatter_ceiling  # noqa: E402


def test_each_draw_is_judged_against_the_median_of_the_others():
    assert draws_within_goal([1.0, 1.0, 1.0]) == 1.0
    # 1.0, 1.02 and 1.04 are each within 10% of the others' median; 2.0 is not
    assert draws_within_goal([1.0, 1.02, 1.04, 2.0]) == 0.75
    # in points: 0.92 is 2.5 points from 0.945; 0.90 and 0.99 are 5.5 and 8 points off
    assert draws_within_goal([0.90, 0.92, 0.99], points=True) == pytest.approx(1 / 3)


def _policy(p90: list[float], slo: list[float]) -> dict:
    cell = {"sim_draws": {"p50": [1.0, 1.0, 1.0], "p90": p90}}
    return {"metrics": {"ttft": cell, "e2e": cell}, "slo_attainment": {"sim_draws": slo}}


def test_the_ceiling_sums_the_cells_over_the_traces_and_apart_without_lru():
    steady, scattered = [1.0, 1.02, 1.04, 2.0], [0.9, 0.9, 0.9, 0.9]
    reports = {"a": {"policies": {"fcfs/all": _policy(steady, scattered)}},
               "b": {"policies": {"fcfs/lru": _policy([1.0, 2.0, 4.0, 8.0], scattered)}}}
    ceiling = scatter_ceiling(reports)
    assert ceiling["ttft p50"] == {"within": 2.0, "without_lru": 1.0}
    assert ceiling["ttft p90"] == {"within": 0.75, "without_lru": 0.75}
    assert ceiling["slo"] == {"within": 2.0, "without_lru": 1.0}


def test_one_draw_has_no_ceiling():
    reports = {"a": {"policies": {"fcfs/all": {"metrics": {"ttft": {}, "e2e": {}},
                                               "slo_attainment": {}}}}}
    assert scatter_ceiling(reports) is None
