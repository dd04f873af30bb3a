"""How a Fed-Grow simulation grows with the number of clients: 3, 10, 30 and 50 SuperNodes.

For each size the benchmark runs ``flwr run .`` in local simulation, exactly as
``make run`` does (project-local ``FLWR_HOME``, a fresh local SuperLink, Ray),
with a federation of that many SuperNodes (``--federation-config``:
``num-supernodes``, ``client-resources-num-cpus`` :data:`CLIENT_CPUS` unless
``--client-cpus`` says otherwise, and ``flwr_home/federation.toml``'s other
client resources) and a small image run (:data:`SCALE_RUN`: the image preset's small ViTs, a small
target). At 30 and 50 nodes it samples a fraction of the nodes per round
(``fraction-train``, :data:`SAMPLED`), as a user with that many clients would.

It reports, per size (one JSON line each):

* ``round_wall_s`` and ``round_compute_s``: each growth round's wall time (the
  ServerApp's, ``rounds_log``'s ``seconds``: from the round's start, through
  sending, every client's work and reply, to the last reply checked) and the sum of the replying
  clients' compute seconds (``train-seconds`` + ``eval-seconds`` +
  ``received-eval-seconds``: training, and evaluating the trained and the
  received Global-LiGO), divided by the ClientApps that can run at once
  (``parallel``: cores over ``client-resources-num-cpus``);
  ``round_received_eval_s``: the received Global-LiGO's evaluation, its part;
* ``overhead_ratio``: the sum over growth rounds of that wall time over the sum
  of that compute (1.0: every second until the last reply is checked is client
  compute);
* ``client_ratio`` and ``client_overhead_s``: the part of that spent in the
  ClientApps: their train handlers' seconds (each reply's ``message-seconds``:
  from the message's arrival at the handler to its reply, building or loading
  the client, its compute, keeping its state and encoding its update) over
  their compute, and the mean seconds per reply beside its compute. The rest of
  ``overhead_ratio`` is Flower's hand-over of each message, the rounds' start
  and end, and the ClientApps finishing a round apart;
* ``round_aggregate_s``: the server's work after the last reply is checked
  (``rounds_log``'s ``aggregate_seconds``: the round log's byte counts,
  clipping, the strategy's aggregate, the diagnostics), during which no client
  computes; ``overhead_ratio_with_aggregation`` adds it to the wall time. The
  checkpoint written after each round and Flower's steps before the next one
  are in neither;
* ``peak_rss_gib``: the peak over the run of the proportional set size (PSS,
  ``/proc/<pid>/smaps_rollup``; shared pages counted once) summed over every
  process of the simulation: the ``flwr`` CLI, the local SuperLink, the
  ServerApp, the simulation and its Ray workers (all the processes whose
  environment names the run's ``FLWR_HOME``), sampled every
  :data:`SAMPLE_SECONDS`;
* ``state_bytes_per_node``: the size of one node's private state after its
  last round (Local-LiGO, head, optimiser moments, batch position: the file
  the node writes under its state folder), the mean over nodes;
* ``wall_s``: the whole ``flwr run``, pre-training and final phase included.

Its last line is ``scale_overhead_ratio=<at the largest size> peak_rss_gib=<at
the largest size>`` (goals at 50 nodes: at most 1.15, and at most 16 GiB on a
24 GiB machine).

    python -m benchmarks.federation_scale [--sizes 3,10,30,50] [--client-cpus N] [key=value ...]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import threading
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from experiments.flower_launcher import flwr_run, prepare_flwr_home, processes_started_for, stop_local_superlink
from experiments.runner import run_overrides, toml_text
from fedgrow_core.protocol import Phase

ROOT = Path(__file__).resolve().parents[1]
#: The run at every size: the image preset (:data:`PRESET`: its small ViTs, each pre-trained by its client on
#: its own rows, grown through 4 x 192 to 8 x 384) with these overrides: 30 pre-training steps, 2 rounds of 5
#: local steps of 32 images, 5 fine-tuning steps, and small test sets, so that the final phase stays short.
PRESET = ROOT / "presets" / "image.toml"
SCALE_RUN = [
    "pretrain-steps=30",
    "num-server-rounds=2",
    "local-steps=5",
    "batch-size=32",
    "finetune-steps=5",
    "max-test-examples=200",
    "eval-max-examples=64",
    "save-models=false",
    'device="cpu"',
]
#: ``fraction-train`` by federation size: every node up to 10, then a sample, as a user would.
SAMPLED = {30: 0.34, 50: 0.2}
#: ``client-resources-num-cpus`` of the benchmark's federation: one core per ClientApp, so a 2-core machine runs
#: two at once and one client's loading, saving and messaging overlaps the other's training (``make run``'s
#: federation gives each ClientApp 2 cores, one at a time).
CLIENT_CPUS = 1
#: Seconds between two memory samples.
SAMPLE_SECONDS = 0.5


def pss_bytes(pids: list[int]) -> int:
    """The summed proportional set size of ``pids`` (bytes; a process that is gone counts 0)."""
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


class MemorySampler(threading.Thread):
    """Sample the summed PSS of every process started for a ``FLWR_HOME`` until stopped.

    Keeps the peak (bytes) and whether a local SuperLink was among the processes
    (``flwr run`` reuses a SuperLink already listening on its port, started for
    another ``FLWR_HOME``; its processes would not be counted).
    """

    def __init__(self, home: Path, every: float = SAMPLE_SECONDS):
        super().__init__(daemon=True)
        self.home, self.every, self.peak, self.saw_superlink = home, every, 0, False
        self._done = threading.Event()

    def run(self) -> None:
        """Sample every :attr:`every` seconds until :meth:`stop`."""
        while not self._done.is_set():
            pids = processes_started_for(self.home)
            self.peak = max(self.peak, pss_bytes(pids))
            self.saw_superlink = self.saw_superlink or any(_is_superlink(pid) for pid in pids)
            self._done.wait(self.every)

    def stop(self) -> int:
        """Stop sampling; returns the peak (bytes)."""
        self._done.set()
        self.join()
        return self.peak


def _is_superlink(pid: int) -> bool:
    try:
        return b"flower-superlink" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def federation_config(work: Path, num_nodes: int, client_cpus: int | None = None) -> Path:
    """``flwr_home/federation.toml`` with ``num-supernodes = num_nodes``, written under ``work``.

    ``client_cpus``, if given, replaces its ``client-resources-num-cpus``.
    """
    base = tomllib.loads((ROOT / "flwr_home" / "federation.toml").read_text())
    base["num-supernodes"] = num_nodes
    if client_cpus is not None:
        base["client-resources-num-cpus"] = client_cpus
    path = work / "federation.toml"
    path.write_text(toml_text(base))
    return path


def parallel_clients(federation: Path) -> int:
    """ClientApps that run at once on this machine: its cores over ``client-resources-num-cpus`` (at least 1)."""
    cpus = float(tomllib.loads(federation.read_text()).get("client-resources-num-cpus", 1))
    return max(1, int((os.cpu_count() or 1) // cpus))


#: A client's compute seconds in a round's metrics: training, evaluating the trained Global-LiGO, and evaluating
#: the received one (``received-accuracy``).
COMPUTE_METRICS = ("train-seconds", "eval-seconds", "received-eval-seconds")
#: A client's seconds in its ClientApp's train handler, compute included.
HANDLER_METRIC = "message-seconds"


@dataclass(frozen=True)
class RoundCost:
    """One growth round's times (seconds).

    Attributes
    ----------
    wall : float
        ``rounds_log``'s ``seconds``: from the round's start to the last reply checked.
    compute : float
        The replying clients' :data:`COMPUTE_METRICS`, summed, over the ClientApps that run at once.
    received_eval : float
        Its ``received-eval-seconds`` part.
    aggregate : float
        ``aggregate_seconds``: the server's work after the last reply is checked (the round log's byte
        counts, bounding, aggregation, diagnostics; 0 in a log that lacks it).
    handling : float or None
        The replying clients' ``message-seconds`` (their train handlers' seconds, compute included),
        summed, over the ClientApps that run at once; ``None`` if a reply lacks it.
    replies : int
        The replying clients.
    """

    wall: float
    compute: float
    received_eval: float
    aggregate: float
    handling: float | None = None
    replies: int = 0


def round_costs(summary: dict, parallel: int) -> list[RoundCost]:
    """The :class:`RoundCost` of each growth round in ``rounds_log`` (a round without replies is left out).

    Parameters
    ----------
    summary : dict
        A run's ``summary.json``.
    parallel : int
        ClientApps that run at once: each round's compute is the sum over its
        replying clients of :data:`COMPUTE_METRICS` (seconds) divided by it.

    Returns
    -------
    list of RoundCost
        In round order; the final phase is left out.
    """
    out = []
    for entry in summary["rounds_log"]:
        if entry.get("phase") == Phase.FINAL or not entry.get("client_metrics"):
            continue
        metrics = list(entry["client_metrics"].values())
        compute = sum(m.get(key, 0.0) for m in metrics for key in COMPUTE_METRICS)
        received = sum(m.get("received-eval-seconds", 0.0) for m in metrics)
        aggregate = float(entry.get("aggregate_seconds", 0.0))
        handled = [m.get(HANDLER_METRIC) for m in metrics]
        handling = None if None in handled else sum(handled) / parallel
        wall = float(entry["seconds"])
        out.append(RoundCost(wall, compute / parallel, received / parallel, aggregate, handling, len(metrics)))
    return out


def state_bytes_per_node(output: Path) -> float:
    """Mean over nodes of the size of each node's newest private-state file (bytes; 0 if none was written)."""
    sizes = []
    for node in sorted(output.glob("clients/partition-*")):
        files = sorted(node.glob("state/**/round-*.safetensors"), key=lambda p: int(p.stem.split("-")[1]))
        if files:
            sizes.append(files[-1].stat().st_size)
    return statistics.mean(sizes) if sizes else 0.0


