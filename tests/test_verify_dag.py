"""Verification of random graphs: every derivation of a random valid DAG spec verifies."""

from __future__ import annotations

import pytest

hypothesis = pytest.importorskip("hypothesis")
strategies = pytest.importorskip("tests.strategies")

from hypothesis import HealthCheck, given, settings

from derive.spec.load import load_spec
from derive.verify.expansion import verify


@settings(max_examples=10, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(strategies.random_dag_specs(max_layers=6, max_width=3))
def test_random_graphs_verify(data):
    report = verify(load_spec(data), points=2)
    assert report.ok, "\n".join(report.lines())
