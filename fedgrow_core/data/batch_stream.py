"""A client's endless, seekable stream of shuffled training batches.

Batch ``s`` of the stream depends only on the seed and ``s``: epoch ``s //
steps_per_epoch`` is a permutation drawn by ``torch.utils.data.DistributedSampler``
(one replica, ``set_epoch``), and the stream can be moved to any step with
:meth:`BatchStream.seek`. A client keeps its position in its private state, so a
client rebuilt in another process (another simulation actor, a restarted
SuperNode, a resumed run) continues with exactly the batches it would have seen.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

from torch.utils.data import DataLoader, DistributedSampler, Sampler


class _EpochOrder(Sampler[int]):
    """Row indices of one epoch's permutation from batch ``skip`` on (what the ``DataLoader`` batches next)."""

    def __init__(self, num_rows: int, batch_size: int, seed: int) -> None:
        self._epochs = DistributedSampler(range(num_rows), num_replicas=1, rank=0, shuffle=True, seed=seed)
        self._batch_size = batch_size
        self.epoch, self.skip = 0, 0

    def __iter__(self) -> Iterator[int]:
        self._epochs.set_epoch(self.epoch)
        return iter(list(self._epochs)[self.skip * self._batch_size :])

    def __len__(self) -> int:
        return max(len(self._epochs) - self.skip * self._batch_size, 0)


class BatchStream:
    """Endless shuffled batches whose order is a function of the step alone.

    Parameters
    ----------
    num_rows : int
        Training rows (> 0).
    batch_size : int
        Rows per batch (the last batch of an epoch may be smaller).
    seed : int
        Seeds every epoch's permutation (epoch ``e`` uses ``seed + e``, as
        ``DistributedSampler`` does).
    make_loader : callable
        ``make_loader(sampler)`` returns the ``DataLoader`` that batches the rows
        in the sampler's order (:func:`fedgrow_core.data.preprocessing.make_dataloader`).

    Attributes
    ----------
    steps_per_epoch : int
        ``ceil(num_rows / batch_size)``.
    position : int
        Batches drawn so far (the step the next batch belongs to).

    Raises
    ------
    ValueError
        If ``num_rows`` or ``batch_size`` is not positive.
    """

    def __init__(
        self, num_rows: int, batch_size: int, seed: int, make_loader: Callable[[Sampler[int]], DataLoader]
    ) -> None:
        if num_rows < 1 or batch_size < 1:
            raise ValueError(f"need num_rows >= 1 and batch_size >= 1, got {num_rows} and {batch_size}")
        self.steps_per_epoch = math.ceil(num_rows / batch_size)
        self._order = _EpochOrder(num_rows, batch_size, seed)
        self._loader = make_loader(self._order)
        self._batches: Iterator | None = None
        self.position = 0

    def seek(self, step: int) -> None:
        """Make batch ``step`` the next one (no-op if it already is).

        At an epoch's end (``step`` a positive multiple of :attr:`steps_per_epoch`)
        the stream is left as one that has just given that epoch's last batch:
        the next batch starts the next epoch's iterator, as it does for a stream
        that got there by iterating. A ``DataLoader`` iterator draws its base
        seed from torch's global random stream when it starts, so a stream that
        seeks and one that iterated draw the same numbers at the same batch.

        Raises
        ------
        ValueError
            If ``step`` is negative.
        """
        if step < 0:
            raise ValueError(f"step = {step}: expected an integer >= 0")
        if step != self.position or self._batches is None:
            epoch, skip = divmod(step, self.steps_per_epoch)
            if step and not skip:  # at an epoch's end: the next batch opens the next epoch
                self._order.epoch, self._order.skip = epoch - 1, 0
                self._batches = iter(())
            else:
                self._order.epoch, self._order.skip = epoch, skip
                self._batches = iter(self._loader)
            self.position = step

    def __iter__(self) -> BatchStream:
        return self

    def __next__(self) -> dict:
        if self._batches is None:
            self.seek(self.position)
        try:
            batch = next(self._batches)
        except StopIteration:
            self._order.epoch, self._order.skip = self._order.epoch + 1, 0
            self._batches = iter(self._loader)
            batch = next(self._batches)
        self.position += 1
        return batch
