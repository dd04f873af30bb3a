"""Fed-Grow deployed across separate hosts, with faults: a SuperNode killed, a cable cut, the SuperLink restarted.

Every party is a host of its own: a Linux network namespace with its own
address on a private subnet, joined to the others by a bridge over veth pairs
(:mod:`network_namespaces`): the SuperLink (10.77.0.1), three SuperNodes and
the operator's ``flwr`` CLI. The SuperLink's certificate is issued for its
address alone (``deploy/generate_certs.sh OUT 3 IP:10.77.0.1``) and the
SuperLink listens on that address; the CLI registers the nodes' keys from its
own host; every process is started with the command lines of
:mod:`deploy.commands`, in its environment, and each host keeps its Flower
files in a ``FLWR_HOME`` of its own.

One run (tiny BERT clients, ``min-train-nodes = 1``, a short ``round-timeout``)
meets the faults, then is resumed:

- SuperNode 1's cable is cut (its bridge port down) right after it replied in
  round 1, and stays cut through round 2 and the SuperLink's restart, longer
  than the round timeout: round 2's instruction never reaches it, round 2 ends
  within the timeout plus a margin, and ``summary.json`` logs it missing there;
- SuperNode 2's host dies in round 2 right after the node received its
  instruction (SIGKILL to its process group and every process it started):
  the round goes on with the others and logs it missing. It is started again at
  once with the same node config and state folder, as a supervisor would, and
  again after each refusal (Flower 1.41 refuses a node it still counts as
  online: up to 60 s after its last heartbeat);
- after round 2 the SuperLink's host dies (SuperLink, SuperExec, ServerApp) and
  the SuperLink is started again on its database: the nodes registered before
  are still registered and come back by themselves, the operator stops the
  orphaned run, and the run started again with ``resume-from`` continues from
  round 2's checkpoint to the end with every node, each from its own state on
  disk: the restarted SuperNode 2's step count goes on from round 1's, not from
  zero.

Before the run, two strangers try to join, each from a host of its own
(10.77.0.6 and 10.77.0.7) with the SuperNode command: one with a key pair that
was never registered, one with the right key but a second CA's certificate
(another ``generate_certs.sh``) as its root certificate. Both are refused: the
process exits non-zero and is never listed. The SuperLink logs the first (an
``ERROR`` naming the public key, and the request's address with status 412);
the second never reaches it (the node cannot verify the SuperLink's certificate
and aborts the TLS handshake, which Flower 1.41's SuperLink logs at no log
level), so its log names no request from that address.

Every process is stopped by its own pid or process group, every process still
inside a namespace is stopped, and every namespace deleted afterwards, even on
failure. The module is skipped where network
namespaces cannot be made (it needs root or CAP_NET_ADMIN, and ``ip``).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import reviews_csv, tiny_bert_folder
from cryptography.hazmat.primitives import serialization
from network_namespaces import HostProcesses, Network, namespace_names, namespaces_unavailable
from safetensors.numpy import load_file

from deploy.commands import COMMAND_ENV, SUPERLINK_PORT, superlink_command, supernode_command

UNAVAILABLE = namespaces_unavailable()
if UNAVAILABLE:
    pytest.skip(f"network namespaces unavailable: {UNAVAILABLE}", allow_module_level=True)

from server_app.persistence.checkpoint import read_checkpoint  # noqa: E402 (after the skip: imports torch)

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NODES = 3
LOCAL_STEPS = 3
ROUNDS = 3
#: Seconds the server waits for a round's replies. Long enough for three cold ClientApp processes on two
#: cores (each message starts one), and shorter than Flower's heartbeat patience (a node that stops sending
#: heartbeats, every 17.5 to 22.5 s, counts as gone 60 s after its last one), so a round that misses a node
#: ends at this timeout.
ROUND_TIMEOUT = 35
#: Seconds a round may take beyond ROUND_TIMEOUT: the server pulls replies every 0.05 s
#: (``server_app/orchestration/prompt_grid.py``), then aggregates and writes its checkpoint.
MARGIN = 10
KILLED, UNPLUGGED = 2, 1  # in round 2, SuperNode 2 is killed and SuperNode 1's cable is cut
STRANGERS = ("unregistered", "wrong-ca")  # at 10.77.0.6 and 10.77.0.7


def _wait(what: str, condition, timeout: float, logs=lambda: "", every: float = 0.2) -> float:
    """Poll ``condition`` every ``every`` s; returns the ``time.monotonic()`` at which it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}\n{logs()}")
        time.sleep(every)
    return time.monotonic()


