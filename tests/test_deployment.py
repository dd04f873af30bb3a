"""Real-process deployment on loopback: one SuperLink, two SuperNodes, TLS and SuperNode authentication.

Starts ``flower-superlink`` and ``flower-supernode`` processes on 127.0.0.1 with
the commands of :mod:`deploy.commands` and certificates and keys from
``deploy/generate_certs.sh``; each SuperNode has its own node config (partition,
small-model folder, state folder, output folder, and the shared data file its
strict node policy lets the run name). ``flwr run`` against that
SuperLink must give the same Global-LiGO and client accuracies as the same
config in Flower's simulation, and each client's private state must persist
across rounds. A SuperNode whose key was not registered is refused. Every
process started here is stopped afterwards, even on failure.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import test_resume
from conftest import reviews_csv, tiny_bert_folder
from safetensors.numpy import load_file

from deploy.commands import COMMAND_ENV, superlink_command, supernode_command
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Processes:
    """Processes started by the test, each in its own session; :meth:`stop_all` ends them and their children."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs, self.started = env, logs, []

    def start(self, name: str, argv: list[str]) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "w")  # noqa: SIM115 (closed with the process)
        proc = subprocess.Popen(argv, env=self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        self.started.append((proc, log))
        return proc

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text()

    def stop_all(self) -> None:
        # Flower detaches its SuperExec processes into their own sessions: find them by
        # parentage (while their parents still run), never by a command-line pattern.
        family = {d for proc, _ in self.started for d in _descendants(proc.pid)}
        for proc, _ in self.started:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc, log in self.started:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            log.close()
        for pid in family:
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass


def _descendants(pid: int) -> set[int]:
    """Every live descendant of ``pid``, from the parent ids in ``/proc/<pid>/stat``."""
    parents = {}
    for entry in Path("/proc").iterdir():
        try:
            stat = (entry / "stat").read_text()
        except (OSError, ValueError):
            continue
        if entry.name.isdigit():
            parents[int(entry.name)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def _flwr(env, *args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("deploy")
    subprocess.run(["bash", str(ROOT / "deploy/generate_certs.sh"), str(tmp / "secrets"), "3"], check=True)
    certs, keys = tmp / "secrets/certificates", tmp / "secrets/keys"
    models = [tiny_bert_folder(tmp / "bert-a", 1, 32, 2, 64, 0), tiny_bert_folder(tmp / "bert-b", 2, 32, 2, 64, 1)]
    reviews_csv(tmp / "reviews.csv", 200)
    port, runtime_ports = _free_port(), [_free_port() for _ in range(3)]
    home = tmp / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "loopback"\n\n[superlink.loopback]\naddress = "127.0.0.1:{port}"\n'
        f'root-certificates = "{certs / "ca.crt"}"\n'
    )
    env = {
        **os.environ,
        **COMMAND_ENV,  # the ServerApp runs in this environment: no per-run `uv sync` from the package index
        "FLWR_HOME": str(home),
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # as Ray gives each simulated ClientApp (one CPU): the same float reductions
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    procs = Processes(env, tmp)
    config = {
        "dataset": str(tmp / "reviews.csv"),
        "client-models": ",".join(models),  # simulation: partition i gets model i; deployment: node config
        "intermediate-shape": "2x32x64x2",
        "target-shape": "3x48x96x3",
        "num-server-rounds": 2,
        "local-steps": 3,
        "batch-size": 16,
        "max-length": 32,
        "finetune-steps": 1,
        "partitioner": "iid",
        "save-models": False,
        "cache-dir": str(tmp / "cache"),
    }
    try:
        procs.start("superlink", superlink_command(str(certs), port, host="127.0.0.1"))
        deadline = time.monotonic() + 60
        while _flwr(env, "supernode", "list", "loopback").returncode != 0:
            assert time.monotonic() < deadline, procs.log("superlink")[-3000:]
            time.sleep(1)
        for i in (0, 1):  # node 2's key is never registered
            registered = _flwr(env, "supernode", "register", str(keys / f"supernode_{i}.pub"), "loopback")
            assert registered.returncode == 0, registered.stdout + registered.stderr
        nodes = []
        for i in (0, 1):
            node = {
                "partition-id": i,
                "num-partitions": 2,
                "model": models[i],
                "state-dir": str(tmp / f"node-{i}/state"),
                "output-dir": str(tmp / f"node-{i}/out"),
                # no node-policy: a deployed node is strict. It lets the run partition this shared file, as
                # the simulation this test compares with does
                "allowed-datasets": str(tmp / "reviews.csv"),
                "min-eval-rows": 8,  # this test's partitions have about 18 test rows
            }
            cmd = supernode_command(
                f"127.0.0.1:{port}", str(certs / "ca.crt"), str(keys / f"supernode_{i}"), node, runtime_ports[i]
            )
            procs.start(f"supernode-{i}", cmd)
            nodes.append(node)
        refused_cmd = supernode_command(
            f"127.0.0.1:{port}",
            str(certs / "ca.crt"),
            str(keys / "supernode_2"),
            {"partition-id": 0, "num-partitions": 2},
            runtime_ports[2],
        )
        refused = procs.start("unregistered", [*refused_cmd, "--max-retries", "1"])
        # an audit folder of the server's choosing, which strict nodes never write
        deployed = {**config, "output-dir": str(tmp / "server-out"), "audit-dir": str(tmp / "server-audit")}
        lines = [f"{k} = {json.dumps(v)}" for k, v in deployed.items()]
        (tmp / "run.toml").write_text("\n".join(lines) + "\n")
        run = _flwr(env, "run", str(ROOT), "loopback", "--run-config", str(tmp / "run.toml"), "--stream", timeout=600)
        refused_rc = refused.wait(timeout=120)
        logs = {name: procs.log(name) for name in ("superlink", "supernode-0", "supernode-1", "unregistered")}
    finally:
        procs.stop_all()
    assert run.returncode == 0, (run.stdout + run.stderr)[-4000:] + logs["supernode-0"][-2000:]
    (run_dir,) = (tmp / "server-out").glob("*-text-geometric-median")

    test_resume._simulate({**config, "output-dir": str(tmp / "simulation")})
    (sim_dir,) = (tmp / "simulation").glob("*-text-geometric-median")
    return {
        "run_dir": run_dir,
        "sim_dir": sim_dir,
        "nodes": nodes,
        "refused_rc": refused_rc,
        "logs": logs,
        "tmp": tmp,
        "config": config,
    }


def test_deployment_gives_the_simulation_outputs(deployment):
    run_dir, sim_dir = deployment["run_dir"], deployment["sim_dir"]
    deployed = load_file(str(run_dir / "global_ligo.safetensors"))
    simulated = load_file(str(sim_dir / "global_ligo.safetensors"))
    start = {
        k: v.numpy() for k, v in initial_global_ligo(RunConfig.from_flower(deployment["config"])).state_dict().items()
    }
    assert set(deployed) == set(simulated) == set(start)
    # the rounds' total change of the Global-LiGO agrees to 1% (float reductions may differ between processes)
    moved = np.concatenate([(simulated[k] - start[k]).ravel() for k in start])
    gap = np.concatenate([(deployed[k] - simulated[k]).ravel() for k in start])
    assert np.linalg.norm(moved) > 1e-3
    assert np.linalg.norm(gap) <= 1e-2 * np.linalg.norm(moved), (np.linalg.norm(gap), np.linalg.norm(moved))
    by_partition = {}
    for folder in (run_dir, sim_dir):
        summary = json.loads((folder / "summary.json").read_text())
        by_partition[folder] = {c["partition_id"]: c["accuracy"] for c in summary["clients"]}
        assert summary["rounds"] == 2
    assert by_partition[run_dir] == pytest.approx(by_partition[sim_dir], abs=1e-9)  # same test predictions
    assert len(by_partition[run_dir]) == 2


def test_deployed_supernodes_are_strict_and_never_write_where_the_run_config_says(deployment):
    assert not (deployment["tmp"] / "server-audit").exists()  # a node of the open policy would have written it
    for i in (0, 1):
        assert "refused by this node's policy" not in deployment["logs"][f"supernode-{i}"]


def test_each_supernode_kept_its_local_ligo_across_rounds_in_its_state_folder(deployment):
    for node in deployment["nodes"]:
        (folder,) = Path(node["state-dir"]).glob("*/*/*")  # one run tag, one run fingerprint, one Flower run
        first, second = (load_file(str(folder / f"round-{r}.safetensors")) for r in (1, 2))
        assert int(first["data.steps"]) == 3 and int(second["data.steps"]) == 6  # round 2 went on from round 1
        local = [k for k in first if k.startswith("operator.local.")]
        assert local, sorted(first)[:5]
        assert any(not np.array_equal(first[k], second[k]) for k in local), "the Local-LiGO did not train in round 2"
        assert not any(k.startswith("operator.global_.") for k in second)


def test_a_supernode_without_a_registered_key_is_refused(deployment):
    assert deployment["refused_rc"] != 0
    assert "Failed to activate SuperNode" in deployment["logs"]["unregistered"]
    for i in (0, 1):  # the same command with a registered key connects
        assert "Failed to activate" not in deployment["logs"][f"supernode-{i}"]


def test_no_process_is_left_running(deployment):
    out = subprocess.run(["pgrep", "-f", str(deployment["tmp"])], capture_output=True, text=True).stdout.split()
    assert not out, f"processes left: {out}"
