"""One Fed-Grow client: its small model, its data, its Local-LiGO and task head.

Framework-free: the Flower ClientApp (``client_app/``) turns messages into calls
of :class:`GrowthClient` and back. Per round (Shen et al., Sec. 4, Alg. 1) the
client loads the received Global-LiGO, trains Local-LiGO, Global-LiGO and head
for ``local_steps`` on its own rows, and returns the Global-LiGO only. After the
growth rounds it materialises its grown model, fine-tunes it, evaluates it on its
own test split and saves it as an ordinary ``transformers`` / ``timm`` model.
"""

from __future__ import annotations

import functools
import time
from pathlib import Path

import torch
from datasets import Dataset, DatasetDict
from torch import Tensor

from .data_sources import label_names, load_data_source, task_of
from .grown_model import GrownModel
from .ligo import DualLiGO, LiGO
from .partitions import FederatedData, federate
from .preprocessing import make_dataloader
from .run_config import RunConfig
from .training import cycle, evaluate, resolve_device, train_steps
from .vit_pretrain import VitSpec, pretrain_small_vits
from .zoo import default_cache_dir, load_small_model

GLOBAL_PREFIX = "operator.global_."
HEAD_PREFIX = "head."


def global_ligo(run: RunConfig) -> LiGO:
    """The initial Global-LiGO (intermediate -> target), from the run config alone, seeded by ``run.seed``."""
    return LiGO(
        run.intermediate_shape,
        run.target_shape,
        depth_init=run.depth_init,
        depth_noise=run.depth_noise,
        seed=run.seed,
    )


def _load(run: RunConfig, source: str) -> DatasetDict:
    data = load_data_source(
        source, text_column=run.text_column, label_column=run.label_column, image_column=run.image_column
    )
    if task_of(data) != run.task:
        raise ValueError(f"dataset {source!r} is a {task_of(data)} dataset, but task = {run.task!r}")
    return data


@functools.lru_cache(maxsize=4)
def federated_data(run: RunConfig, num_partitions: int) -> FederatedData:
    """The run's dataset split among ``num_partitions`` clients (cached per process)."""
    return federate(_load(run, run.dataset), num_partitions, run.partitioner, alpha=run.dirichlet_alpha, seed=run.seed)


def client_rows(
    run: RunConfig, partition_id: int, num_partitions: int, dataset: str | None = None
) -> tuple[Dataset, Dataset, list[str]]:
    """A client's training rows (capped at ``max_train_examples``), test rows and class names.

    From partition ``partition_id`` of ``run.dataset``, or, when ``dataset`` names
    the node's own data source, from all of it (split 80/20, no partitioning).
    """
    if dataset:
        data = _load(run, dataset)
        split, names = data["train"].train_test_split(test_size=0.2, seed=run.seed), label_names(data)
    else:
        fed = federated_data(run, num_partitions)
        split, names = fed.client(partition_id), fed.label_names
    train = split["train"]
    if run.max_train_examples and len(train) > run.max_train_examples:
        train = train.shuffle(seed=run.seed).select(range(run.max_train_examples))
    return train, split["test"], names