def _replies_sent(log: str, kind: str = "train") -> int:
    """How many ``kind`` replies a SuperNode's log says it sent successfully."""
    sent, pending = 0, False
    for line in log.splitlines():
        if f"Sending: {kind} message" in line:
            pending = True
        elif "Sent successfully" in line and pending:
            sent, pending = sent + 1, False
        elif "Sending:" in line:
            pending = False
    return sent


def _checkpoint_round(out: Path) -> int:
    """The round of the newest checkpoint of the (one) run folder under ``out``; 0 before the first."""
    found = list(out.glob("*/checkpoint.safetensors"))
    return read_checkpoint(found[0].parent).server_round if found else 0


def _run_id(log: str) -> int:
    (found,) = re.findall(r"Successfully started run (\d+)", log)
    return int(found)


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hosts")
    subprocess.run(
        ["bash", str(ROOT / "deploy/generate_certs.sh"), str(tmp / "secrets"), str(NODES), "IP:10.77.0.1"],
        check=True,
        capture_output=True,
    )
    certs, keys = tmp / "secrets/certificates", tmp / "secrets/keys"
    # the strangers': another CA (its certificate) and a key pair that is never registered
    subprocess.run(
        ["bash", str(ROOT / "deploy/generate_certs.sh"), str(tmp / "stranger"), "1", "IP:10.77.0.1"],
        check=True,
        capture_output=True,
    )
    models = [tiny_bert_folder(tmp / f"bert-{i}", 1 + i % 2, 32, 2, 64, i) for i in range(NODES)]
    reviews_csv(tmp / "reviews.csv", 240)
    base_env = {
        **os.environ,
        **COMMAND_ENV,  # no per-run `uv sync` from the package index, which these hosts cannot reach
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }

    def env(role: str) -> dict:  # each host keeps its Flower files (FABs, config) in a home of its own
        home = tmp / "hosts" / role / "flwr-home"
        home.mkdir(parents=True, exist_ok=True)
        return {**base_env, "FLWR_HOME": str(home)}

    net = Network(f"fg{os.getpid()}")
    procs = HostProcesses(base_env, tmp)
    result: dict = {"tmp": tmp, "net_tag": net.tag, "logs": {}}
    names = ("run-1", "run-2", "superlink", *(f"supernode-{i}" for i in range(NODES)), *STRANGERS)

    def logs() -> str:
        return "".join(f"--- {n}\n{procs.log(n)[-2500:]}\n" for n in names if procs.log(n))

    try:
        link = net.add_host("superlink")
        hosts = [net.add_host(f"node{i}") for i in range(NODES)]
        cli = net.add_host("cli")
        stranger_hosts = {name: net.add_host(f"stranger{k}") for k, name in enumerate(STRANGERS)}
        assert link.address == "10.77.0.1"  # the certificate's subjectAltName
        superlink = f"{link.address}:{SUPERLINK_PORT}"
        cli_env = env("cli")
        (Path(cli_env["FLWR_HOME"]) / "config.toml").write_text(
            f'[superlink]\ndefault = "fedgrow"\n\n[superlink.fedgrow]\naddress = "{superlink}"\n'
            f'root-certificates = "{certs / "ca.crt"}"\n'
        )

        def flwr(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
            return subprocess.run(
                cli.command([str(BIN / "flwr"), *args]),
                env=cli_env,
                capture_output=True,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )

        def nodes_listed() -> dict[int, str]:
            listed = flwr("supernode", "list", "fedgrow", "--format", "json", timeout=60)
            if listed.returncode != 0:
                return {}
            return {int(n["node-id"]): n["status"] for n in json.loads(listed.stdout)["nodes"]}

        # on its own address: its SuperExec, which starts the ServerApp, connects to --host (with 0.0.0.0:
        # to 127.0.0.1, which this certificate does not name, and no ServerApp ever starts)
        superlink_cmd = superlink_command(str(certs), host=link.address, database=str(tmp / "superlink.db"))

        def start_superlink() -> None:
            procs.start("superlink", link, superlink_cmd, env=env("superlink"))
            _wait("the SuperLink", lambda: flwr("supernode", "list", "fedgrow").returncode == 0, 90, logs, every=1)

        start_superlink()
        for i in range(NODES):
            done = flwr("supernode", "register", str(keys / f"supernode_{i}.pub"), "fedgrow")
            assert done.returncode == 0, done.stdout + done.stderr
        result["registered"] = set(nodes_listed())

        node_configs, node_cmds = [], []
        for i in range(NODES):
            node = {
                "partition-id": i,
                "num-partitions": NODES,
                "model": models[i],
                "state-dir": str(tmp / f"node-{i}/state"),
                "output-dir": str(tmp / f"node-{i}/out"),
                "cache-dir": str(tmp / f"node-{i}/cache"),
                "allowed-datasets": str(tmp / "reviews.csv"),
                "min-eval-rows": 8,  # this test's partitions have about 16 test rows
                "allow-resume": True,  # the run is resumed after the SuperLink's restart
            }
            node_configs.append(node)
            node_cmds.append(supernode_command(superlink, str(certs / "ca.crt"), str(keys / f"supernode_{i}"), node))
            procs.start(f"supernode-{i}", hosts[i], node_cmds[i], env=env(f"node{i}"))
        result["node_configs"] = node_configs

        def node_id(i: int) -> int | None:
            found = re.findall(r"SuperNode ID: (\d+)", procs.log(f"supernode-{i}"))
            return int(found[-1]) if found else None

        def all_online() -> bool:
            listed = nodes_listed()
            return all(listed.get(node_id(i)) == "online" for i in range(NODES))

        def trains_received(i: int) -> int:
            return procs.log(f"supernode-{i}").count("Receiving: train message")

        _wait("every SuperNode online", all_online, 90, logs, every=2)
        result["node_ids"] = {i: node_id(i) for i in range(NODES)}

        # two strangers try to join with the SuperNode command: a key that was never registered, and
        # SuperNode 0's registered key with another CA's certificate (so it cannot verify the SuperLink's)
        stranger_config = {"partition-id": 0, "num-partitions": NODES}
        stranger_cmds = {
            "unregistered": supernode_command(
                superlink, str(certs / "ca.crt"), str(tmp / "stranger/keys/supernode_0"), stranger_config
            ),
            "wrong-ca": supernode_command(
                superlink, str(tmp / "stranger/certificates/ca.crt"), str(keys / "supernode_0"), stranger_config
            ),
        }
        strangers_from = time.monotonic()
        tried = {n: procs.start(n, stranger_hosts[n], stranger_cmds[n], env=env(n)) for n in STRANGERS}
        deadline = time.monotonic() + 60
        for proc in tried.values():
            try:
                proc.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        procs.remember_children()
        result["strangers"] = {n: tried[n].poll() for n in STRANGERS}  # None: still running, let in
        result["stranger_addresses"] = {n: h.address for n, h in stranger_hosts.items()}
        for n in STRANGERS:
            procs.kill(n)
        result["listed_with_strangers"] = set(nodes_listed())
        result["strangers_s"] = time.monotonic() - strangers_from

        out = tmp / "server-out"
        config = {
            "dataset": str(tmp / "reviews.csv"),
            "intermediate-shape": "2x32x64x2",
            "target-shape": "3x48x96x3",
            "num-server-rounds": ROUNDS,
            "local-steps": LOCAL_STEPS,
            "batch-size": 16,
            "max-length": 32,
            "finetune-steps": 1,
            "partitioner": "iid",
            "save-models": False,
            "min-train-nodes": 1,  # a round aggregates whatever replies came
            "round-timeout": ROUND_TIMEOUT,
            "output-dir": str(out),
            "cache-dir": str(tmp / "server-cache"),
        }

        def run(name: str, values: dict) -> None:
            (tmp / f"{name}.toml").write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in values.items()))
            argv = [str(BIN / "flwr"), "run", str(ROOT), "fedgrow", "--run-config", str(tmp / f"{name}.toml")]
            procs.start(name, cli, [*argv, "--stream"], env=cli_env)

        run("run-1", config)
        started = time.monotonic()
        marks = result["marks"] = {}

        # round 1 ends with SuperNode 1's cable cut (right after it replied, so round 2's instruction never
        # reaches it); it stays cut through round 2 and the SuperLink's restart
        _wait("SuperNode 1's round-1 reply", lambda: _replies_sent(procs.log(f"supernode-{UNPLUGGED}")), 240, logs)
        net.cut(hosts[UNPLUGGED])
        cut_at, trains_at_cut = time.monotonic(), trains_received(UNPLUGGED)
        marks["cut"] = cut_at - started
        round1_end = _wait("round 1's end", lambda: _checkpoint_round(out) >= 1, 120, logs)
        # round 2: SuperNode 2's host dies right after the node received its instruction
        _wait("SuperNode 2's round-2 instruction", lambda: trains_received(KILLED) >= 2, 120, logs)
        procs.remember_children()
        result["killed_status"] = procs.kill(f"supernode-{KILLED}")
        result["rounds_done_at_kill"] = _checkpoint_round(out)
        marks["kill"] = time.monotonic() - started

        # SuperNode 2 is started again at once, as a supervisor would, and again 5 s after each refusal:
        # Flower refuses a node it still counts as online (until 60 s after its last heartbeat)
        restarts = result["restarts"] = []  # (seconds after the kill, exit status; None: connected)
        supervisor = {"next": time.monotonic(), "trying": None, "connected": False}

        def supervise() -> bool:
            """One step of the supervisor; True once SuperNode 2 is connected."""
            name = f"supernode-{KILLED}"
            if supervisor["connected"]:
                return True
            if supervisor["trying"] is None:
                if time.monotonic() < supervisor["next"]:
                    return False
                seen = procs.log(name).count("SuperNode ID:")
                proc = procs.start(name, hosts[KILLED], node_cmds[KILLED], env=env(f"node{KILLED}"))
                supervisor["trying"] = proc, seen
            proc, seen = supervisor["trying"]
            procs.remember_children()
            since_kill = time.monotonic() - started - marks["kill"]
            if proc.poll() is not None:  # refused
                procs.kill(name)
                restarts.append((since_kill, proc.returncode))
                supervisor.update(next=time.monotonic() + 5, trying=None)
                assert len(restarts) < 20, logs()
            elif procs.log(name).count("SuperNode ID:") > seen:
                restarts.append((since_kill, None))
                supervisor["connected"] = True
            return supervisor["connected"]

        def round_2_over() -> bool:
            supervise()
            return _checkpoint_round(out) >= 2

        round2_end = _wait("round 2's end", round_2_over, 120, logs)
        marks["round 2 end"] = round2_end - started
        result["round2_wall"] = round2_end - round1_end  # as the test's clock saw it
        (run_dir,) = (p.parent for p in out.glob("*/checkpoint.safetensors"))
        result["run_dir"] = run_dir

        # after round 2: the SuperLink's host goes down (SuperLink, its SuperExec and the ServerApp)
        procs.remember_children()
        procs.kill("superlink")
        result["checkpoint_round_at_restart"] = read_checkpoint(run_dir).server_round
        procs.kill("run-1", signal.SIGTERM)  # the operator's stream of that run
        start_superlink()
        marks["superlink back"] = time.monotonic() - started
        result["listed_after_restart"] = set(nodes_listed())  # from its database: nobody registered again
        stopped = flwr("stop", str(_run_id(procs.log("run-1"))), "fedgrow")  # the run whose ServerApp died
        result["stop_old_run"] = stopped.returncode, stopped.stdout + stopped.stderr
        result["trains_while_unplugged"] = trains_received(UNPLUGGED) - trains_at_cut
        net.reconnect(hosts[UNPLUGGED])
        result["unplugged_s"] = time.monotonic() - cut_at
        _wait("SuperNode 2 to be let in again", supervise, 120, logs)
        _wait("every SuperNode online after the SuperLink's restart", all_online, 120, logs, every=2)
        result["node_ids_after_restart"] = {i: node_id(i) for i in range(NODES)}
        marks["all online"] = time.monotonic() - started

        # the run again, from its checkpoint
        run("run-2", {**config, "resume-from": str(run_dir)})
        try:
            result["run2_status"] = procs.running["run-2"][0].wait(timeout=400)
        except subprocess.TimeoutExpired:
            result["run2_status"] = None
        result["run2_id"] = _run_id(procs.log("run-2"))
        marks["run 2 end"] = time.monotonic() - started
    finally:
        procs.stop_all()
        result["logs"] = {n: procs.log(n) for n in names}
        result["namespaces_left"] = net.close()
        result["stray_pids"] = net.stray_pids
    return result


