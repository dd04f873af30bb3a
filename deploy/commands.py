"""The command lines that start a Fed-Grow deployment: one SuperLink, one SuperNode per client.

The loopback test (``tests/test_deployment.py``) and the separate-hosts test
(``tests/test_separate_hosts.py``) run exactly these commands, in the
environment :data:`COMMAND_ENV`, and ``docker/compose.yaml`` passes exactly
their arguments to Flower's ``flower-superlink`` / ``flower-supernode`` entry
points (checked by ``tests/test_docker_files.py``; the images set that
environment). TLS is always on and SuperNodes authenticate with their own EC
key (Flower's CLI-managed SuperNode authentication: a node connects only if its
public key was registered with ``flwr supernode register``).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import PurePosixPath

#: The SuperLink's HTTP API port (Fleet, Control and Runtime APIs share it in flwr 1.41; 8000 is its default).
SUPERLINK_PORT = 8000

#: The environment every command here runs in. By default flwr 1.41's
#: SuperLink installs each run's app dependencies with ``uv sync`` from the package index into a fresh
#: environment before it starts the ServerApp; on a host without Internet access that fails (exit code 608,
#: no round run, while ``flwr run --stream`` still exits 0). Off, the ServerApp runs in the installed
#: environment, which holds everything the app needs.
COMMAND_ENV = {"FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}


def superlink_command(
    certificates: str, port: int = SUPERLINK_PORT, host: str = "0.0.0.0", database: str | None = None
) -> list[str]:
    """``flower-superlink`` with TLS and SuperNode authentication.

    Parameters
    ----------
    certificates : str
        Folder with ``ca.crt``, ``server.pem`` and ``server.key``
        (``deploy/generate_certs.sh``).
    port : int
        The SuperLink's HTTP API port (Fleet, Control and Runtime APIs).
    host : str
        Interface to listen on (``127.0.0.1`` for loopback only). The
        SuperLink's own SuperExec, which starts each run's ServerApp, connects
        to this address over TLS (to ``127.0.0.1`` for ``0.0.0.0``), so the
        certificate must name it: ``generate_certs.sh``'s default names do,
        a certificate for the host's address alone needs ``host`` set to it.
    database : str, optional
        SQLite file of the SuperLink's state (registered nodes, runs, messages),
        so a restarted SuperLink keeps them; ``None``: in memory.
    """
    c = PurePosixPath(certificates)
    return [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(c / "ca.crt"),
        "--ssl-certfile",
        str(c / "server.pem"),
        "--ssl-keyfile",
        str(c / "server.key"),
        "--enable-supernode-auth",
        "--host",
        host,
        "--port",
        str(port),
        *(["--database", database] if database else []),
    ]


def node_config(values: Mapping[str, int | float | bool | str]) -> str:
    """``--node-config``'s ``key=value`` list, values as TOML, e.g. ``partition-id=0 allow-resume=true model="/m"``."""
    return " ".join(f"{k}={json.dumps(v) if isinstance(v, str | bool) else v}" for k, v in values.items())


def supernode_command(
    superlink: str,
    ca_certificate: str,
    private_key: str,
    config: Mapping[str, int | float | bool | str],
    runtime_port: int = 9094,
    trusted_entities: str | None = None,
) -> list[str]:
    """``flower-supernode`` connecting over TLS with its own authentication key.

    Parameters
    ----------
    superlink : str
        ``host:port`` of the SuperLink.
    ca_certificate : str
        The CA certificate that signed the SuperLink's (``ca.crt``).
    private_key : str
        This node's EC private key (its ``.pub`` must be registered).
    config : mapping
        Node config read by the ClientApp: ``partition-id`` and
        ``num-partitions``, and optionally ``model`` (its small-model folder),
        ``dataset`` (its own data file), ``state-dir`` (its private state) and
        ``output-dir`` (where its grown model is saved).
    runtime_port : int
        Port of the node's local Runtime API (distinct per node on one host).
    trusted_entities : str, optional
        A YAML file of the public keys (``fpk_<id>: 'ssh-ed25519 ...'``) whose
        signature an app must carry to run on this node (Flower's FAB
        verification, ``--trusted-entities``). Flower verifies only apps
        published and signed through its platform; a local ``flwr run .`` FAB
        carries no signature and is then refused, so the loopback test runs
        without it.
    """
    return [
        "flower-supernode",
        "--superlink",
        superlink,
        "--root-certificates",
        ca_certificate,
        "--auth-supernode-private-key",
        private_key,
        "--port",
        str(runtime_port),
        "--node-config",
        node_config(config),
        *(["--trusted-entities", trusted_entities] if trusted_entities else []),
    ]
