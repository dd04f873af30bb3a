"""Experiment tracking: round scalars reach TensorBoard event files and MLflow, read back independently."""

import sys
import types

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from fedgrow_core.run_config import ConfigError, RunConfig
from server_app.reporting.tracking import RunTrackers, round_scalars


def _entry(server_round, losses, evals=None):
    metrics = {str(n): {"train-loss": loss, "train-accuracy": 0.5} for n, loss in enumerate(losses)}
    for n, value in enumerate(evals or []):
        metrics[str(n)]["eval-accuracy"] = value
    return {
        "round": server_round,
        "client_metrics": metrics,
        "upload_bytes": {str(n): 1000 * (n + 1) for n in range(len(losses))},
        "download_bytes": {},
        "seconds": 2.5,
        "accepted_nodes": list(range(len(losses))),
        "rejected": [{"node_id": 9, "reason": "x"}],
        "failed": 0,
        "missing_nodes": [],
    }


def test_round_scalars_are_the_clients_means_and_the_round_counts():
    scalars = round_scalars(_entry(2, [0.4, 0.8], evals=[0.6, 0.7]))
    assert scalars["train/loss"] == pytest.approx(0.6) and scalars["eval/accuracy"] == pytest.approx(0.65)
    assert scalars["traffic/upload-bytes"] == 1500 and "traffic/download-bytes" not in scalars  # none sent
    assert scalars["round/accepted"] == 2 and scalars["round/rejected"] == 1 and scalars["round/seconds"] == 2.5


def test_tensorboard_event_files_hold_every_round_and_the_final_accuracies(tmp_path):
    trackers = RunTrackers(RunConfig(), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written before the first round
    trackers.round(_entry(1, [0.9, 0.7]))
    trackers.round(_entry(2, [0.5, 0.3]))
    trackers.final([{"partition_id": 0, "accuracy": 0.75}, {"partition_id": 1, "accuracy": 0.85}], 3)
    trackers.close()
    events = EventAccumulator(str(tmp_path / "run" / "tensorboard"))
    events.Reload()
    loss = [(e.step, e.value) for e in events.Scalars("train/loss")]
    assert loss == [(1, pytest.approx(0.8)), (2, pytest.approx(0.4))]
    assert [(e.step, e.value) for e in events.Scalars("final/mean-accuracy")] == [(3, pytest.approx(0.8))]
    assert events.Scalars("final/accuracy/partition-1")[0].value == pytest.approx(0.85)


def test_mlflow_receives_params_and_metrics_by_round(tmp_path, monkeypatch):
    calls = []
    fake = types.ModuleType("mlflow")
    fake.start_run = lambda run_name: calls.append(("start", run_name))
    fake.log_params = lambda params: calls.append(("params", params))
    fake.log_metrics = lambda metrics, step: calls.append(("metrics", step, metrics))
    fake.end_run = lambda: calls.append(("end",))
    monkeypatch.setitem(sys.modules, "mlflow", fake)
    monkeypatch.setattr("importlib.util.find_spec", lambda name: object())
    trackers = RunTrackers(RunConfig(trackers="mlflow"), tmp_path / "run-7")
    trackers.round(_entry(1, [0.2]))
    trackers.close()
    assert calls[0] == ("start", "run-7")
    assert calls[1][0] == "params" and calls[1][1]["local-steps"] == "10"
    assert calls[2][0] == "metrics" and calls[2][1] == 1 and calls[2][2]["train/loss"] == pytest.approx(0.2)
    assert calls[-1] == ("end",)
    assert not (tmp_path / "run-7").exists()  # no TensorBoard files unless asked for


def test_a_tracker_whose_package_is_missing_fails_before_any_round(tmp_path, monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None if name == "mlflow" else object())
    with pytest.raises(ConfigError, match="trackers = 'mlflow': the 'mlflow' package is not installed; pip install"):
        RunTrackers(RunConfig(trackers="tensorboard,mlflow"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