def _summary(federation) -> dict:
    path = federation["run_dir"] / "summary.json"
    assert path.is_file(), federation["logs"]["run-2"][-4000:]
    return json.loads(path.read_text())


def _states(federation, node: int) -> dict[tuple[str, int], dict]:
    """Node ``node``'s private states on disk: (Flower run folder, round) -> state."""
    folder = Path(federation["node_configs"][node]["state-dir"]) / federation["run_dir"].name
    return {
        (p.parent.name, int(p.stem.split("-")[1])): load_file(str(p))
        for p in folder.glob("*/run-*/round-*.safetensors")
    }


def _steps(federation, node: int, server_round: int, flower_run: str) -> int:
    return int(_states(federation, node)[(flower_run, server_round)]["data.steps"])


def test_the_run_crossed_the_bridge_to_its_end(federation):
    assert federation["run2_status"] == 0, federation["logs"]["run-2"][-4000:]
    summary = _summary(federation)
    assert summary["rounds"] == ROUNDS
    assert [e["round"] for e in summary["rounds_log"]] == list(range(1, ROUNDS + 1))
    ids = federation["node_ids"]
    assert None not in ids.values() and len(set(ids.values())) == NODES
    assert federation["registered"] == set(ids.values())
    assert sorted(summary["rounds_log"][0]["accepted_nodes"]) == sorted(ids.values())  # round 1: everyone
    assert {c["partition_id"] for c in summary["clients"]} == set(range(NODES))  # every node's final phase
    # the Fleet traffic came over the bridge, from each node's own address
    for i in range(NODES):
        assert f"10.77.0.{2 + i}:" in federation["logs"]["superlink"]


