"""End to end: `flwr run .` in local simulation (3 SuperNodes, Ray) on tiny heterogeneous clients.

Starts its own local SuperLink under a temporary FLWR_HOME (a copy of the repo's
flwr_home/config.toml) with FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1, and
stops it afterwards, even on failure.
"""

import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch
from conftest import reviews_csv, tiny_bert_folder
from safetensors.torch import load_file
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from experiments import flower_launcher
from fedgrow_core.accounting import tensor_bytes
from fedgrow_core.growth.ligo import LiGO
from fedgrow_core.protocol import INFO_MEANINGS, METRIC_MEANINGS
from fedgrow_core.run_config import parse_shape
from fedgrow_core.update_encoding import encoded_spec

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _stop_superlinks(flwr_home):
    """Stop what ``flwr run`` started for ``flwr_home``: processes whose environment names it, by pid."""
    flower_launcher.stop_local_superlink(flwr_home)


def _local_superlink_running() -> bool:
    import httpx
    from flwr.cli.constant import LOCAL_SUPERLINK_HTTP_API_PORT

    try:
        return httpx.get(f"http://127.0.0.1:{LOCAL_SUPERLINK_HTTP_API_PORT}/health", timeout=1).is_success
    except httpx.HTTPError:
        return False


def _flwr_run(tmp: Path, overrides: dict) -> tuple[int, str, str | None]:
    """``flwr run`` of this app with ``overrides`` against a local SuperLink of its own, stopped afterwards.

    Returns the exit status, the log, and ``run_failure``'s verdict (asked before the SuperLink stops).
    """
    lines = [f"{k} = {json.dumps(v)}" for k, v in overrides.items()]
    (tmp / "run.toml").write_text("\n".join(lines) + "\n")
    home = flower_launcher.prepare_flwr_home(tmp / "flwr-home")
    try:
        status = flower_launcher.flwr_run(tmp / "run.toml", home, tmp / "flwr.log", timeout=600)
        log = (tmp / "flwr.log").read_text(errors="replace")
        failure = flower_launcher.run_failure(log, home)
    finally:
        _stop_superlinks(home)
    return status, log, failure


@pytest.fixture(scope="module")
def flwr_run(tmp_path_factory):
    # `flwr run` reuses any local SuperLink already listening on its fixed port, whatever
    # environment started it; this test must start (and stop) its own.
    assert not _local_superlink_running(), "a local Flower SuperLink is already running: stop it first"
    tmp = tmp_path_factory.mktemp("flwr")
    models = [
        tiny_bert_folder(tmp / "bert-1x32", 1, 32, 2, 64, 0),
        tiny_bert_folder(tmp / "bert-2x32", 2, 32, 2, 64, 1),
    ]
    reviews_csv(tmp / "reviews.csv", 400, text_column="review", label_column="verdict")
    overrides = {
        "dataset": str(tmp / "reviews.csv"),
        "text-column": "review",
        "label-column": "verdict",
        "client-models": ",".join(models),
        "intermediate-shape": "2x32x64x2",
        "target-shape": "3x64x128x4",
        "num-server-rounds": 2,
        "local-steps": 3,
        "batch-size": 16,
        "max-length": 32,
        "finetune-steps": 2,
        "partitioner": "iid",
        "output-dir": str(tmp / "out"),
        "cache-dir": str(tmp / "cache"),
        "audit-dir": str(tmp / "audit"),
        # the smallest message: low-rank Global-LiGO, updates sent as int8 with error feedback
        "global-rank": 4,
        "update-encoding": "int8",
    }
    status, log, failure = _flwr_run(tmp, overrides)
    assert status == 0 and failure is None, (failure, log[-4000:])
    runs = list((tmp / "out").glob("*-text-geometric-median"))
    assert len(runs) == 1, log[-4000:]
    return runs[0], overrides, models, log


#: Lines a run's log must not show: load reports of the expected new task head, progress bars of
#: model loading and tokenisation, Ray's accelerator warning, Flower's deprecated federation options
#: and empty federated-evaluation lines, and averaged parameter counts.
NOISE = (
    "LOAD REPORT",
    "Loading weights",
    "examples/s",  # any `datasets` progress bar: generating, filtering, mapping, flattening
    "it/s]",  # any tqdm bar
    "FutureWarning",
    "deprecated",
    "fraction_evaluate",
    "Evaluate Metrics",
    "MetricRecord: None",
    "trainable-params",
    "Final results",
)


def test_the_log_is_quiet_and_reports_progress(flwr_run):
    _, overrides, _, log = flwr_run
    shown = [noise for noise in NOISE if noise in log]
    assert not shown, shown
    assert "(3 simulated SuperNodes)" in log  # flwr_home/federation.toml, not Flower's default of 2
    for partition in (0, 1, 2):  # every client reports its steps, loss and seconds
        steps = overrides["local-steps"]
        assert f"partition {partition}, grow round 1: step {steps}/{steps}, loss " in log
    assert "round 1: 3/3 replies accepted, train loss " in log
    assert "mean accuracy " in log and "summary in " in log


