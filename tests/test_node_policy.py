"""The node decides: a curious server against the real ClientApp, and the node policy that stops it.

Each test plays a server of the project's own that tries what a curious or
malicious operator would, through the whole ClientApp (``client_app.app.app``:
its mods and its catch-all), against a node with a tiny BERT and a review file
of its own. Outside Flower's simulation engine the node takes the ``strict``
policy, as a deployed SuperNode does.
"""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_bert, reviews_csv, tiny_bert_folder
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict

import client_app.app as fedgrow_client
import fedgrow_core.clients.growth_client as growth_client
from client_app import kept_state
from client_app.guards import in_simulation
from fedgrow_core.clients.model_export import NonFiniteModel, save_model, write_folder_atomically
from fedgrow_core.clients.state_store import ClientStateStore
from fedgrow_core.growth.families import get_family
from fedgrow_core.modes import mode_names
from fedgrow_core.node_policy import NodePolicy, NodePolicyError, run_fingerprint
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig
from fedgrow_core.training import resolve_device

#: The server's run config: tiny shapes; the node's own model and data are named in its node config.
RUN = {
    "intermediate-shape": "2x32x64x2",
    "target-shape": "3x48x96x3",
    "local-steps": 2,
    "batch-size": 16,
    "max-length": 32,
    "finetune-steps": 1,
}
TAG = "20261206-120000-text-fedavg"


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The node's own small model and review file (columns ``review`` and ``stars``), and a file it never shares."""
    tmp = tmp_path_factory.mktemp("node-files")
    return {
        "model": tiny_bert_folder(tmp / "bert", 1, 32, 2, 64, 0),
        "data": reviews_csv(tmp / "own.csv", 200, text_column="review", label_column="stars"),
        "secret": reviews_csv(tmp / "secret.csv", 60),
    }


@pytest.fixture(autouse=True)
def fresh_cache():
    """Every test starts with an empty client cache, as a new ClientApp process does."""
    fedgrow_client._CLIENTS.clear()
    yield
    fedgrow_client._CLIENTS.clear()


def _node(files, tmp_path, **extra):
    own = {"model": files["model"], "dataset": files["data"], "text-column": "review", "label-column": "stars"}
    return {"partition-id": 0, "num-partitions": 2, "output-dir": str(tmp_path / "node"), **own, **extra}


def _context(node, run=None, run_id=1):
    return Context(run_id, 1, node, RecordDict(), {**RUN, **(run or {})})


def _send(context, phase, arrays=None, message_type=MessageType.TRAIN, **config):
    content = RecordDict({"config": ConfigRecord({"phase": phase, **config})})
    if arrays is not None:
        content["arrays"] = ArrayRecord({k: v.contiguous() for k, v in arrays.items()})
    return fedgrow_client.app(Message(content, dst_node_id=1, message_type=message_type), context)


def _preflight(context):
    return _send(context, "preflight", message_type=MessageType.QUERY)


def _grow(context, arrays, server_round, **config):
    return _send(context, "grow", arrays, **{"server-round": server_round, "run-tag": TAG, **config})


def _final(context, arrays, **config):
    return _send(context, "finetune-evaluate", arrays, MessageType.EVALUATE, **{"run-tag": TAG, **config})


def _global_ligo(run=None):
    ligo = initial_global_ligo(RunConfig.from_flower({**RUN, **(run or {})}))
    return {k: v.detach().clone() for k, v in ligo.state_dict().items()}


def _arrays(reply):
    assert not reply.has_error(), reply.error.reason
    return {k: v.numpy() for k, v in reply.content["arrays"].items()}


def _refusal(reply):
    assert reply.has_error(), "the node served what it should have refused"
    return reply.error.reason


# --- the policy itself -------------------------------------------------------------------------------------------


