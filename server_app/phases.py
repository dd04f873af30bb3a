"""The server's building blocks for every mode: shared rounds, local rounds, collection, final phase.

Each function sends messages through the ``Grid`` and returns the round-log
entries (:func:`server_app.round_log.round_entry`) with the round number and the
phase (``grow``, ``train-local``, ``train-shared``, ``collect``) added, so
:mod:`server_app.modes` can chain them and the summary can count rounds and bytes
uniformly.
"""

from __future__ import annotations

import time
from logging import INFO, WARNING
from pathlib import Path

from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, RecordDict
from flwr.common import log
from flwr.serverapp import Grid

from fedgrow_core.run_config import RunConfig

from .checkpoint import Checkpoint, load_strategy_state, write_checkpoint
from .reply_checks import array_spec
from .round_log import last_line, round_entry
from .strategy import build_strategy, strategy_for_run

FINAL_PHASE = "finetune-evaluate"


def _send(
    grid: Grid, arrays: ArrayRecord, phase: str, message_type: str, timeout: float, **config: int | str
) -> list[Message]:
    """One message per node (``config`` + ``phase``); returns the replies that arrived within ``timeout`` seconds."""
    messages = [
        Message(
            content=RecordDict({"arrays": arrays, "config": ConfigRecord({"phase": phase, **config})}),
            message_type=message_type,
            dst_node_id=node_id,
        )
        for node_id in grid.get_node_ids()
    ]
    replies = list(grid.send_and_receive(messages, timeout=timeout))
    for msg in replies:
        if msg.has_error():
            log(WARNING, "%s: node %d failed: %s", phase, msg.metadata.src_node_id, msg.error.reason)
    return replies


class PreflightError(RuntimeError):
    """Raised when a node cannot set up its model and data; names every failing node and why."""


def preflight(grid: Grid, timeout: float) -> dict[int, dict]:
    """Before any training, ask every node to load its model and data (a ``query`` message).

    Each client builds its setup (the run config checked, its small model and
    data partition loaded, its paths resolved) and replies with its partition
    id and row counts; building it now also warms the client's cache for round 1.

    Returns
    -------
    dict of int to dict
        Node id -> the reply's metrics (``partition-id``, ``train-examples``,
        ``test-examples``).

    Raises
    ------
    PreflightError
        If any node replied with an error or did not reply within ``timeout``
        seconds; the message lists every such node with its reason.
    """
    sent = list(grid.get_node_ids())
    replies = _send(grid, ArrayRecord(), "preflight", MessageType.QUERY, timeout)
    problems = [f"node {m.metadata.src_node_id}: {last_line(m.error.reason)}" for m in replies if m.has_error()]
    replied = {m.metadata.src_node_id for m in replies}
    problems += [f"node {n}: no reply within {timeout:g} s" for n in sent if n not in replied]
    if problems:
        raise PreflightError("preflight failed, no training started:\n  " + "\n  ".join(problems))
    return {m.metadata.src_node_id: dict(m.content["metrics"]) for m in replies}


def shared_rounds(
    grid: Grid,
    run: RunConfig,
    arrays: ArrayRecord,
    num_rounds: int,
    phase: str,
    first_round: int,
    *,
    run_dir: Path | None = None,
    resume: Checkpoint | None = None,
) -> tuple[ArrayRecord, list[dict]]:
    """``num_rounds`` rounds of the configured (checked) strategy over ``arrays``.

    Clients receive ``config["phase"] = phase`` and, with ``run_dir``, the run's
    tag (``run-tag``, the folder's name) under which they keep their private state
    on disk. Rounds are numbered from ``first_round`` in the returned log.

    With ``run_dir`` the server writes a checkpoint there after every round
    (:func:`server_app.checkpoint.write_checkpoint`, through ``Strategy.start``'s
    ``evaluate_fn`` hook). With ``resume`` the Global-LiGO, the strategy's state,
    the RNGs and the log of the checkpoint's rounds are restored and only the
    rounds after ``resume.server_round`` run.

    Returns
    -------
    tuple of (ArrayRecord, list of dict)
        The aggregated arrays after the last round (``arrays`` if no round
        aggregated anything) and one log entry per round.
    """
    num_nodes = len(list(grid.get_node_ids()))
    strategy = strategy_for_run(run, num_nodes)
    done, before = 0, []
    if resume is not None:
        done, arrays, before = resume.server_round, resume.global_ligo, resume.entries
        load_strategy_state(strategy, resume.strategy)
        resume.restore_rng()
        strategy.round_offset = done
        log(INFO, "resuming after round %d from %s", done, run_dir)

    def entries() -> list[dict]:
        new = [
            {**entry, "round": entry["round"] + first_round - 1, "phase": phase}
            for entry in getattr(strategy, "round_log", [])
        ]
        return [*before, *new]

    def checkpoint(server_round: int, current: ArrayRecord) -> None:
        if run_dir is not None and server_round > 0:
            write_checkpoint(run_dir, run, server_round + done, current, strategy, entries())

    if num_rounds <= done:
        return arrays, before
    config = {"phase": phase, **({"run-tag": run_dir.name} if run_dir is not None else {})}
    result = strategy.start(
        grid=grid,
        initial_arrays=arrays,
        num_rounds=num_rounds - done,
        timeout=run.round_timeout,
        train_config=ConfigRecord(config),
        evaluate_fn=checkpoint,
    )
    return (result.arrays if result.arrays is not None else arrays), entries()


