"""Separate hosts on one Linux machine: network namespaces on a bridge, and processes started inside them.

:class:`Network` gives each host a network namespace of its own, with ``lo`` up
and one address on a private subnet on ``eth0``, the end of a veth pair whose
other end is a port of a bridge. The bridge lives in a namespace of its own
(the switch), so the machine's own interfaces, routes and firewall rules are
never touched, and deleting the namespaces removes every veth and the bridge
with them. Namespace names carry a per-run tag (the test's pid), so parallel
runs cannot collide; interface names are private to their namespace. Before the
namespaces are deleted, every process still inside one of them (``ip netns
pids``) is stopped, SIGTERM then SIGKILL, so none outlives its host, not even
one reparented away from the processes this module started.

:class:`HostProcesses` starts every process inside its host's namespace
(``ip netns exec``), in its own session, with its output in a log file, and
stops it, with the processes it started (Flower detaches some of them into
sessions of their own), by pid and process group only.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path


def ip(*args: str) -> None:
    """Run ``ip <args>``; raises ``RuntimeError`` with its stderr if it fails."""
    done = subprocess.run(["ip", *args], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {done.stderr.strip()}")


def namespaces_unavailable() -> str | None:
    """Why network namespaces with a bridge cannot be made here, or ``None``: tries to make (and delete) one."""
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    probe = f"fgprobe{os.getpid()}"
    made = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if made.returncode != 0:
        return f"cannot create a network namespace (needs root or CAP_NET_ADMIN): {made.stderr.strip()}"
    try:
        bridge = subprocess.run(
            ["ip", "-n", probe, "link", "add", "br0", "type", "bridge"], capture_output=True, text=True
        )
        if bridge.returncode != 0:
            return f"cannot create a bridge in a network namespace: {bridge.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "delete", probe], capture_output=True)
    return None


def namespace_pids(netns: str) -> list[int]:
    """The pids of the processes inside network namespace ``netns`` (``ip netns pids``); [] if it is gone."""
    done = subprocess.run(["ip", "netns", "pids", netns], capture_output=True, text=True)
    return [int(p) for p in done.stdout.split()] if done.returncode == 0 else []


def stop_processes_in(namespaces: list[str], grace: float = 5.0) -> list[int]:
    """SIGTERM to every process inside ``namespaces``, SIGKILL to those still there after ``grace`` s.

    Every process inside these namespaces was started by the test that made them,
    so none is spared. Returns the pids found there at first.
    """
    found = [p for ns in namespaces for p in namespace_pids(ns)]
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in (p for ns in namespaces for p in namespace_pids(ns)):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while any(namespace_pids(ns) for ns in namespaces) and time.monotonic() < deadline:
            time.sleep(0.1)
    return found


def namespace_names() -> set[str]:
    """The names of this machine's named network namespaces (``ip netns list``)."""
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.strip()}


@dataclass(frozen=True)
class Host:
    """One host: its network namespace, its address and the bridge port its cable plugs into."""

    role: str
    netns: str
    address: str
    port: str

    def command(self, argv: list[str]) -> list[str]:
        """``argv`` run inside this host's namespace."""
        return ["ip", "netns", "exec", self.netns, *argv]


