"""The comparison's records, tables, paired intervals, plots and results page, on hand-made runs."""

import json
import math
import statistics
import subprocess

import pandas as pd
import pytest
from scipy import stats

from experiments import records, runner
from experiments.plots import accuracy_curves, plot_accuracy
from experiments.significance import paired_differences, t_interval, verdict
from experiments.tables import markdown, paper_comparison, results_table, write_tables
from fedgrow_core.run_config import RunConfig
from server_app.reporting.summary import build_summary, round_rows

WHERE = {
    "commit": "abc1234",
    "date": "2026-12-03",
    "machine": "x86_64, 2 cores, 24 GiB, no GPU",
    "software": "Python 3.11.7, flwr 1.41.0",
}
CONFIG = {"num-server-rounds": 2, "local-steps": 10, "finetune-steps": 20}


def _run(mode, seed, accs, upload=1000, alpha=0.5, trainable=(10, 30)):
    """summary.json and metrics.jsonl rows of a 2-round run whose clients end at ``accs``."""
    clients = [
        {
            "partition_id": i,
            "model": f"m{i}",
            "accuracy": a,
            "precision": a - 0.1,
            "trainable_params": trainable[i % len(trainable)],
            "model_params": 100,
            "test_examples": 50,
        }
        for i, a in enumerate(accs)
    ]
    run = RunConfig(mode=mode, seed=seed, dirichlet_alpha=alpha, **{k.replace("-", "_"): v for k, v in CONFIG.items()})
    entries = [
        {
            "round": r,
            "phase": "grow" if mode == "fedgrow" else "train-local",
            "replies": len(accs),
            "accepted_nodes": list(range(len(accs))),
            "failed": 0,
            "rejected": [],
            "seconds": 1.0,
            "client_metrics": {str(i): {"eval-accuracy": 0.4 + 0.1 * r + 0.01 * seed} for i in range(len(accs))},
            "upload_bytes": {str(i): upload for i in range(len(accs))},
            "payload_bytes": {str(i): upload for i in range(len(accs))},
        }
        for r in (1, 2)
    ]
    rows = round_rows(run, entries, clients)
    return build_summary(run, entries, clients, rows, wall=5.0 + seed), rows


def _records(runs):
    clients, rounds = [], []
    for mode, seed, accs, *rest in runs:
        c, r = records.run_records(*_run(mode, seed, accs, *rest), {**CONFIG, "mode": mode, "seed": seed}, WHERE)
        clients += c
        rounds += r
    return pd.DataFrame(clients), pd.DataFrame(rounds)


def test_run_records_give_one_row_per_client_and_per_round_with_steps():
    clients, rounds = _records([("fedgrow", 3, [0.6, 0.8])])
    assert list(clients["partition_id"]) == [0, 1] and list(clients["accuracy"]) == [0.6, 0.8]
    assert (clients["steps"] == 2 * 10 + 20).all() and (clients["commit"] == "abc1234").all()
    assert clients["config"].nunique() == 1 and (clients["seed"] == 3).all()
    assert list(rounds["steps"]) == [10, 20, 40]  # two rounds of 10 local steps, then 20 fine-tuning steps
    assert list(rounds["phase"]) == ["grow", "grow", "finetune-evaluate"]
    assert rounds["eval_accuracy"].iloc[-1] == pytest.approx(0.7)
    assert list(rounds["cumulative_upload_bytes"]) == [1000, 2000, 2000]


def test_records_round_trip_and_refuse_another_sweep_config(tmp_path):
    clients, rounds = _records([("fedgrow", 0, [0.6, 0.8]), ("small-only", 0, [0.7, 0.7])])
    records.append_records(tmp_path, clients.to_dict("records")[:2], rounds.to_dict("records")[:3])
    records.append_records(tmp_path, clients.to_dict("records")[2:], rounds.to_dict("records")[3:])
    back_clients, back_rounds = records.load_records(tmp_path)
    pd.testing.assert_frame_equal(back_clients, clients, check_dtype=False)
    assert len(back_rounds) == len(rounds)
    fingerprint = records.config_fingerprint({**CONFIG, "mode": "small-only", "seed": 9, "output-dir": "/tmp/x"})
    assert records.done_runs(back_clients, fingerprint) == {("text", 0.5, "fedgrow", 0), ("text", 0.5, "small-only", 0)}
    other = records.config_fingerprint({**CONFIG, "local-steps": 5})
    with pytest.raises(ValueError, match=f"not of this sweep's config '{other}'"):
        records.done_runs(back_clients, other)


