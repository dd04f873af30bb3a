"""Federated partitions with ``flwr-datasets`` partitioners.

The pool of training rows is shuffled with the seed and split among clients by
an ``IidPartitioner``, a ``DirichletPartitioner`` (label skew controlled by
Dirichlet alpha; smaller alpha, stronger skew) or a ``ShardPartitioner``
(McMahan et al.'s label-sorted shards). Each client's partition is split again
into its own train and test rows; a held-out global test set is never given to
any client (the source's ``test`` split where it has one, else a stratified
share of the rows).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pandas as pd
from datasets import Dataset, DatasetDict
from flwr_datasets.metrics import compute_counts
from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, Partitioner, ShardPartitioner

from fedgrow_core.data.sources import LABEL, label_names

PARTITIONERS = ("iid", "dirichlet", "shards")


def make_partitioner(
    name: str,
    num_partitions: int,
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_partition_size: int = 10,
    seed: int = 0,
) -> Partitioner:
    """A ``flwr-datasets`` partitioner by name.

    Parameters
    ----------
    name : {"iid", "dirichlet", "shards"}
        ``IidPartitioner``, ``DirichletPartitioner`` (``partition_by="label"``,
        ``alpha``) or ``ShardPartitioner`` (``shards_per_partition`` shards each).
    num_partitions : int
        Number of clients, >= 1.
    alpha : float
        Dirichlet concentration, > 0 (Dirichlet only).
    shards_per_partition : int
        Label-sorted shards per client, >= 1 (shards only).
    min_partition_size : int
        Dirichlet resamples until every partition has this many rows.
    seed : int
        Seed of the partitioner's own sampling.

    Raises
    ------
    ValueError
        Unknown name, or a count or alpha out of range (names the value).
    """
    if name not in PARTITIONERS:
        raise ValueError(f"unknown partitioner {name!r}; expected one of {PARTITIONERS}")
    if not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be an integer >= 1, got {num_partitions!r}")
    if name == "iid":
        return IidPartitioner(num_partitions)
    if name == "dirichlet":
        if not alpha > 0:
            raise ValueError(f"Dirichlet alpha must be > 0, got {alpha!r}")
        return DirichletPartitioner(
            num_partitions, LABEL, alpha, min_partition_size=min_partition_size, self_balancing=False, seed=seed
        )
    if shards_per_partition < 1:
        raise ValueError(f"shards_per_partition must be >= 1, got {shards_per_partition!r}")
    return ShardPartitioner(num_partitions, LABEL, num_shards_per_partition=shards_per_partition, seed=seed)


@dataclass
class FederatedData:
    """A dataset split among clients, plus a held-out global test set.

    Attributes
    ----------
    partitioner : flwr_datasets.partitioner.Partitioner
        Holds the clients' pool; ``partitioner.load_partition(i)`` is client ``i``'s rows.
    global_test : datasets.Dataset
        Rows no client ever sees.
    client_test_fraction : float
        Share of each partition kept as the client's own test split.
    seed : int
        Seed of every split.
    """

    partitioner: Partitioner
    global_test: Dataset
    client_test_fraction: float = 0.2
    seed: int = 0
    _cache: dict[int, DatasetDict] = field(default_factory=dict, repr=False)

    @property
    def num_partitions(self) -> int:
        """Number of clients."""
        return self.partitioner.num_partitions

    @property
    def label_names(self) -> list[str]:
        """Class names."""
        return label_names(self.global_test)

    def client(self, partition_id: int) -> DatasetDict:
        """Client ``partition_id``'s ``train`` and ``test`` splits (deterministic given the seed).

        Raises
        ------
        ValueError
            If ``partition_id`` is not in ``[0, num_partitions)``.
        """
        if not 0 <= partition_id < self.num_partitions:
            raise ValueError(f"partition_id must be in [0, {self.num_partitions}), got {partition_id!r}")
        if partition_id not in self._cache:
            rows = self.partitioner.load_partition(partition_id)
            if len(rows) < 2:
                raise ValueError(f"partition {partition_id} has {len(rows)} rows; too few for a train/test split")
            self._cache[partition_id] = rows.train_test_split(test_size=self.client_test_fraction, seed=self.seed)
        return self._cache[partition_id]


def federate(
    data: DatasetDict,
    num_partitions: int,
    partitioner: str = "dirichlet",
    *,
    alpha: float = 0.5,
    shards_per_partition: int = 2,
    min_partition_size: int = 10,
    global_test_fraction: float = 0.1,
    client_test_fraction: float = 0.2,
    seed: int = 0,
) -> FederatedData:
    """Split a dataset among ``num_partitions`` clients.

    Parameters
    ----------
    data : DatasetDict
        From :func:`fedgrow_core.data.sources.load_data_source`. Its ``test``
        split, where present, is the global test set; otherwise a stratified
        ``global_test_fraction`` of ``train`` is held out.
    num_partitions : int
        Number of clients.
    partitioner : {"iid", "dirichlet", "shards"}
        See :func:`make_partitioner`.
    alpha, shards_per_partition, min_partition_size
        Passed to :func:`make_partitioner`.
    global_test_fraction, client_test_fraction : float
        In ``(0, 1)``.
    seed : int
        Seeds the shuffle, the partitioner and every split.

    Returns
    -------
    FederatedData

    Raises
    ------
    ValueError
        A fraction out of ``(0, 1)`` or a bad partitioner setting.
    """
    for name, value in (("global_test_fraction", global_test_fraction), ("client_test_fraction", client_test_fraction)):
        if not 0 < value < 1:
            raise ValueError(f"{name} must be in (0, 1), got {value!r}")
    part = make_partitioner(
        partitioner,
        num_partitions,
        alpha=alpha,
        shards_per_partition=shards_per_partition,
        min_partition_size=min_partition_size,
        seed=seed,
    )
    if "test" in data:
        pool, global_test = data["train"], data["test"]
    else:
        split = data["train"].train_test_split(test_size=global_test_fraction, seed=seed, stratify_by_column=LABEL)
        pool, global_test = split["train"], split["test"]
    part.dataset = pool.shuffle(seed=seed).flatten_indices()
    return FederatedData(part, global_test, client_test_fraction, seed)


def label_histogram(data: FederatedData) -> pd.DataFrame:
    """Rows per client (index ``partition_id``) and class (columns: class names).

    Counted with ``flwr_datasets.metrics.compute_counts`` over each client's
    whole partition (its train and test rows).
    """
    counts = compute_counts(data.partitioner, LABEL, verbose_names=True)
    counts = counts.reindex(columns=data.label_names, fill_value=0)
    counts.index.name = "partition_id"
    return counts


def print_label_histogram(data: FederatedData, console=None) -> pd.DataFrame:
    """Print :func:`label_histogram` as a ``rich`` table and return it."""
    from rich.console import Console
    from rich.table import Table

    counts = label_histogram(data)
    table = Table(title=f"Label histogram ({data.num_partitions} clients)")
    table.add_column("client", justify="right")
    for name in counts.columns:
        table.add_column(str(name), justify="right")
    table.add_column("total", justify="right")
    for pid, row in counts.iterrows():
        table.add_row(str(pid), *(str(int(v)) for v in row), str(int(row.sum())))
    (console or Console()).print(table)
    return counts