def events_scalars(run_dir, tag):
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    return events.Scalars(tag)


def test_run_folder_holds_metrics_plot_and_global_ligo(flwr_run):
    run_dir, cfg, _, log = flwr_run
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    # two growth rounds, then the final fine-tuning (finetune-steps / local-steps = 2 / 3, rounded up: 1 round)
    assert [(r["round"], r["phase"]) for r in rows] == [(1, "grow"), (2, "grow"), (3, "finetune-evaluate")]
    assert all(r["accepted"] == 3 and r["rejected"] == 0 for r in rows)
    assert all(0 <= r["eval-accuracy"] <= 1 for r in rows)
    header = "round,phase,eval-accuracy,received-accuracy,grown-accuracy,relative-change,update-cosine,train-loss"
    assert (run_dir / "metrics.csv").read_text().splitlines()[0].startswith(header)
    # the Global-LiGO's diagnostics in each growth round; the grown models before fine-tuning at the end
    assert all(r["relative-change"] > 0 and -1 <= r["update-cosine"] <= 1 for r in rows[:2])
    assert all(0 <= r["received-accuracy"] <= 1 for r in rows[:2]) and 0 <= rows[2]["grown-accuracy"] <= 1
    assert len(events_scalars(run_dir, "global-ligo/relative-change")) == 2
    change = json.loads((run_dir / "summary.json").read_text())["global_ligo_relative_change"]
    assert 0 < change < 1
    assert (run_dir / "metrics.png").stat().st_size > 1000
    events = EventAccumulator(str(run_dir / "tensorboard"))  # written round by round, read back by TensorBoard
    events.Reload()
    logged = [(e.step, e.value) for e in events.Scalars("eval/accuracy")]
    assert [step for step, _ in logged] == [1, 2]
    assert [value for _, value in logged] == pytest.approx([r["eval-accuracy"] for r in rows[:2]])
    assert len(events.Scalars("final/accuracy/partition-0")) == 1
    inter, target = parse_shape(cfg["intermediate-shape"]), parse_shape(cfg["target-shape"])
    expected = LiGO(inter, target, seed=0, rank=cfg["global-rank"]).state_dict()
    final = load_file(str(run_dir / "global_ligo.safetensors"))
    assert {k: v.shape for k, v in final.items()} == {k: v.shape for k, v in expected.items()}
    assert any(not torch.equal(final[k], expected[k]) for k in expected)  # training moved it
    assert "round 2: 3/3 replies accepted, train loss " in log


def test_summary_reports_every_client(flwr_run):
    run_dir, cfg, models, _ = flwr_run
    summary = json.loads((run_dir / "summary.json").read_text())
    for key in ("mode", "rounds", "clients", "mean_accuracy", "std_accuracy", "upload_bytes_per_round"):
        assert key in summary
    assert summary["mode"] == "fedgrow" and summary["rounds"] == 2
    assert [c["partition_id"] for c in summary["clients"]] == [0, 1, 2]
    names = [Path(m).name for m in models]  # the folder's name only: a client's paths stay private
    assert [c["model"] for c in summary["clients"]] == [names[0], names[1], names[0]]  # cycling
    for c in summary["clients"]:
        assert 0 <= c["accuracy"] <= 1 and 0 <= c["precision"] <= 1 and c["trainable_params"] > 0
    accs = [c["accuracy"] for c in summary["clients"]]
    assert summary["mean_accuracy"] == pytest.approx(sum(accs) / 3)
    inter, target = parse_shape(cfg["intermediate-shape"]), parse_shape(cfg["target-shape"])
    sent = LiGO(inter, target, rank=cfg["global-rank"]).state_dict()
    spec = encoded_spec({k: (tuple(v.shape), "float32") for k, v in sent.items()}, "int8")
    int8_bytes = sum(math.prod(shape) * (1 if dtype == "int8" else 4) for shape, dtype in spec.values())
    for entry in summary["rounds_log"]:  # every reply carried exactly the int8 update and its scales
        assert set(entry["payload_bytes"].values()) == {int8_bytes}
    # serialised messages: the payload plus names, .npy headers and metrics, a few kB at most
    assert int8_bytes < summary["upload_bytes_per_round"] < int8_bytes + 20_000
    assert tensor_bytes(sent) < summary["download_bytes_per_round"] < tensor_bytes(sent) + 20_000
    ratio = summary["upload_bytes_per_round"] / summary["model_bytes"]
    assert summary["upload_over_model_bytes"] == pytest.approx(ratio)
    assert int8_bytes < tensor_bytes(sent)  # int8 of the update and its scales, not float32 values
    assert summary["wall_time_s"] > 0


