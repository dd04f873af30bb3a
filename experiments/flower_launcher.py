"""Run the app with ``flwr run`` in local simulation, from Python, with a project-local ``FLWR_HOME``.

flwr 1.41 reads its SuperLink connections from ``$FLWR_HOME/config.toml`` and
starts a detached local SuperLink on first use (fixed port), which it reuses for
later runs; :func:`stop_local_superlink` stops the one started under a given
``FLWR_HOME``. The simulated federation is ``flwr_home/federation.toml``
(``--federation-config``).

``flwr run --stream`` exits 0 whether or not the ServerApp finished.
:func:`run_failure` asks the SuperLink for the run's status (``flwr list``) and
checks that the run wrote its summary; ``make run`` and the experiment runner
exit non-zero with its reason.

Command line (the Makefile's)::

    python -m experiments.flower_launcher --check <log of flwr run> <FLWR_HOME>
    python -m experiments.flower_launcher --stop <FLWR_HOME>
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
#: The simulated federation (``flwr run --federation-config``): SuperNodes and their resources.
FEDERATION_CONFIG = ROOT / "flwr_home" / "federation.toml"
_STARTED = re.compile(r"Successfully started run (\d+)")
_SUMMARY = re.compile(r"summary in (\S+summary\.json)")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def prepare_flwr_home(home: Path, template: Path = ROOT / "flwr_home") -> Path:
    """Copy the SuperLink connection (``flwr_home/config.toml``) into ``home``; returns ``home``."""
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


def flwr_run(
    run_config: Path,
    home: Path,
    log_file: Path,
    timeout: float = 7200,
    app: Path = ROOT,
    federation: Path = FEDERATION_CONFIG,
) -> int:
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
    federation : Path
        The simulated federation (``--federation-config``): SuperNodes and their resources.

    Returns
    -------
    int
        The exit status of ``flwr run``.
    """
    with open(log_file, "w") as log:
        proc = subprocess.run(
            [
                *(str(BIN / "flwr"), "run", str(app), "--stream"),
                *("--run-config", str(run_config), "--federation-config", str(federation)),
            ],
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


def flower_error(text: str) -> str:
    """The text of the last error box Flower's CLI printed (rich's ``╭─ Error ─╮ │ ... │ ╰─╯``), else its last line.

    Parameters
    ----------
    text : str
        What ``flwr`` printed, without ANSI colours.

    Returns
    -------
    str
        The box's lines joined by spaces, without its borders; ``(no output)`` for empty text.
    """
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    box: list[str] = []
    for line in lines:
        if line.startswith("╭"):
            box = []
        elif line.startswith("│"):
            box.append(line.strip("│").strip())
    inside = " ".join(part for part in box if part)
    if inside:
        return inside
    plain = [line for line in lines if not line.startswith(("╭", "╰", "│"))]
    return (plain or ["(no output)"])[-1]


def run_failure(log_text: str, home: Path, source: str = "") -> str | None:
    """Why the run that ``flwr run --stream`` logged did not finish with a summary, or ``None`` if it did.

    Parameters
    ----------
    log_text : str
        What ``flwr run`` printed (its run id, the streamed log).
    home : Path
        The ``FLWR_HOME`` it ran under; its local SuperLink must still be up,
        since the run's status comes from ``flwr list --run-id``.
    source : str
        The ``--run-config`` it was given (a TOML file or ``key=value`` pairs), named
        in the message when no run started.

    Returns
    -------
    str or None
        ``None`` if Flower reports ``finished:completed`` and the
        ``summary.json`` the ServerApp named exists; otherwise one line: no run
        started (with Flower's own error text, :func:`flower_error`, and ``source``),
        Flower's status and its details, or no summary written.
    """
    text = _ANSI.sub("", log_text)
    started = _STARTED.search(text)
    if started is None:
        return f"flwr run started no run: {flower_error(text)[:300]}{f' (in {source})' if source else ''}"
    run_id = started.group(1)
    listed = subprocess.run(
        [str(BIN / "flwr"), "list", "--run-id", run_id, "--format", "json"],
        env=flwr_env(home),
        capture_output=True,
        text=True,
        timeout=120,
    )
    try:
        (run,) = json.loads(listed.stdout)["runs"]
    except (ValueError, KeyError, TypeError):
        return f"run {run_id}: its status could not be read from the SuperLink ({listed.stdout.strip()[:300]})"
    if run.get("status") != "finished:completed":
        return f"run {run_id} ended {run.get('status')!r}: {str(run.get('status-details', ''))[:500]}"
    summaries = _SUMMARY.findall(text)
    if not summaries or not Path(summaries[-1]).is_file():
        return f"run {run_id} completed but wrote no summary.json"
    return None


def main(argv: list[str] | None = None) -> int:
    """Command line entry point (``--check LOG FLWR_HOME`` or ``--stop FLWR_HOME``); returns the exit status."""
    parser = argparse.ArgumentParser(description="Check or clean up a `flwr run` in local simulation.")
    group = parser.add_mutually_exclusive_group(required=True)
    group.add_argument("--check", nargs=2, metavar=("LOG", "FLWR_HOME"), help="exit 1, naming why, if the run failed")
    group.add_argument("--stop", metavar="FLWR_HOME", help="stop the local SuperLink started under FLWR_HOME")
    parser.add_argument("--run-config", default="", help="the run's --run-config, named when no run started")
    args = parser.parse_args(argv)
    if args.stop:
        stop_local_superlink(Path(args.stop).resolve())
        return 0
    log_file, home = Path(args.check[0]), Path(args.check[1]).resolve()
    failure = run_failure(log_file.read_text(errors="replace") if log_file.is_file() else "", home, args.run_config)
    if failure:
        print(f"FAILED: {failure}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
