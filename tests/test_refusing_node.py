"""A node that refuses the run at preflight is left out of it, and the run goes on with the others.

Three nodes through the real ServerApp and ClientApp in this process
(:class:`benchmarks.in_process_grid.InProcessGrid`); one node's node config
names hardware it lacks (``device = "cuda:99"``), or a device that is none.
That node refuses at preflight with the reason; the server logs it, records it
in ``summary.json`` and sends it nothing more; the other two train and finish.
With fewer accepting nodes than ``min-train-nodes`` the run stops before round 1.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import client_app.app as fedgrow_client
import server_app.app as fedgrow_server
from benchmarks.in_process_grid import federation
from benchmarks.robustness import small_vit_config
from server_app.orchestration.phases import PreflightError

SHORT = {
    "pretrain-steps": 20,
    "num-server-rounds": 2,
    "local-steps": 2,
    "max-train-examples": 100,
    "max-test-examples": 40,
    "finetune-steps": 1,
    "save-models": False,
}
REFUSER = 1003  # node ids are 1001, 1002, 1003


def _run(work: Path, device: str, run_id: int, **extra) -> tuple[dict, list]:
    config = {**small_vit_config(work), **SHORT, "output-dir": str(work / f"out-{run_id}"), **extra}
    grid = federation(fedgrow_client.app, 3, config, run_id, {"node-policy": "open"})
    grid.nodes[REFUSER].context.node_config["device"] = device
    served = []
    grid.tamper = lambda sent, replies: served.extend(m.metadata.dst_node_id for m in sent) or replies
    grid.run_server(fedgrow_server.main, Context(run_id, 0, {}, RecordDict(), dict(config)))
    (summary,) = Path(config["output-dir"]).glob("*/summary.json")
    return json.loads(summary.read_text()), served


@pytest.mark.parametrize("device", ["cuda:99", "gpu"])
def test_the_run_goes_on_without_the_node_that_refused(tmp_path, device):
    summary, served = _run(tmp_path, device, 51)
    (refused,) = summary["preflight_refused"]
    assert refused["node_id"] == REFUSER
    if device == "cuda:99":
        assert refused["reason"].startswith("RefusedMessage: device = 'cuda:99', but this machine has")
    else:
        assert refused["reason"].startswith("NodePolicyError: bad node config")
        assert "device = 'gpu'" in refused["reason"]
    # the others trained every round and finished; the refusing node was sent nothing after preflight
    assert sorted(c["node_id"] for c in summary["clients"]) == [1001, 1002]
    assert [sorted(r["accepted_nodes"]) for r in summary["rounds_log"]] == [[1001, 1002]] * 2
    assert served.count(REFUSER) == 1 and served.count(1001) == 4  # preflight, 2 rounds, final phase


def test_too_few_accepting_nodes_stop_the_run_before_round_one(tmp_path):
    with pytest.raises(PreflightError, match=r"2 node\(s\) accepted the run, fewer than min-train-nodes = 3"):
        _run(tmp_path, "cuda:99", 52, **{"min-train-nodes": 3})
    assert not list((tmp_path / "out-52").glob("*/summary.json"))
