"""Run the app with ``flwr run`` in local simulation, from Python, with a project-local ``FLWR_HOME``.

flwr 1.41 reads its SuperLink connections from ``$FLWR_HOME/config.toml`` and
starts a detached local SuperLink on first use (fixed port), which it reuses for
later runs; :func:`stop_local_superlink` stops the one started under a given
``FLWR_HOME``.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent


def prepare_flwr_home(home: Path, template: Path = ROOT / "flwr_home") -> Path:
    """Copy the federation config (``flwr_home/config.toml``) into ``home``; returns ``home``."""
    home.mkdir(parents=True, exist_ok=True)
    shutil.copy(template / "config.toml", home / "config.toml")
    return home


def flwr_env(home: Path) -> dict[str, str]:
    """The environment of ``make run``: this ``FLWR_HOME``, no runtime installs, offline hubs, our ``bin`` first."""
    return {
        **os.environ,
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
    }


def flwr_run(run_config: Path, home: Path, log_file: Path, timeout: float = 7200, app: Path = ROOT) -> int:
    """``flwr run <app> --run-config <run_config> --stream``; output goes to ``log_file``.

    Parameters
    ----------
    run_config : Path
        A TOML file of ``[tool.flwr.app.config]`` overrides.
    home : Path
        ``FLWR_HOME`` (see :func:`prepare_flwr_home`).
    log_file : Path
        Receives stdout and stderr.
    timeout : float
        Seconds before the run is killed (``subprocess.TimeoutExpired`` is raised).
    app : Path
        The Flower app folder (this repository).

    Returns
    -------
    int
        The exit status of ``flwr run``.
    """
    with open(log_file, "w") as log:
        proc = subprocess.run(
            [str(BIN / "flwr"), "run", str(app), "--run-config", str(run_config), "--stream"],
            env=flwr_env(home),
            stdout=log,
            stderr=subprocess.STDOUT,
            timeout=timeout,
        )
    return proc.returncode


def processes_started_for(home: Path) -> list[int]:
    """Pids of this user's processes whose environment has ``FLWR_HOME=<home>``.

    ``flwr run`` starts a detached local SuperLink (and its SuperExec) that
    inherit the environment :func:`flwr_env` gave it, so this names exactly the
    processes started for ``home``, unlike a command-line pattern, which can
    match anyone's process.
    """
    wanted = f"FLWR_HOME={Path(home)}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # gone, or another user's
            continue
        if wanted in environ:
            pids.append(int(entry.name))
    return pids


def stop_local_superlink(home: Path) -> None:
    """SIGTERM every process started for ``home`` (:func:`processes_started_for`: the local SuperLink and its own)."""
    for pid in processes_started_for(home):
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass


if __name__ == "__main__":  # ``python -m experiments.flower_launcher --stop <FLWR_HOME>`` (the Makefile's clean-up)
    import sys

    if sys.argv[1:2] != ["--stop"] or len(sys.argv) != 3:
        raise SystemExit("usage: python -m experiments.flower_launcher --stop <FLWR_HOME folder>")
    stop_local_superlink(Path(sys.argv[2]).resolve())
