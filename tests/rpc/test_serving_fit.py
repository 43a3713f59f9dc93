"""The robust lines ``emoe profile`` fits to its serving session (emoe.rpc.serving_profile)."""

from __future__ import annotations

import numpy as np
import pytest

from emoe.rpc.serving_profile import _robust_line, cycle_scatter


def test_a_line_is_fitted_within_its_bounds():
    xs = [0, 1, 2, 3, 4, 5]
    a, b = _robust_line(xs, [2e-3 + 1e-4 * x for x in xs])
    assert (a, b) == (pytest.approx(2e-3, abs=1e-5), pytest.approx(1e-4, abs=1e-5))


def test_mostly_negative_offsets_fit_to_zero_rather_than_fail():
    """Receipts a little before the modelled step end (a noisy one-round profile) once made
    the fit's starting point negative, outside its bounds: "Initial guess is outside of
    provided bounds" ended `emoe profile`."""
    a, b = _robust_line([1, 2, 3, 4], [-2e-4, -1e-4, -3e-4, 1e-5])
    assert a == pytest.approx(0.0, abs=1e-6) and b >= 0.0
    assert _robust_line([], []) == (0.0, 0.0)


def test_the_cycles_scatter_is_measured_within_a_step_shape():
    """Each shape's own offset (the model's error for it) is taken out; what is left gives
    sigma and the lag-1 correlation (the provenance's figures)."""
    rng = np.random.default_rng(0)
    n, sigma, phi = 6000, 0.2, 0.5
    x = np.zeros(n)
    for t in range(1, n):
        x[t] = phi * x[t - 1] + sigma * np.sqrt(1 - phi ** 2) * rng.standard_normal()
    shapes = [(int(k), -1) for k in rng.integers(1, 5, n)]
    offsets = {s: 0.3 * s[0] for s in set(shapes)}  # far more than the scatter
    measured = cycle_scatter(x + np.array([offsets[s] for s in shapes]), shapes)
    assert measured == (pytest.approx(sigma, abs=0.02), pytest.approx(phi, abs=0.05))
    assert cycle_scatter(np.zeros(6), [(1, -1)] * 6) == (0.0, 0.0)  # too few cycles
