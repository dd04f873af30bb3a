"""The fifty-client benchmark's accounting: what counts as a round's client compute, and a node's state size."""

from __future__ import annotations

import pytest

from benchmarks.federation_scale import (
    RoundCost,
    federation_config,
    parallel_clients,
    round_costs,
    round_report,
    state_bytes_per_node,
)


def _metrics(train, evaluation=None, received=None):
    out = {"train-seconds": train}
    if evaluation is not None:
        out["eval-seconds"] = evaluation
    if received is not None:
        out["received-eval-seconds"] = received
    return out


def test_a_rounds_compute_is_training_and_both_evaluations_over_the_clients_that_run_at_once():
    summary = {
        "rounds_log": [
            {
                "round": 1,
                "phase": "grow",
                "seconds": 10.0,
                "aggregate_seconds": 1.5,
                "client_metrics": {"1": _metrics(2.0, 0.5, 0.25)},
            },
            {"round": 2, "phase": "grow", "seconds": 9.0, "client_metrics": {"1": _metrics(1.0), "2": _metrics(3, 1)}},
            {"round": 3, "phase": "grow", "seconds": 4.0, "client_metrics": {}},  # no reply: no compute to compare
            {"round": 3, "phase": "finetune-evaluate", "seconds": 7.0, "client_metrics": {"1": _metrics(9.0)}},
        ]
    }
    # the server's aggregation after the last reply is its own item; a log without it counts 0
    # no reply reports message-seconds: no handling time
    assert round_costs(summary, 1) == [
        RoundCost(10.0, 2.75, 0.25, 1.5, None, 1),
        RoundCost(9.0, 5.0, 0.0, 0.0, None, 2),
    ]
    assert round_costs(summary, 2) == [
        RoundCost(10.0, 1.375, 0.125, 1.5, None, 1),
        RoundCost(9.0, 2.5, 0.0, 0.0, None, 2),
    ]
    report = round_report(summary, 2)
    assert report["round_wall_s"] == [10.0, 9.0] and report["round_aggregate_s"] == [1.5, 0.0]
    assert report["overhead_ratio"] == pytest.approx((10 + 9) / (1.375 + 2.5))
    assert report["overhead_ratio_with_aggregation"] == pytest.approx((10 + 9 + 1.5) / (1.375 + 2.5))


def test_the_clients_share_is_their_handlers_seconds_over_their_compute():
    """``message-seconds`` covers a reply's compute and the client's own work beside it."""

    def reply(train, handler):
        return {**_metrics(train, 1.0, 0.5), "message-seconds": handler}

    summary = {
        "rounds_log": [
            {
                "round": 1,
                "phase": "grow",
                "seconds": 12.0,
                "client_metrics": {"1": reply(4.0, 6.0), "2": reply(2.5, 4.5)},
            },
            {"round": 2, "phase": "grow", "seconds": 8.0, "client_metrics": {"3": reply(5.5, 7.5)}},
        ]
    }
    rounds = round_costs(summary, 2)
    assert [r.handling for r in rounds] == [5.25, 3.75] and [r.replies for r in rounds] == [2, 1]
    report = round_report(summary, 2)
    assert report["client_ratio"] == pytest.approx((6 + 4.5 + 7.5) / (5.5 + 4 + 7))
    assert report["client_overhead_s"] == pytest.approx(((6 - 5.5) + (4.5 - 4) + (7.5 - 7)) / 3)
    summary["rounds_log"][1]["client_metrics"]["4"] = _metrics(1.0)  # a reply without it: no share
    assert round_report(summary, 2)["client_ratio"] is None and round_report(summary, 2)["client_overhead_s"] is None


def test_the_parallel_clients_follow_the_federation_config_and_the_state_size_is_the_newest_file(tmp_path):
    federation = federation_config(tmp_path, 50)
    assert "num-supernodes = 50" in federation.read_text()
    assert parallel_clients(federation) >= 1
    for node, sizes in {0: (10, 30), 1: (50,)}.items():
        folder = tmp_path / "out" / "clients" / f"partition-{node}" / "state" / "tag" / "fp" / "run-1"
        folder.mkdir(parents=True)
        for r, size in enumerate(sizes, start=1):
            (folder / f"round-{r}.safetensors").write_bytes(b"x" * size)
    assert state_bytes_per_node(tmp_path / "out") == pytest.approx((30 + 50) / 2)
    assert state_bytes_per_node(tmp_path / "nothing") == 0.0
