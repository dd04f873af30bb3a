"""Smoke test of the experiment runner: every mode, 1 seed, 2 rounds, tiny heterogeneous BERTs.

Runs the real `flwr run` (local simulation, its own FLWR_HOME) four times through
`python -m experiments.runner`'s entry point, then checks the table against
parameter and byte counts computed here, by hand, from the shapes.
"""

import json
import math

import pandas as pd
import pytest
from conftest import reviews_csv, tiny_bert_folder
from test_flower_app import _local_superlink_running

from experiments import runner
from fedgrow_core.accounting import encoded_bytes
from fedgrow_core.growth.ligo import LiGO
from fedgrow_core.modes import mode_names
from fedgrow_core.run_config import parse_shape

VOCAB, POSITIONS, LABELS = 30522, 64, 2
ROUNDS, LOCAL_STEPS, FINETUNE_STEPS = 2, 2, 2


def ligo_params(source, target, tied):
    """Fed-Grow / LiGO operator size from the shapes: 16 depth matrices (L_t x L_s), the
    residual-stream width matrix, and per layer (or once, tied) q/k/v and FFN width matrices;
    plus the split weights of the spaces read through an input side (res; per layer v and FFN)."""
    per_layer = 1 if tied else target.layers
    dd, ff = (target.hidden - source.hidden) * source.hidden, (target.ffn - source.ffn) * source.ffn
    split = (target.hidden - source.hidden) + per_layer * ((target.hidden - source.hidden) + (target.ffn - source.ffn))
    return 16 * target.layers * source.layers + dd + per_layer * (3 * dd + ff) + split


