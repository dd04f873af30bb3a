"""Flower's simulation on a Ray cluster whose head and worker are different hosts.

Two Linux network namespaces joined by a veth pair stand for two machines
(``10.78.0.1`` and ``10.78.0.2``): a Ray head is started in the first with
``ray start --head``, a Ray worker in the second with ``ray start --address``,
each with one CPU, and a Flower simulation driver in the first attaches to that
existing cluster the way Flower does it, through the backend config's
``init_args`` (``{"init_args": {"address": "10.78.0.1:6379"}}``, passed to
``ray.init``), with four SuperNodes and one CPU per ClientApp. Each ClientApp
replies with the IP of the Ray node it ran on: both addresses must appear.
The same driver then attaches a second time through ``RAY_ADDRESS`` alone,
which is what ``flwr run`` relies on (its federation config cannot carry an
address: checked below). See docs/deployment.md, "Ray clusters".

Every process of the cluster runs inside the test's own namespaces, and is
stopped by process group and by namespace membership (``ip netns pids``), never
by name; the namespaces (and the veth pair with them) are deleted at the end.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from network_namespaces import ip, namespaces_unavailable, stop_processes_in

VENV_BIN = Path(sys.executable).parent
HEAD_IP, WORKER_IP, GCS_PORT = "10.78.0.1", "10.78.0.2", 6379
ADDRESS = f"{HEAD_IP}:{GCS_PORT}"
NUM_SUPERNODES = 4

# The driver, run inside the head's namespace: prints one line `RESULT {json}`.
DRIVER = """
import json
import os
import sys
import time

import ray
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.simulation import run_simulation

ADDRESS, NUM_NODES = sys.argv[1], int(sys.argv[2])

client = ClientApp()


@client.query()
def where(msg: Message, context: Context) -> Message:
    time.sleep(1.0)  # hold this actor, so the other node's actor takes the next message
    record = RecordDict(
        {
            "metrics": MetricRecord({"partition-id": int(context.node_config["partition-id"])}),
            "where": ConfigRecord({"ip": ray.util.get_node_ip_address()}),
        }
    )
    return Message(record, reply_to=msg)


def placements(backend_config: dict) -> dict[int, str]:
    out: dict[int, str] = {}
    server = ServerApp()

    @server.main()
    def _main(grid: Grid, context: Context) -> None:
        deadline = time.monotonic() + 120
        while len(list(grid.get_node_ids())) < NUM_NODES and time.monotonic() < deadline:
            time.sleep(0.2)
        messages = [Message(RecordDict(), dst_node_id=n, message_type=MessageType.QUERY) for n in grid.get_node_ids()]
        for reply in grid.send_and_receive(messages, timeout=300):
            out[int(reply.content["metrics"]["partition-id"])] = str(reply.content["where"]["ip"])

    run_simulation(server, client, num_supernodes=NUM_NODES, backend_config=backend_config)
    return out


# The cluster as the head sees it, once the worker has joined.
ray.init(address=ADDRESS, include_dashboard=False, logging_level="WARNING")
deadline = time.monotonic() + 60
while len([n for n in ray.nodes() if n["Alive"]]) < 2 and time.monotonic() < deadline:
    time.sleep(0.5)
nodes = sorted(n["NodeManagerAddress"] for n in ray.nodes() if n["Alive"])
ray.shutdown()

