"""Where a node keeps its private state between rounds: its state folder, named by ``Context.state``.

A client's private state (Local-LiGO, head, optimiser moments, batch position,
update residual; or the small model's weights in ``small-only``) persists
between rounds in simulation and deployment alike. When the server names its
run (``run-tag``), :func:`keep` writes it after every round to the node's state
folder (:class:`fedgrow_core.clients.state_store.ClientStateStore`, under the tag,
the run config's fingerprint and the Flower run id), and ``Context.state`` keeps
only the round, the file's absolute path and a token of that save
(:data:`ROUND_KEY`), so Flower does not carry the tensors with every message.
The tensors stay in ``Context.state`` (:data:`STATE_KEY`) when the server names
no run tag, and when the node's messages may be served on another machine than
the one that wrote the file: in a simulation on a Ray cluster of several hosts
(:func:`on_one_host`).

A client that trained the round ``Context.state`` names is marked as holding it
(:func:`keep`), and :func:`load_kept` does not load it again; the ClientApp
clears the marks when a message fails (:func:`clear_marks`) and a final phase
clears its client's (:func:`release`). A state file that ``Context.state`` names
but that cannot be read is an error, never a silent step back to older state.
"""

from __future__ import annotations

import secrets
import sys
import weakref
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.clients.model_client import ModelClient
from fedgrow_core.clients.state_store import ClientStateStore, PendingSave

from .guards import RefusedMessage, check_finite_reply, in_simulation
from .node_view import NodeView

#: ``Context.state`` key of the private state itself (an ArrayRecord), when it is not kept in a file.
STATE_KEY = "fedgrow-private"
#: ``Context.state`` key of the round the private state was kept after: a ConfigRecord ``{"round": int,
#: "token": str}``, plus ``"file"`` (an absolute path) when the state is kept in the node's state folder.
ROUND_KEY = "fedgrow-private-round"

#: The kept state (:func:`kept_mark`) each cached client holds exactly, set after it trained that round.
_HOLDS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

Client = GrowthClient | ModelClient


