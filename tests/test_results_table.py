"""The results table and the per-round rows, on hand-made run summaries."""

import statistics

import pytest

from experiments.tables import METRICS, markdown, results_table
from fedgrow_core.run_config import RunConfig
from server_app.summary import build_summary, final_clients, round_rows


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


def test_table_gives_mean_and_sample_std_over_seeds_per_alpha_and_mode():
    accs = {0: 0.6, 1: 0.7, 2: 0.9}
    summaries = [_summary("small-only", seed, 0.5, acc, 0) for seed, acc in accs.items()]
    summaries += [_summary("fedgrow", seed, 0.5, acc - 0.05, 2000) for seed, acc in accs.items()]
    summaries += [_summary("fedgrow", 0, 10.0, 0.8, 2000)]
    table = results_table(summaries)
    assert list(zip(table["dirichlet_alpha"], table["mode"], table["seeds"], strict=True)) == [
        (0.5, "fedgrow", 3),
        (0.5, "small-only", 3),
        (10.0, "fedgrow", 1),
    ]
    row = table.iloc[1]
    assert row["accuracy_mean"] == pytest.approx(statistics.fmean(accs.values()))
    assert row["accuracy_std"] == pytest.approx(statistics.stdev(accs.values()))
    assert row["wall_time_s_mean"] == pytest.approx(6.0) and row["upload_bytes_total_mean"] == 0
    assert table.iloc[0]["upload_bytes_total_mean"] == 4000 and table.iloc[2]["accuracy_std"] == 0
    assert not table.isna().any().any()
    md = markdown(table)
    assert "0.733 ± 0.153" in md and "| fedgrow " in md


def test_table_refuses_incomplete_summaries():
    s = _summary("fedgrow", 0, 0.5, 0.7, 1000)
    s["mean_precision"] = None
    with pytest.raises(ValueError, match="mean_precision"):
        results_table([s])
    with pytest.raises(ValueError, match="no run summaries"):
        results_table([])
    assert set(METRICS) <= set(_summary("fedgrow", 0, 0.5, 0.7, 1).keys())


def test_comparison_with_the_paper_uses_fedgrow_against_each_baseline(tmp_path):
    from experiments.tables import paper_comparison, write_tables

    summaries = [_summary("fedgrow", s, 0.5, 0.8, 1000) for s in (0, 1)]
    summaries += [_summary("scratch-fedavg", s, 0.5, 0.7, 4000) for s in (0, 1)]
    summaries += [_summary("small-only", s, 0.5, 0.9, 0) for s in (0, 1)]
    for s in summaries:  # trainable params: Fed-Grow 20 per client, scratch 80
        if s["mode"] == "scratch-fedavg":
            s["trainable_params_per_client"] = 80
    comparison = paper_comparison(results_table(summaries)).set_index("baseline")
    assert comparison.loc["scratch-fedavg", "accuracy_gain"] == pytest.approx(0.1)
    assert comparison.loc["scratch-fedavg", "fewer_trainable"] == pytest.approx(1 - 20 / 80)
    assert comparison.loc["scratch-fedavg", "less_communication"] == pytest.approx(1 - 2000 / 8000)
    assert comparison.loc["small-only", "accuracy_gain"] == pytest.approx(-0.1)
    assert comparison.loc["small-only", "less_communication"] != comparison.loc["small-only", "less_communication"]
    paths = write_tables(results_table(summaries), tmp_path)
    text = (tmp_path / "comparison.md").read_text()
    assert tmp_path / "comparison.md" in paths and "75.00%" in text and "n/a (sends nothing)" in text


def test_compute_floor_sums_every_phase_over_the_cores_used(monkeypatch):
    import server_app.summary as summary

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


def test_accuracy_curves_give_the_mean_and_the_seed_spread_per_round(tmp_path):
    from experiments.plots import accuracy_curves, plot_accuracy

    def run(seed, mode, accs):
        rows = [
            {"round": r + 1, "eval-accuracy": a, "cumulative-upload-bytes": 1e6 * (r + 1)} for r, a in enumerate(accs)
        ]
        return {"seed": seed, "mode": mode, "dirichlet_alpha": 0.5, "task": "text", "rows": rows}

    runs = [run(0, "fedgrow", [0.5, 0.6, 0.7]), run(1, "fedgrow", [0.6, 0.7]), run(2, "fedgrow", [0.7, 0.9, 1.0])]
    runs.append(run(0, "small-only", [0.4, 0.5]))
    curves = accuracy_curves(runs, "round")[0.5]
    xs, mean, std = curves["fedgrow"]
    assert list(xs) == [1, 2]  # cut to the shortest run
    assert list(mean) == pytest.approx([statistics.fmean([0.5, 0.6, 0.7]), statistics.fmean([0.6, 0.7, 0.9])])
    assert list(std) == pytest.approx([statistics.stdev([0.5, 0.6, 0.7]), statistics.stdev([0.6, 0.7, 0.9])])
    assert list(curves["small-only"][2]) == [0.0, 0.0]  # one seed: no band
    paths = plot_accuracy(runs, tmp_path)
    assert [p.name for p in paths] == ["accuracy_vs_rounds.png", "accuracy_vs_bytes.png"]
    assert all(p.stat().st_size > 1000 for p in paths)