class Network:
    """Hosts on one private subnet (``<prefix>.<i>/24``), each in its own namespace, joined by a bridge.

    Parameters
    ----------
    tag : str
        Prefix of every namespace name; unique per run (e.g. with the pid).
    prefix : str
        The subnet's first three octets; hosts get ``.1``, ``.2``, ... in the
        order they are added.
    """

    def __init__(self, tag: str, prefix: str = "10.77.0"):
        self.tag, self.prefix = tag, prefix
        self.switch = f"{tag}-switch"
        self.hosts: dict[str, Host] = {}
        self.namespaces: list[str] = []
        self.stray_pids: list[int] = []
        try:
            self._add_namespace(self.switch)
            ip("-n", self.switch, "link", "add", "br0", "type", "bridge")
            ip("-n", self.switch, "link", "set", "br0", "up")
        except Exception:
            self.close()
            raise

    def _add_namespace(self, name: str) -> None:
        ip("netns", "add", name)
        self.namespaces.append(name)  # ours from here: close() deletes it, even if what follows fails
        ip("-n", name, "link", "set", "lo", "up")  # a fresh namespace's loopback is down

    def add_host(self, role: str) -> Host:
        """A new host named ``role``: its namespace, a veth pair to the bridge, its address, all links up."""
        index = len(self.hosts) + 1
        host = Host(role, f"{self.tag}-{role}", f"{self.prefix}.{index}", f"port{index}")
        self._add_namespace(host.netns)
        ip("-n", self.switch, "link", "add", host.port, "type", "veth", "peer", "name", "eth0", "netns", host.netns)
        ip("-n", self.switch, "link", "set", host.port, "master", "br0")
        ip("-n", self.switch, "link", "set", host.port, "up")
        ip("-n", host.netns, "addr", "add", f"{host.address}/24", "dev", "eth0")
        ip("-n", host.netns, "link", "set", "eth0", "up")
        self.hosts[role] = host
        return host

    def cut(self, host: Host) -> None:
        """Unplug ``host``'s cable: its bridge port down (the host's own ``eth0`` loses its carrier)."""
        ip("-n", self.switch, "link", "set", host.port, "down")

    def reconnect(self, host: Host) -> None:
        """Plug ``host``'s cable back in."""
        ip("-n", self.switch, "link", "set", host.port, "up")

    def close(self) -> list[str]:
        """Stop every process inside the namespaces, then delete them (their veths and the bridge go with them).

        Returns the namespaces still listed afterwards. The pids that were still
        inside a namespace are kept in :attr:`stray_pids`.
        """
        self.stray_pids = stop_processes_in(self.namespaces)
        for name in reversed(self.namespaces):
            subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        return sorted(namespace_names() & set(self.namespaces))


def descendants(pid: int) -> dict[int, str]:
    """Every live descendant of ``pid`` (from the parent ids in ``/proc/<pid>/stat``), mapped to its start time."""
    parents, started = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parents[int(entry.name)], started[int(entry.name)] = int(fields[1]), fields[19]
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return {p: started[p] for p in found}


def _signal(pid: int, started: str, sig: int) -> None:
    """``sig`` to ``pid`` if it is still the process that started at ``started`` (never a reused pid)."""
    if _start_time(pid) == started:
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass


def _start_time(pid: int) -> str | None:
    """The start time of live process ``pid`` (field 22 of its stat), ``None`` if gone or a zombie."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return None if fields[0] == "Z" else fields[19]


class HostProcesses:
    """Processes started inside hosts' namespaces, each in its own session, logged to ``<logs>/<name>.log``."""

    def __init__(self, env: dict, logs: Path):
        self.env, self.logs = env, logs
        self.running: dict[str, tuple[subprocess.Popen, object]] = {}
        self.family: dict[str, dict[int, str]] = {}

    def start(self, name: str, host: Host, argv: list[str], env: dict | None = None) -> subprocess.Popen:
        """Start ``argv`` inside ``host``'s namespace as ``name`` (a stopped name may start again; its log grows).

        ``env``: the process's environment (default: the one given at construction).
        """
        assert name not in self.running, f"{name} is running"
        log = open(self.logs / f"{name}.log", "a")  # noqa: SIM115 (closed when the process is stopped)
        proc = subprocess.Popen(
            host.command(argv), env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        self.running[name] = (proc, log)
        self.family[name] = {}
        return proc

    def log(self, name: str) -> str:
        path = self.logs / f"{name}.log"
        return path.read_text(errors="replace") if path.is_file() else ""

    def remember_children(self) -> None:
        """Note the processes each one has started so far, to stop them too should their parent end first."""
        for name, (proc, _) in self.running.items():
            self.family[name].update(descendants(proc.pid))

    def kill(self, name: str, sig: int = signal.SIGKILL, grace: float = 20) -> int:
        """``sig`` to ``name``'s process group and to every process it started; SIGKILL after ``grace`` s.

        Returns the process's exit status.
        """
        proc, log = self.running.pop(name)
        family = {**self.family.pop(name), **descendants(proc.pid)}
        if proc.poll() is None:
            os.killpg(proc.pid, sig)
        for pid, started in family.items():
            _signal(pid, started, sig)
        try:
            status = proc.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            status = proc.wait(timeout=grace)
        deadline = time.monotonic() + grace
        while any(_start_time(p) == s for p, s in family.items()) and time.monotonic() < deadline:
            time.sleep(0.1)
        for pid, started in family.items():
            _signal(pid, started, signal.SIGKILL)
        log.close()
        return status

    def stop_all(self) -> None:
        """SIGTERM to every process still running and to its children; SIGKILL to those still there after it."""
        self.remember_children()
        for name in list(self.running):
            self.kill(name, signal.SIGTERM)
