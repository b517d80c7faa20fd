"""Fairness across clients: the spread of per-client accuracy, by hand."""

import pytest
from flwr.app import MetricRecord, RecordDict

from fedsim.metrics import aggregate_client_evaluations, client_spread


def test_client_spread_by_hand():
    """Ten clients at 0.1, 0.2, ..., 1.0: the worst 10% is one client (0.1), the best one
    client (1.0); population std of an evenly spaced 0.1..1.0 is sqrt(0.0825)."""
    values = [i / 10 for i in range(10, 0, -1)]  # any order
    spread = client_spread(values)
    assert spread["worst10"] == pytest.approx(0.1) and spread["best10"] == pytest.approx(1.0)
    assert spread["std"] == pytest.approx(0.0825 ** 0.5)


def test_a_few_clients_still_have_a_worst_and_best_one():
    """Three clients: 10% rounds to 0, so each tail is the one extreme client."""
    spread = client_spread([0.5, 0.9, 0.7])
    assert (spread["worst10"], spread["best10"]) == (0.5, 0.9)
    assert client_spread([0.4])["std"] == 0.0


def test_aggregation_reports_the_spread_of_whole_split_accuracies_only():
    replies = [RecordDict({"m": MetricRecord({"accuracy": a, "accuracy-tail": a,
                                              "num-examples": 10, "num-examples-tail": 1})})
               for a in (0.25, 0.75)]
    out = aggregate_client_evaluations(replies, "num-examples")
    assert out["worst10-accuracy"] == 0.25 and out["best10-accuracy"] == 0.75
    assert out["std-accuracy"] == 0.25
    assert "std-accuracy-tail" not in out  # group accuracies keep only their means
