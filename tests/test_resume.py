"""Server checkpoint and resume, end to end in Flower's simulation runtime with the real apps.

Three runs of the real ServerApp and ClientApp (FedAdam, 2 nodes, tiny BERT
clients): an uninterrupted 4-round run; a run whose server dies right after
writing its round-2 checkpoint; and ``resume-from`` that run folder up to round
4, in a fresh simulation (new processes, empty ``Context.state``: the clients
must pick up their Local-LiGO, head, optimiser and batch position from disk).
The resumed Global-LiGO must equal the uninterrupted one.
"""

import json
import re
import sys

import numpy as np
import pytest
from conftest import reviews_csv, tiny_bert_folder
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.numpy import load_file
from simulated_federation import simulate_fedgrow_server, with_run_config

import client_app.app as fedgrow_client
import server_app.orchestration.phases
from fedgrow_core.run_config import ConfigError, RunConfig
from server_app.persistence.checkpoint import CHECKPOINT_FILE, check_resumable, read_checkpoint

NODES = 2
#: Set by the fixture before each simulation; shipped to the Ray workers with this module (by value).
RUN_CONFIG: dict = {}

client = ClientApp()


def _with_config(context: Context) -> Context:
    return with_run_config(context, RUN_CONFIG)


@client.query()
def query(msg: Message, context: Context) -> Message:
    return fedgrow_client.query(msg, _with_config(context))


@client.train()
def train(msg: Message, context: Context) -> Message:
    return fedgrow_client.train(msg, _with_config(context))


@client.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return fedgrow_client.evaluate(msg, _with_config(context))


class ServerStopped(RuntimeError):
    """Raised by the test to stop the server right after a checkpoint."""


def _simulate(config: dict) -> None:
    RUN_CONFIG.clear()
    RUN_CONFIG.update(config)
    simulate_fedgrow_server(client, RUN_CONFIG, NODES, sys.modules[__name__])


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    models = [tiny_bert_folder(tmp / "bert-a", 1, 32, 2, 64, 0), tiny_bert_folder(tmp / "bert-b", 2, 32, 2, 64, 1)]
    reviews_csv(tmp / "reviews.csv", 200)
    base = {
        "dataset": str(tmp / "reviews.csv"),
        "client-models": ",".join(models),
        "intermediate-shape": "2x32x64x2",
        "target-shape": "3x48x96x3",
        "num-server-rounds": 4,
        "local-steps": 3,  # 3 steps of 16 rows: rounds cross epoch boundaries of the ~80-row partitions
        "batch-size": 16,
        "max-length": 32,
        "finetune-steps": 1,
        "partitioner": "iid",
        "strategy": "fedadam",
        "save-models": False,
        "cache-dir": str(tmp / "cache"),
    }
    _simulate({**base, "output-dir": str(tmp / "uninterrupted")})
    (full,) = (tmp / "uninterrupted").glob("*-text-fedadam")

    real_write = server_app.orchestration.phases.write_checkpoint

    def write_then_die(run_dir, run, server_round, *args):
        path = real_write(run_dir, run, server_round, *args)
        if server_round == 2:
            raise ServerStopped("stopped after round 2")
        return path

    server_app.orchestration.phases.write_checkpoint = write_then_die
    try:
        with pytest.raises(ServerStopped):  # run_simulation re-raises the ServerApp's exception
            _simulate({**base, "output-dir": str(tmp / "interrupted")})
    finally:
        server_app.orchestration.phases.write_checkpoint = real_write
    (stopped,) = (tmp / "interrupted").glob("*-text-fedadam")
    stopped_round = read_checkpoint(stopped).server_round
    _simulate({**base, "output-dir": str(tmp / "interrupted"), "resume-from": str(stopped)})
    return full, stopped, stopped_round, base


def test_a_stopped_run_resumed_ends_with_the_uninterrupted_global_ligo(runs):
    full, resumed, stopped_round, _ = runs
    assert stopped_round == 2, "the interrupted run did not stop after round 2"
    expected = load_file(str(full / "global_ligo.safetensors"))
    got = load_file(str(resumed / "global_ligo.safetensors"))
    assert set(got) == set(expected)
    start = read_checkpoint(full)  # rounds 1..4 moved the Global-LiGO: the comparison is not trivial
    assert start.server_round == 4
    for name in expected:
        np.testing.assert_allclose(got[name], expected[name], rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(np.abs(v).sum() > 0 for v in read_checkpoint(full).strategy["arrays"].values())


def test_the_resumed_run_folder_holds_all_four_rounds_once(runs):
    _, resumed, _, _ = runs
    rows = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["phase"]) for r in rows][:4] == [(r, "grow") for r in (1, 2, 3, 4)]
    summary = json.loads((resumed / "summary.json").read_text())
    assert summary["rounds"] == 4
    assert read_checkpoint(resumed).server_round == 4
    assert not list(resumed.glob(".*.tmp")), "a temporary checkpoint file was left behind"


def test_clients_kept_their_private_state_on_disk_per_round(runs):
    _, resumed, _, base = runs
    # one folder per run tag, run fingerprint and Flower run: the resumed run found the state that the
    # interrupted run of its configuration wrote (rounds 1-2), and wrote its own (rounds 3-4) beside it
    folders = sorted((resumed.parent / "clients").glob(f"partition-*/state/{resumed.name}/*/run-*"))
    assert len(folders) == 2 * NODES
    folders = [f for f in folders if (f / "round-4.safetensors").is_file()]
    assert len(folders) == NODES
    for folder in folders:
        kept = sorted(int(p.stem.split("-")[1]) for p in folder.glob("round-*.safetensors"))
        assert kept == [3, 4]  # the newest two rounds
        state = load_file(str(folder / "round-4.safetensors"))
        assert int(state["data.steps"]) == 4 * base["local-steps"]
        assert not any(k.startswith("operator.global_.") for k in state), "the Global-LiGO is not private state"


def test_resume_refuses_other_settings_and_missing_checkpoints(runs, tmp_path):
    _, resumed, _, base = runs
    config = {**base, "output-dir": str(tmp_path), "resume-from": str(resumed), "lr-width": 0.5}
    run = RunConfig.from_flower(config)
    written = re.escape(str(base.get("lr-width", RunConfig().lr_width)))  # the interrupted run's value
    with pytest.raises(ConfigError, match=rf"lr-width = '0.5', but the checkpoint .* written with '{written}'"):
        check_resumable(read_checkpoint(resumed), run)
    with pytest.raises(ConfigError, match=f"no {CHECKPOINT_FILE}"):
        read_checkpoint(tmp_path)
    with pytest.raises(ConfigError, match="is not checkpointed, so not resumed"):
        RunConfig.from_flower({**config, "mode": "small-only"})