def test_profiles_set_the_defaults_and_the_node_config_overrides_them():
    assert not in_simulation()  # pytest's process is no Ray actor: the strict profile applies
    strict = NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 2})
    assert strict.strict and strict.modes == ("fedgrow",)
    assert (strict.max_local_steps, strict.max_finetune_steps, strict.max_final_phases) == (1000, 1000, 1)
    simulated = NodePolicy.from_node_config({"partition-id": 0, "num-partitions": 2}, simulation=True)
    assert not simulated.strict and simulated.modes == mode_names() and simulated.max_local_steps == 0
    own = NodePolicy.from_node_config(
        {"node-policy": "strict", "allowed-modes": "fedgrow,small-only", "max-local-steps": 5}, simulation=True
    )
    assert own.strict and own.modes == ("fedgrow", "small-only") and own.max_local_steps == 5
    server = RunConfig(cache_dir="/srv/server-cache", audit_dir="/srv/server-audit", text_column="x")
    # a strict node never takes the run config's folders; an open one does unless it names its own
    assert (strict.effective_run(server).cache_dir, strict.effective_run(server).audit_dir) == ("", "")
    assert simulated.effective_run(server).cache_dir == "/srv/server-cache"
    mine = NodePolicy.from_node_config({"cache-dir": "/node/cache", "dataset": "own.csv"}, simulation=True)
    assert mine.effective_run(server).cache_dir == "/node/cache" and mine.effective_run(server).text_column == "x"
    assert strict.model_copy(update={"dataset": "own.csv"}).effective_run(server).text_column == "text"
    (problem,) = strict.problems(RunConfig(batch_size=256, max_length=512))  # each within its own cap
    assert problem == "batch-size * max-length = 131072: over this node's max-batch-tokens = 65536"
    with pytest.raises(NodePolicyError) as err:
        NodePolicy.from_node_config({"max-local-step": 3, "max-batch-size": -1, "max-message-seconds": float("nan")})
    text = str(err.value)
    assert "max-local-step = 3" in text and "max-batch-size = -1" in text and "max-message-seconds = nan" in text
    with pytest.raises(NodePolicyError, match="node-policy = 'lax': expected one of"):
        NodePolicy.from_node_config({"node-policy": "lax"})
    with pytest.raises(NodePolicyError, match="unknown modes"):
        NodePolicy.from_node_config({"allowed-modes": "fedgrow,steal"})


def test_the_run_fingerprint_ignores_only_what_a_resumption_may_change():
    run = RunConfig()
    assert run_fingerprint(run) == run_fingerprint(RunConfig(num_server_rounds=9, round_timeout=5.0))
    assert run_fingerprint(run) != run_fingerprint(RunConfig(lr_width=0.5))
    assert run_fingerprint(run) != run_fingerprint(RunConfig(seed=1))


# --- 1. where a node writes ---------------------------------------------------------------------------------------


