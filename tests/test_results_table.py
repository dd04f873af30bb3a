"""A run's per-round rows and summary, and the communication table, on hand-made run summaries."""

import statistics

import pytest

from fedgrow_core.run_config import RunConfig
from server_app.reporting.summary import build_summary, final_clients, round_rows


def _summary(mode, seed, alpha, acc, upload):
    clients = [
        {"accuracy": acc - 0.1, "precision": 0.5, "trainable_params": 10, "model_params": 100},
        {"accuracy": acc + 0.1, "precision": 0.7, "trainable_params": 30, "model_params": 100},
    ]
    run = RunConfig(mode=mode, seed=seed, dirichlet_alpha=alpha)
    entries = [
        {
            "round": r,
            "phase": "grow",
            "replies": 2,
            "accepted_nodes": [1, 2],
            "failed": 0,
            "rejected": [],
            "seconds": 1.0,
            "client_metrics": {"1": {"eval-accuracy": 0.4, "train-loss": 1.0}, "2": {"eval-accuracy": 0.6}},
            "upload_bytes": {"1": upload, "2": upload},
            "payload_bytes": {"1": upload, "2": upload},
        }
        for r in (1, 2)
    ]
    rows = round_rows(run, entries, clients)
    return {**build_summary(run, entries, clients, rows, wall=5.0 + seed), "rows": rows}


def test_rows_average_clients_and_accumulate_bytes():
    s = _summary("fedgrow", 0, 0.5, 0.7, 1000)
    rows = s["rows"]
    assert [r["round"] for r in rows] == [1, 2, 2 + 2]  # finetune 20 / local 10 = 2 more rounds
    assert rows[0]["eval-accuracy"] == pytest.approx(0.5) and rows[0]["train-loss"] == 1.0
    assert [r["cumulative-upload-bytes"] for r in rows] == [1000, 2000, 2000]
    assert rows[-1]["eval-accuracy"] == pytest.approx(0.7)
    assert s["upload_bytes_per_round"] == 1000 and s["upload_bytes_total"] == 2000
    assert s["std_accuracy"] == pytest.approx(0.1) and s["trainable_params_per_client"] == 20


def test_compute_floor_sums_every_phase_over_the_cores_used(monkeypatch):
    import server_app.reporting.summary as summary

    run = RunConfig()
    entries = [
        {
            "round": r,
            "phase": "grow",
            "replies": 3,
            "accepted_nodes": [1, 2, 3],
            "failed": 0,
            "rejected": [],
            "seconds": 9.0,
            "client_metrics": {
                "1": {"train-seconds": 2.0, "eval-seconds": 0.5, "compute-threads": 1},
                "2": {"train-seconds": 1.5, "compute-threads": 2},  # no evaluation; two threads: 3 core-s
                "3": {"train-seconds": 4.0, "eval-seconds": 0.5},  # (one thread when not reported)
            },
        }
        for r in (1, 2)
    ]
    clients = [
        {"accuracy": 0.5, "precision": 0.5, "trainable_params": 1, "model_params": 1, "final_compute_s": f}
        for f in (1.0, 2.0, 3.0)
    ]
    monkeypatch.setattr(summary.os, "cpu_count", lambda: 2)
    s = build_summary(run, entries, clients, round_rows(run, entries, clients), wall=30.0)
    assert s["compute_s"] == pytest.approx(2 * (2 + 0.5 + 3 + 4 + 0.5) + 6)  # 26 s
    assert s["compute_cores"] == 2  # three clients, two cores
    assert s["compute_floor_s"] == pytest.approx(13.0)
    assert s["wall_over_floor"] == pytest.approx(30.0 / 13.0)
    # a run resumed after round 1 counts only the rounds its own ServerApp ran
    resumed = build_summary(run, entries, clients, round_rows(run, entries, clients), wall=30.0, resumed_after=1)
    assert resumed["compute_s"] == pytest.approx(10 + 6)
    finals = final_clients([_final_reply(seconds=2.0, threads=2)], [])
    assert finals[0]["final_compute_s"] == pytest.approx(2 * (2.0 + 0.25))


def _final_reply(seconds, threads):
    """A received final-phase reply, as :func:`final_clients` reads it (content and ``metadata.src_node_id``)."""
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, MetricRecord, RecordDict

    metrics = {"partition-id": 0, "accuracy": 0.5, "precision": 0.5, "model-params": 10, "num-examples": 4}
    metrics |= {"finetune-seconds": seconds, "eval-seconds": 0.25, "compute-threads": threads}
    content = RecordDict({"metrics": MetricRecord(metrics), "info": ConfigRecord({"model": "m"})})
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=7))


def test_communication_table_pairs_each_variant_with_float32_on_the_same_seed(tmp_path):
    from scipy import stats

    from experiments.communication import communication_table, plot_accuracy_vs_upload

    def summary(seed, acc, upload):
        return {
            "seed": seed,
            "mean_accuracy": acc,
            "mean_precision": acc - 0.2,
            "upload_over_model_bytes": upload,
            "download_over_model_bytes": 0.2,
            "upload_bytes_per_round": upload * 1e8,
        }

    runs = {
        "float32": [summary(0, 0.70, 0.2), summary(1, 0.80, 0.2), summary(2, 0.75, 0.2)],
        "int8": [summary(2, 0.74, 0.05), summary(0, 0.71, 0.05), summary(1, 0.78, 0.05)],  # any order
    }
    table = communication_table(runs).set_index("variant")
    diffs = [0.71 - 0.70, 0.78 - 0.80, 0.74 - 0.75]
    half = stats.t.ppf(0.975, 2) * statistics.stdev(diffs) / 3**0.5
    row = table.loc["int8"]
    assert row["paired_diff_mean"] == pytest.approx(statistics.fmean(diffs))
    assert row["paired_diff_std"] == pytest.approx(statistics.stdev(diffs))
    assert (row["ci95_low"], row["ci95_high"]) == pytest.approx(
        (statistics.fmean(diffs) - half, statistics.fmean(diffs) + half)
    )
    assert row["upload_over_model"] == pytest.approx(0.05) and row["upload_mb"] == pytest.approx(5.0)
    assert table.loc["float32", "paired_diff_mean"] == 0 and table.loc["int8", "seeds"] == 3
    plot_accuracy_vs_upload(table.reset_index(), tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 5000
