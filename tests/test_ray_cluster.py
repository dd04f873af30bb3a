"""Simulation on an existing multi-node Ray cluster: ClientApps are scheduled on every node.

Builds a two-node Ray cluster on this machine (``ray.cluster_utils.Cluster``: a
head and a worker, one CPU each), points Flower's Ray backend at it through
``RAY_ADDRESS`` (as ``ray start --head`` / ``ray start --address`` clusters are
used, see docs/deployment.md), runs two SuperNodes with one CPU per ClientApp, and
checks that the ClientApps ran on both Ray nodes.
"""

import sys
import time

import pytest
import ray
import ray.cloudpickle
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation
from ray.cluster_utils import Cluster

where = ClientApp()


@where.query()
def ray_node(msg: Message, context: Context) -> Message:
    node = ray.get_runtime_context().get_node_id()
    metrics = MetricRecord({"partition-id": int(context.node_config["partition-id"])})
    return Message(RecordDict({"metrics": metrics, "where": ConfigRecord({"ray-node": node})}), reply_to=msg)


def _placements(num_nodes: int) -> dict[int, str]:
    out: dict[int, str] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 120
        while len(list(grid.get_node_ids())) < num_nodes and time.monotonic() < deadline:
            time.sleep(0.5)
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in grid.get_node_ids()]
        for reply in grid.send_and_receive(messages, timeout=300):
            out[int(reply.content["metrics"]["partition-id"])] = str(reply.content["where"]["ray-node"])

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run_simulation(server, where, num_supernodes=num_nodes, backend_config={"client_resources": {"num_cpus": 1}})
    return out


def test_clientapps_run_on_both_nodes_of_an_existing_ray_cluster(monkeypatch):
    if ray.is_initialized():
        ray.shutdown()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    try:
        cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        monkeypatch.setenv("RAY_ADDRESS", cluster.address)  # what `ray start --address` users export
        placements = _placements(2)
        ray.init(address=cluster.address)
        cluster_nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert sorted(placements) == [0, 1], placements
    assert len(cluster_nodes) == 2
    assert set(placements.values()) == cluster_nodes, (placements, cluster_nodes)


@pytest.fixture(autouse=True)
def _no_stray_ray():
    yield
    if ray.is_initialized():
        ray.shutdown()