def test_the_server_cannot_choose_where_a_node_writes(files, tmp_path, task_identity, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the node's working folder
    server = {k: str(tmp_path / f"server-{k}") for k in ("output-dir", "audit-dir", "cache-dir")}
    node = _node(files, tmp_path)
    del node["output-dir"]  # the node's own default folder: ./fedgrow-node
    context = _context(node, server)
    assert not _preflight(context).has_error()
    _arrays(_grow(context, _global_ligo(), 1))
    assert not _final(context, _global_ligo(), **{"server-round": 1}).has_error()
    assert not any((tmp_path / f"server-{k}").exists() for k in ("output-dir", "audit-dir", "cache-dir"))
    mine = tmp_path / "fedgrow-node" / "clients" / "partition-0"
    assert (mine / "models" / TAG / "grown_model" / "model.safetensors").is_file()
    assert len(list((mine / "state" / TAG).glob("*/run-1/round-1.safetensors"))) == 1


def test_only_the_nodes_own_audit_folder_is_written_and_it_logs_every_reply(files, tmp_path, task_identity):
    context = _context(_node(files, tmp_path, **{"audit-dir": str(tmp_path / "my-audit")}))
    context.run_config["audit-dir"] = str(tmp_path / "server-audit")
    assert not _preflight(context).has_error()
    _refusal(_send(context, "grow", {}, "train.steal"))  # no handler: answered by the catch-all
    _refusal(_send(context, "collect", {}))  # refused inside the handlers: the sanitised text is what left
    assert not (tmp_path / "server-audit").exists()
    (audit,) = (tmp_path / "my-audit").glob("egress-*.jsonl")
    lines = [json.loads(line) for line in audit.read_text().splitlines()]
    assert [line["message_type"] for line in lines] == ["query", "train.steal", "train"]
    assert lines[1]["error"] == "ValueError (details are in the node's own log)"
    assert "is not served in mode 'fedgrow'" in lines[2]["error"]


# --- 2. what a node reads -----------------------------------------------------------------------------------------


def test_the_server_cannot_choose_what_a_node_reads(files, tmp_path, task_identity):
    bare = {"partition-id": 0, "num-partitions": 2, "output-dir": str(tmp_path / "node")}
    reason = _refusal(_preflight(_context(bare, {"dataset": files["secret"]})))
    assert "this node reads only its own data" in reason and "secret" not in reason and "<path>" in reason
    reason = _refusal(_preflight(_context(bare, {"client-models": files["model"]})))
    assert "it loads only its own model" in reason
    shared = {**bare, "allowed-datasets": f"{files['data']}, digits", "model": files["model"], "min-eval-rows": 8}
    reason = _refusal(_preflight(_context(shared, {"dataset": files["secret"]})))
    assert "or one its node config allowed-datasets names" in reason
    # a file the organisations share, named in the node's allow-list: partitioned like a built-in source
    run = {"dataset": files["data"], "text-column": "x", "label-column": "y", "partitioner": "iid"}
    reply = _preflight(_context({**shared, "text-column": "review", "label-column": "stars"}, run))
    assert not reply.has_error(), reply.error.reason  # read with the node's columns, not the run config's
    rows = reply.content["metrics"]["train-examples"] + reply.content["metrics"]["test-examples"]
    assert 0 < rows <= 100  # one of two partitions of the 200 rows (the global test split held out), not all
    assert "min-eval-rows = 32" in _refusal(_preflight(_context({**shared, "min-eval-rows": 32}, run)))
    # the node's own file, read with the node's own columns whatever the run config names
    own = _preflight(_context(_node(files, tmp_path), {"dataset": files["secret"], "text-column": "x"}))
    assert not own.has_error(), own.error.reason
    assert own.content["metrics"]["train-examples"] + own.content["metrics"]["test-examples"] == 200


# --- 3. which mode a node serves ----------------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["scratch-fedavg", "small-only", "independent-ligo"])
def test_the_server_cannot_switch_a_nodes_mode(files, tmp_path, task_identity, mode):
    context = _context(_node(files, tmp_path), {"mode": mode})
    assert f"mode = {mode!r}: this node serves ['fedgrow']" in _refusal(_preflight(context))
    for phase in ("collect", "train-shared", "train-local"):
        reply = _send(context, phase, {}, **{"server-round": 1})
        assert "this node serves ['fedgrow']" in _refusal(reply)
    assert not (tmp_path / "node").exists()


# --- 4. a bad message does not poison the node --------------------------------------------------------------------


@pytest.fixture
def clean(files, tmp_path, task_identity):
    """The replies of a node that only ever saw honest messages: rounds 1 and 2 with the initial Global-LiGO."""
    context = _context(_node(files, tmp_path / "clean"))
    replies = [_arrays(_grow(context, _global_ligo(), r)) for r in (1, 2)]
    fedgrow_client._CLIENTS.clear()
    return replies


def _assert_same(got, expected):
    assert set(got) == set(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(got[name], value, err_msg=name)


def test_the_private_state_lives_in_the_state_folder_and_a_held_client_is_not_reloaded(
    files, tmp_path, monkeypatch, caplog, task_identity
):
    loads = []
    real_load = growth_client.GrowthClient.load_private_state
    monkeypatch.setattr(
        growth_client.GrowthClient, "load_private_state", lambda self, state: loads.append(1) or real_load(self, state)
    )

    def two_rounds(folder, tag, rebuild):
        fedgrow_client._CLIENTS.clear()
        context = _context(_node(files, folder))
        first = _send(context, "grow", _global_ligo(), **{"server-round": 1, "run-tag": tag})
        if rebuild:  # another process, or the cache let the client go: it is built again and loads the state
            fedgrow_client._CLIENTS.clear()
        second = _send(context, "grow", _global_ligo(), **{"server-round": 2, "run-tag": tag})
        return context, [_arrays(first), _arrays(second)]

    held, held_replies = two_rounds(tmp_path / "held", TAG, rebuild=False)
    assert loads == []  # the client that trained round 1 holds its state: nothing is read back
    mark = dict(held.state[kept_state.ROUND_KEY])
    assert kept_state.STATE_KEY not in held.state  # Context.state names the file, holds no tensors
    assert mark["round"] == 2 and Path(mark["file"]) == ClientStateStore(Path(mark["file"]).parent).file(2)
    assert Path(mark["file"]).is_relative_to(tmp_path / "held" / "node")
    (client,) = [v for k, v in fedgrow_client._CLIENTS.items() if "growth" in k]
    kept = kept_state.kept_private_state(held)
    _assert_same({k: v.numpy() for k, v in kept.items()}, {k: v.numpy() for k, v in client.private_state().items()})

    rebuilt, rebuilt_replies = two_rounds(tmp_path / "rebuilt", TAG, rebuild=True)
    assert loads == [1]  # read back from the file Context.state names
    in_memory, memory_replies = two_rounds(tmp_path / "memory", "", rebuild=True)  # no run tag: no state folder
    assert kept_state.STATE_KEY in in_memory.state and "file" not in in_memory.state[kept_state.ROUND_KEY]
    assert not (tmp_path / "memory" / "node").exists()
    # on a Ray cluster of several hosts the next message may be served elsewhere: the tensors stay in Context
    monkeypatch.setattr(kept_state, "on_one_host", lambda: False)
    spread, spread_replies = two_rounds(tmp_path / "hosts", TAG, rebuild=True)
    monkeypatch.undo()
    assert kept_state.STATE_KEY in spread.state and "file" not in spread.state[kept_state.ROUND_KEY]
    assert list((tmp_path / "hosts" / "node").rglob("round-2.safetensors"))  # and the state folder has it too
    for replies in (rebuilt_replies, memory_replies, spread_replies):  # the same rounds, wherever the state was kept
        for got, expected in zip(replies, held_replies, strict=True):
            _assert_same(got, expected)

    Path(mark["file"]).write_bytes(b"damaged")
    fedgrow_client._CLIENTS.clear()
    monkeypatch.setattr(growth_client.GrowthClient, "load_private_state", real_load)
    caplog.clear()
    reply = _send(held, "grow", _global_ligo(), **{"server-round": 3, "run-tag": TAG})  # a failure; never stale state
    assert _refusal(reply) == "RuntimeError (details are in the node's own log)"
    assert "private state of round 2 in " in caplog.text and "round-2.safetensors cannot be read" in caplog.text
    assert dict(held.state[kept_state.ROUND_KEY]) == mark  # nothing changed


@pytest.mark.skipif(not hasattr(os, "posix_fadvise"), reason="no posix_fadvise here: a file's pages stay cached")
def test_a_simulation_worker_drops_its_state_files_from_the_page_cache_and_reads_them_back_whole(
    files, tmp_path, monkeypatch, task_identity
):
    """A simulation worker holds its clients in memory: its state files leave the page cache once on disk.

    A client built again reads the file back from disk, and the rounds are those of a deployed node's, whose
    ClientApp process serves one message and reads the file back from the cache (its pages stay).
    """
    dropped = []
    real_fadvise = os.posix_fadvise
    monkeypatch.setattr(
        os,
        "posix_fadvise",
        lambda fd, *args: dropped.append(Path(f"/proc/self/fd/{fd}").resolve().name) or real_fadvise(fd, *args),
    )

    def two_rounds(folder, simulation):
        monkeypatch.setattr(kept_state, "in_simulation", lambda: simulation)
        fedgrow_client._CLIENTS.clear()
        context = _context(_node(files, folder))
        replies = []
        for server_round in (1, 2):
            replies.append(_arrays(_grow(context, _global_ligo(), server_round)))
            fedgrow_client._CLIENTS.clear()  # the next round builds the client again and loads the file
        return context, replies

    _, deployed = two_rounds(tmp_path / "deployed", simulation=False)
    assert dropped == []
    context, simulated = two_rounds(tmp_path / "simulated", simulation=True)
    assert [name.split(".")[1] for name in dropped] == ["round-1", "round-2"]  # each temporary file, once synced
    for got, expected in zip(simulated, deployed, strict=True):
        _assert_same(got, expected)
    file = Path(context.state[kept_state.ROUND_KEY]["file"])
    assert file.name == "round-2.safetensors" and file.is_relative_to(tmp_path / "simulated")


@pytest.mark.parametrize(
    ("mode", "rows"),
    [("fedgrow", None), ("fedgrow", 32), ("small-only", None)],  # 32 rows: round 2 starts at an epoch's end
)
def test_a_client_built_again_trains_with_the_random_stream_of_the_held_one(
    files, tmp_path, monkeypatch, task_identity, mode, rows
):
    """With dropout, a round draws from the torch stream; building a client again must not shift what it draws."""
    model = tiny_bert_folder(tmp_path / "dropout-bert", 1, 32, 2, 64, 0, dropout=0.1)
    run = {"mode": mode, **({"max-train-examples": rows} if rows else {})}
    phase = "grow" if mode == "fedgrow" else "train-local"

    def second_round(folder, rebuild):
        fedgrow_client._CLIENTS.clear()
        node = _node({**files, "model": model}, folder, **{"allowed-modes": "fedgrow,small-only"})
        context = _context(node, run)
        for server_round in (1, 2):
            if server_round == 2 and rebuild:  # another process serves the node, or the cache let its client go
                fedgrow_client._CLIENTS.clear()
            reply = _send(
                context,
                phase,
                _global_ligo() if mode == "fedgrow" else None,
                **{"server-round": server_round, "run-tag": TAG},
            )
            assert not reply.has_error(), reply.error.reason
        arrays = {k: v.numpy() for k, v in reply.content["arrays"].items()} if "arrays" in reply.content else {}
        metrics = reply.content["metrics"]
        return arrays, [metrics["train-loss"], metrics["train-accuracy"]]

    held = second_round(tmp_path / "held", rebuild=False)
    rebuilt = second_round(tmp_path / "rebuilt", rebuild=True)
    _assert_same(rebuilt[0], held[0])
    assert rebuilt[1] == held[1]
    # the stream matters here: round 2 drawn from another stream trains another way
    real_seed = fedgrow_client.round_seed
    monkeypatch.setattr(fedgrow_client, "round_seed", lambda *a: real_seed(*a) + (a[-1] == 2))
    shifted = second_round(tmp_path / "shifted", rebuild=False)
    assert shifted[1] != held[1]


def test_one_host_means_outside_ray_or_a_ray_cluster_whose_live_nodes_share_one_address(monkeypatch):
    import sys
    import types

    monkeypatch.delitem(sys.modules, "ray", raising=False)
    assert kept_state.on_one_host()  # a deployed SuperNode's process, or this test process

    def cluster(*nodes):
        fake = types.SimpleNamespace(is_initialized=lambda: True, nodes=lambda: list(nodes))
        monkeypatch.setitem(sys.modules, "ray", fake)
        return kept_state.on_one_host()

    here, there = "10.0.0.1", "10.0.0.2"
    assert cluster({"Alive": True, "NodeManagerAddress": here}, {"Alive": True, "NodeManagerAddress": here})
    assert not cluster({"Alive": True, "NodeManagerAddress": here}, {"Alive": True, "NodeManagerAddress": there})
    assert cluster({"Alive": True, "NodeManagerAddress": here}, {"Alive": False, "NodeManagerAddress": there})


def test_a_bad_global_ligo_is_refused_before_it_touches_private_state(files, tmp_path, clean):
    context = _context(_node(files, tmp_path))
    honest = _global_ligo()
    name = next(iter(honest))
    attacks = {
        "has 1 non-finite values": {**honest, name: honest[name].clone().index_fill_(0, torch.tensor([0]), 0)},
        "max |value| 1e+30 is over this node's max-received-abs = 100": {k: v + 1e30 for k, v in honest.items()},
        "expected": {**honest, name: honest[name][:1]},
        "extra ['steal']": {**honest, "steal": torch.zeros(1)},
        "missing": {k: v for k, v in honest.items() if k != name},
        "torch.float64": {**honest, name: honest[name].double()},
    }
    attacks["has 1 non-finite values"][name].view(-1)[0] = float("nan")
    for phrase, arrays in attacks.items():
        assert phrase in _refusal(_grow(context, arrays, 1)), phrase
    assert not (tmp_path / "node").exists() and "fedgrow-private" not in context.state
    _assert_same(_arrays(_grow(context, honest, 1)), clean[0])  # as if the attacks never came
    _assert_same(_arrays(_grow(context, honest, 2)), clean[1])


def test_a_message_that_fails_mid_training_leaves_the_node_as_it_was(files, tmp_path, clean, monkeypatch):
    real = growth_client.train_steps

    def train_then_fail(*args, **kwargs):
        real(*args, **kwargs)  # the cached client's Local-LiGO, head and optimiser have moved
        raise RuntimeError("injected failure after training")

    context = _context(_node(files, tmp_path))
    monkeypatch.setattr(growth_client, "train_steps", train_then_fail)
    assert _refusal(_grow(context, _global_ligo(), 1)) == "RuntimeError (details are in the node's own log)"
    monkeypatch.setattr(growth_client, "train_steps", real)
    _assert_same(_arrays(_grow(context, _global_ligo(), 1)), clean[0])


@pytest.mark.parametrize("fails", [False, True])
def test_the_state_file_is_written_while_the_trained_model_is_evaluated_and_kept_only_if_that_succeeds(
    files, tmp_path, clean, monkeypatch, fails
):
    """The state file's fsync overlaps the evaluation after training; a failure there keeps nothing of the round."""
    real = growth_client.GrowthClient.evaluate_round
    own = tmp_path / "own"  # the clean node's files are under tmp_path too
    seen = []

    def evaluate_round(self):
        seen.append((sorted(p.name for p in own.rglob(".round-*.tmp")), sorted(own.rglob("round-*.safetensors"))))
        if fails and len(seen) == 2:
            raise RuntimeError("injected failure in the evaluation after training")
        return real(self)

    context = _context(_node(files, own))
    monkeypatch.setattr(growth_client.GrowthClient, "evaluate_round", evaluate_round)
    reply = _grow(context, _global_ligo(), 1)
    received_eval, trained_eval = seen
    assert received_eval == ([], [])  # before training: nothing written
    assert len(trained_eval[0]) == 1 and trained_eval[1] == []  # written, not yet renamed
    if fails:
        assert _refusal(reply) == "RuntimeError (details are in the node's own log)"
        assert not list(own.rglob("*round-*")) and kept_state.ROUND_KEY not in context.state
        monkeypatch.setattr(growth_client.GrowthClient, "evaluate_round", real)
        _assert_same(_arrays(_grow(context, _global_ligo(), 1)), clean[0])
    else:
        _assert_same(_arrays(reply), clean[0])
        metrics = reply.content["metrics"]
        compute = metrics["train-seconds"] + metrics["eval-seconds"] + metrics["received-eval-seconds"]
        assert compute < metrics["message-seconds"] < compute + 30  # the handler's seconds, compute included
        assert [p.name for p in own.rglob("*round-*")] == ["round-1.safetensors"]
        assert context.state[kept_state.ROUND_KEY]["file"] == str(next(own.rglob("round-1.safetensors")))


# --- 5. bounded work ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key,value,phrase",
    [
        ("finetune-steps", 10**9, "finetune-steps = 1000000000: over this node's max-finetune-steps = 1000"),
        ("local-steps", 10**6, "local-steps = 1000000: over this node's max-local-steps = 1000"),
        ("batch-size", 10**5, "batch-size = 100000: over this node's max-batch-size = 256"),
        ("max-length", 10**4, "max-length = 10000: over this node's max-sequence-length = 512"),
        ("target-shape", "48x8192x32768x64", "over this node's max-model-params = 200000000"),
        ("num-server-rounds", 10**6, "num-server-rounds = 1000000: over this node's max-rounds = 200"),
        ("eval-max-examples", 1, "eval-max-examples = 1: under this node's min-eval-rows = 32"),
        ("max-test-examples", 4, "max-test-examples = 4: under this node's min-eval-rows = 32"),
    ],
)
def test_the_server_cannot_demand_unbounded_work(files, tmp_path, task_identity, key, value, phrase):
    context = _context(_node(files, tmp_path), {key: value})
    assert phrase in _refusal(_preflight(context))
    assert phrase in _refusal(_final(context, {}, **{"server-round": 1}))
    assert not (tmp_path / "node").exists()


def test_a_huge_vit_small_model_is_refused_before_pre_training(tmp_path, task_identity):
    bare = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path / "cache")}
    run = {"task": "image", "dataset": "digits", "client-models": "vit:100x8192"}
    assert "client model 'vit:100x8192' = " in _refusal(_preflight(_context(bare, run)))
    assert "over this node's max-model-params" in _refusal(_preflight(_context(bare, run)))
    run["client-models"], run["pretrain-steps"] = "vit:1x16", 10**6
    assert "pretrain-steps = 1000000: over this node's max-pretrain-steps = 5000" in _refusal(
        _preflight(_context(bare, run))
    )
    run["client-models"] = "vit:banana"
    assert "client-models names 'vit:banana' for this node: ViT spec must look like" in _refusal(
        _preflight(_context(bare, run))
    )
    assert not (tmp_path / "cache").exists()


