"""A client that trains an ordinary family model: the baselines.

One class serves two baselines of the comparison, both on the rows and batch
order of :class:`fedgrow_core.clients.setup.ClientSetup`:

* ``small-only``: the client's own pre-trained small model, trained alone;
* ``scratch-fedavg``: the target-shaped model from random initialisation, all of
  its weights trained locally and averaged by the server (FedAvg, McMahan et al.
  2017).

Weights and AdamW moments are kept by the caller between rounds when the model is
private (:meth:`private_state`); when its weights travel, each round starts a fresh
optimiser on the received weights, as Flower's FedAvg examples do.
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from fedgrow_core.clients.model_card import client_model_card
from fedgrow_core.clients.model_export import NonFiniteModel, check_finite, save_model
from fedgrow_core.clients.private_state import cpu_tensor, load_training_state, model_tensors, training_state
from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.protocol import round_metrics
from fedgrow_core.training import EvalResult, evaluate, train_steps


def target_model(setup: ClientSetup, seed: int) -> tuple[nn.Module, object]:
    """A randomly initialised model of the run's target shape in the client's model family.

    The architecture is the client's small model's configuration with the target
    shape (``family.target_config``); initialisation is the family's own, seeded
    with ``seed``, so clients with the same family and vocabulary build identical
    models.

    Returns
    -------
    tuple of (nn.Module, config)
        The model (on CPU) and its family config (for saving).
    """
    family, small = setup.small.family, setup.small.model
    config = family.target_config(small, setup.run.target_shape, setup.num_labels)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = family.build(config)
    return model, config


class ModelClient:
    """Train and evaluate one ordinary family model on a client's rows.

    Parameters
    ----------
    setup : ClientSetup
        The client's rows, small model (for its family and preprocessor) and device.
    model : nn.Module
        A family model (``BertForSequenceClassification``, timm ViT) whose forward
        takes the setup's batches; every parameter is trained.
    config : object
        The model's family config, used by :meth:`save`.
    lr : float
        AdamW learning rate of every weight but the task head's, which trains at
        ``run.lr_head`` (:meth:`param_groups`; ``weight_decay`` from the run config).

    Attributes
    ----------
    trainable_params : int
        Number of trained parameters (all of the model's).
    """

    def __init__(self, setup: ClientSetup, model: nn.Module, config: object, lr: float) -> None:
        self.setup = setup
        self.run = setup.run
        self.device = setup.device
        self.model = model.to(self.device)
        self.config = config
        self.lr = lr
        self.trainable_params = sum(p.numel() for p in self.model.parameters())
        self.optimizer = self._new_optimizer()
        self._batches = setup.batches()
        self._test = setup.test_loader()
        self._round_test = setup.round_test_loader()

    def _new_optimizer(self) -> torch.optim.AdamW:
        return torch.optim.AdamW(self.param_groups(), weight_decay=self.run.weight_decay)

    def param_groups(self) -> list[dict]:
        """AdamW groups: the task head (the family's ``head_names``) at ``run.lr_head``, every other weight at ``lr``.

        The head is the one part that starts from a random initialisation in
        every mode (no checkpoint of ours has this task's classifier); it gets
        the same rate as the grown model's head in the growth phase
        (:func:`fedgrow_core.clients.growth_client.growth_param_groups`), so that
        no mode's head learns slower than another's.
        """
        head = set(self.setup.small.family.head_names())
        params = list(self.model.named_parameters())
        groups = [
            {"name": "body", "params": [p for n, p in params if n not in head], "lr": self.lr},
            {"name": "head", "params": [p for n, p in params if n in head], "lr": self.run.lr_head},
        ]
        return [g for g in groups if g["params"]]

    # --- weights -------------------------------------------------------------
    def weights(self) -> dict[str, Tensor]:
        """Every parameter under its ``named_parameters()`` name (CPU, float32 clones); what travels when shared."""
        return {k: v.detach().cpu().clone() for k, v in self.model.named_parameters()}

    def load_weights(self, weights: dict[str, Tensor], fresh_optimizer: bool = True) -> None:
        """Load received parameters (all of them, strictly) and, by default, restart the optimiser.

        Raises
        ------
        ValueError
            If the names differ from :meth:`weights`'s.
        RuntimeError
            From ``load_state_dict``, if a shape differs.
        """
        own = dict(self.model.named_parameters())
        if set(weights) != set(own):
            missing, extra = sorted(set(own) - set(weights)), sorted(set(weights) - set(own))
            raise ValueError(f"received weights do not match the model: missing {missing[:3]}, extra {extra[:3]}")
        self.model.load_state_dict({**self.model.state_dict(), **weights}, strict=True)
        if fresh_optimizer:
            self.optimizer = self._new_optimizer()

    @property
    def data_steps(self) -> int:
        """Training batches drawn so far (the position in :meth:`ClientSetup.batches`'s stream)."""
        return self._batches.position

    def seek_data(self, step: int) -> None:
        """Make training batch ``step`` the next one drawn (:meth:`BatchStream.seek`)."""
        self._batches.seek(step)

    def private_state(self, copy: bool = True) -> dict[str, Tensor]:
        """Weights, AdamW moments (``optimizer.<i>.<name>``) and ``data.steps``: kept when the model is private.

        Parameters
        ----------
        copy : bool
            CPU clones (default); ``False``: detached aliases of the client's own CPU tensors, for a
            caller that reads them at once and keeps nothing (writing the state file).

        Returns
        -------
        dict of str to Tensor
            Every parameter under its ``named_parameters()`` name, the AdamW state and ``data.steps``.
        """
        out = {k: cpu_tensor(v, copy) for k, v in self.model.named_parameters()}
        out.update(training_state(self.optimizer, self._batches, copy))
        return out

    def load_private_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`private_state` (weights strictly, then the AdamW moments)."""
        self.load_weights(model_tensors(state), fresh_optimizer=True)
        load_training_state(state, self.optimizer, self._batches, self.device)

    # --- training --------------------------------------------------------------
    def train_round(self, steps: int, with_eval: bool = True) -> dict:
        """Train ``steps`` optimiser steps, then (``with_eval``) evaluate on the per-round test rows.

        Returns
        -------
        dict
            ``num-examples`` (training rows), ``train-loss``, ``train-accuracy``,
            ``train-seconds`` (seconds of training), ``trainable-params``,
            ``compute-threads`` (``torch.get_num_threads()``), and with ``with_eval`` ``eval-accuracy`` (on
            :meth:`ClientSetup.round_test_loader`'s rows) and ``eval-seconds``.
        """
        start = time.perf_counter()
        stats = train_steps(self.model, self._batches, self.optimizer, steps, self.device)
        seconds = time.perf_counter() - start
        metrics = round_metrics(
            len(self.setup.train_rows), stats.mean_loss, stats.accuracy, seconds, self.trainable_params
        )
        if with_eval:
            start = time.perf_counter()
            metrics["eval-accuracy"] = evaluate(self.model, self._round_test, self.device).accuracy
            metrics["eval-seconds"] = time.perf_counter() - start
        return metrics

    def evaluate_round(self) -> float:
        """Accuracy of the model as it is now on the per-round test rows."""
        return evaluate(self.model, self._round_test, self.device).accuracy

    def evaluate(self) -> EvalResult:
        """Loss, accuracy and macro precision on the client's test rows."""
        return evaluate(self.model, self._test, self.device)

    def finetune_and_evaluate(
        self, steps: int, out_dir: str | Path | None, owner: Mapping[str, str] | None = None, origin: str = ""
    ) -> dict:
        """Train ``steps`` more steps, evaluate, save atomically (unless ``out_dir`` is ``None``), recording ``owner``.

        The saved folder has the class names and a model card (``README.md``) whose origin line is ``origin``.

        Returns
        -------
        dict
            ``num-examples`` (test rows), ``accuracy``, ``precision``, ``loss``,
            ``model-params`` (this model's parameters), ``finetune-seconds``, ``eval-seconds`` (all test rows),
            ``compute-threads``.

        Raises
        ------
        NonFiniteModel
            If the fine-tuned model or its test loss is not finite; nothing is saved.
        """
        start = time.perf_counter()
        if steps:
            train_steps(self.model, self._batches, self.optimizer, steps, self.device)
        seconds = time.perf_counter() - start
        check_finite(self.model, "fine-tuned model")
        start = time.perf_counter()
        result = self.evaluate()
        eval_seconds = time.perf_counter() - start
        if not math.isfinite(result.loss):
            raise NonFiniteModel(f"the fine-tuned model's test loss is {result.loss}; it is not saved or reported")
        if out_dir is not None:
            metrics = {"num-examples": result.num_examples, "accuracy": result.accuracy, "precision": result.precision}
            family, shape = self.setup.small.family, self.setup.small.family.shape(self.model)
            card = client_model_card(self.setup, f"{shape} {family.name} classifier", origin or "trained", metrics)
            preprocessor, names = self.setup.small.preprocessor, self.setup.label_names
            save_model(family, self.model, self.config, preprocessor, out_dir, owner, names, card)
            self.model.to(self.device)
        return {
            "num-examples": result.num_examples,
            "accuracy": result.accuracy,
            "precision": result.precision,
            "loss": result.loss,
            "model-params": self.trainable_params,
            "finetune-seconds": seconds,
            "eval-seconds": eval_seconds,
            "compute-threads": torch.get_num_threads(),
        }