def test_a_killed_supernode_is_logged_missing_and_the_others_go_on(federation):
    ids = federation["node_ids"]
    assert federation["killed_status"] == -signal.SIGKILL
    assert federation["rounds_done_at_kill"] == 1  # it died inside round 2
    entry = _summary(federation)["rounds_log"][1]
    assert entry["round"] == 2
    assert ids[KILLED] in entry["missing_nodes"]
    assert entry["accepted_nodes"] == [ids[0]]  # the node that kept going (SuperNode 1's cable is cut)
    assert entry["aggregated"] is True  # min-train-nodes = 1
    assert entry["seconds"] <= ROUND_TIMEOUT + MARGIN


def test_a_restarted_supernode_rejoins_and_continues_from_its_state_on_disk(federation):
    ids = federation["node_ids"]
    restarts = federation["restarts"]
    # started again at once it is refused: the SuperLink still counts it online ("Failed to activate")
    assert restarts[0][1] not in (None, 0) and restarts[-1][1] is None, restarts
    assert "Failed to activate SuperNode" in federation["logs"][f"supernode-{KILLED}"]
    assert federation["node_ids_after_restart"][KILLED] == ids[KILLED]  # its key: the same node
    assert ids[KILLED] in _summary(federation)["rounds_log"][2]["accepted_nodes"]
    first, resumed = f"run-{_run_id(federation['logs']['run-1'])}", f"run-{federation['run2_id']}"
    # round 2's work died with the process: on disk it has round 1 only
    assert [r for run, r in _states(federation, KILLED) if run == first] == [1]
    assert _steps(federation, KILLED, 1, first) == LOCAL_STEPS
    # round 3 went on from round 1's state: 6 steps, not 3 (from zero)
    assert _steps(federation, KILLED, 3, resumed) == 2 * LOCAL_STEPS


