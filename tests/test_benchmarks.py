"""The benchmarks' own arithmetic: what their summaries count (the benchmarks run apart)."""

import json
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


def _run(folder: Path, rate: float, ttft: list[float], met: list[bool]) -> Path:
    """A benchmark run of one trace and policy, three draws: its report and rows."""
    import pandas as pd

    (folder / "t").mkdir(parents=True)
    doc = {"trace": "x.csv", "limit": len(ttft), "rate_scale": rate, "seed": 0, "fit": "scale",
           "profile": "p.json", "sim_draws": 3, "policies": {"fcfs/all": {
               "slo_attainment": {"sim": 0.5, "real": 0.5, "sim_draws": [0.4, 0.5, 0.6]},
               "goodput_rps": {"sim": 1.0, "real": 2.0}, "elapsed_s": {"sim": 10.0, "real": 10.0}}}}
    (folder / "t.json").write_text(json.dumps(doc))
    rows = pd.DataFrame({"id": range(len(ttft)), "ttft_s": ttft, "tpot_s": ttft,
                         "e2e_s": [2 * v for v in ttft], "queueing_s": ttft, "slo_met": met})
    for name in ("fcfs-all-real", "fcfs-all-sim", "fcfs-all-sim-draw1", "fcfs-all-sim-draw2"):
        rows.to_csv(folder / "t" / f"{name}.csv", index=False)
    return folder


def test_replays_pool_their_requests_and_refuse_another_workload(tmp_path):
    from benchmarks.pool_replays import _reports, pool

    a = _run(tmp_path / "a", 2.0, [0.1] * 9 + [1.0], [True] * 10)
    b = _run(tmp_path / "b", 2.0, [0.2] * 10, [True] * 10)
    docs = _reports([a, b])
    cells = pool([a, b], "t", docs["t"])["fcfs/all"]["cells"]
    # the p90 of the 20 pooled requests, neither run's own (1.0 and 0.2)
    assert cells["ttft p90"]["real"] == pytest.approx(0.2)
    assert cells["ttft p50"]["sim"] == pytest.approx(0.2)
    assert cells["slo"]["draws"] == pytest.approx([0.4, 0.5, 0.6])
    c = _run(tmp_path / "c", 3.0, [0.1] * 10, [True] * 10)
    with pytest.raises(SystemExit, match="rate_scale"):
        _reports([a, c])


def _side(ttft: list[float], slo: float, goodput: float):
    """A simulated side of ``compare``, its rows and summary."""
    from types import SimpleNamespace

    import pandas as pd

    from emoe.rpc.fidelity import Side

    rows = pd.DataFrame({"id": range(len(ttft)), "ttft_s": ttft, "tpot_s": ttft,
                         "e2e_s": [2 * v for v in ttft], "queueing_s": ttft,
                         "slo_met": [True] * len(ttft)})
    summary = SimpleNamespace(requests=len(ttft), finished=len(ttft), rejected=0,
                              slo_attainment=slo, goodput_rps=goodput, hit_rate=1.0)
    return Side(summary, rows, 0, 0, 10.0)


def test_a_resimulated_run_is_written_as_a_run_that_pools(tmp_path):
    from benchmarks.pool_replays import _reports, pool
    from benchmarks.resimulate import write_run

    run = _run(tmp_path / "run", 2.0, [0.1] * 10, [True] * 10)
    policy = json.loads((run / "t.json").read_text())["policies"]["fcfs/all"]
    for key, value in (("requests", 10), ("finished", 10), ("rejected", 0),
                       ("hit_rate", 1.0), ("bytes_loaded", 0), ("predictor_calls", 0)):
        policy[key] = {"sim": value, "real": value}
    doc = {**json.loads((run / "t.json").read_text()), "policies": {"fcfs/all": policy}}
    (run / "t.json").write_text(json.dumps(doc))
    (run / "t" / "policy-fcfs-all.json").write_text("{}")
    sides = {("t", "fcfs/all", "measured", d): _side([0.3] * 10, 0.7 + d / 10, 1.5)
             for d in range(3)}
    out = tmp_path / "out"
    (out / "t").mkdir(parents=True)
    for d in range(3):  # resimulate.py's workers write the simulated rows themselves
        name = f"fcfs-all-sim-draw{d}.csv" if d else "fcfs-all-sim.csv"
        sides[("t", "fcfs/all", "measured", d)].rows.to_csv(out / "t" / name, index=False)
    write_run({"t": doc}, run, sides, "measured", out, {"arrival_cost": "none"})

    report = json.loads((out / "t.json").read_text())
    entry = report["policies"]["fcfs/all"]
    assert entry["metrics"]["ttft"]["sim"]["p90"] == pytest.approx(0.3)
    assert entry["metrics"]["ttft"]["real"]["p90"] == pytest.approx(0.1)  # the measured rows
    assert entry["slo_attainment"]["sim_draws"] == pytest.approx([0.7, 0.8, 0.9])
    assert entry["slo_attainment"]["real"] == 0.5
    assert report["resimulated"] == {"run": str(run), "step_scatter": "measured",
                                     "arrival_cost": "none"}
    assert (out / "t" / "policy-fcfs-all.json").exists()
    cells = pool([run, out], "t", _reports([run, out])["t"])["fcfs/all"]["cells"]
    assert cells["ttft p90"]["real"] == pytest.approx(0.1)
    assert cells["slo"]["draws"] == pytest.approx([0.55, 0.65, 0.75])


def test_a_cells_interval_resamples_whole_replays(tmp_path):
    from benchmarks.pool_replays import _reports, pool

    # simulated 0.1 s throughout; measured 0.1 s in one replay, 0.2 s in the other
    a = _run(tmp_path / "a", 2.0, [0.1] * 10, [True] * 10)
    b = _run(tmp_path / "b", 2.0, [0.1] * 10, [True] * 10)
    real = b / "t" / "fcfs-all-real.csv"
    real.write_text(real.read_text().replace("0.1,", "0.2,"))
    cells = pool([a, b], "t", _reports([a, b])["t"], resamples=200)["fcfs/all"]["cells"]
    lo, hi = cells["ttft p50"]["run_interval"]
    # a resample of replay a twice is exact, of b twice -50%: the interval spans both
    assert lo == pytest.approx(-0.5)
    assert hi == pytest.approx(0.0)
    assert cells["ttft p50"]["sim"] == pytest.approx(0.1)
    # every replay with the same SLO attainment on both sides: no spread in points
    assert cells["slo"]["run_interval"] == pytest.approx([0.0, 0.0])
    assert "run_interval" not in pool([a, b], "t", _reports([a, b])["t"])["fcfs/all"]["cells"]["slo"]