def test_preflight_pre_training_stops_at_the_time_limit(tmp_path, task_identity):
    bare = {"partition-id": 0, "num-partitions": 2, "cache-dir": str(tmp_path / "cache"), "max-message-seconds": 0.2}
    run = {"task": "image", "dataset": "digits", "client-models": "vit:1x16", "pretrain-steps": 5000, "patch-size": 4}
    assert "ran past this node's max-message-seconds = 0.2 s" in _refusal(_preflight(_context(bare, run)))
    assert not list((tmp_path / "cache").rglob("*.safetensors"))  # nothing half-trained was cached


def test_a_replayed_round_is_refused(files, tmp_path, task_identity):
    context = _context(_node(files, tmp_path, **{"max-rounds": 3}))
    _arrays(_grow(context, _global_ligo(), 1))
    for again in (1, 0):
        reason = _refusal(_grow(context, _global_ligo(), again))
        assert f"server-round = {again}: this node already served round 1" in reason
    assert "server-round = 4: over this node's max-rounds = 3" in _refusal(_grow(context, _global_ligo(), 4))
    _arrays(_grow(context, _global_ligo(), 3))  # a node that was not sampled in round 2 goes on


def test_a_message_stops_at_the_nodes_time_limit_and_keeps_no_state(files, tmp_path, task_identity):
    context = _context(_node(files, tmp_path, **{"max-message-seconds": 0.05}), {"local-steps": 1000})
    reason = _refusal(_grow(context, _global_ligo(), 1))
    assert "ran past this node's max-message-seconds = 0.05 s" in reason
    assert "fedgrow-private" not in context.state and not (tmp_path / "node").exists()


