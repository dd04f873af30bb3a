"""A run's per-round rows and its ``summary.json``, from the round log and the final replies.

Per-client quantities are averaged over the clients that replied; bytes are
those of one client's messages as Flower serialises them
(:func:`server_app.reporting.round_log.message_bytes`): its reply (upload) and the
instruction it was sent (download).
"""

from __future__ import annotations

import math
import os
import statistics
from typing import Any

from flwr.app import Message
from pydantic import ValidationError

from fedgrow_core.protocol import INFO_KEY, NUM_EXAMPLES, PARTITION_ID, Phase
from fedgrow_core.run_config import RunConfig
from fedgrow_core.run_summary import RunSummary


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def round_rows(run: RunConfig, entries: list[dict], final: list[dict]) -> list[dict]:
    """One row per round plus a last ``finetune-evaluate`` row.

    Columns: ``round``, ``phase``, ``eval-accuracy`` (mean over clients of the
    model evaluated after the round on each client's first ``eval-max-examples``
    test rows; None in rounds without evaluation; the last row: every test row),
    ``received-accuracy`` (the same, with the Global-LiGO received at the
    round's start, before training: the previous round's aggregate),
    ``grown-accuracy`` (the last row only: the grown models before fine-tuning,
    every test row; growth modes), ``relative-change``
    (``||G_after - G_sent|| / ||G_sent||`` of the shared arrays this round) and
    ``update-cosine`` (mean pairwise cosine of the clients' bounded updates),
    None where they do not apply, ``train-loss``
    (mean over clients), ``upload-bytes`` and ``download-bytes`` (mean per
    client this round), ``cumulative-upload-bytes``, ``replies``, ``accepted``, ``rejected``,
    ``failed``, ``missing``, ``seconds``, ``accepted_nodes``. The last row's round counts the
    final local fine-tuning as ``ceil(finetune_steps / local_steps)`` rounds, so
    every mode's x-axis measures the same number of local steps.
    """
    rows, cumulative = [], 0.0
    for e in entries:
        metrics = list(e.get("client_metrics", {}).values())
        upload = _mean(list(e.get("upload_bytes", {}).values())) or 0.0
        download = _mean(list(e.get("download_bytes", {}).values())) or 0.0
        cumulative += upload
        rows.append(
            {
                "round": e["round"],
                "phase": e["phase"],
                "eval-accuracy": _mean([m["eval-accuracy"] for m in metrics if "eval-accuracy" in m]),
                "received-accuracy": _mean([m["received-accuracy"] for m in metrics if "received-accuracy" in m]),
                "grown-accuracy": None,
                "relative-change": e.get("relative_change"),
                "update-cosine": e.get("update_cosine"),
                "train-loss": _mean([m["train-loss"] for m in metrics if "train-loss" in m]),
                "upload-bytes": upload,
                "download-bytes": download,
                "cumulative-upload-bytes": cumulative,
                "replies": e["replies"],
                "accepted": len(e["accepted_nodes"]),
                "rejected": len(e["rejected"]),
                "failed": e["failed"],
                "missing": len(e.get("missing_nodes", [])),
                "seconds": e["seconds"],
                "accepted_nodes": " ".join(str(n) for n in e["accepted_nodes"]),
            }
        )
    last = max((e["round"] for e in entries), default=0)
    local_ft = math.ceil(run.finetune_steps / run.local_steps)
    rows.append(
        {
            "round": last + local_ft,
            "phase": Phase.FINAL.value,
            "eval-accuracy": _mean([c["accuracy"] for c in final]),
            "received-accuracy": None,
            "grown-accuracy": _mean([c["grown_accuracy"] for c in final if c.get("grown_accuracy") is not None]),
            "relative-change": None,
            "update-cosine": None,
            "train-loss": None,
            "upload-bytes": 0.0,
            "download-bytes": 0.0,
            "cumulative-upload-bytes": cumulative,
            "replies": len(final),
            "accepted": len(final),
            "rejected": 0,
            "failed": 0,
            "missing": 0,
            "seconds": None,
            "accepted_nodes": "",
        }
    )
    return rows