def on_one_host() -> bool:
    """Whether every message of this node is served on this machine.

    True outside Ray (a deployed SuperNode, or an in-process test) and in a
    simulation whose Ray cluster has one host (its live nodes share one
    address); False on a Ray cluster of several hosts, where Flower may serve
    the node's next message on another machine.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return True
    return len({n.get("NodeManagerAddress") for n in ray.nodes() if n.get("Alive")}) <= 1


def kept_mark(context: Context) -> tuple | None:
    """Which private state ``Context.state`` names: ``(round, file or "", token)``, or ``None`` before the first."""
    if ROUND_KEY not in context.state or (STATE_KEY not in context.state and "file" not in context.state[ROUND_KEY]):
        return None
    record = context.state[ROUND_KEY]
    return int(record["round"]), str(record.get("file", "")), str(record.get("token", ""))


def kept_private_state(context: Context) -> dict[str, torch.Tensor] | None:
    """The node's private state after the last round it served: from ``Context.state`` or the file it names.

    Parameters
    ----------
    context : Context
        The node's Flower context.

    Returns
    -------
    dict of str to Tensor, or None
        The tensors :meth:`GrowthClient.private_state` (or ``ModelClient``'s)
        gave; ``None`` before the node's first kept round.

    Raises
    ------
    RuntimeError
        If the state folder's file that ``Context.state`` names cannot be read
        (removed or damaged on this node's disk since, or written on another host).
    """
    if STATE_KEY in context.state:
        return context.state[STATE_KEY].to_torch_state_dict()
    mark = kept_mark(context)
    if mark is None:
        return None
    server_round, file, _ = mark
    try:
        return ClientStateStore(Path(file).parent).load(server_round)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own type for a damaged file
        raise RuntimeError(
            f"this node's private state of round {server_round} in {file} cannot be read: {err}"
        ) from err


def load_kept(context: Context, client: Client) -> None:
    """Put the node's kept private state onto ``client``, unless the client holds exactly that state already.

    Raises
    ------
    RuntimeError
        From :func:`kept_private_state`.
    """
    mark = kept_mark(context)
    if mark is None or _HOLDS.get(client) == mark:
        return
    _HOLDS.pop(client, None)
    client.load_private_state(kept_private_state(context))
    _HOLDS[client] = mark


def release(client: Client) -> None:
    """Forget that ``client`` holds its node's kept state (it is about to change it, e.g. by fine-tuning)."""
    _HOLDS.pop(client, None)


def clear_marks() -> None:
    """Forget every client's mark (a message failed: the ClientApp drops its cached clients)."""
    _HOLDS.clear()


def state_store(context: Context, node: NodeView, tag: str) -> ClientStateStore | None:
    """The node's on-disk state for the server's run ``tag``, this run config and this Flower run (``None``: no tag).

    The folder is ``<state folder>/<tag>/<first 16 hex digits of the run fingerprint>/run-<Flower run id>``:
    a run writes only its own folder, and a run config other than the one that wrote a state folder never
    finds it. In a simulation worker, which usually still holds a node's client when the node is next
    sampled, each file leaves the page cache once it is on disk (:class:`ClientStateStore`'s
    ``cache_pages``); when another worker serves the node, or the client was let go, the file is read back
    from the disk. A deployed SuperNode starts a ClientApp process for each message, which reads the file
    back every round, so there its pages stay.
    """
    if not tag:
        return None
    folder = node.policy.state_folder(node.effective) / tag / node.fingerprint[:16]
    # a simulation worker usually holds its nodes' clients: the files are seldom read back
    return ClientStateStore(folder / f"run-{context.run_id}", cache_pages=not in_simulation())


def state_metadata(context: Context, node: NodeView) -> dict[str, str]:
    """What a state file's header records of the run that wrote it: Flower's run id and the run fingerprint."""
    return {"run-id": str(context.run_id), "run-fingerprint": node.fingerprint}


def _name(context: Context, server_round: int, path: Path | None, state: dict | None) -> None:
    """Make ``Context.state`` name the state of ``server_round``: the file at ``path``, or ``state`` itself."""
    record = {"round": server_round, "token": secrets.token_hex(8)}
    if path is not None and on_one_host():
        context.state.pop(STATE_KEY, None)
        record["file"] = str(Path(path).resolve())
    else:
        context.state[STATE_KEY] = ArrayRecord(state)
    context.state[ROUND_KEY] = ConfigRecord(record)


def restore(
    context: Context, node: NodeView, store: ClientStateStore | None, server_round: int, resumed_after: int = 0
) -> None:
    """Make ``Context.state`` name the newest private state saved before ``server_round`` (memory or disk).

    From disk, only state this Flower run wrote is taken or, in a resumed run (``resumed_after`` > 0, if
    the node's policy allows resuming), state that a run of the same tag and run fingerprint wrote; a
    round the node already holds is not read.

    Raises
    ------
    RefusedMessage
        If the server resumes a run and the node's policy does not allow it
        (``allow-resume``); or if it resumes a run in which every node trains
        every round and this node has no private state from it: a fresh start
        would silently train new operators. The text is the same whether no
        state exists or another run's does.
    """
    if resumed_after > 0 and not node.policy.allow_resume:
        raise RefusedMessage(
            f"resumed-after = {resumed_after}: this node does not resume runs (node config allow-resume)"
        )
    if store is None:
        return
    have = int(context.state[ROUND_KEY]["round"]) if ROUND_KEY in context.state else 0
    if have < server_round - 1:
        require = state_metadata(context, node)
        stores = [store]
        if resumed_after > 0:  # a resumed run is a new Flower run of the same tag and configuration
            del require["run-id"]
            siblings = store.folder.parent.iterdir() if store.folder.parent.is_dir() else []
            stores = [ClientStateStore(p) for p in sorted(siblings) if p.is_dir()]
        found = None  # (round, state, file) of the newest readable state, the first store's on a tie
        for candidate in stores:
            newest = candidate.load_latest(at_most=server_round - 1, require=require, above=have)
            if newest is not None and (found is None or newest[0] > found[0]):
                found = (*newest, candidate.file(newest[0]))
        if found is not None and found[0] > have:
            _name(context, found[0], found[2], found[1])
            have = found[0]
    if resumed_after > 0 and have == 0 and node.run.fraction_train >= 1:
        raise RefusedMessage(
            f"resumed after round {resumed_after}: this node holds no private state of this run; "
            "refusing to start from fresh operators"
        )


def _unaliased(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``state`` with a copy of each tensor whose storage an earlier entry shares (safetensors refuses those)."""
    seen: set[int] = set()
    out = {}
    for name, tensor in state.items():
        storage = tensor.untyped_storage().data_ptr()
        out[name] = tensor.clone() if storage in seen and tensor.numel() else tensor
        seen.add(storage)
    return out


def keep(context: Context, node: NodeView, store: ClientStateStore | None, server_round: int, client: Client) -> None:
    """Keep ``client``'s private state after ``server_round``: in the node's state folder, or in ``Context.state``.

    With a store (the server named its run), the state is written there and,
    on one host (:func:`on_one_host`), ``Context.state`` names the file
    (:data:`ROUND_KEY`); otherwise the tensors go into ``Context.state``
    (:data:`STATE_KEY`). Either way ``client`` is marked as holding that
    state, so the node's next round need not load it again.

    Raises
    ------
    RefusedMessage
        If a tensor of the state is not finite (nothing is kept).
    """
    begin_keep(context, node, store, server_round, client).commit()


def begin_keep(
    context: Context, node: NodeView, store: ClientStateStore | None, server_round: int, client: Client
) -> PendingKeep:
    """:func:`keep` in two steps: the state file is written now and its fsync runs while the caller works on.

    The caller must not change ``client``'s private state before :meth:`PendingKeep.commit` (evaluating
    it is fine), and calls either that or :meth:`PendingKeep.abort`.

    Parameters
    ----------
    context : Context
        The node's Flower context.
    node : NodeView
        The node's policy and run config.
    store : ClientStateStore or None
        The node's state folder for this run (:func:`state_store`); ``None``: ``Context.state`` only.
    server_round : int
        The round the state is kept after.
    client : GrowthClient or ModelClient
        The client whose private state is kept.

    Returns
    -------
    PendingKeep
        The state on its way, to commit or abort.

    Raises
    ------
    RefusedMessage
        If a tensor of the state is not finite (nothing is written).
    Exception
        From :meth:`ClientStateStore.begin_save` (nothing is left).
    """
    state = _unaliased(client.private_state(copy=False))  # written or serialised, never kept: no copy
    check_finite_reply(state, {}, "training on the received message")
    save = store.begin_save(server_round, state, state_metadata(context, node)) if store is not None else None
    return PendingKeep(context, client, server_round, state, save)


class PendingKeep:
    """A client's private state on its way to being kept (:func:`begin_keep`).

    Parameters
    ----------
    context : Context
        The node's Flower context, which :meth:`commit` makes name the state.
    client : GrowthClient or ModelClient
        The client whose state it is.
    server_round : int
        The round it is kept after.
    state : dict of str to Tensor
        The state (the client's own tensors, unchanged until :meth:`commit`), for ``Context.state`` when
        it does not name a file (:func:`keep`).
    save : PendingSave or None
        The state file being written, if any.
    """

    def __init__(
        self,
        context: Context,
        client: Client,
        server_round: int,
        state: dict[str, torch.Tensor],
        save: PendingSave | None,
    ) -> None:
        self.context, self.client, self.server_round, self.state, self.save = context, client, server_round, state, save

    def commit(self) -> None:
        """Wait for the file to be on disk; then make ``Context.state`` name the state and mark the client.

        Raises
        ------
        OSError
            If the file could not be synced or renamed into place (nothing is kept).
        """
        path = self.save.commit() if self.save is not None else None
        _name(self.context, self.server_round, path, self.state)
        _HOLDS[self.client] = kept_mark(self.context)

    def abort(self) -> None:
        """Keep nothing: the temporary file goes, ``Context.state`` and the client's mark stay as they were."""
        if self.save is not None:
            self.save.abort()