def test_a_cut_link_costs_a_round_at_most_its_timeout_and_is_logged_missing(federation):
    ids = federation["node_ids"]
    assert federation["unplugged_s"] > ROUND_TIMEOUT
    assert federation["trains_while_unplugged"] == 0  # round 2's instruction never reached it
    entry = _summary(federation)["rounds_log"][1]
    assert ids[UNPLUGGED] in entry["missing_nodes"]
    assert entry["seconds"] <= ROUND_TIMEOUT + MARGIN
    assert federation["round2_wall"] <= ROUND_TIMEOUT + MARGIN, federation["marks"]
    # plugged in again, it takes part in the next round, from its own round 1
    assert ids[UNPLUGGED] in _summary(federation)["rounds_log"][2]["accepted_nodes"]
    assert _steps(federation, UNPLUGGED, 3, f"run-{federation['run2_id']}") == 2 * LOCAL_STEPS


def test_a_restarted_superlink_keeps_its_nodes_and_the_run_resumes_from_its_checkpoint(federation):
    ids = set(federation["node_ids"].values())
    assert federation["listed_after_restart"] == ids  # from its database, not registered again
    assert federation["node_ids_after_restart"] == federation["node_ids"]
    assert federation["checkpoint_round_at_restart"] == 2
    assert federation["stop_old_run"][0] == 0, federation["stop_old_run"][1]
    assert "resuming after round 2" in federation["logs"]["run-2"]
    summary = _summary(federation)
    assert read_checkpoint(federation["run_dir"]).server_round == ROUNDS
    assert sorted(summary["rounds_log"][2]["accepted_nodes"]) == sorted(ids)  # round 3: everyone back
    # the node that never stopped: its round 3 went on from its round 2, written before the restart
    assert _steps(federation, 0, ROUNDS, f"run-{federation['run2_id']}") == ROUNDS * LOCAL_STEPS


