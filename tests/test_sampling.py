"""Sampling at scale: ``fraction-train < 1`` through the real ServerApp and ClientApp.

Five nodes, two sampled per round (``fraction-train = 0.4``), four rounds, run in
this process (:class:`benchmarks.in_process_grid.InProcessGrid`, every message
through the real apps and their mods), with Flower's node sampling seeded so
the schedule is fixed. The grid records, round by round, which nodes were sent
what and what each node's ``Context.state`` held. A node that is not sampled
keeps its private state untouched and rejoins from it; a node whose first
round is not round 1 starts from the Global-LiGO of that round, the one every
sampled node receives and the server's own checkpoint holds, which the earlier
rounds moved.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Context, RecordDict

import client_app.app as fedgrow_client
import server_app.app as fedgrow_server
from benchmarks.in_process_grid import federation
from benchmarks.robustness import small_vit_config
from client_app import kept_state
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig
from server_app.persistence.checkpoint import CHECKPOINT_FILE, read_checkpoint

NODES, ROUNDS, LOCAL_STEPS = 5, 4, 2
SAMPLING = {
    "pretrain-steps": 20,
    "num-server-rounds": ROUNDS,
    "local-steps": LOCAL_STEPS,
    "max-train-examples": 100,
    "max-test-examples": 40,
    "finetune-steps": 1,
    "fraction-train": 0.4,
    "strategy": "fedavg",
    "save-models": False,
}


def _private(context: Context) -> dict | None:
    """A copy of a node's private state as numpy arrays (read where ``Context.state`` says it is kept), with the
    round it was kept after and what ``Context.state`` holds about it."""
    state = kept_state.kept_private_state(context)
    if state is None:
        return None
    arrays = {k: v.numpy().copy() for k, v in state.items()}
    mark = dict(context.state[kept_state.ROUND_KEY])
    return {"round": int(mark["round"]), "mark": mark, "arrays": arrays}


@pytest.fixture(scope="module")
def sampled_run(tmp_path_factory):
    work = tmp_path_factory.mktemp("sampling")
    config = {**small_vit_config(work), **SAMPLING, "output-dir": str(work / "out")}
    grid = federation(fedgrow_client.app, NODES, config, 41, {"node-policy": "open"})
    rounds: list[dict] = []

    def record(sent, replies):
        grow = [m for m in sent if m.content["config"].get("phase") == "grow"]
        if grow:
            # the server's checkpoint now is the one after the previous round (this round's is written after
            # its aggregation): the Global-LiGO the server holds, read from its own file
            written = list(Path(config["output-dir"]).glob(f"*/{CHECKPOINT_FILE}"))
            held = read_checkpoint(written[0].parent) if written else None
            # what every node held right after this round, and what the sampled ones were sent and replied
            rounds.append(
                {
                    "sampled": sorted(m.metadata.dst_node_id for m in grow),
                    "sent": {m.metadata.dst_node_id: dict(m.content["arrays"].items()) for m in grow},
                    "replied": {r.metadata.src_node_id: not r.has_error() for r in replies},
                    "state": {n: _private(spec.context) for n, spec in grid.nodes.items()},
                    "server_held": None if held is None else (held.server_round, dict(held.global_ligo.items())),
                }
            )
        return replies

    grid.tamper = record
    state = random.getstate()
    random.seed(3)  # Flower samples nodes with `random.sample`: a fixed schedule
    try:
        grid.run_server(fedgrow_server.main, Context(41, 0, {}, RecordDict(), dict(config)))
    finally:
        random.setstate(state)
    (summary,) = Path(config["output-dir"]).glob("*/summary.json")
    initial = initial_global_ligo(RunConfig.from_flower(config)).state_dict()
    return {"rounds": rounds, "summary": json.loads(summary.read_text()), "initial": initial}


def _schedule(run) -> dict[int, list[int]]:
    """Node id -> the rounds (1-based) it was sampled in."""
    out: dict[int, list[int]] = {}
    for r, entry in enumerate(run["rounds"], start=1):
        for node in entry["sampled"]:
            out.setdefault(node, []).append(r)
    return out


def test_the_schedule_samples_two_of_five_nodes_each_round_and_has_gaps_and_late_joiners(sampled_run):
    rounds = sampled_run["rounds"]
    assert len(rounds) == ROUNDS and all(len(e["sampled"]) == 2 for e in rounds)
    assert all(all(e["replied"].values()) for e in rounds)
    schedule = _schedule(sampled_run)
    # the seeded schedule has what the other tests need: a node that skips a round and comes back, and one
    # whose first round is after round 1
    assert any(any(b - a > 1 for a, b in zip(rs, rs[1:], strict=False)) for rs in schedule.values()), schedule
    assert any(rs[0] > 1 for rs in schedule.values()), schedule
    assert [len(r["accepted_nodes"]) for r in sampled_run["summary"]["rounds_log"][:ROUNDS]] == [2] * ROUNDS


def test_a_node_not_sampled_keeps_its_private_state_and_rejoins_from_it(sampled_run):
    rounds, checked = sampled_run["rounds"], 0
    for node, served in _schedule(sampled_run).items():
        for r in range(1, ROUNDS + 1):
            before = rounds[r - 2]["state"][node] if r > 1 else None
            after = rounds[r - 1]["state"][node]
            if r not in served:  # not sampled: exactly what it held before, not a byte changed
                if before is None:
                    assert after is None
                else:
                    assert after["round"] == before["round"] and after["mark"] == before["mark"]
                    assert after["arrays"].keys() == before["arrays"].keys()
                    assert all(np.array_equal(after["arrays"][k], before["arrays"][k]) for k in before["arrays"])
            else:  # sampled: it went on from its own last round (its batch position and AdamW moments continue)
                last = [s for s in served if s < r]
                assert after["round"] == r
                steps = int(after["arrays"]["data.steps"])
                assert steps == LOCAL_STEPS * (len(last) + 1), (node, r, served, steps)
                adam = [int(v) for k, v in after["arrays"].items() if k.startswith("optimizer.") and k.endswith("step")]
                assert adam and set(adam) == {steps}, (node, r, set(adam))
                if last and r - last[-1] > 1:  # a rejoin after a gap
                    checked += 1
    assert checked >= 1


def test_a_node_that_joins_after_round_one_starts_from_the_current_global_ligo(sampled_run):
    rounds, initial = sampled_run["rounds"], sampled_run["initial"]
    names = sorted(initial)
    initial_flat = np.concatenate([initial[k].numpy().ravel() for k in names])
    late = [(node, served[0]) for node, served in _schedule(sampled_run).items() if served[0] > 1]
    assert late
    for node, first in late:
        entry = rounds[first - 1]
        received = np.concatenate([entry["sent"][node][k].numpy().ravel() for k in names])
        # exactly the Global-LiGO the server held after the round before (its checkpoint) ...
        held_round, held = entry["server_held"]
        assert held_round == first - 1
        assert np.array_equal(received, np.concatenate([held[k].numpy().ravel() for k in names]))
        # ... which every node sampled in that round receives, and which the earlier rounds moved
        for other, arrays in entry["sent"].items():
            assert np.array_equal(received, np.concatenate([arrays[k].numpy().ravel() for k in names])), other
        assert np.linalg.norm(received - initial_flat) > 1e-6 * np.linalg.norm(initial_flat)
        # and the node had no private state before: its Local-LiGO starts fresh, its step count at 0
        assert rounds[first - 2]["state"][node] is None
        assert int(entry["state"][node]["arrays"]["data.steps"]) == LOCAL_STEPS