def bert_params(shape):
    """BertForSequenceClassification with LABELS classes, by hand."""
    d, f = shape.hidden, shape.ffn
    embeddings = VOCAB * d + POSITIONS * d + 2 * d + 2 * d
    layer = 4 * (d * d + d) + 2 * d + (d * f + f) + (f * d + d) + 2 * d
    return embeddings + shape.layers * layer + (d * d + d) + (d * LABELS + LABELS)


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    assert not _local_superlink_running(), "a local Flower SuperLink is already running: stop it first"
    tmp = tmp_path_factory.mktemp("experiments")
    models = [
        tiny_bert_folder(tmp / "bert-1x32", 1, 32, 2, 64, 0),
        tiny_bert_folder(tmp / "bert-2x32", 2, 32, 2, 64, 1),
    ]
    reviews_csv(tmp / "reviews.csv", 300)
    preset = {
        "dataset": str(tmp / "reviews.csv"),
        "client-models": ",".join(models),
        "intermediate-shape": "2x32x64x2",
        "target-shape": "3x64x128x4",
        "num-server-rounds": ROUNDS,
        "local-steps": LOCAL_STEPS,
        "finetune-steps": FINETUNE_STEPS,
        "batch-size": 8,
        "max-length": 32,
        "max-test-examples": 20,
        "partitioner": "iid",
        "cache-dir": str(tmp / "cache"),
    }
    (tmp / "preset.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in preset.items()))
    out = tmp / "results"
    assert runner.main(["--preset", str(tmp / "preset.toml"), "--seeds", "0", "--out", str(out)]) == 0
    summaries = {s["mode"]: s for s in (json.loads(p.read_text()) for p in out.glob("runs/*/output/*/summary.json"))}
    return pd.read_csv(out / "results.csv"), summaries, out, preset


def test_every_mode_has_a_filled_row(results):
    table, summaries, out, _ = results
    assert list(table["mode"]) == list(mode_names())
    assert not table.isna().any().any(), table.to_string()
    assert (table["seeds"] == 1).all()
    assert table["accuracy_mean"].between(0, 1).all() and table["precision_mean"].between(0, 1).all()
    assert (table["wall_time_s_mean"] > 0).all()
    md = (out / "results.md").read_text()
    assert all(f"| {m} " in md for m in mode_names())
    for name in ("accuracy_vs_steps.png", "accuracy_vs_bytes.png"):
        assert (out / name).stat().st_size > 5000


def test_records_hold_every_client_of_every_run_and_a_second_call_runs_nothing(results, capsys):
    _, summaries, out, _ = results
    clients, rounds = pd.read_csv(out / "clients.csv"), pd.read_csv(out / "rounds.csv")
    assert sorted(clients["mode"].unique()) == sorted(mode_names())
    for mode, summary in summaries.items():
        rows = clients[clients["mode"] == mode].sort_values("partition_id")
        assert list(rows["accuracy"]) == pytest.approx([c["accuracy"] for c in summary["clients"]]), mode
        last = rounds[rounds["mode"] == mode].iloc[-1]
        assert last["steps"] == ROUNDS * LOCAL_STEPS + FINETUNE_STEPS, mode
    assert clients["config"].nunique() == 1 and clients[["commit", "date", "machine"]].notna().all().all()
    # resuming: every run is recorded, so the same command starts no `flwr run` and changes no record
    before = sorted(out.glob("runs/*/output/*/summary.json"))
    assert runner.main(["--preset", str(out.parent / "preset.toml"), "--seeds", "0", "--out", str(out)]) == 0
    assert "[runner] alpha" not in capsys.readouterr().out
    assert sorted(out.glob("runs/*/output/*/summary.json")) == before
    pd.testing.assert_frame_equal(pd.read_csv(out / "clients.csv"), clients)


#: Serialisation overhead allowed per message (names, .npy headers, metrics) and per tensor, in bytes.
MESSAGE_OVERHEAD, TENSOR_OVERHEAD = 2048, 256


def test_bytes_match_the_operator_and_model_shapes(results):
    table, summaries, _, cfg = results
    inter, target = parse_shape(cfg["intermediate-shape"]), parse_shape(cfg["target-shape"])
    ligo_bytes, model_bytes = 4 * ligo_params(inter, target, tied=False), 4 * bert_params(target)
    # tensor payload of every reply, per phase, from the shapes
    # growth rounds carry the int8 update (the default update-encoding) with one float32 scale per row
    grow_bytes = encoded_bytes(LiGO(inter, target).state_dict(), "int8")
    assert grow_bytes == ligo_params(inter, target, tied=False) + 4 * (
        16 * target.layers
        + (1 + 3 * target.layers) * (target.hidden - inter.hidden)
        + target.layers * (target.ffn - inter.ffn)
        + 1
        + 2 * target.layers  # split.res (one row), split.v and split.ffn (a row per layer)
    )
    expected = {"grow": grow_bytes, "collect": model_bytes, "train-shared": model_bytes, "train-local": 0}
    for mode, summary in summaries.items():
        for entry in summary["rounds_log"]:
            local = mode in ("independent-ligo", "independent-dual-ligo", "small-only")  # nothing shared
            assert set(entry["payload_bytes"].values()) == {0 if local else expected[entry["phase"]]}, mode
    by_mode = table.set_index("mode")
    fedgrow = by_mode.loc["fedgrow", "upload_bytes_per_round_mean"]  # serialised replies: payload plus a little
    # 16 depth + 5 width + 3 split tensors, each with its scales
    assert grow_bytes < fedgrow <= grow_bytes + 48 * TENSOR_OVERHEAD + MESSAGE_OVERHEAD
    assert by_mode.loc["fedgrow", "upload_bytes_total_mean"] == pytest.approx(ROUNDS * fedgrow)
    # the server collects the seeded initial model once, then ROUNDS rounds of FedAvg
    scratch = by_mode.loc["scratch-fedavg", "upload_bytes_per_round_mean"]
    assert model_bytes < scratch <= model_bytes * 1.01
    assert by_mode.loc["scratch-fedavg", "upload_bytes_total_mean"] == pytest.approx((1 + ROUNDS) * scratch)
    for mode in ("independent-ligo", "independent-dual-ligo", "small-only"):  # metrics only
        assert 0 < by_mode.loc[mode, "upload_bytes_per_round_mean"] < MESSAGE_OVERHEAD
    for mode in ("fedgrow", "scratch-fedavg"):
        summary = summaries[mode]
        assert summary["upload_over_model_bytes"] == pytest.approx(summary["upload_bytes_per_round"] / model_bytes)
        assert summary["download_bytes_per_round"] > (ligo_bytes if mode == "fedgrow" else 0)


def test_trainable_parameters_match_the_shapes(results):
    _, summaries, _, cfg = results
    inter, target = parse_shape(cfg["intermediate-shape"]), parse_shape(cfg["target-shape"])
    smalls = [parse_shape("1x32x64x2"), parse_shape("2x32x64x2"), parse_shape("1x32x64x2")]  # cycling
    head = target.hidden * LABELS + LABELS
    expected = {
        "fedgrow": [ligo_params(s, inter, tied=True) + ligo_params(inter, target, tied=False) + head for s in smalls],
        "independent-ligo": [ligo_params(s, target, tied=False) + head for s in smalls],
        "independent-dual-ligo": [
            ligo_params(s, inter, tied=True) + ligo_params(inter, target, tied=False) + head for s in smalls
        ],
        "small-only": [bert_params(s) for s in smalls],
        "scratch-fedavg": [bert_params(target)] * 3,
    }
    for mode, params in expected.items():
        clients = summaries[mode]["clients"]
        assert [c["trainable_params"] for c in clients] == params, mode
        model = [bert_params(s) for s in smalls] if mode == "small-only" else [bert_params(target)] * 3
        assert [c["model_params"] for c in clients] == model, mode
    assert summaries["small-only"]["trainable_params_per_client"] == pytest.approx(sum(expected["small-only"]) / 3)


def test_curves_cover_the_same_step_budget(results):
    _, summaries, out, _ = results
    last = ROUNDS + math.ceil(FINETUNE_STEPS / LOCAL_STEPS)  # ROUNDS * LOCAL_STEPS + FINETUNE_STEPS steps
    for mode in mode_names():
        (metrics,) = out.glob(f"runs/*-{mode}-seed0/output/*/metrics.jsonl")
        rows = [json.loads(line) for line in metrics.read_text().splitlines()]
        trained = [r for r in rows if r["phase"] != "collect"]
        assert all(r["eval-accuracy"] is not None for r in trained), mode
        assert trained[-1]["phase"] == "finetune-evaluate" and trained[-1]["round"] == last, mode
        assert trained[-1]["eval-accuracy"] == pytest.approx(summaries[mode]["mean_accuracy"])
        assert rows[-1]["cumulative-upload-bytes"] == summaries[mode]["upload_bytes_total"]


def test_a_run_that_never_started_names_flowers_own_error_and_its_run_config(tmp_path):
    from experiments.flower_launcher import run_failure

    # what `flwr run --run-config dup.toml` prints for a TOML file that sets `seed` twice (flwr 1.41)
    log = (
        "Starting local SuperLink on 127.0.0.1:39091...\n"
        "Using SuperLink: local-simulation (127.0.0.1:39091)\n"
        "\x1b[31m╭─ Error ──────────────────────────────────────────────────────────────────────╮\x1b[0m\n"
        "│ Cannot overwrite a value (at line 2, column 9)                               │\n"
        "╰──────────────────────────────────────────────────────────────────────────────╯\n"
    )
    assert run_failure(log, tmp_path, "presets/dup.toml") == (
        "flwr run started no run: Cannot overwrite a value (at line 2, column 9) (in presets/dup.toml)"
    )
    assert run_failure("Traceback ...\nValueError: bad\n", tmp_path) == "flwr run started no run: ValueError: bad"