def final_clients(replies: list[Message], entries: list[dict]) -> list[dict]:
    """Per-client results of the final phase, sorted by partition id.

    ``trainable_params`` is what the client trained in the rounds (its
    ``trainable-params`` train metric, e.g. Local + Global-LiGO + head for
    Fed-Grow); ``model_params`` the size of the model it fine-tuned, evaluated
    and saved at the end (the target model, or the small model for ``small-only``).
    """
    trained: dict[str, int] = {}
    for e in entries:
        for node, m in e.get("client_metrics", {}).items():
            if "trainable-params" in m and e["phase"] in (Phase.GROW, Phase.TRAIN_LOCAL, Phase.TRAIN_SHARED):
                trained.setdefault(node, int(m["trainable-params"]))
    clients = []
    for msg in replies:
        m = msg.content["metrics"]
        clients.append(
            {
                "partition_id": int(m[PARTITION_ID]),
                "node_id": msg.metadata.src_node_id,
                "model": str(msg.content["info"][INFO_KEY]),
                "accuracy": float(m["accuracy"]),
                "grown_accuracy": float(m["grown-accuracy"]) if "grown-accuracy" in m else None,
                "precision": float(m["precision"]),
                "trainable_params": trained.get(str(msg.metadata.src_node_id), int(m["model-params"])),
                "model_params": int(m["model-params"]),
                "test_examples": int(m[NUM_EXAMPLES]),
                "final_compute_s": _core_seconds(m, "finetune-seconds"),
            }
        )
    return sorted(clients, key=lambda c: c["partition_id"])


def _core_seconds(metrics, phase_key: str) -> float:
    seconds = float(metrics.get(phase_key, 0.0)) + float(metrics.get("eval-seconds", 0.0))
    return seconds * int(metrics.get("compute-threads", 1))


def compute_seconds(entries: list[dict], clients: list[dict], after_round: int = 0) -> float:
    """Pure compute of every client over the run, in core-seconds.

    Parameters
    ----------
    entries : list of dict
        The round log (``client_metrics`` per node).
    clients : list of dict
        :func:`final_clients`.
    after_round : int
        Count only rounds after this one (a resumed run: the rounds restored from
        the checkpoint ran in an earlier ServerApp, outside this one's wall time).

    Returns
    -------
    float
        Core-seconds, as below.

    For every round and node, the reported ``train-seconds`` plus
    ``eval-seconds`` times the client's ``compute-threads``; plus every client's
    final fine-tuning and evaluation (``final_compute_s``, counted the same way).
    Setup, model loading, serialisation and waiting are not in it. Counting a
    multi-threaded phase as ``seconds x threads`` core-seconds charges the
    client for imperfect thread scaling, so the floor is a lower bound only for
    perfectly packed compute at the clients' own thread counts.
    """
    rounds = sum(
        _core_seconds(m, "train-seconds")
        for e in entries
        if e["round"] > after_round
        for m in e.get("client_metrics", {}).values()
    )
    return rounds + sum(c.get("final_compute_s", 0.0) for c in clients)


def compute_cores() -> int:
    """Cores the clients' compute can share: this machine's (``os.cpu_count()``).

    Meaningful in local simulation, where every client runs on this machine; a
    deployment's clients compute on their own machines.
    """
    return max(1, os.cpu_count() or 1)