def _public_key_pem(private_key: Path) -> bytes:
    """The PEM public key of an OpenSSH private key file, as the SuperLink logs it (``SubjectPublicKeyInfo``)."""
    key = serialization.load_ssh_private_key(private_key.read_bytes(), password=None)
    return key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)


def test_a_stranger_with_an_unregistered_key_is_refused_and_logged_on_the_superlink(federation):
    assert federation["strangers"]["unregistered"] not in (None, 0)  # exited by itself, refused
    assert "Failed to activate SuperNode" in federation["logs"]["unregistered"]
    assert federation["listed_with_strangers"] == set(federation["node_ids"].values())
    superlink = federation["logs"]["superlink"]
    # the SuperLink logs the refusal (an ERROR at its default level) with the key, and the request with its address
    key = _public_key_pem(federation["tmp"] / "stranger/keys/supernode_0")
    assert (
        f"[/v1/fleet/activate-node][ApiError:2004] Attempted to register SuperNode with public key: {key!r}, "
        "exception: No SuperNode found with the given public key." in superlink
    )
    address = re.escape(federation["stranger_addresses"]["unregistered"])
    assert re.search(rf'{address}:\d+ - "POST /v1/fleet/activate-node HTTP/1\.1" 412', superlink)


def test_a_stranger_with_another_ca_is_refused_before_it_reaches_the_superlink(federation):
    assert federation["strangers"]["wrong-ca"] not in (None, 0)  # exited by itself, refused
    log = federation["logs"]["wrong-ca"]
    assert "SSL/TLS handshake error detected." in log and "CERTIFICATE_VERIFY_FAILED" in log
    # The node cannot verify the SuperLink's certificate and aborts the TLS handshake, so no request ever
    # reaches the SuperLink; Flower 1.41's SuperLink (uvicorn on uvloop) logs no failed handshake at any
    # log level, so its log names no request from that address, though the key is registered and online.
    assert f"{federation['stranger_addresses']['wrong-ca']}:" not in federation["logs"]["superlink"]


def test_nothing_is_left_running_or_configured(federation):
    assert federation["namespaces_left"] == []
    assert not {n for n in namespace_names() if n.startswith(f"{federation['net_tag']}-")}
    out = subprocess.run(["pgrep", "-f", str(federation["tmp"])], capture_output=True, text=True).stdout.split()
    assert not out, f"processes left: {out}"