# --- 6. the final phase -------------------------------------------------------------------------------------------


def test_the_final_phase_cannot_be_abused(files, tmp_path, task_identity):
    context = _context(_node(files, tmp_path))
    honest = _global_ligo()
    _arrays(_grow(context, honest, 1))
    model_file = tmp_path / "node" / "clients" / "partition-0" / "models" / TAG / "grown_model" / "model.safetensors"
    nan = {k: torch.full_like(v, float("nan")) for k, v in honest.items()}
    assert "non-finite values" in _refusal(_final(context, nan, **{"server-round": 1}))
    huge = {k: torch.full_like(v, 1e30) for k, v in honest.items()}
    assert "max-received-abs" in _refusal(_final(context, huge, **{"server-round": 1}))
    assert not model_file.parent.exists()  # nothing materialised, nothing written
    served = _final(context, honest, **{"server-round": 1})
    assert not served.has_error() and np.isfinite(served.content["metrics"]["loss"])
    saved = model_file.read_bytes()
    again = _refusal(_final(context, honest, **{"server-round": 1}))
    assert "served 1 final phase(s) in this run; its max-final-phases = 1" in again
    assert model_file.read_bytes() == saved
    assert not list(model_file.parent.parent.glob(".*"))  # no temporary folder left beside the model