def build_summary(
    run: RunConfig,
    entries: list[dict],
    clients: list[dict],
    rows: list[dict],
    wall: float,
    resumed_after: int = 0,
    **extra: Any,
) -> dict:
    """The run's ``summary.json`` content, of the schema :class:`fedgrow_core.run_summary.RunSummary` declares.

    ``extra`` holds the keys the ServerApp adds (``final_rejected``,
    ``preflight_refused``, ``global_ligo_relative_change``).

    Keys: ``mode``, ``strategy``, ``seed``, ``dirichlet_alpha``, ``rounds``
    (rounds run, collection included), ``intermediate_shape``, ``target_shape``,
    ``clients`` (:func:`final_clients`), ``mean_accuracy``, ``std_accuracy``
    (population std over clients: the spread), ``mean_grown_accuracy`` (the
    grown models before fine-tuning; growth modes), ``mean_precision``,
    ``trainable_params_per_client`` (mean over clients), ``model_params``
    (median over clients),
    ``upload_bytes_per_round`` and ``download_bytes_per_round`` (means over
    rounds of one client's serialised reply and instruction, bytes),
    ``upload_bytes_total`` (per client, over the run), ``payload_bytes_total``
    (its tensor data only: 0 in modes that share nothing), ``model_bytes``
    (float32 bytes of ``model_params``, the median over clients of the final
    model's parameters: the target model's in the growth modes),
    ``upload_over_model_bytes`` and ``download_over_model_bytes`` (the per-round
    bytes over ``model_bytes``), ``participation`` (:func:`participation`),
    ``rounds_log``, ``wall_time_s`` (seconds), ``compute_s`` (:func:`compute_seconds`),
    ``compute_cores`` (:func:`compute_cores`), ``compute_floor_s``
    (of this ServerApp's rounds only: ``resumed_after`` is the checkpoint's round
    of a resumed run)
    (``compute_s / compute_cores``: the wall time of client compute packed
    perfectly onto every core) and ``wall_over_floor`` (``wall_time_s / compute_floor_s``).
    """
    accs = [c["accuracy"] for c in clients]
    # rounds in which replies were accepted: a round whose every reply was lost or rejected counts no zero
    uploads = [r["upload-bytes"] for r in rows if r["phase"] != Phase.FINAL and r["accepted"]]
    downloads = [r["download-bytes"] for r in rows if r["phase"] != Phase.FINAL and r["accepted"]]
    payloads = [_mean(list(e.get("payload_bytes", {}).values())) or 0.0 for e in entries]
    # the median, not the mean: one client's report cannot move the byte ratios
    model_params = statistics.median_low([c["model_params"] for c in clients]) if clients else 0
    upload, download, model_bytes = _mean(uploads) or 0.0, _mean(downloads) or 0.0, 4 * model_params
    compute = compute_seconds(entries, clients, after_round=resumed_after)
    cores = compute_cores()
    floor = compute / cores
    summary = {
        "mode": run.mode,
        "strategy": run.strategy,
        "seed": run.seed,
        "dirichlet_alpha": run.dirichlet_alpha,
        "task": run.task,
        "rounds": len(entries),
        "intermediate_shape": str(run.intermediate_shape),
        "target_shape": str(run.target_shape),
        "clients": clients,
        "mean_accuracy": _mean(accs),
        "mean_grown_accuracy": _mean([c["grown_accuracy"] for c in clients if c.get("grown_accuracy") is not None]),
        "std_accuracy": statistics.pstdev(accs) if accs else None,
        "mean_precision": _mean([c["precision"] for c in clients]),
        "trainable_params_per_client": _mean([c["trainable_params"] for c in clients]),
        "model_params": model_params,
        "upload_bytes_per_round": upload,
        "download_bytes_per_round": download,
        "upload_bytes_total": sum(r["upload-bytes"] for r in rows),
        "payload_bytes_total": sum(payloads),
        "model_bytes": model_bytes,
        "upload_over_model_bytes": upload / model_bytes if model_bytes else None,
        "download_over_model_bytes": download / model_bytes if model_bytes else None,
        "participation": participation(entries),
        "rounds_log": entries,
        "wall_time_s": wall,
        "compute_s": compute,
        "compute_cores": cores,
        "compute_floor_s": floor,
        "wall_over_floor": wall / floor if floor > 0 else None,
        **extra,
    }
    return summary


def summary_problems(summary: dict) -> list[str]:
    """Where ``summary`` departs from :class:`fedgrow_core.run_summary.RunSummary`: one line per key (empty: none)."""
    try:
        RunSummary.model_validate(summary)
    except ValidationError as err:
        return [f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in err.errors()]
    return []


def participation(entries: list[dict]) -> list[dict]:
    """Which nodes took part in which round.

    Returns
    -------
    list of dict
        Per round: ``round``, ``phase``, ``accepted`` (node ids whose reply was
        used), ``rejected``, ``failed`` (the client raised) and ``missing`` (no
        reply before ``round-timeout``) node ids, and ``aggregated`` (False when
        fewer than ``min-train-nodes`` replies were usable and the round was skipped).
    """
    return [
        {
            "round": e["round"],
            "phase": e["phase"],
            "accepted": list(e["accepted_nodes"]),
            "rejected": [r["node_id"] for r in e["rejected"]],
            "failed": [f["node_id"] for f in e.get("failed_nodes", [])],
            "missing": list(e.get("missing_nodes", [])),
            "aggregated": e.get("aggregated", True),
        }
        for e in entries
    ]