result = {"nodes": nodes}
# Flower's way: the backend config's init_args go to ray.init (address = the existing cluster).
result["init_args"] = placements({"client_resources": {"num_cpus": 1}, "init_args": {"address": ADDRESS}})
# What `flwr run` relies on: no address in the config, RAY_ADDRESS in the environment.
os.environ["RAY_ADDRESS"] = ADDRESS
result["ray_address_env"] = placements({"client_resources": {"num_cpus": 1}})
print("RESULT " + json.dumps(result), flush=True)
"""


def _run(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def hosts():
    """Two namespaces ``(head, worker)`` joined by a veth pair: 10.78.0.1 and 10.78.0.2, ``lo`` up in each."""
    reason = namespaces_unavailable()
    if reason:
        pytest.skip(reason)
    tag = os.getpid()
    head, worker = f"fgray-head-{tag}", f"fgray-worker-{tag}"
    made: list[str] = []
    try:
        for ns in (head, worker):
            ip("netns", "add", ns)
            made.append(ns)
            ip("-n", ns, "link", "set", "lo", "up")
        ip("-n", head, "link", "add", "eth0", "type", "veth", "peer", "name", "eth0", "netns", worker)
        for ns, address in ((head, HEAD_IP), (worker, WORKER_IP)):
            ip("-n", ns, "addr", "add", f"{address}/24", "dev", "eth0")
            ip("-n", ns, "link", "set", "eth0", "up")
            # A default route, so that Ray's own address detection (a UDP "connect" to a public
            # address; nothing is sent) finds this host's address and not 127.0.0.1.
            ip("-n", ns, "route", "add", "default", "dev", "eth0")
        yield head, worker
    finally:
        stop_processes_in(made)
        for ns in made:
            _run("ip", "netns", "delete", ns)


def _reachable(netns: str, host: str, port: int) -> bool:
    probe = f"import socket; socket.create_connection(('{host}', {port}), timeout=1).close()"
    return _run("ip", "netns", "exec", netns, sys.executable, "-c", probe).returncode == 0


@pytest.fixture(scope="module")
def ray_cluster(hosts):
    """A Ray head (one CPU) in the head namespace and a Ray worker (one CPU) in the worker namespace.

    Yields ``(head namespace, log folder)``. The temporary folders are short
    ones under /tmp, not pytest's: Ray's Unix sockets live in them, and a socket
    path may not be longer than 107 bytes.
    """
    head, worker = hosts
    root = Path(tempfile.mkdtemp(prefix="fgray", dir="/tmp"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    common = ["--block", "--num-cpus", "1", "--num-gpus", "0", "--object-store-memory", "100000000"]
    common += ["--disable-usage-stats"]
    procs: list[subprocess.Popen] = []
    logs: list = []

    def start(netns: str, name: str, argv: list[str]) -> None:
        log = open(root / f"{name}.log", "w")  # noqa: SIM115 (closed at teardown)
        logs.append(log)
        procs.append(
            subprocess.Popen(
                ["ip", "netns", "exec", netns, str(VENV_BIN / "ray"), "start", *argv],
                env=env,
                cwd=root,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its own process group: stopped by pgid
            )
        )

    try:
        start(
            head,
            "head",
            ["--head", "--node-ip-address", HEAD_IP, "--port", str(GCS_PORT), "--include-dashboard", "false"]
            + ["--temp-dir", str(root / "h"), *common],
        )
        deadline = time.monotonic() + 60
        while not _reachable(worker, HEAD_IP, GCS_PORT):  # the GCS, seen from the other host
            if procs[0].poll() is not None or time.monotonic() > deadline:
                pytest.skip(f"Ray head did not start: {(root / 'head.log').read_text(errors='replace')[-2000:]}")
            time.sleep(0.5)
        start(
            worker,
            "worker",
            ["--address", ADDRESS, "--node-ip-address", WORKER_IP, "--temp-dir", str(root / "w"), *common],
        )
        yield head, root
    finally:
        for proc in procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=5)
        stop_processes_in(list(hosts))  # workers the raylets started in sessions of their own
        for log in logs:
            log.close()
        shutil.rmtree(root, ignore_errors=True)


def test_clientapps_run_on_both_hosts_of_a_ray_cluster_flower_attaches_to(ray_cluster):
    head, root = ray_cluster
    script = root / "driver.py"
    script.write_text(DRIVER)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    done = subprocess.run(
        ["ip", "netns", "exec", head, sys.executable, str(script), ADDRESS, str(NUM_SUPERNODES)],
        env=env,
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-1500:]}" for p in sorted(root.glob("*.log")))
    assert done.returncode == 0 and lines, f"driver failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}\n{logs}"
    result = json.loads(lines[-1][len("RESULT ") :])
    print(result)  # shown with -s, or on failure
    assert result["nodes"] == [HEAD_IP, WORKER_IP], result
    for how in ("init_args", "ray_address_env"):
        placements = {int(k): v for k, v in result[how].items()}
        assert sorted(placements) == list(range(NUM_SUPERNODES)), (how, result)
        assert set(placements.values()) == {HEAD_IP, WORKER_IP}, (how, result)


def test_flwr_run_federation_config_carries_no_ray_address():
    """``flwr run`` cannot pass an address to ``ray.init``: its simulation config has no such field.

    The SuperLink hands the simulation process only ``init_args`` ``num_cpus``,
    ``num_gpus``, ``logging_level`` and ``log_to_driver``; a ``--federation-config``
    key ``init-args-address`` is refused, and an ``options.backend.init-args.address``
    in the SuperLink connection is dropped. ``flwr run`` attaches to an existing
    cluster through ``RAY_ADDRESS`` in the SuperLink's environment. Should Flower
    add the field, this test fails: update docs/deployment.md.
    """
    from flwr.cli.flower_config import parse_superlink_connection
    from flwr.proto.federation_config_pb2 import SimulationConfig
    from flwr.supercore.utils import simulation_config_from_json

    fields = {f.name for f in SimulationConfig.DESCRIPTOR.fields}
    assert {"init_args_num_cpus", "init_args_num_gpus"} <= fields
    assert not any("address" in f for f in fields), fields
    with pytest.raises(ValueError, match="init_args_address"):
        simulation_config_from_json({"init_args_address": ADDRESS})
    backend = {"init-args": {"address": ADDRESS, "num-cpus": 1}}
    options = {"num-supernodes": 4, "backend": backend}
    connection = parse_superlink_connection({"address": ":local:", "options": options}, "local")
    assert not hasattr(connection.options.backend.init_args, "address")
    assert connection.options.backend.init_args.num_cpus == 1
