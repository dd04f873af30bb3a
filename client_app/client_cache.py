"""Client objects kept between messages in one process, within a byte budget.

A deployed SuperNode's ClientApp process serves one node; a simulation worker
(a Ray actor) serves many nodes in turn. Building a node's client (its rows,
its small model, its grown model and optimiser) costs far more than a
message's bookkeeping, so each process keeps the clients it built, most
recently used last, for as long as their tensors fit in
:data:`BUDGET_ENV` megabytes (default :data:`DEFAULT_BUDGET_MB`); the least
recently used are dropped first. A kept client never carries private state
across nodes or runs: the ClientApp reloads that from ``Context.state`` on
every message, and drops a run's clients when one of its messages fails.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Callable, Hashable
from typing import Any

import torch
from datasets import Dataset
from torch import Tensor, nn

#: Environment variable: megabytes of client objects one process keeps (0: only the node in use).
BUDGET_ENV = "FEDGROW_CLIENT_CACHE_MB"
#: Its default: about 25 clients of the image preset (each about 80 MB: rows, small and grown model, optimiser).
DEFAULT_BUDGET_MB = 2048


def budget_bytes() -> int:
    """The byte budget from :data:`BUDGET_ENV` (default :data:`DEFAULT_BUDGET_MB`).

    Raises
    ------
    ValueError
        If the variable is set to anything but a whole number of megabytes >= 0 (naming the value).
    """
    raw = os.environ.get(BUDGET_ENV, str(DEFAULT_BUDGET_MB))
    if not raw.strip().isdigit():
        raise ValueError(f"{BUDGET_ENV} = {raw!r}: expected a whole number of megabytes >= 0")
    return int(raw) * 2**20


def footprint(obj: Any, depth: int = 2) -> int:
    """Bytes of the tensors and rows an object holds: its modules, optimiser state, tensors and datasets.

    Walks the object's attributes ``depth`` levels down (a client's setup and
    its small model); a tensor storage or a dataset reached twice counts once.
    A dataset counts its share of its Arrow table (``nbytes`` times its rows
    over the table's: a partition of a shared, memory-mapped table is a view).
    An upper bound where two kept objects share tensors (each counts them).
    """
    seen: set[int] = set()

    def first(key: int) -> bool:
        if key in seen:
            return False
        seen.add(key)
        return True

    def tensor(t: Tensor) -> int:
        storage = t.untyped_storage()
        return storage.nbytes() if first(storage.data_ptr()) else 0

    def walk(value: Any, level: int) -> int:
        if isinstance(value, Tensor):
            return tensor(value)
        if not first(id(value)):
            return 0
        if isinstance(value, nn.Module):
            return sum(tensor(t) for t in (*value.parameters(), *value.buffers()))
        if isinstance(value, torch.optim.Optimizer):
            return sum(tensor(t) for state in value.state.values() for t in state.values() if isinstance(t, Tensor))
        if isinstance(value, Dataset):
            return value.data.nbytes * len(value) // max(1, value.data.num_rows)
        if level <= 0 or not hasattr(value, "__dict__"):
            return 0
        return sum(walk(v, level - 1) for v in vars(value).values())

    return walk(obj, depth)


class ClientCache:
    """Built objects by key, least recently used first, within a byte budget.

    Parameters
    ----------
    budget : int, optional
        Bytes of :func:`footprint` kept; ``None``: :func:`budget_bytes`.
    group : callable, optional
        ``group(key)``: the objects of one node (its setup, its client). The
        group of the object used last is always kept, whatever its size, so a
        node's client never loses the setup it was built from.

    An object's footprint is measured when it is kept, and again at every
    trim (after every :meth:`get`) for the objects of the groups handed out
    since the last trim, the only ones a caller can have grown (optimiser
    moments appear at the first step); the others keep their last measure.
    """

    def __init__(self, budget: int | None = None, group: Callable[[Hashable], Hashable] | None = None):
        self._budget = budget
        self._group = group or (lambda key: key)
        self._entries: OrderedDict[Hashable, Any] = OrderedDict()
        self._sizes: dict[Hashable, int] = {}
        self._in_use: set[Hashable] = set()  # groups handed out since the last trim

    @property
    def budget(self) -> int:
        """The byte budget."""
        return budget_bytes() if self._budget is None else self._budget

    def get(self, key: Hashable, build: Callable[[], Any]) -> Any:
        """The object kept under ``key`` (now the most recently used), else ``build()``, kept."""
        if key in self._entries:
            self._entries.move_to_end(key)
            value = self._entries[key]
        else:
            value = self._entries[key] = build()
        group = self._group(key)
        self._in_use.add(group)
        self._trim(group)
        self._in_use = {group}  # the caller may still grow what it was just handed
        return value

    def drop(self, where: Callable[[Hashable], bool]) -> None:
        """Drop every object whose key satisfies ``where``."""
        for key in [k for k in self._entries if where(k)]:
            del self._entries[key]
            self._sizes.pop(key, None)

    def clear(self) -> None:
        """Drop everything."""
        self._entries.clear()
        self._sizes.clear()

    def keys(self) -> list[Hashable]:
        """The keys kept, least recently used first."""
        return list(self._entries)

    def items(self) -> list[tuple[Hashable, Any]]:
        """``(key, object)`` pairs kept, least recently used first."""
        return list(self._entries.items())

    @property
    def nbytes(self) -> int:
        """The summed :func:`footprint` of what is kept, measured now (bytes)."""
        return sum(footprint(v) for v in self._entries.values())

    def _trim(self, keep: Hashable) -> None:
        budget = self.budget
        for key, value in self._entries.items():
            if key not in self._sizes or self._group(key) in self._in_use:
                self._sizes[key] = footprint(value)
        total = sum(self._sizes.values())
        for key in [k for k in self._entries if self._group(k) != keep]:  # least recently used first
            if total <= budget:
                break
            total -= self._sizes.pop(key)
            del self._entries[key]
