"""Test harness: run the server's shared rounds against test ClientApps in Flower's simulation runtime.

``simulate`` runs ``flwr.simulation.run_simulation`` (Ray backend, one CPU per
ClientApp) with a ServerApp that first sends a ``warmup`` message to every node
(so Ray actor start-up does not count against ``round-timeout``; each node
answers with its ``partition-id``), then runs :func:`server_app.orchestration.phases.shared_rounds`
exactly as the Fed-Grow ServerApp does.
"""

from __future__ import annotations

import sys
import time
from types import ModuleType

import numpy as np
import ray.cloudpickle
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

from fedgrow_core.protocol import Phase
from fedgrow_core.run_config import RunConfig
from server_app.orchestration.phases import shared_rounds
from server_app.orchestration.strategy import run_checks, strategy_for_run

WARMUP = "warmup"


def train_metrics(num_examples: int, **extra) -> dict:
    """The metrics of a well-formed round reply (the keys the real client reports), ``extra`` added or overriding."""
    return {
        "num-examples": num_examples,
        "train-loss": 0.5,
        "train-accuracy": 0.5,
        "train-seconds": 1.0,
        "trainable-params": 10,
        "compute-threads": 1,
        **extra,
    }


def warmup_reply(msg: Message, context: Context) -> Message:
    """What a test ClientApp answers to the warm-up message."""
    pid = int(context.node_config["partition-id"])
    return Message(RecordDict({"metrics": MetricRecord({"partition-id": pid})}), reply_to=msg)


def phase_of(msg: Message) -> str:
    """The ``phase`` of a server message."""
    return str(msg.content["config"].get("phase", ""))


def wait_for_registration(grid: Grid, num_nodes: int, timeout: float = 120) -> None:
    """Wait up to ``timeout`` seconds until ``num_nodes`` nodes have registered (they do so asynchronously)."""
    deadline = time.monotonic() + timeout
    while len(list(grid.get_node_ids())) < num_nodes and time.monotonic() < deadline:
        time.sleep(0.5)


def with_run_config(context: Context, run_config: dict) -> Context:
    """``context`` with ``run_config`` (``run_simulation`` gives apps an empty one); same node config and state."""
    return Context(context.run_id, context.node_id, context.node_config, context.state, dict(run_config))


def simulate_fedgrow_server(client_app: ClientApp, run_config: dict, num_nodes: int, test_module: ModuleType) -> None:
    """Run the real Fed-Grow ServerApp's ``main`` under ``run_config`` against ``client_app`` in simulation.

    ``client_app``'s handlers are defined in ``test_module`` (shipped to the Ray
    workers by value, with this module); they must give the real ClientApp the
    same ``run_config`` (:func:`with_run_config`).
    """
    import server_app.app as fedgrow_server

    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        wait_for_registration(grid, num_nodes)
        fedgrow_server.main(grid, with_run_config(context, run_config))

    ray.cloudpickle.register_pickle_by_value(test_module)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run_simulation(server, client_app, num_supernodes=num_nodes, backend_config={"client_resources": {"num_cpus": 1}})


def simulate(
    client_app: ClientApp,
    run: RunConfig,
    num_nodes: int,
    arrays: dict[str, np.ndarray],
    rounds: int,
    test_module: ModuleType,
):
    """Run ``rounds`` shared rounds of ``run``'s strategy over ``arrays`` against ``client_app``.

    ``client_app``'s handlers are defined in ``test_module``: that module and
    this one are shipped to the Ray workers by value (they cannot import them).

    Returns
    -------
    tuple
        (final arrays as ``{name: np.ndarray}``, round-log entries,
        ``{node_id: partition_id}``).
    """
    out: dict = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        wait_for_registration(grid, num_nodes)
        warm = [
            Message(
                RecordDict({"config": ConfigRecord({"phase": WARMUP})}),
                dst_node_id=node,
                message_type=MessageType.TRAIN,
            )
            for node in grid.get_node_ids()
        ]
        replies = list(grid.send_and_receive(warm, timeout=600))
        out["partitions"] = {m.metadata.src_node_id: int(m.content["metrics"]["partition-id"]) for m in replies}
        record = ArrayRecord({k: torch.from_numpy(v) for k, v in arrays.items()})
        grown = run.model_copy(update={"num_server_rounds": rounds})
        checks = run_checks(grown, encoded=True, diagnostics=True)
        strategy = strategy_for_run(grown, len(list(grid.get_node_ids())), checks)
        final, entries = shared_rounds(grid, grown, strategy, record, Phase.GROW)
        out["final"] = {k: v.numpy() for k, v in final.items()}
        out["entries"] = entries

    ray.cloudpickle.register_pickle_by_value(test_module)
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    run_simulation(server, client_app, num_supernodes=num_nodes, backend_config={"client_resources": {"num_cpus": 1}})
    assert "final" in out, "the simulated ServerApp did not finish"
    return out["final"], out["entries"], out["partitions"]
