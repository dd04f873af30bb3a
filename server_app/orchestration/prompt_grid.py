"""A Flower ``Grid`` that collects a round's replies as they arrive.

Flower's deployed and simulated grids (``flwr.superlink.grid.HttpGrid``) wait
for replies in ``send_and_receive`` by pulling from the SuperLink, then
sleeping 3 s between pulls: a round whose last reply arrives just after a pull
waits up to 3 s more, in every round. :class:`PromptGrid` wraps the grid Flower
gives the ServerApp and pulls every :data:`POLL_SECONDS` instead, hands each
reply on as soon as it is pulled (so a strategy that checks replies one by one,
as :class:`~server_app.trust.checked_round.ReplyChecks` does, checks them while
the other nodes still train), and leaves out the nodes that refused the run at
preflight (:meth:`PromptGrid.exclude`); everything else (pushing, pulling, the
run) is the wrapped grid's own. Its replies (:class:`Replies`) are a sequence
like the list Flower's grid returns, read as they arrive.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence

from flwr.app import Message
from flwr.serverapp import Grid

#: Seconds between two pulls of a round's replies.
POLL_SECONDS = 0.05


class Replies(Sequence[Message]):
    """A round's replies, handed over as they are pulled: a sequence, like the list Flower's grid returns.

    Iterating gives each reply as soon as a pull brings it, in the order
    pulled, and may be repeated (what came is kept). ``len``, truth, indexing
    and :meth:`drain` first wait for the rest (every reply, or the timeout).

    Parameters
    ----------
    stream : iterator of Message
        The replies as pulled (:meth:`PromptGrid._arrivals`); read once.

    Raises
    ------
    Exception
        Whatever the wrapped grid's ``pull_messages`` raises (e.g. the SuperLink
        gone), from the read that needed the pull.
    """

    def __init__(self, stream: Iterator[Message]):
        self._stream = stream
        self._came: list[Message] = []

    def __iter__(self) -> Iterator[Message]:
        """Every reply: those that came, then each one as it is pulled."""
        i = 0
        while i < len(self._came) or self._pull_one():
            yield self._came[i]
            i += 1

    def _pull_one(self) -> bool:
        """Take the next reply from the stream into :attr:`_came`; ``False`` once the stream is done."""
        reply = next(self._stream, None)
        if reply is not None:
            self._came.append(reply)
        return reply is not None

    def _all(self) -> list[Message]:
        """Every reply, once every message has one or the timeout passed (the list itself, not a copy)."""
        self._came.extend(self._stream)
        return self._came

    def drain(self) -> list[Message]:
        """Wait for the rest; returns every reply (a new list)."""
        return list(self._all())

    def __len__(self) -> int:
        """How many replies came, once every message has one or the timeout passed."""
        return len(self._all())

    def __getitem__(self, index):  # noqa: ANN001, ANN204 - Sequence's signature (int or slice)
        """A reply (or a list of them), once every message has one or the timeout passed."""
        return self._all()[index]


class PromptGrid(Grid):
    """Flower's ``grid`` with a shorter wait between pulls of replies (:data:`POLL_SECONDS`).

    Parameters
    ----------
    grid : flwr.serverapp.Grid
        The grid Flower gives the ServerApp; every call but ``send_and_receive`` goes to it.
    poll : float
        Seconds between two pulls.
    """

    def __init__(self, grid: Grid, poll: float = POLL_SECONDS):
        self.grid = grid
        self.poll = poll
        #: Nodes left out of the run (:meth:`exclude`): never listed, so never sampled or sent anything.
        self.excluded: set[int] = set()
        #: The replies of the last :meth:`send_and_receive`, drained before the next push.
        self._open: Replies | None = None

    def exclude(self, node_ids: Iterable[int]) -> None:
        """Leave ``node_ids`` out of the run: :meth:`get_node_ids` no longer lists them."""
        self.excluded.update(node_ids)

    def set_run(self, run) -> None:  # noqa: ANN001 - Flower's signature
        """Set the wrapped grid's run."""
        self.grid.set_run(run)

    @property
    def run(self):  # noqa: ANN201 - Flower's signature
        """The wrapped grid's run."""
        return self.grid.run

    def create_message(self, *args, **kwargs) -> Message:
        """The wrapped grid's (deprecated) message factory."""
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        """The ids of the connected nodes (the wrapped grid's), less the excluded ones."""
        return [n for n in self.grid.get_node_ids() if n not in self.excluded]

    def get_nodes(self):  # noqa: ANN201 - Flower's signature
        """The connected nodes (the wrapped grid's)."""
        return self.grid.get_nodes()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Push messages through the wrapped grid; returns their ids."""
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        """Pull the replies to ``message_ids`` that have arrived (the wrapped grid's)."""
        return self.grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Replies:
        """Push ``messages`` now; return their replies as they arrive, pulled every :attr:`poll` seconds.

        The messages are pushed before this returns (after the replies of the
        previous call have all come, or its timeout passed, as Flower's own
        ``send_and_receive`` would have waited). Reading the returned
        :class:`Replies` gives each reply as soon as a pull brings it, so a
        caller can check one while the other nodes still compute. The pulls end
        when every message has a reply or ``timeout`` seconds after the push
        (``None``: no limit); past it, one last pull takes what arrived while
        the caller was busy.

        Parameters
        ----------
        messages : iterable of Message
            The round's messages.
        timeout : float, optional
            Seconds from the push to the last pull.

        Returns
        -------
        Replies
            The replies, in the order pulled.
        """
        if self._open is not None:
            self._open.drain()
        pending = dict.fromkeys(self.push_messages(messages))  # in the order pushed: pulls ask in that order
        deadline = None if timeout is None else time.monotonic() + timeout
        self._open = Replies(self._arrivals(pending, deadline))
        return self._open

    def _arrivals(self, pending: dict[str, None], deadline: float | None) -> Iterator[Message]:
        """Pull the replies to ``pending`` (message ids) until all came or ``deadline``; yield each as pulled."""
        while pending:
            expired = deadline is not None and time.monotonic() >= deadline  # then this pull is the last
            arrived = list(self.pull_messages(list(pending)))
            for m in arrived:
                pending.pop(m.metadata.reply_to_message_id, None)
            yield from arrived
            if not pending or expired:
                return
            time.sleep(self.poll if deadline is None else max(0.0, min(self.poll, deadline - time.monotonic())))

    def __getattr__(self, name: str):  # noqa: ANN204 - anything else Flower adds (``close``, ...)
        if name in ("grid", "_open"):  # not set yet (e.g. while unpickling)
            raise AttributeError(name)
        return getattr(self.grid, name)
