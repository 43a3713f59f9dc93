"""The measured step table: interpolation and extrapolation."""

from __future__ import annotations

import pytest

from emoe.core.profile import StepTimes


def test_table_interpolates_and_extrapolates_with_the_last_slope():
    table = StepTimes((1, 64, 128), (0.010, 0.020, 0.040), 0.0, 0.0)
    assert table.table(32) == pytest.approx(0.010 + 0.010 * 31 / 63)
    assert table.table(256) == pytest.approx(0.040 + 0.020 / 64 * 128)


def test_a_falling_last_point_never_makes_a_step_shorter_with_more_tokens():
    # measured on a loaded machine: the longest prompt happened to time below the one before
    table = StepTimes((1, 256, 511), (0.010, 0.060, 0.050), 0.0, 0.0)
    far = table.table(4096)
    assert far >= table.table(511) > 0
    assert far == pytest.approx(0.050 + (0.040 / 510) * (4096 - 511))
