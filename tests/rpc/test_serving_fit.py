"""The robust lines ``emoe profile`` fits to its serving session (emoe.rpc.serving_profile)."""

from __future__ import annotations

import pytest

from emoe.rpc.serving_profile import _robust_line


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