def run_size(num_nodes: int, overrides: list[str], work: Path, client_cpus: int | None = None) -> dict:
    """One ``flwr run`` of ``num_nodes`` SuperNodes; returns the size's measurements (the keys of the module doc).

    Raises
    ------
    RuntimeError
        If the run was served by a local SuperLink this benchmark did not start, or failed (with its log's end).
    """
    home = prepare_flwr_home(work / "flwr-home")
    federation = federation_config(work, num_nodes, client_cpus)
    fraction = SAMPLED.get(num_nodes, 1.0)
    config = work / "run.toml"
    keys = run_overrides(PRESET, [*SCALE_RUN, f"fraction-train={fraction}", *overrides])
    keys["output-dir"] = str(work / "output")
    config.write_text(toml_text(keys))
    sampler = MemorySampler(home)
    sampler.start()
    start = time.perf_counter()
    try:
        status = flwr_run(config, home, work / "flwr.log", federation=federation)
    finally:
        wall = time.perf_counter() - start
        peak = sampler.stop()
        stop_local_superlink(home)
    if not sampler.saw_superlink:
        raise RuntimeError(
            "the run was served by a local SuperLink this benchmark did not start (its memory is not counted): "
            "stop it first (make stop-superlink, or the flower-superlink process listening on port 39091)"
        )
    summaries = sorted((work / "output").glob("*/summary.json"))
    if status != 0 or not summaries:
        log = (work / "flwr.log").read_text(errors="replace") if (work / "flwr.log").is_file() else ""
        tail = "\n".join(log.splitlines()[-30:])  # the work folder is removed after the size
        raise RuntimeError(f"flwr run with {num_nodes} SuperNodes failed (exit {status}); its log ends:\n{tail}")
    summary = json.loads(summaries[-1].read_text())
    measured = {"supernodes": num_nodes, "fraction_train": fraction, "parallel": parallel_clients(federation)}
    measured.update(round_report(summary, measured["parallel"]))
    measured.update(
        peak_rss_gib=peak / 2**30,
        state_bytes_per_node=state_bytes_per_node(work / "output"),
        wall_s=wall,
        mean_accuracy=summary["mean_accuracy"],
    )
    return measured