class GrowthClient:
    """A client's private side of Fed-Grow.

    Parameters
    ----------
    run : RunConfig
        The checked run configuration.
    partition_id, num_partitions : int
        Which partition of ``run.dataset`` is this client's; its small model is
        ``run.client_models[partition_id % len(run.client_models)]``.
    model : str, optional
        Overrides the small model (a SuperNode naming its own model folder).
    dataset : str, optional
        The node's own data source (a SuperNode naming its own data file): all
        of it is this client's (its own train/test split), no partitioning.

    Attributes
    ----------
    model : GrownModel
        Small model (frozen) grown through ``Global o Local``, plus the task head.
    optimizer : torch.optim.AdamW
        Over Local-LiGO, Global-LiGO (``lr_ligo``) and the head (``lr_head``).
    """

    def __init__(
        self,
        run: RunConfig,
        partition_id: int,
        num_partitions: int,
        model: str | None = None,
        dataset: str | None = None,
    ) -> None:
        self.run = run
        self.partition_id = partition_id
        self.device = resolve_device(run.device)
        self.train_rows, self.test_rows, names = client_rows(run, partition_id, num_partitions, dataset)
        self.num_labels = len(names)
        self.model_name = model or run.client_models[partition_id % len(run.client_models)]
        small = load_small_model(self._pretrained_path(num_partitions), self.num_labels, run.cache_dir or None)
        self.small = small
        local = LiGO(
            small.family.shape(small.model),
            run.intermediate_shape,
            tie_layers=True,
            depth_init=run.depth_init,
            depth_noise=run.depth_noise,
            seed=run.seed + 1 + partition_id,
        )
        self.model = GrownModel(small.family, small.model, DualLiGO(local, global_ligo(run)), self.num_labels)
        self.model.to(self.device)
        head = [p for n, p in self.model.named_parameters() if n.startswith(HEAD_PREFIX)]
        operators = [p for n, p in self.model.named_parameters() if not n.startswith(HEAD_PREFIX)]
        self.optimizer = torch.optim.AdamW(
            [{"params": operators, "lr": run.lr_ligo}, {"params": head, "lr": run.lr_head}],
            weight_decay=run.weight_decay,
        )
        loader = make_dataloader(
            self.train_rows,
            small.preprocessor,
            run.batch_size,
            shuffle=True,
            seed=run.seed + partition_id,
            max_length=run.max_length,
        )
        self._batches = cycle(loader)

    def _pretrained_path(self, num_partitions: int) -> str:
        """The small model to load; ``vit:LxD`` is first pre-trained on this client's own rows (cached)."""
        if not self.model_name.startswith("vit:"):
            return self.model_name
        spec = VitSpec.parse(self.model_name[len("vit:") :])
        cache = Path(self.run.cache_dir) if self.run.cache_dir else default_cache_dir()
        run = self.run
        tag = f"{run.dataset}/{run.partitioner}-{run.dirichlet_alpha}/{num_partitions}/p{self.partition_id}"
        (result,) = pretrain_small_vits(
            [spec],
            self.train_rows,
            self.test_rows,
            cache / "vits",
            data_tag=tag,
            steps=self.run.pretrain_steps,
            patch_size=self.run.patch_size,
            seed=self.run.seed,
            device=self.run.device,
        )
        return result.path

    # --- what travels -----------------------------------------------------
    def global_state(self) -> dict[str, Tensor]:
        """Global-LiGO tensors under their ``LiGO.state_dict()`` names (CPU, float32).

        Shapes: ``depth.<kind>`` ``(L_t, L_m)``; ``width.res`` ``(D_t - D_m, D_m)``;
        ``width.q/k/v`` ``(L_t, D_t - D_m, D_m)``; ``width.ffn`` ``(L_t, F_t - F_m, F_m)``
        (``m``: intermediate, ``t``: target shape). These are the only tensors sent.
        """
        return {k: v.detach().cpu().clone() for k, v in self.model.operator.global_.state_dict().items()}

    def load_global_state(self, state: dict[str, Tensor]) -> None:
        """Load received Global-LiGO tensors.

        Raises
        ------
        RuntimeError
            From ``load_state_dict(strict=True)``, if names or shapes differ.
        """
        self.model.operator.global_.load_state_dict(state, strict=True)

    # --- what stays ---------------------------------------------------------
    def private_state(self) -> dict[str, Tensor]:
        """Local-LiGO, head and optimiser moments: the client state kept between rounds."""
        out = {
            k: v.detach().cpu().clone() for k, v in self.model.state_dict().items() if not k.startswith(GLOBAL_PREFIX)
        }
        for i, state in self.optimizer.state_dict()["state"].items():
            for key, value in state.items():
                out[f"optimizer.{i}.{key}"] = torch.as_tensor(value).detach().cpu().clone()
        return out

    def load_private_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`private_state` onto this client's Local-LiGO, head and optimiser.

        Raises
        ------
        RuntimeError
            From ``load_state_dict`` (strict), if a tensor name or shape does not
            match this client's model.
        """
        own = {k: v for k, v in state.items() if not k.startswith("optimizer.")}
        # the Global-LiGO is not in the private state: keep the current one, check the rest strictly
        self.model.load_state_dict({**self.model.state_dict(), **own}, strict=True)
        moments: dict[int, dict[str, Tensor]] = {}
        for key, value in state.items():
            if key.startswith("optimizer."):
                _, i, name = key.split(".", 2)
                moments.setdefault(int(i), {})[name] = value.to(self.device) if name != "step" else value
        current = self.optimizer.state_dict()
        self.optimizer.load_state_dict({"state": moments, "param_groups": current["param_groups"]})

    # --- phases ---------------------------------------------------------------
    def train_round(self, global_state: dict[str, Tensor], proximal_mu: float = 0.0) -> tuple[dict[str, Tensor], dict]:
        """Load the Global-LiGO, train ``run.local_steps`` steps, return the new Global-LiGO and metrics.

        Parameters
        ----------
        global_state : dict of str to Tensor
            Global-LiGO from the server.
        proximal_mu : float
            FedProx's proximal weight (Li et al. 2020, Eq. 2) on the Global-LiGO; 0 disables it.

        Returns
        -------
        tuple of (dict, dict)
            The Global-LiGO after training, and ``{"num-examples", "train-loss",
            "train-accuracy", "train-seconds"}``.
        """
        self.load_global_state(global_state)
        start = time.perf_counter()
        penalty = None
        if proximal_mu > 0:
            params = dict(self.model.operator.global_.named_parameters())
            anchor = {k: v.detach().clone() for k, v in params.items()}

            def penalty() -> Tensor:
                return 0.5 * proximal_mu * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)

        stats = train_steps(
            self.model, self._batches, self.optimizer, self.run.local_steps, self.device, penalty=penalty
        )
        return self.global_state(), {
            "num-examples": len(self.train_rows),
            "train-loss": stats.mean_loss,
            "train-accuracy": stats.accuracy,
            "train-seconds": time.perf_counter() - start,
        }

    def finetune_and_evaluate(self, global_state: dict[str, Tensor], out_dir: str | Path | None) -> dict:
        """Materialise the grown model, fine-tune it locally, evaluate it on the client's test split, save it.

        ``finetune_steps`` AdamW steps at ``lr_finetune`` on all target weights;
        saved with the family's own format (``save_pretrained`` / timm
        ``config.json`` + ``model.safetensors``) and the tokenizer, unless
        ``out_dir`` is ``None``.

        Returns
        -------
        dict
            ``num-examples`` (test rows), ``accuracy``, ``precision`` (macro),
            ``loss``, ``trainable-params`` (growth phase: Local + Global + head),
            ``target-params``, ``finetune-seconds``.
        """
        self.load_global_state(global_state)
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        grown = self.model.to_family_model().to(self.device)
        start = time.perf_counter()
        if self.run.finetune_steps:
            optimizer = torch.optim.AdamW(
                grown.parameters(), lr=self.run.lr_finetune, weight_decay=self.run.weight_decay
            )
            train_steps(grown, self._batches, optimizer, self.run.finetune_steps, self.device)
        seconds = time.perf_counter() - start
        test = make_dataloader(self.test_rows, self.small.preprocessor, 64, max_length=self.run.max_length)
        result = evaluate(grown, test, self.device)
        if out_dir is not None:
            self.small.family.save(grown.cpu(), self.model.target_config, out_dir)
            if hasattr(self.small.preprocessor, "save_pretrained"):
                self.small.preprocessor.save_pretrained(out_dir)
        return {
            "num-examples": result.num_examples,
            "accuracy": result.accuracy,
            "precision": result.precision,
            "loss": result.loss,
            "trainable-params": trainable,
            "target-params": sum(p.numel() for p in grown.parameters()),
            "finetune-seconds": seconds,
        }
