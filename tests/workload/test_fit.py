"""Fitting a workload to a model's context: the rule the simulator and replay share."""

from __future__ import annotations

import pytest

from emoe.core.errors import ConfigError
from emoe.core.request import SLO, Request
from emoe.core.workload import ContextFit


def requests() -> list[Request]:
    shapes = [(100, 20), (300, 10), (250, 7), (255, 1), (20, 400), (1, 1)]
    return [Request(str(i), 0.1 * i, "qa", n_in, n_out, SLO(1.0, 0.1))
            for i, (n_in, n_out) in enumerate(shapes)]


def test_reject_passes_every_request_as_recorded_and_counts_those_over():
    fit = ContextFit(256, "reject")
    out = list(fit(requests()))
    assert [(r.input_tokens, r.output_tokens) for r in out] == [
        (r.input_tokens, r.output_tokens) for r in requests()]
    assert (fit.requests, fit.over) == (6, 3)
    assert fit.describe().startswith("context: 3 of 6 requests (50.0%) exceed the model's "
                                     "context of 256 tokens (prompt + output): sent as recorded")


def test_skip_leaves_out_the_requests_over_the_context():
    fit = ContextFit(256, "skip")
    assert [r.id for r in fit(requests())] == ["0", "3", "5"]
    assert fit.over == 3 and "skipped" in fit.describe()


def test_scale_keeps_the_ratio_and_fits_with_room_for_output():
    fit = ContextFit(256, "scale")
    out = {r.id: r for r in fit(requests())}
    assert (out["1"].input_tokens, out["1"].output_tokens) == (247, 8)  # 256/310 of each
    assert (out["2"].input_tokens, out["2"].output_tokens) == (249, 6)
    assert (out["4"].input_tokens, out["4"].output_tokens) == (12, 243)
    assert (out["0"].input_tokens, out["0"].output_tokens) == (100, 20)  # fits: unchanged
    for r in out.values():
        assert r.input_tokens >= 1 and r.output_tokens >= 1
        assert r.input_tokens + r.output_tokens <= 256


def test_an_unknown_context_checks_nothing_and_a_bad_rule_is_named():
    fit = ContextFit(0, "skip")
    assert len(list(fit(requests()))) == 6 and "not checked" in fit.describe()
    with pytest.raises(ConfigError, match="--fit: unknown rule 'shorten'; valid: reject, skip, "
                                          "scale"):
        ContextFit(256, "shorten")