def test_the_runner_skips_runs_already_recorded_and_runs_only_the_missing_ones(tmp_path, monkeypatch):
    overrides = dict(CONFIG)
    clients, rounds = _records([("fedgrow", 0, [0.6, 0.8])])
    records.append_records(tmp_path / "out", clients.to_dict("records"), rounds.to_dict("records"))
    launched = []

    def fake_flwr_run(run_toml, home, log_file, timeout, federation):
        launched.append(run_toml.parent.name)
        summary, rows = _run("small-only", 0, [0.7, 0.7])
        out = run_toml.parent / "output" / "20261203"
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(summary))
        (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        log_file.write_text("done")
        return 0

    monkeypatch.setattr(runner, "flwr_run", fake_flwr_run)
    monkeypatch.setattr(runner, "run_failure", lambda log, home: None)
    monkeypatch.setattr(runner, "stop_local_superlink", lambda home: None)
    got, _ = runner.run_grid(overrides, ["fedgrow", "small-only"], [0], [None], tmp_path / "out", work=tmp_path / "w")
    assert launched == ["alpha0.5-small-only-seed0"]  # fedgrow seed 0 came from the records
    assert sorted(got["mode"].unique()) == ["fedgrow", "small-only"] and len(got) == 4
    assert (tmp_path / "w" / "runs" / "alpha0.5-small-only-seed0" / "provenance.json").is_file()
    again, _ = runner.run_grid(overrides, ["fedgrow", "small-only"], [0], [None], tmp_path / "out", work=tmp_path / "w")
    assert launched == ["alpha0.5-small-only-seed0"] and len(again) == 4  # nothing run twice


def test_a_failed_run_does_not_stop_the_sweep_and_is_retried_by_the_next_call(tmp_path, monkeypatch):
    launched, broken = [], {"alpha0.5-fedgrow-seed0"}

    def fake_flwr_run(run_toml, home, log_file, timeout, federation):
        tag = run_toml.parent.name
        launched.append(tag)
        log_file.write_text("lost")
        if tag in broken:
            return 1
        summary, rows = _run("fedgrow", int(tag[-1]), [0.7, 0.7])
        out = run_toml.parent / "output" / "20261203"
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(summary))
        (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
        return 0

    monkeypatch.setattr(runner, "flwr_run", fake_flwr_run)
    monkeypatch.setattr(runner, "run_failure", lambda log, home: None)
    monkeypatch.setattr(runner, "stop_local_superlink", lambda home: None)
    grid = (dict(CONFIG), ["fedgrow"], [0, 1], [None], tmp_path / "out")
    with pytest.raises(RuntimeError, match=r"1 of the sweep's runs failed.*alpha0\.5-fedgrow-seed0.*exited 1"):
        runner.run_grid(*grid, work=tmp_path / "w")
    assert launched == ["alpha0.5-fedgrow-seed0", "alpha0.5-fedgrow-seed1"]  # seed 1 ran after seed 0 failed
    assert sorted(records.load_records(tmp_path / "out")[0]["seed"].unique()) == [1]
    sets = [f"{k}={v}" for k, v in CONFIG.items()]
    argv = ["--set", *sets, "--modes", "fedgrow", "--seeds", "0", "1", "--out", str(tmp_path / "out")]
    assert runner.main([*argv, "--work", str(tmp_path / "w")]) == 1  # seed 0 fails again: exit 1 ...
    assert (tmp_path / "out" / "results.md").is_file()  # ... with the recorded runs tabulated
    assert launched[2:] == ["alpha0.5-fedgrow-seed0"]
    broken.clear()
    got, _ = runner.run_grid(*grid, work=tmp_path / "w")
    assert launched[3:] == ["alpha0.5-fedgrow-seed0"] and sorted(got["seed"].unique()) == [0, 1]


def test_provenance_is_dirty_for_changed_app_files_but_not_for_changed_records(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    (tmp_path / "docs" / "results").mkdir(parents=True)
    (tmp_path / "docs" / "results" / "clients.csv").write_text("a\n")
    (tmp_path / "app.py").write_text("x = 1\n")
    git("init", "-q")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=tmp_path, capture_output=True, text=True)
    (tmp_path / "docs" / "results" / "clients.csv").write_text("a\nb\n")  # a sweep appends its records
    assert records.provenance(tmp_path)["commit"] == head.stdout.strip()
    (tmp_path / "app.py").write_text("x = 2\n")
    assert records.provenance(tmp_path)["commit"] == head.stdout.strip() + "-dirty"


def _run_folder(work, tag, config, mode, accs):
    """A finished run folder as ``flwr run`` leaves it: run.toml, output/<time>/summary.json and metrics.jsonl."""
    folder = work / "runs" / tag
    out = folder / "output" / "20261203-000000"
    out.mkdir(parents=True)
    summary, rows = _run(mode, config.get("seed", 0), accs)
    (out / "summary.json").write_text(json.dumps(summary))
    (out / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    (folder / "run.toml").write_text(runner.toml_text({**config, "output-dir": str(out.parent)}))
    return folder


def test_a_run_folder_of_another_config_is_refused_and_one_without_provenance_is_marked_unknown(tmp_path):
    work = tmp_path / "w"
    # no provenance.json: the federation's size is taken from the clients that replied (3, the default's)
    _run_folder(work, "alpha0.5-fedgrow-seed0", {**CONFIG, "mode": "fedgrow", "seed": 0}, "fedgrow", [0.6, 0.8, 0.7])
    clients, rounds = runner.run_grid(dict(CONFIG), ["fedgrow"], [0], [None], tmp_path / "out", run_missing=False,
                                      work=work)  # fmt: skip
    assert (clients["commit"] == "unknown").all() and (clients["machine"] == "unknown").all()
    assert list(rounds["steps"]) == [10, 20, 40] and len(clients) == 3
    other = {**CONFIG, "local-steps": 5, "mode": "small-only", "seed": 0}
    _run_folder(work, "alpha0.5-small-only-seed0", other, "small-only", [0.7, 0.7, 0.7])
    with pytest.raises(ValueError, match="holds a run of another config"):
        runner.run_grid(dict(CONFIG), ["small-only"], [0], [None], tmp_path / "out", run_missing=False, work=work)
    assert set(records.load_records(tmp_path / "out")[0]["mode"]) == {"fedgrow"}  # nothing of it recorded


def test_records_keep_text_columns_as_text_and_replace_a_run_recorded_twice(tmp_path):
    clients, rounds = _records([("fedgrow", 0, [0.6, 0.8])])
    clients["commit"] = "0123456"
    clients["config"] = "1e5"
    for _ in range(2):
        records.append_records(tmp_path, clients.to_dict("records"), rounds.to_dict("records"))
    back, back_rounds = records.load_records(tmp_path)
    assert list(back["commit"]) == ["0123456"] * 2 and list(back["config"]) == ["1e5"] * 2
    assert len(back_rounds) == len(rounds)  # the second append replaced the first
    assert records.done_runs(back, "1e5") == {("text", 0.5, "fedgrow", 0)}


def test_table_gives_mean_and_sample_std_over_seeds_of_the_client_means():
    accs = {0: 0.6, 1: 0.7, 2: 0.9}
    runs = [("small-only", s, [a - 0.1, a + 0.1], 0) for s, a in accs.items()]
    runs += [("fedgrow", s, [a - 0.15, a + 0.05], 2000) for s, a in accs.items()]
    runs += [("fedgrow", 0, [0.8, 0.8], 2000, 10.0)]
    clients, _ = _records(runs)
    table = results_table(clients)
    assert list(zip(table["dirichlet_alpha"], table["mode"], table["seeds"], strict=True)) == [
        (0.5, "fedgrow", 3),
        (0.5, "small-only", 3),
        (10.0, "fedgrow", 1),
    ]
    row = table.iloc[1]
    assert row["accuracy_mean"] == pytest.approx(statistics.fmean(accs.values()))
    assert row["accuracy_std"] == pytest.approx(statistics.stdev(accs.values()))
    assert row["spread_mean"] == pytest.approx(0.1)  # population std of two clients 0.2 apart
    assert row["trainable_params_mean"] == 20 and row["wall_time_s_mean"] == pytest.approx(6.0)
    assert table.iloc[0]["upload_bytes_total_mean"] == 4000 and table.iloc[2]["accuracy_std"] == 0
    assert not table.isna().any().any()
    assert "0.733 ± 0.153" in markdown(table)
    with pytest.raises(ValueError, match="no run records"):
        results_table(pd.DataFrame())
    with pytest.raises(ValueError, match="precision"):
        results_table(clients.drop(columns="precision"))


def test_t_interval_matches_the_textbook_formula():
    d = [0.03, -0.01, 0.05, 0.02, 0.00]
    mean, low, high, p = t_interval(d)
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    tstat = statistics.fmean(d) / (statistics.stdev(d) / math.sqrt(len(d)))
    assert mean == pytest.approx(statistics.fmean(d))
    assert (low, high) == pytest.approx((mean - half, mean + half))
    assert p == pytest.approx(2 * stats.t.sf(abs(tstat), len(d) - 1))
    assert all(math.isnan(v) for v in t_interval([0.1])[1:])
    assert all(math.isnan(v) for v in t_interval([0.02, 0.02, 0.02])[1:])
    assert verdict(0.01, 0.05, "small-only") == "Fed-Grow more accurate (significant)"
    assert verdict(-0.05, -0.01, "small-only") == "small-only more accurate (significant)"
    assert verdict(-0.01, 0.05, "small-only") == "no significant difference"


def test_paired_differences_pair_the_same_seed_and_client_and_average_clients_per_seed():
    ours = {0: [0.80, 0.70], 1: [0.75, 0.65], 2: [0.90, 0.60], 3: [0.70, 0.70]}
    theirs = {0: [0.70, 0.70], 1: [0.70, 0.60], 2: [0.80, 0.70], 3: [0.60, 0.65]}
    runs = [("fedgrow", s, a) for s, a in ours.items()] + [("small-only", s, a) for s, a in theirs.items()]
    runs.append(("small-only", 9, [0.1, 0.1]))  # no Fed-Grow run on seed 9: not a pair
    clients, _ = _records(runs)
    (row,) = paired_differences(clients).to_dict("records")
    per_seed = [statistics.fmean(o - t for o, t in zip(ours[s], theirs[s], strict=True)) for s in ours]
    half = stats.t.ppf(0.975, 3) * statistics.stdev(per_seed) / 2
    assert row["baseline"] == "small-only" and row["seeds"] == 4 and row["pairs"] == 8
    assert row["difference"] == pytest.approx(statistics.fmean(per_seed))
    assert (row["ci_low"], row["ci_high"]) == pytest.approx((row["difference"] - half, row["difference"] + half))
    assert row["client_wins"] == pytest.approx((6 + 0.5) / 8)  # 6 ahead, 1 tie, 1 behind
    assert row["verdict"] == verdict(row["ci_low"], row["ci_high"], "small-only")


def test_tables_and_plots_are_written_from_the_records(tmp_path):
    runs = [("fedgrow", s, [0.8, 0.8], 1000, 0.5, (20, 20)) for s in (0, 1)]
    runs += [("scratch-fedavg", s, [0.7, 0.7], 4000, 0.5, (80, 80)) for s in (0, 1)]
    runs += [("small-only", s, [0.9, 0.9 + 0.01 * s], 0) for s in (0, 1)]
    clients, rounds = _records(runs)
    comparison = paper_comparison(results_table(clients)).set_index("baseline")
    assert comparison.loc["scratch-fedavg", "accuracy_gain"] == pytest.approx(0.1)
    assert comparison.loc["small-only", "accuracy_gain"] == pytest.approx(-0.1 - 0.005 / 2)
    assert comparison.loc["scratch-fedavg", "fewer_trainable"] == pytest.approx(1 - 20 / 80)
    assert comparison.loc["scratch-fedavg", "less_communication"] == pytest.approx(1 - 2000 / 8000)
    assert math.isnan(comparison.loc["small-only", "less_communication"])
    paths = write_tables(clients, tmp_path)
    assert {p.name for p in paths} == {"results.csv", "results.md", "paired.csv", "paired.md", "comparison.md"}
    assert "75.00%" in (tmp_path / "comparison.md").read_text()
    assert "small-only more accurate (significant)" in (tmp_path / "paired.md").read_text()
    plots = plot_accuracy(rounds, tmp_path)
    assert [p.name for p in plots] == ["accuracy_vs_steps.png", "accuracy_vs_bytes.png"]
    assert all(p.stat().st_size > 5000 for p in plots)


def test_accuracy_curves_give_the_mean_and_the_seed_spread_per_step():
    rows = []
    for seed, accs in {0: [0.5, 0.6, 0.7], 1: [0.6, 0.7], 2: [0.7, 0.9, 1.0]}.items():
        for k, a in enumerate(accs):
            rows.append({"dirichlet_alpha": 0.5, "mode": "fedgrow", "seed": seed, "steps": 10 * (k + 1),
                         "eval_accuracy": a, "cumulative_upload_bytes": 1e6 * (k + 1)})  # fmt: skip
    rows.append({"dirichlet_alpha": 0.5, "mode": "fedgrow", "seed": 0, "steps": 0, "eval_accuracy": None,
                 "cumulative_upload_bytes": 5.0})  # fmt: skip
    rows.append({"dirichlet_alpha": 0.5, "mode": "small-only", "seed": 0, "steps": 10, "eval_accuracy": 0.4,
                 "cumulative_upload_bytes": 0.0})  # fmt: skip
    curves = accuracy_curves(pd.DataFrame(rows), "steps")[0.5]
    xs, mean, std = curves["fedgrow"]
    assert list(xs) == [10, 20]  # step 30: only two of three seeds; the unevaluated row is left out
    assert list(mean) == pytest.approx([statistics.fmean([0.5, 0.6, 0.7]), statistics.fmean([0.6, 0.7, 0.9])])
    assert list(std) == pytest.approx([statistics.stdev([0.5, 0.6, 0.7]), statistics.stdev([0.6, 0.7, 0.9])])
    assert list(curves["small-only"][2]) == [0.0]  # one seed: no band


def test_results_page_states_every_number_from_the_records(tmp_path, monkeypatch):
    from experiments import results_page

    runs = [("fedgrow", s, [0.80 + 0.01 * s, 0.70], 1000, 10.0) for s in range(5)]
    runs += [("small-only", s, [0.78, 0.70 - 0.01 * s], 0, 10.0) for s in range(5)]
    runs += [("independent-ligo", s, [0.75, 0.70], 0, 10.0) for s in range(2)]
    clients, rounds = _records(runs)
    folder = tmp_path / "text"
    records.append_records(folder, clients.to_dict("records"), rounds.to_dict("records"))
    preset = tmp_path / "preset.toml"
    preset.write_text("dirichlet-alpha = 10.0\nlocal-steps = 10\neval-max-examples = 64\n")
    comp = results_page.Comparison("text", "Text: Test", folder, preset, "results-text", "A note.", bar=0.78)
    monkeypatch.setattr(results_page, "COMPARISONS", (comp,))
    monkeypatch.setattr(results_page, "_rel", lambda p: p.name)
    page = tmp_path / "results.md"
    assert results_page.main(["--page", str(page)]) == 0
    text = page.read_text()
    ours = statistics.fmean(statistics.fmean([0.80 + 0.01 * s, 0.70]) for s in range(5))
    small = statistics.fmean(statistics.fmean([0.78, 0.70 - 0.01 * s]) for s in range(5))
    assert f"reach {ours:.3f} ±" in text and f"(`small-only`) reach {small:.3f}" in text
    assert "each client's first 64 test rows" in text  # the curves' test rows, from the preset
    assert "the bar of 0.78 at alpha 10 for a budget in which the baselines learn is NOT met" in text
    assert "Fed-Grow more accurate (significant)" in text  # +0.01 + 0.01 s, every seed ahead
    assert "- Text: Test, alpha 10: Fed-Grow is significantly more accurate than `small-only`" in text
    # the why of "Fed-Grow does not win" is given for independent-ligo (a tie), not for small-only (a win)
    assert results_page.WHY["independent-ligo"] in text and results_page.WHY["small-only"] not in text
    assert "`independent-ligo` has 2 of 5 seeds" in text and "`scratch-fedavg` has none" in text
    assert "A note." in text and "x86_64, 2 cores, 24 GiB, no GPU" in text and "`abc1234`" in text
    for name in ("results.md", "paired.md", "accuracy_vs_steps.png", "accuracy_vs_bytes.png"):
        assert (folder / name).is_file(), name


def test_discussion_says_where_fed_grow_wins_loses_and_ties_from_the_verdicts():
    from types import SimpleNamespace

    from experiments import results_page

    paired = pd.DataFrame(
        {
            "dirichlet_alpha": [10.0, 10.0, 10.0],
            "baseline": ["scratch-fedavg", "small-only", "independent-ligo"],
            "verdict": [
                verdict(0.05, 0.15, "scratch-fedavg"),
                verdict(-0.04, -0.01, "small-only"),
                verdict(-0.001, 0.008, "independent-ligo"),
            ],
        }
    )
    lines = results_page.discussion([(SimpleNamespace(title="Text"), None, None, paired)])
    assert lines[2] == (
        "- Text, alpha 10: Fed-Grow is significantly more accurate than `scratch-fedavg`; "
        "is significantly less accurate than `small-only`; cannot be told apart from `independent-ligo`."
    )