def test_each_client_saved_an_ordinary_grown_model(flwr_run):
    run_dir, cfg, _, _ = flwr_run
    target = parse_shape(cfg["target-shape"])
    for pid in range(3):
        folder = run_dir / "clients" / f"partition-{pid}" / "grown_model"  # inside the run's own folder
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        assert model.config.num_hidden_layers == target.layers and model.config.hidden_size == target.hidden
        assert model.config.id2label == {0: "0", 1: "1"}  # the CSV's verdicts, named by their values
        card = (folder / "README.md").read_text()
        assert f"partition {pid}," in card and "AutoModelForSequenceClassification.from_pretrained" in card
        assert re.search(r"accuracy\s+0\.\d{4}, macro precision 0\.\d{4}", card)
        batch = AutoTokenizer.from_pretrained(folder)(["a fine film"], return_tensors="pt")
        assert model(**batch).logits.shape == (1, 2)


#: Serialisation overhead allowed per message (bytes): names, shapes, dtypes, .npy headers, metrics, configs.
METADATA_BYTES_PER_TENSOR = 256
METADATA_BYTES_PER_MESSAGE = 2048


def test_privacy_audit_only_the_global_ligo_leaves_a_client(flwr_run):
    """Every reply of every client (egress audit mod): Global-LiGO tensors only, documented scalar metrics."""
    _, cfg, _, _ = flwr_run
    files = sorted(Path(cfg["audit-dir"]).glob("egress-*.jsonl"))
    assert len(files) == 3  # one per SuperNode
    records = [json.loads(line) for f in files for line in f.read_text().splitlines()]
    glob = LiGO(parse_shape(cfg["intermediate-shape"]), parse_shape(cfg["target-shape"]), rank=cfg["global-rank"])
    spec = encoded_spec({k: (tuple(v.shape), "float32") for k, v in glob.state_dict().items()}, "int8")
    expected = {k: (list(shape), dtype) for k, (shape, dtype) in spec.items()}  # the int8 update and its scales
    update_bytes = sum(math.prod(shape) * (1 if dtype == "int8" else 4) for shape, dtype in spec.values())
    train = [r for r in records if r["message_type"] == "train"]
    final = [r for r in records if r["message_type"] == "evaluate"]
    preflight = [r for r in records if r["message_type"] == "query"]
    assert len(train) == 3 * cfg["num-server-rounds"] and len(final) == 3 and len(preflight) == 3
    assert len(records) == len(train) + len(final) + len(preflight)
    for r in records:
        assert r["error"] is None
        for metrics in r["metrics"].values():
            assert set(metrics) <= set(METRIC_MEANINGS), set(metrics) - set(METRIC_MEANINGS)
            assert set(metrics.values()) <= {"int", "float"}  # scalars only
        for rname, configs in r["configs"].items():
            assert set(configs) <= set(INFO_MEANINGS)
            assert all("/" not in v for v in r["config_values"][rname].values())  # no client path
    for r in train:
        assert r["phase"] == "grow"
        assert {name: (shape, dtype) for _, name, shape, dtype, _ in r["arrays"]} == expected
        assert len(r["arrays"]) == len(expected)  # no name twice, no second record
        assert r["tensor_bytes"] == update_bytes
    assert all(r["arrays"] == [] and r["tensor_bytes"] == 0 for r in final + preflight)
    total = sum(r["content_bytes"] for r in records)
    payload = update_bytes * len(train)
    bound = METADATA_BYTES_PER_TENSOR * len(expected) * len(train) + METADATA_BYTES_PER_MESSAGE * len(records)
    assert payload <= total <= payload + bound, (total, payload, bound)


def test_a_node_that_cannot_set_up_stops_the_run_before_any_training(flwr_run, tmp_path):
    """Preflight: a client model folder that does not exist fails the run before round 1, naming the problem."""
    _, cfg, models, _ = flwr_run  # runs after the main run (one local SuperLink at a time)
    missing = tmp_path / "no-such-model"
    overrides = {**cfg, "client-models": f"{models[0]},{missing}", "output-dir": str(tmp_path / "out")}
    overrides.pop("audit-dir")
    status, log, failure = _flwr_run(tmp_path, overrides)
    assert "preflight failed, no training started" in log, log[-3000:]
    # `flwr run --stream` exits 0 all the same; the run's status says it failed, and why
    assert failure is not None and "finished:failed" in failure and "preflight failed" in failure, failure
    assert "no-such-model" in log
    assert "[ROUND 1" not in log and "round 1:" not in log
    assert not list((tmp_path / "out").glob("*-text-*"))  # no run folder