def round_report(summary: dict, parallel: int) -> dict:
    """The growth rounds' part of a size's measurements.

    Parameters
    ----------
    summary : dict
        A run's ``summary.json``.
    parallel : int
        ClientApps that run at once (:func:`round_costs`).

    Returns
    -------
    dict
        ``round_wall_s``, ``round_compute_s``, ``round_received_eval_s`` and
        ``round_aggregate_s`` (seconds per growth round, rounded to 0.01),
        ``overhead_ratio`` and ``overhead_ratio_with_aggregation`` (``None``
        without compute), ``client_ratio`` and ``client_overhead_s`` (``None``
        without compute, or when a reply lacks ``message-seconds``).
    """
    rounds = round_costs(summary, parallel)
    round_wall, compute = sum(r.wall for r in rounds), sum(r.compute for r in rounds)
    aggregate = sum(r.aggregate for r in rounds)
    handled = compute > 0 and all(r.handling is not None for r in rounds)
    handling = sum(r.handling for r in rounds) if handled else None
    replies = sum(r.replies for r in rounds)
    return {
        "round_wall_s": [round(r.wall, 2) for r in rounds],
        "round_compute_s": [round(r.compute, 2) for r in rounds],
        "round_received_eval_s": [round(r.received_eval, 2) for r in rounds],
        "round_aggregate_s": [round(r.aggregate, 2) for r in rounds],
        "overhead_ratio": round_wall / compute if compute > 0 else None,
        "overhead_ratio_with_aggregation": (round_wall + aggregate) / compute if compute > 0 else None,
        "client_ratio": handling / compute if handled else None,
        "client_overhead_s": (handling - compute) * parallel / replies if handled else None,
    }


def main(argv: list[str] | None = None) -> dict:
    """Run every size; returns the largest size's measurements (its ratio and memory are printed last)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="3,10,30,50", help="comma-separated numbers of SuperNodes")
    parser.add_argument(
        "--client-cpus",
        type=int,
        default=CLIENT_CPUS,
        help=f"client-resources-num-cpus (default {CLIENT_CPUS}; 0: flwr_home/federation.toml's)",
    )
    parser.add_argument("overrides", nargs="*", help="run-config key=value, over SCALE_RUN")
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    last = {}
    for num_nodes in sizes:
        with tempfile.TemporaryDirectory(prefix=f"federation-scale-{num_nodes}-") as tmp:
            last = run_size(num_nodes, args.overrides, Path(tmp), args.client_cpus or None)
        print(json.dumps(last), flush=True)
    print(f"scale_overhead_ratio={last['overhead_ratio']:.3f} peak_rss_gib={last['peak_rss_gib']:.2f}")
    return last


if __name__ == "__main__":
    main()
