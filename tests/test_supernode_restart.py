"""A SuperNode that restarts between rounds picks up its private state from its state folder.

Calls the real ClientApp's ``train`` handler as a SuperNode's ClientApp process
would: round 1, then round 2 either in the same process (``Context.state`` kept)
or after a restart (a new ``Context`` with empty state, the process's client
cache emptied, the same node config). Both round-2 replies must be equal; a
restart without the state folder must not be.
"""

import time

import numpy as np
import pytest
from conftest import tiny_bert_folder
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.app.message.message import make_message
from flwr.app.metadata import Metadata

import client_app.app as fedgrow_client
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig
from fedgrow_core.update_encoding import decode_update


@pytest.fixture(scope="module")
def run_config(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("restart")
    model = tiny_bert_folder(tmp / "bert", 1, 32, 2, 64, 0)
    return {
        "dataset": "rotten-tomatoes",
        "client-models": model,  # the node's own model, as a deployed SuperNode names it (node config `model`)
        "intermediate-shape": "2x32x64x2",
        "target-shape": "3x48x96x3",
        "local-steps": 3,
        "batch-size": 16,
        "max-length": 32,
        "max-train-examples": 64,
        "max-test-examples": 32,
        "partitioner": "iid",
        "cache-dir": str(tmp / "cache"),
        "output-dir": str(tmp / "out"),
    }


def _train(context: Context, arrays: ArrayRecord, server_round: int) -> Message:
    config = ConfigRecord({"phase": "grow", "server-round": server_round, "run-tag": "run-1"})
    metadata = Metadata(  # as a SuperNode receives it from the SuperLink
        run_id=1,
        message_id=f"m{server_round}",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id=str(server_round),
        created_at=time.time(),
        ttl=3600,
        message_type=MessageType.TRAIN,
    )
    msg = make_message(metadata, RecordDict({"arrays": arrays, "config": config}))
    return fedgrow_client.train(msg, context)


def _context(run_config: dict, state_dir: str) -> Context:
    # a deployed node (strict policy) names its own model; the run config's folder would be refused
    node = {"partition-id": 1, "num-partitions": 3, "state-dir": state_dir, "model": run_config["client-models"]}
    return Context(run_id=1, node_id=7, node_config=node, state=RecordDict(), run_config=run_config)


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def test_a_restarted_supernode_continues_from_its_state_folder(run_config, tmp_path):
    start = ArrayRecord(initial_global_ligo(RunConfig.from_flower(run_config)).state_dict())
    state_dir = str(tmp_path / "state")
    node = _context(run_config, state_dir)
    # round 1's reply is the int8 update (the default encoding): the server's aggregate is it decoded
    sent = {k: v.numpy() for k, v in start.items()}
    values, problem = decode_update(
        _arrays(_train(node, start, 1)), sent, RunConfig.from_flower(run_config).update_encoding
    )
    assert problem is None
    after_one = ArrayRecord({k: Array(v) for k, v in values.items()})
    kept = _train(node, after_one, 2)  # its update includes round 1's rounding error (the residual)

    fedgrow_client._CLIENTS.clear()  # a new process: nothing cached; the residual comes back from the state folder
    restarted = _train(_context(run_config, state_dir), after_one, 2)
    for name, value in _arrays(kept).items():
        np.testing.assert_array_equal(_arrays(restarted)[name], value, err_msg=name)
    assert restarted.content["metrics"]["train-loss"] == kept.content["metrics"]["train-loss"]

    fedgrow_client._CLIENTS.clear()
    forgotten = _train(_context(run_config, str(tmp_path / "elsewhere")), after_one, 2)
    assert any(not np.array_equal(_arrays(forgotten)[k], v) for k, v in _arrays(kept).items())
