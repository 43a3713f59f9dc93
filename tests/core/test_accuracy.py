import json

import pytest

from emoe.core.accuracy import AccuracyCalibration, fit_calibration, pearson
from emoe.core.errors import ConfigError

POINTS = [{"planner": p, "budget": b, "proxy": x, "agreement": 0.2 + 0.8 * x,
           "quality": x - 0.05, "slots_per_layer": [2, 2]}
          for p, b, x in (("emoe", 0.25, 0.3), ("static", 0.5, 0.6), ("random", 0.75, 0.9))]
TABLE = {"qa": [1.0, 0.0], "summarization": [0.5, 0.25]}


def test_fit_recovers_a_line_and_round_trips_with_its_weights(tmp_path):
    calibration = fit_calibration(POINTS, TABLE, "tiny", {"mode": "graded", "file": "s.json"},
                                  "replayed: r.parquet", {"rows": ["a.json"]})
    fit = calibration.fits["agreement"]
    assert fit.slope == pytest.approx(0.8) and fit.intercept == pytest.approx(0.2)
    assert fit.r == pytest.approx(1.0)
    assert calibration.predict(0.5) == pytest.approx({"agreement": 0.6, "quality": 0.45})
    assert calibration.predict(2.0)["agreement"] == 1.0  # clipped to [0, 1]
    path = tmp_path / "c.json"
    calibration.to_file(path)
    back = AccuracyCalibration.from_file(path)
    assert back.fits == calibration.fits and back.points == calibration.points
    assert back.sensitivity == TABLE and back.routing == "replayed: r.parquet"
    assert back.model == "tiny" and back.predict(0.7) == calibration.predict(0.7)
    assert "3 `emoe eval` runs of tiny replayed in the simulator" in back.describe()
    assert back.weights() == "graded s measured on ? (s.json)"


def test_too_few_runs_and_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="at least 3 runs"):
        fit_calibration(POINTS[:2], TABLE)
    with pytest.raises(ConfigError, match="run 0"):
        fit_calibration([{"planner": "emoe"}] * 3, TABLE)
    path = tmp_path / "c.json"
    good = fit_calibration(POINTS, TABLE).to_dict()
    for change, message in (({"fits": {}}, "field 'fits'"),
                            ({"sensitivity": {}}, "field 'sensitivity'"),
                            ({"version": 1}, "version 1 was fitted on the engine's own proxy")):
        path.write_text(json.dumps({**good, **change}))
        with pytest.raises(ConfigError, match=message):
            AccuracyCalibration.from_file(path)


def test_pearson():
    assert pearson([1, 2, 3], [2, 4, 6]) == pytest.approx(1.0)
    assert pearson([1, 2, 3], [3, 2, 1]) == pytest.approx(-1.0)


def test_the_shipped_calibration_reads_and_says_what_it_was_fitted_on():
    from emoe.core.paths import REPOSITORY

    calibration = AccuracyCalibration.from_file(
        f"{REPOSITORY}/traces/accuracy-calibration-emoe-tiny.json")
    assert calibration.model == "emoe-tiny" and calibration.routing.startswith("replayed: ")
    assert all(len(s) == 4 for s in calibration.sensitivity.values())
    assert calibration.sensitivity_source["file"] == "traces/sensitivity-emoe-tiny.json"
    experiments = {p["experiment"] for p in calibration.points}
    assert "main" in experiments and any(e.startswith("cut-layer-") for e in experiments)
    assert set(calibration.fits) == {"agreement", "quality"}
