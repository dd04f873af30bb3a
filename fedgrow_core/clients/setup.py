"""What every client of every mode starts from: its rows, its small model, its batches.

Shared by :class:`fedgrow_core.clients.growth_client.GrowthClient` (Fed-Grow and the
independent-LiGO baseline) and :class:`fedgrow_core.clients.model_client.ModelClient`
(small-only, scratch FedAvg), so that every mode of a run sees the same partition,
the same capped train/test rows and the same batch order.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader

from fedgrow_core.data.batch_stream import BatchStream
from fedgrow_core.data.partitions import FederatedData, federate
from fedgrow_core.data.preprocessing import make_dataloader
from fedgrow_core.data.sources import label_names, load_data_source, task_of, without_progress_bars
from fedgrow_core.run_config import RunConfig
from fedgrow_core.training import resolve_device
from fedgrow_core.zoo.registry import SmallModel, default_cache_dir, load_small_model
from fedgrow_core.zoo.vit_pretrain import VitSpec, pretrain_small_vits


def _load(run: RunConfig, source: str) -> DatasetDict:
    data = load_data_source(
        source, text_column=run.text_column, label_column=run.label_column, image_column=run.image_column
    )
    if task_of(data) != run.task:
        raise ValueError(f"dataset {source!r} is a {task_of(data)} dataset, but task = {run.task!r}")
    return data


@functools.lru_cache(maxsize=4)
def _federated(data_run: RunConfig, num_partitions: int) -> FederatedData:
    run = data_run
    with without_progress_bars():
        data = _load(run, run.dataset)
        return federate(
            data,
            num_partitions,
            run.partitioner,
            alpha=run.dirichlet_alpha,
            shards_per_partition=run.shards_per_partition,
            seed=run.seed,
        )


def federated_data(run: RunConfig, num_partitions: int) -> FederatedData:
    """The run's dataset split among ``num_partitions`` clients (cached per process).

    The cache key holds only what the split depends on (source, columns, task,
    partitioner, alpha, shards per partition, seed), so every mode of a comparison reuses one split.
    """
    data_run = RunConfig(
        task=run.task,
        dataset=run.dataset,
        text_column=run.text_column,
        label_column=run.label_column,
        image_column=run.image_column,
        partitioner=run.partitioner,
        dirichlet_alpha=run.dirichlet_alpha,
        shards_per_partition=run.shards_per_partition,
        seed=run.seed,
    )
    return _federated(data_run, num_partitions)


def client_rows(
    run: RunConfig, partition_id: int, num_partitions: int, dataset: str | None = None
) -> tuple[Dataset, Dataset, list[str]]:
    """A client's training rows, test rows (capped at ``max_train/test_examples``) and class names.

    From partition ``partition_id`` of ``run.dataset``, or, when ``dataset`` names
    the node's own data source, from all of it (split 80/20, no partitioning).
    """
    with without_progress_bars():
        if dataset:
            data = _load(run, dataset)
            split, names = data["train"].train_test_split(test_size=0.2, seed=run.seed), label_names(data)
        else:
            fed = federated_data(run, num_partitions)
            split, names = fed.client(partition_id), fed.label_names
    train, test = split["train"], split["test"]
    if run.max_train_examples and len(train) > run.max_train_examples:
        train = train.shuffle(seed=run.seed).select(range(run.max_train_examples))
    if run.max_test_examples and len(test) > run.max_test_examples:
        test = test.shuffle(seed=run.seed).select(range(run.max_test_examples))
    return train, test, names


@dataclass
class ClientSetup:
    """A client's rows, class names, small model and device.

    Attributes
    ----------
    run : RunConfig
    partition_id : int
    model_name : str
        Zoo name, folder or ``vit:LxD`` spec of the small model.
    small : SmallModel
        The pre-trained small model with its tokenizer or image transform.
    train_rows, test_rows : datasets.Dataset
        Canonical ``text``/``image`` + ``label`` rows (see :func:`client_rows`).
    label_names : list of str
    device : torch.device
    """

    run: RunConfig
    partition_id: int
    model_name: str
    small: SmallModel
    train_rows: Dataset
    test_rows: Dataset
    label_names: list[str]
    device: torch.device

    @classmethod
    def load(
        cls,
        run: RunConfig,
        partition_id: int,
        num_partitions: int,
        model: str | None = None,
        dataset: str | None = None,
    ) -> ClientSetup:
        """Load partition ``partition_id`` and the client's small model.

        The small model is ``model`` or ``run.client_models[partition_id %
        len(run.client_models)]``; a ``vit:LxD`` spec is first pre-trained on
        this client's own rows (cached under the model cache). Whatever the
        checkpoint lacks (e.g. a classifier head) is initialised from a torch
        seed derived from ``(run.seed, partition_id)`` only.

        Raises
        ------
        ValueError
            If the dataset's task is not ``run.task``.
        fedgrow_core.zoo.registry.MissingAssetError
            If a zoo model's asset package is not installed.
        """
        train, test, names = client_rows(run, partition_id, num_partitions, dataset)
        model_name = model or run.client_models[partition_id % len(run.client_models)]
        path = model_name
        if model_name.startswith("vit:"):
            spec = VitSpec.parse(model_name[len("vit:") :])
            cache = Path(run.cache_dir) if run.cache_dir else default_cache_dir()
            split = f"{run.partitioner}-" + (
                f"{run.shards_per_partition}" if run.partitioner == "shards" else f"{run.dirichlet_alpha}"
            )
            tag = f"{dataset or run.dataset}/{split}/{num_partitions}/p{partition_id}"
            (result,) = pretrain_small_vits(
                [spec],
                train,
                test,
                cache / "vits",
                data_tag=tag,
                steps=run.pretrain_steps,
                patch_size=run.patch_size,
                seed=run.seed,
                device=run.device,
            )
            path = result.path
        # A head the checkpoint lacks (a sentence-embedding model has no classifier) is drawn by
        # ``from_pretrained`` from torch's global RNG, and the grown model's head starts from it:
        # seed it per client, so that it does not depend on what the process drew before (in
        # simulation, on which nodes the same worker happened to serve first).
        with torch.random.fork_rng():
            torch.manual_seed(int(np.random.SeedSequence([run.seed, partition_id]).generate_state(1)[0]))
            small = load_small_model(path, len(names), run.cache_dir or None)
        return cls(run, partition_id, model_name, small, train, test, names, resolve_device(run.device))

    @property
    def num_labels(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def batches(self, start_step: int = 0) -> BatchStream:
        """Endless shuffled training batches of ``run.batch_size`` rows from step ``start_step`` on.

        Epoch permutations are seeded by ``run.seed + partition_id`` (plus the
        epoch), so batch ``s`` is the same in every process (:class:`BatchStream`).
        """
        stream = BatchStream(
            len(self.train_rows),
            self.run.batch_size,
            self.run.seed + self.partition_id,
            lambda sampler: make_dataloader(
                self.train_rows,
                self.small.preprocessor,
                self.run.batch_size,
                max_length=self.run.max_length,
                sampler=sampler,
            ),
        )
        stream.seek(start_step)
        return stream

    def test_loader(self, max_rows: int = 0) -> DataLoader:
        """The client's test rows in batches of 64 (the first ``max_rows`` of them if > 0), shortest texts first.

        Rows are batched by token count (:func:`make_dataloader`'s ``by_length``)
        so that little of an evaluation is padding; accuracy, precision and
        loss do not depend on the order.
        """
        rows = self.test_rows
        if 0 < max_rows < len(rows):
            rows = rows.select(range(max_rows))
        return make_dataloader(rows, self.small.preprocessor, 64, max_length=self.run.max_length, by_length=True)

    def round_test_loader(self) -> DataLoader:
        """The rows of a per-round evaluation: the first ``run.eval_max_examples`` test rows (0: all)."""
        return self.test_loader(self.run.eval_max_examples)