def test_a_run_cannot_replace_another_runs_model_or_state(files, tmp_path, task_identity):
    node = _node(files, tmp_path)
    first = _context(node)
    _arrays(_grow(first, _global_ligo(), 1))
    assert not _final(first, _global_ligo(), **{"server-round": 1}).has_error()
    models = tmp_path / "node" / "clients" / "partition-0" / "models"
    model_file = models / TAG / "grown_model" / "model.safetensors"
    saved = model_file.read_bytes()
    (state_file,) = (tmp_path / "node" / "clients" / "partition-0" / "state" / TAG).rglob("round-1.safetensors")
    state = state_file.read_bytes()
    fedgrow_client._CLIENTS.clear()
    for run_id, run in ((2, {"seed": 1}), (3, {})):  # other runs that name the first one's tag, with its config too
        other = _context(node, run, run_id=run_id)
        _arrays(_grow(other, _global_ligo(run), 1))
        assert not _final(other, _global_ligo(run), **{"server-round": 1}).has_error()  # the same reply either way
        assert (models / f"{TAG}.run-{run_id}" / "grown_model" / "model.safetensors").is_file()
    assert model_file.read_bytes() == saved and state_file.read_bytes() == state


def test_a_non_finite_model_is_never_saved_and_a_failed_save_keeps_the_old_one(tmp_path):
    family, folder = get_family("bert"), tmp_path / "grown_model"
    model = make_bert()
    save_model(family, model, model.config, None, folder)
    before = (folder / "model.safetensors").read_bytes()
    with torch.no_grad():
        next(model.parameters()).view(-1)[0] = float("inf")
    with pytest.raises(NonFiniteModel, match="1 non-finite values"):
        save_model(family, model, model.config, None, folder)

    def fails(tmp):
        (tmp / "model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        write_folder_atomically(folder, fails)
    assert (folder / "model.safetensors").read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["grown_model"]


# --- 7. smaller leaks ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("message_type", ["train.steal", "evaluate.peek", "query.files"])
def test_a_message_without_a_handler_gets_a_sanitised_reply(files, tmp_path, task_identity, message_type):
    reply = _send(_context(_node(files, tmp_path)), "grow", {}, message_type)
    reason = _refusal(reply)
    assert reason == "ValueError (details are in the node's own log)"


def test_a_strict_node_does_not_resume_unless_its_policy_allows_it(files, tmp_path, task_identity):
    node = _node(files, tmp_path)
    first = _context(node)
    for r in (1, 2):
        _arrays(_grow(first, _global_ligo(), r))
    fedgrow_client._CLIENTS.clear()
    resumed = _context(node, run_id=2)
    reason = _refusal(_grow(resumed, _global_ligo(), 3, **{"resumed-after": 2}))
    assert "resumed-after = 2: this node does not resume runs (node config allow-resume)" in reason
    nan = {k: torch.full_like(v, float("nan")) for k, v in _global_ligo().items()}
    allowed = _context({**node, "allow-resume": True}, run_id=3)
    assert "non-finite" in _refusal(_grow(allowed, nan, 3, **{"resumed-after": 2}))
    assert "fedgrow-private" not in allowed.state  # the state it found on disk was not kept for a refused message


def test_a_node_resumes_only_state_its_own_run_wrote(files, tmp_path, task_identity):
    node = _node(files, tmp_path, **{"allow-resume": True})
    first = _context(node)
    for r in (1, 2):
        _arrays(_grow(first, _global_ligo(), r))
    fedgrow_client._CLIENTS.clear()
    resume = {"resumed-after": 2}
    other = _refusal(_grow(_context(node, {"lr-width": 0.5}, run_id=2), _global_ligo(), 3, **resume))
    absent = _refusal(_grow(_context(node, run_id=3), _global_ligo(), 3, **{**resume, "run-tag": "never-used"}))
    assert other == absent  # the refusal does not tell whether another run's state exists
    assert "holds no private state of this run" in other
    _arrays(_grow(_context(node, run_id=4), _global_ligo(), 3, **resume))  # the same configuration resumes


def test_the_state_store_skips_state_another_run_wrote(tmp_path):
    store = ClientStateStore(tmp_path)
    store.save(1, {"x": torch.ones(2)}, {"run-id": "1", "run-fingerprint": "a"})
    store.save(2, {"x": torch.zeros(2)}, {"run-id": "2", "run-fingerprint": "a"})
    assert store.load_latest(2, require={"run-id": "1"})[0] == 1
    assert store.load_latest(2, require={"run-fingerprint": "a"})[0] == 2
    assert store.load_latest(2, require={"run-fingerprint": "b"}) is None


def test_every_policy_key_is_documented_for_node_operators():
    text = (Path(__file__).resolve().parents[1] / "docs" / "deployment.md").read_text()
    missing = [f.alias for f in NodePolicy.model_fields.values() if f"`{f.alias}`" not in text]
    assert not missing, missing


# --- each organisation picks its own hardware ----------------------------------------------------------------------


def test_the_node_picks_its_device_and_refuses_hardware_it_lacks_with_the_reason(files, tmp_path, task_identity):
    gpu_run = {"device": "cuda:99"}  # more GPUs than any machine here has
    # a strict node never takes the server's device: without its own it runs on `auto` (the CPU here)
    assert not _preflight(_context(_node(files, tmp_path), gpu_run)).has_error()
    fedgrow_client._CLIENTS.clear()
    # an open node takes the run config's as its default, and refuses a GPU it lacks, naming it
    reason = _refusal(_preflight(_context(_node(files, tmp_path, **{"node-policy": "open"}), gpu_run)))
    assert reason.startswith("RefusedMessage: device = 'cuda:99', but this machine has") and "CUDA device" in reason
    fedgrow_client._CLIENTS.clear()
    # the node's own device wins over the run config's, both ways
    reason = _refusal(_preflight(_context(_node(files, tmp_path, device="cuda:99"), {"device": "cpu"})))
    assert reason.startswith("RefusedMessage: device = 'cuda:99'")
    fedgrow_client._CLIENTS.clear()
    context = _context(_node(files, tmp_path, **{"node-policy": "open", "device": "cpu"}), gpu_run)
    reply = _preflight(context)
    assert not reply.has_error(), reply.error.reason
    ((key, setup),) = [(k, v) for k, v in fedgrow_client._CLIENTS.items() if k[-1] == "setup"]
    assert setup.device == torch.device("cpu")
    with pytest.raises(ValueError, match=r"device = 'cuda:99', but this machine has [0-9]+ CUDA device"):
        resolve_device("cuda:99")
    assert NodePolicy.from_node_config({"device": "cuda:3"}).effective_run(RunConfig(device="cpu")).device == "cuda:3"
    assert NodePolicy.from_node_config({}).effective_run(RunConfig(device="cuda")).device == "auto"
    open_policy = NodePolicy.from_node_config({}, simulation=True)
    assert open_policy.effective_run(RunConfig(device="cuda")).device == "cuda"


@pytest.mark.parametrize("device", ["gpu", "cuda:", "cuda:-1", "CPU"])
def test_a_device_name_that_is_none_is_refused_by_name(device, files, tmp_path, task_identity):
    with pytest.raises(NodePolicyError, match=f"device = '{device}'"):
        NodePolicy.from_node_config({"device": device})
    # at preflight too: the server gets the reason
    reason = _refusal(_preflight(_context(_node(files, tmp_path, device=device))))
    assert reason.startswith("NodePolicyError: bad node config") and f"device = '{device}'" in reason
    with pytest.raises(ValueError, match=f"device = '{device}': expected 'auto', 'cpu', 'cuda' or 'cuda:<index>'"):
        RunConfig(device=device)
