"""A Flower ``Grid`` that serves every message with a ClientApp in this process: the real apps, no Ray.

:class:`InProcessGrid` runs a ServerApp's ``main`` against a ClientApp (the
real ``client_app.app:app``, its mods included) and one ``Context`` per node,
exactly as Flower's simulation engine would call them, but one node after the
other in this process. It exists for measurements that run a federation many
times (``benchmarks.robustness``): Flower's simulation starts Ray for every
run, which costs more than a run of tiny models.

A ``tamper`` hook sees every round's replies together before the server does,
so a test or benchmark can play a hostile node that knows what every honest
node sent (the strongest, omniscient attacker of the robust-aggregation
literature).
"""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from flwr.app import Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common import Error
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

#: Node id Flower gives the ServerApp (``flwr.simulation``'s ``SUPERLINK_NODE_ID``).
SERVER_NODE_ID = 1

#: ``tamper(sent, replies) -> replies``: one round's messages and their replies, in the same order.
Tamper = Callable[[list[Message], list[Message]], list[Message]]


@dataclass
class NodeSpec:
    """One simulated SuperNode: its id and its ``Context`` (node config, private state)."""

    node_id: int
    context: Context


class InProcessGrid(Grid):
    """Deliver each message to its node's ClientApp in this process, and return the replies.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        Called as ``client_app(message, context)``, as Flower's runtimes do.
    nodes : list of NodeSpec
        The federation; ``get_node_ids`` returns their ids.
    run_id : int
        The run's id (``Message`` metadata and the clients' ``Context.run_id``).
    tamper : callable, optional
        Applied to every ``send_and_receive``'s replies before they are returned.
    """

    def __init__(self, client_app: ClientApp, nodes: list[NodeSpec], run_id: int, tamper: Tamper | None = None):
        self.client_app = client_app
        self.nodes = {n.node_id: n for n in nodes}
        self.run_id = run_id
        self.tamper = tamper
        self._pending: dict[str, Message] = {}

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's signature
        """Not used: the run is fixed at construction."""

    @property
    def run(self):  # noqa: ANN201 - Flower's signature
        """Not used (Flower's ``Run`` needs a SuperLink)."""
        raise NotImplementedError("InProcessGrid has no SuperLink run record")

    def create_message(self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl=None):
        """A message to ``dst_node_id`` (Flower's deprecated helper; use ``Message`` directly)."""
        with self._identity(SERVER_NODE_ID):
            return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        """The ids of every node (all are always online)."""
        return list(self.nodes)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Queue messages; :meth:`pull_messages` serves them."""
        ids = []
        for msg in messages:
            msg.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._pending[msg.metadata.message_id] = msg
            ids.append(msg.metadata.message_id)
        return ids

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Serve the queued messages with these ids, in order; returns their replies."""
        sent = [self._pending.pop(i) for i in message_ids if i in self._pending]
        replies = [self._serve(m) for m in sent]
        return self.tamper(sent, replies) if self.tamper else replies

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Push ``messages`` and return every reply (``timeout`` does not apply: nothing runs concurrently)."""
        return self.pull_messages(self.push_messages(list(messages)))

    def run_server(self, server_main: Callable[[Grid, Context], None], context: Context) -> None:
        """Call a ServerApp's ``main(grid, context)`` with this grid, as the ServerApp's task (Flower's identity)."""
        with self._identity(SERVER_NODE_ID):
            server_main(self, context)

    def _serve(self, msg: Message) -> Message:
        node = self.nodes[msg.metadata.dst_node_id]
        with self._identity(node.node_id):
            try:
                return self.client_app(msg, node.context)
            except Exception as err:  # noqa: BLE001 - a failing ClientApp answers with an error, as in Flower
                return Message(Error(code=0, reason=f"{type(err).__name__}: {err}"), reply_to=msg)

    @contextlib.contextmanager
    def _identity(self, node_id: int) -> Iterator[None]:
        """Flower's task identity (which building a ``Message`` reads) as ``node_id`` in this run; restored after."""
        old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
        TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = self.run_id, node_id, 1
        try:
            yield
        finally:
            TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


def federation(
    client_app: ClientApp,
    num_nodes: int,
    run_config: dict,
    run_id: int,
    node_config: dict | None = None,
    tamper: Tamper | None = None,
) -> InProcessGrid:
    """A grid of ``num_nodes`` nodes (ids 1001, 1002, ...), partition ``i`` of ``num_nodes`` each, fresh state.

    Parameters
    ----------
    client_app : flwr.clientapp.ClientApp
        Serves every node.
    num_nodes : int
        The federation's size.
    run_config : dict
        Every node's ``Context.run_config`` (kebab-case keys).
    run_id : int
        The run's id.
    node_config : dict, optional
        Added to each node's ``partition-id`` and ``num-partitions``.
    tamper : callable, optional
        :data:`Tamper`, applied to every round's replies.

    Returns
    -------
    InProcessGrid
        The grid; node ``1001 + i`` holds partition ``i``.
    """
    nodes = [
        NodeSpec(
            1001 + i,
            Context(
                run_id,
                1001 + i,
                {"partition-id": i, "num-partitions": num_nodes, **(node_config or {})},
                RecordDict(),
                dict(run_config),
            ),
        )
        for i in range(num_nodes)
    ]
    return InProcessGrid(client_app, nodes, run_id, tamper)
