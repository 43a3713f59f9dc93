"""Files the README names by repository-relative paths load from any directory."""

from __future__ import annotations

from emoe.core.routing_trace import read_routing_trace
from emoe.core.sensitivity import SensitivityProfile
from emoe.core.workload.reader import read_trace


def test_shipped_files_load_by_their_repository_paths_from_elsewhere(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert SensitivityProfile.from_file("traces/sensitivity-emoe-tiny.json").num_layers == 4
    assert read_routing_trace("traces/routing-emoe-tiny.parquet").num_layers == 4
    assert next(read_trace("traces/mixed-tasks-poisson.csv")).id