def local_rounds(
    grid: Grid, num_rounds: int, phase: str, first_round: int, timeout: float = 3600, run_tag: str = ""
) -> list[dict]:
    """``num_rounds`` rounds in which every node trains locally and replies with metrics only.

    The messages carry an empty ``ArrayRecord``, the round (``server-round``) and
    ``run_tag`` (``run-tag``, if any: clients keep their state on disk under it); a reply that carries any tensor
    is logged as rejected (nothing is aggregated in these modes anyway).
    """
    entries = []
    for r in range(first_round, first_round + num_rounds):
        start = time.perf_counter()
        sent = list(grid.get_node_ids())
        tag = {"run-tag": run_tag} if run_tag else {}
        replies = _send(grid, ArrayRecord(), phase, MessageType.TRAIN, timeout, **{"server-round": r, **tag})
        accepted, rejected = [], []
        for msg in replies:
            if not msg.has_error() and any(len(rec) for rec in msg.content.array_records.values()):
                rejected.append({"node_id": msg.metadata.src_node_id, "reason": "a local-only reply carried tensors"})
            else:
                accepted.append(msg)
        entry = round_entry(r, replies, accepted, rejected, time.perf_counter() - start, sent)
        entries.append({**entry, "phase": phase, "aggregated": False})
        log(INFO, "round %d (%s): %d replies, %.1f s", r, phase, len(replies), entry["seconds"])
    return entries


def collect_average(
    grid: Grid, run: RunConfig, arrays: ArrayRecord, round_number: int, timeout: float = 3600
) -> tuple[ArrayRecord, dict]:
    """Ask every node for its starting weights and average them with the strategy's FedAvg.

    Used before federated training of a full model: ``scratch-fedavg`` (clients
    build the seeded random initialisation) and ``fedgrow-fedft`` (clients
    materialise their grown models from the Global-LiGO in ``arrays``). Replies
    must all match the first accepted reply's names, shapes and dtypes, and pass
    the usual reply checks.

    Returns
    -------
    tuple of (ArrayRecord, dict)
        The example-weighted average (``flwr`` FedAvg) and a log entry for the
        collection (counted as a round: its upload is real traffic).

    Raises
    ------
    RuntimeError
        If no node replied with weights.
    """
    start = time.perf_counter()
    replies = _send(grid, arrays, "collect", MessageType.TRAIN, timeout)
    ok = [m for m in replies if not m.has_error() and m.content.array_records]
    if not ok:
        raise RuntimeError("collect: no node replied with weights")
    num_nodes = len(list(grid.get_node_ids()))
    strategy = build_strategy("fedavg", num_nodes, 1.0)
    strategy.expected_spec = array_spec(next(iter(ok[0].content.array_records.values())))
    strategy._round_start = start
    strategy._sent_nodes = list(grid.get_node_ids())
    averaged, _ = strategy.aggregate_train(round_number, replies)
    if averaged is None:
        raise RuntimeError("collect: every reply was rejected")
    (entry,) = strategy.round_log
    return averaged, {**entry, "phase": "collect"}


def final_phase(
    grid: Grid, arrays: ArrayRecord, timeout: float = 3600, last_round: int = 0, run_tag: str = ""
) -> list[Message]:
    """Ask every node to fine-tune (per its mode), evaluate and save its model; return the good replies.

    One ``EVALUATE`` message per node carries ``arrays`` (the final Global-LiGO,
    the final averaged model, or nothing), ``phase = "finetune-evaluate"``, the
    last round (``server-round``) and the run's tag (``run-tag``, if any);
    ``timeout`` is in seconds. Failed replies are logged with the node id and left out.
    """
    config = {"server-round": last_round, **({"run-tag": run_tag} if run_tag else {})}
    return [m for m in _send(grid, arrays, FINAL_PHASE, MessageType.EVALUATE, timeout, **config) if not m.has_error()]
