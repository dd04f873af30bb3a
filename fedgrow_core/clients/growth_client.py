"""One Fed-Grow client: its small model, its data, its Local-LiGO and task head.

Framework-free: the Flower ClientApp (``client_app/``) turns messages into calls
of :class:`GrowthClient` and back. Per round (Shen et al., Sec. 4, Alg. 1) the
client loads the received Global-LiGO, trains Local-LiGO, Global-LiGO and head
for ``local_steps`` on its own rows, and returns the Global-LiGO only. After the
growth rounds it materialises its grown model, fine-tunes it, evaluates it on its
own test split and saves it as an ordinary ``transformers`` / ``timm`` model.

With ``independent=True`` the same client is the *independent-LiGO* baseline:
one private LiGO grows the small model straight to the target shape (per-layer
width matrices, as in Wang et al. 2023) and nothing is shared. With
``share_global=False`` it is the *independent Dual-LiGO* baseline: the same
Dual-LiGO as Fed-Grow, from the same seeds, whose Global-LiGO stays private and
is never averaged, so that it and Fed-Grow differ only in the averaging.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn
from transformers import (
    get_constant_schedule_with_warmup,
    get_cosine_schedule_with_warmup,
    get_linear_schedule_with_warmup,
)

from fedgrow_core.clients.model_card import client_model_card
from fedgrow_core.clients.model_export import NonFiniteModel, check_finite, save_model
from fedgrow_core.clients.private_state import (
    RESIDUAL_PREFIX,
    cpu_tensor,
    load_training_state,
    model_tensors,
    training_state,
)
from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.growth.grown_model import GrownModel
from fedgrow_core.growth.ligo import DualLiGO, LiGO
from fedgrow_core.growth.shapes import TransformerShape
from fedgrow_core.protocol import initial_global_ligo, round_metrics
from fedgrow_core.run_config import RunConfig
from fedgrow_core.training import EvalResult, evaluate, train_steps
from fedgrow_core.update_encoding import encode_update

GLOBAL_PREFIX = "operator.global_."
HEAD_PREFIX = "head."


def client_operator(
    run: RunConfig, shape: TransformerShape, partition_id: int, *, independent: bool = False
) -> LiGO | DualLiGO:
    """A client's initial growth operator for its small model of shape ``shape``.

    Returns a ``DualLiGO`` (``shape -> run.intermediate_shape -> run.target_shape``)
    or, with ``independent=True``, a ``LiGO`` (``shape -> run.target_shape``);
    raises ``ValueError`` (from :class:`~fedgrow_core.growth.ligo.LiGO`) if
    ``shape`` cannot grow into the intermediate or target shape.

    Fed-Grow (Shen et al., Sec. 4): ``DualLiGO(Local-LiGO, Global-LiGO)``. Every
    client's Local-LiGO is seeded with ``run.seed + 1``, so that clients of
    one width reach the same intermediate coordinates (the width draws depend
    on the seed and the widths only, :func:`~fedgrow_core.growth.ligo.width_seed`):
    the Global-LiGO they average then acts on features laid out alike. The
    Global-LiGO is :func:`~fedgrow_core.protocol.initial_global_ligo`.
    ``independent=True``: the independent-LiGO baseline's private
    ``LiGO(shape -> target)`` with per-layer width matrices (Wang et al. 2023),
    seeded with ``run.seed + 1 + partition_id``.
    """
    if independent:
        return LiGO(
            shape,
            run.target_shape,
            depth_init=run.depth_init,
            depth_noise=run.depth_noise,
            seed=run.seed + 1 + partition_id,
        )
    local = LiGO(
        shape,
        run.intermediate_shape,
        tie_layers=True,
        depth_init=run.depth_init,
        depth_noise=run.depth_noise,
        seed=run.seed + 1,
    )
    return DualLiGO(local, initial_global_ligo(run))


def growth_param_groups(model: GrownModel, run: RunConfig) -> list[dict]:
    """AdamW parameter groups of the growth phase, one per operator part and the head.

    Depth coefficients are O(1) mixing weights (one-hot rows at initialisation)
    and width matrices hold O(1) selections and O(1/d) mean rows; AdamW moves
    each entry by at most about ``lr`` per step, so each kind gets its own rate
    (LiGO, Wang et al. 2023, Sec. 3.3, trains the operator as its own short
    optimisation), and the shared Global-LiGO its own pair of rates. Split
    weights ``split.<space>`` train with their operator's width matrices.
    Weight decay (``run.weight_decay``) applies to the head only: decoupled
    decay pulls towards 0, and an operator's one-hot selections and depth
    coefficients must stay near their initial values, not near 0.

    Returns
    -------
    list of dict
        Groups named ``depth`` and ``width`` (the Local-LiGO, or the
        independent-LiGO baseline's private operator; ``lr-depth``, ``lr-width``),
        ``global-depth`` and ``global-width`` (``lr-global-depth``,
        ``lr-global-width``) and ``head`` (``lr-head``), each with ``params``,
        ``lr`` and ``weight_decay``; a group with no parameters is left out.
    """
    groups: dict[str, list] = {"depth": [], "width": [], "global-depth": [], "global-width": [], "head": []}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith(HEAD_PREFIX):
            groups["head"].append(param)
            continue
        part = "depth" if ".depth." in f".{name}" else "width"
        groups[f"global-{part}" if name.startswith(GLOBAL_PREFIX) else part].append(param)
    lrs = {
        "depth": run.lr_depth,
        "width": run.lr_width,
        "global-depth": run.lr_global_depth,
        "global-width": run.lr_global_width,
        "head": run.lr_head,
    }
    return [
        {"name": k, "params": v, "lr": lrs[k], "weight_decay": run.weight_decay if k == "head" else 0.0}
        for k, v in groups.items()
        if v
    ]


def growth_schedule(optimizer: torch.optim.Optimizer, run: RunConfig) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up and decay of every group over the growth phase (``num_server_rounds * local_steps`` steps).

    ``transformers``' ``get_cosine_schedule_with_warmup``,
    ``get_linear_schedule_with_warmup`` or ``get_constant_schedule_with_warmup``
    (``run.lr_schedule``) with ``run.warmup_steps``. With
    ``run.head_warmup_steps = h``, every group but ``head`` has rate 0 for the
    first ``h`` steps, then follows the schedule from its start over the
    remaining steps (the head follows it from step 0).
    """
    total = run.num_server_rounds * run.local_steps
    h = run.head_warmup_steps

    def schedule(steps: int) -> torch.optim.lr_scheduler.LambdaLR:
        if run.lr_schedule == "constant":
            return get_constant_schedule_with_warmup(optimizer, run.warmup_steps)
        make = get_cosine_schedule_with_warmup if run.lr_schedule == "cosine" else get_linear_schedule_with_warmup
        return make(optimizer, run.warmup_steps, steps)

    head = schedule(total).lr_lambdas[0]
    if not h:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, head)
    later = schedule(max(total - h, 1)).lr_lambdas[0]

    def operators(step: int) -> float:
        return 0.0 if step < h else later(step - h)

    names = [group.get("name") for group in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, [head if n == "head" else operators for n in names])


def seek_schedule(scheduler: torch.optim.lr_scheduler.LambdaLR, step: int) -> None:
    """Set every group's learning rate to the schedule's value at ``step`` (steps already taken)."""
    groups = scheduler.optimizer.param_groups
    for group, base, factor in zip(groups, scheduler.base_lrs, scheduler.lr_lambdas, strict=True):
        group["lr"] = base * factor(step)
    scheduler.last_epoch = step


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
    independent : bool
        The independent-LiGO baseline: one private ``LiGO(small -> target)``
        instead of ``DualLiGO``; :meth:`global_state` is then empty.
    share_global : bool
        ``False``: the independent Dual-LiGO baseline; the Global-LiGO is part
        of :meth:`private_state` and a received one is refused.
    setup : ClientSetup, optional
        An already loaded setup (rows and small model) to reuse.

    Attributes
    ----------
    model : GrownModel
        Small model (frozen) grown through ``Global o Local`` (or the private
        LiGO), plus the task head.
    optimizer : torch.optim.AdamW
        One parameter group per operator part and the head
        (:func:`growth_param_groups`).
    scheduler : torch.optim.lr_scheduler.LambdaLR
        Warm-up then decay over the growth phase (:func:`growth_schedule`),
        positioned at the client's own step count every round.
    trainable_params : int
        Parameters trained in the growth rounds (operators + head).
    """

    def __init__(
        self,
        run: RunConfig,
        partition_id: int,
        num_partitions: int,
        model: str | None = None,
        dataset: str | None = None,
        *,
        independent: bool = False,
        share_global: bool = True,
        setup: ClientSetup | None = None,
    ) -> None:
        self.setup = setup or ClientSetup.load(run, partition_id, num_partitions, model, dataset)
        self.run = run
        self.partition_id = partition_id
        self.independent = independent
        self.share_global = share_global and not independent
        self.device = self.setup.device
        self.train_rows, self.test_rows = self.setup.train_rows, self.setup.test_rows
        self.num_labels = self.setup.num_labels
        self.model_name = self.setup.model_name
        small = self.small = self.setup.small
        operator = client_operator(run, small.family.shape(small.model), partition_id, independent=independent)
        self.model = GrownModel(small.family, small.model, operator, self.num_labels)
        self.model.to(self.device)
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.optimizer = torch.optim.AdamW(growth_param_groups(self.model, run))
        self.scheduler = growth_schedule(self.optimizer, run)
        self._batches = self.setup.batches()
        self._test = self.setup.test_loader()
        self._round_test = self.setup.round_test_loader()
        #: What encoding the Global-LiGO update rounded away, added to the next one (private).
        self.update_residual: dict[str, Tensor] = {}

    # --- what travels -----------------------------------------------------
    def global_state(self, copy: bool = True) -> dict[str, Tensor]:
        """Global-LiGO tensors under their ``LiGO.state_dict()`` names (CPU, float32).

        Shapes: ``depth.<kind>`` ``(L_t, L_m)``; ``width.res`` ``(D_t - D_m, D_m)``;
        ``width.q/k/v`` ``(L_t, D_t - D_m, D_m)``; ``width.ffn`` ``(L_t, F_t - F_m, F_m)``
        (``m``: intermediate, ``t``: target shape); the split weights
        ``split.res`` ``(D_t - D_m,)``, ``split.v`` ``(L_t, D_t - D_m)`` and
        ``split.ffn`` ``(L_t, F_t - F_m)``. With ``global-tie-layers``
        the leading ``L_t`` of the per-layer spaces is dropped; with
        ``global-rank = r`` the last axis is ``r`` (the factor ``U``). These are
        the only tensors sent (as such, or encoded: :meth:`encoded_update`).

        Parameters
        ----------
        copy : bool
            CPU clones (default); ``False``: detached aliases of the client's own tensors, on its
            device, for a caller that only reads them at once (e.g. their names, shapes and dtypes).

        Returns
        -------
        dict of str to Tensor
            Empty for the independent-LiGO baseline.
        """
        if self.independent:
            return {}
        tensors = self.model.operator.global_.state_dict().items()
        return {k: cpu_tensor(v, copy=True) if copy else v.detach() for k, v in tensors}

    def load_global_state(self, state: dict[str, Tensor]) -> None:
        """Load received Global-LiGO tensors.

        Raises
        ------
        RuntimeError
            From ``load_state_dict(strict=True)``, if names or shapes differ.
        ValueError
            If a client that shares no Global-LiGO is sent any tensor.
        """
        if not self.share_global:
            if state:
                raise ValueError(f"a client of an unshared operator shares nothing, but was sent {sorted(state)[:3]}")
            return
        self.model.operator.global_.load_state_dict(state, strict=True)

    def encoded_update(self, received: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
        """The reply's tensors for ``run.update_encoding``, with error feedback.

        Parameters
        ----------
        received, new : dict of str to Tensor
            The Global-LiGO the server sent this round, and :meth:`train_round`'s.

        Returns
        -------
        dict of str to Tensor
            ``new`` itself for ``"float32"``; else the encoded update
            (:func:`~fedgrow_core.update_encoding.encode_update`). The rounding
            error is kept in :attr:`update_residual`, part of :meth:`private_state`.

        Raises
        ------
        ValueError
            From :func:`~fedgrow_core.update_encoding.encode_update`, if the
            update is not finite (the residual is left as it was).
        """
        if self.run.update_encoding == "float32":
            return new
        arrays, self.update_residual = encode_update(new, received, self.update_residual, self.run.update_encoding)
        return {k: torch.from_numpy(v) for k, v in arrays.items()}

    # --- what stays ---------------------------------------------------------
    def private_state(self, copy: bool = True) -> dict[str, Tensor]:
        """Local-LiGO, head, optimiser moments, ``data.steps``, update residual: the state kept between rounds.

        Without ``share_global``, the Global-LiGO too.

        Parameters
        ----------
        copy : bool
            CPU clones (default); ``False``: detached aliases of the client's own CPU tensors, for a
            caller that reads them at once and keeps nothing (writing the state file), without copying
            tens of megabytes.

        Returns
        -------
        dict of str to Tensor
            The model's private tensors under their ``state_dict`` names, ``optimizer.<i>.<name>``
            (AdamW moments and step), ``data.steps`` (0-d int64) and ``update-residual.<name>``.
        """
        out = {
            k: cpu_tensor(v, copy)
            for k, v in self.model.state_dict().items()
            if self.independent or not self.share_global or not k.startswith(GLOBAL_PREFIX)
        }
        out.update(training_state(self.optimizer, self._batches, copy))
        out.update({RESIDUAL_PREFIX + k: cpu_tensor(v, copy) for k, v in self.update_residual.items()})
        return out

    def load_private_state(self, state: dict[str, Tensor]) -> None:
        """Restore :meth:`private_state` onto this client's Local-LiGO, head and optimiser.

        Raises
        ------
        RuntimeError
            From ``load_state_dict`` (strict), if a tensor name or shape does not
            match this client's model.
        """
        # a shared Global-LiGO is not in the private state: keep the current one, check the rest strictly
        self.model.load_state_dict({**self.model.state_dict(), **model_tensors(state)}, strict=True)
        load_training_state(state, self.optimizer, self._batches, self.device)
        self.update_residual = {
            k.removeprefix(RESIDUAL_PREFIX): v for k, v in state.items() if k.startswith(RESIDUAL_PREFIX)
        }

    # --- phases ---------------------------------------------------------------
    def train_round(
        self,
        global_state: dict[str, Tensor],
        proximal_mu: float = 0.0,
        with_eval: bool = True,
        after_training: Callable[[dict[str, Tensor]], None] | None = None,
    ) -> tuple[dict[str, Tensor], dict]:
        """Load the Global-LiGO, train ``run.local_steps`` steps, return the new Global-LiGO and metrics.

        Parameters
        ----------
        global_state : dict of str to Tensor
            Global-LiGO from the server.
        proximal_mu : float
            FedProx's proximal weight (Li et al. 2020, Eq. 2) on the Global-LiGO; 0 disables it.
        with_eval : bool
            Evaluate the grown model after the round on the per-round test rows
            (:meth:`ClientSetup.round_test_loader`).
        after_training : callable, optional
            Called with the trained Global-LiGO (the dict returned) once the
            local steps are done and before that evaluation, e.g. to start
            writing the private state while the evaluation runs. It must leave
            the model as it is; what it raises propagates.

        Returns
        -------
        tuple of (dict, dict)
            The Global-LiGO after training, and ``{"num-examples", "train-loss",
            "train-accuracy", "train-seconds", "trainable-params", "compute-threads"}``, plus with
            ``with_eval`` ``eval-accuracy`` (the grown model after this round,
            evaluated through :class:`GrownModel` without materialising it)
            and ``eval-seconds`` (seconds), and, when the Global-LiGO is
            shared, ``received-accuracy``: the same rows with the received
            Global-LiGO before training, the previous round's aggregate
            evaluated with this client's own Local-LiGO and head, and
            ``received-eval-seconds``, the seconds that evaluation took.
        """
        self.load_global_state(global_state)
        received, received_seconds = None, 0.0
        if with_eval and self.share_global:  # the aggregate as it arrived, before this client trains on it
            start = time.perf_counter()
            received = self.evaluate_round()
            received_seconds = time.perf_counter() - start
        start = time.perf_counter()
        penalty = None
        if proximal_mu > 0:
            params = dict(self.model.operator.global_.named_parameters())
            anchor = {k: v.detach().clone() for k, v in params.items()}

            def penalty() -> Tensor:
                return 0.5 * proximal_mu * sum(((params[k] - anchor[k]) ** 2).sum() for k in params)

        seek_schedule(self.scheduler, self._batches.position)
        stats = train_steps(
            self.model,
            self._batches,
            self.optimizer,
            self.run.local_steps,
            self.device,
            scheduler=self.scheduler,
            penalty=penalty,
        )
        seconds = time.perf_counter() - start
        metrics = round_metrics(len(self.train_rows), stats.mean_loss, stats.accuracy, seconds, self.trainable_params)
        trained = self.global_state()
        if after_training is not None:
            after_training(trained)
        if with_eval:
            start = time.perf_counter()
            # through the operators in factored form: no materialisation, same logits as grown_model()
            metrics["eval-accuracy"] = self.evaluate_round()
            metrics["eval-seconds"] = time.perf_counter() - start
            if received is not None:
                metrics["received-accuracy"] = received
                metrics["received-eval-seconds"] = received_seconds
        return trained, metrics

    def freeze_global(self) -> None:
        """Train no Global-LiGO tensor from now on: the optimiser and schedule are rebuilt without them.

        For a newcomer that grows with a published Global-LiGO as it is
        (:mod:`fedgrow_core.late_joiner`); the Local-LiGO and head keep training.
        """
        for param in self.model.operator.global_.parameters():
            param.requires_grad_(False)
        self.trainable_params = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        self.optimizer = torch.optim.AdamW(growth_param_groups(self.model, self.run))
        self.scheduler = growth_schedule(self.optimizer, self.run)

    def evaluate_round(self) -> float:
        """Accuracy of the grown model as it is now on the per-round test rows (no materialisation)."""
        return evaluate(self.model, self._round_test, self.device).accuracy

    def grown_model(self) -> nn.Module:
        """The grown model as an ordinary family model on this client's device (weights materialised now)."""
        return self.model.to_family_model().to(self.device)

    def evaluate(self) -> EvalResult:
        """The grown model (as it is now, before fine-tuning) on this client's test rows."""
        return evaluate(self.grown_model(), self._test, self.device)

    def finetune_and_evaluate(
        self, global_state: dict[str, Tensor], out_dir: str | Path | None, owner: Mapping[str, str] | None = None
    ) -> dict:
        """Materialise the grown model, fine-tune it locally, evaluate it on the client's test split, save it.

        ``finetune_steps`` AdamW steps at ``lr_finetune`` on all target weights;
        saved in the family's own format (BERT: ``save_pretrained`` and the
        tokenizer; ViT: ``timm.models.save_for_hf``), atomically
        (:func:`~fedgrow_core.clients.model_export.save_model`, recording
        ``owner``, the run that saves it), unless ``out_dir`` is ``None``.

        Returns
        -------
        dict
            ``num-examples`` (test rows), ``accuracy``, ``grown-accuracy`` (the
            grown model before fine-tuning, same rows), ``precision`` (macro),
            ``loss``, ``trainable-params`` (growth phase: operators + head),
            ``model-params`` (the grown model's), ``finetune-seconds``, ``eval-seconds`` (all test rows),
            ``compute-threads``.

        Raises
        ------
        NonFiniteModel
            If the fine-tuned model or its test loss is not finite; nothing is saved.
        """
        self.load_global_state(global_state)
        grown = self.grown_model()
        before = evaluate(grown, self._test, self.device)
        start = time.perf_counter()
        if self.run.finetune_steps:
            optimizer = torch.optim.AdamW(
                grown.parameters(), lr=self.run.lr_finetune, weight_decay=self.run.weight_decay
            )
            train_steps(grown, self._batches, optimizer, self.run.finetune_steps, self.device)
        seconds = time.perf_counter() - start
        check_finite(grown, "fine-tuned grown model")
        start = time.perf_counter()
        result = evaluate(grown, self._test, self.device)
        eval_seconds = time.perf_counter() - start
        if not math.isfinite(result.loss):
            raise NonFiniteModel(f"the fine-tuned grown model's test loss is {result.loss}; not saved or reported")
        metrics = {"num-examples": result.num_examples, "accuracy": result.accuracy, "precision": result.precision}
        if out_dir is not None:
            target, small = self.run.target_shape, self.small.family.shape(self.small.model)
            path = (
                f"one private LiGO {small} -> {target}"
                if self.independent
                else f"a Dual-LiGO: Local-LiGO {small} -> {self.run.intermediate_shape}, Global-LiGO -> {target}"
            )
            origin = (
                f"grown from `{Path(self.setup.model_name).name}` through {path}, trained "
                f"{self.run.num_server_rounds} rounds x {self.run.local_steps} steps, then fine-tuned "
                f"{self.run.finetune_steps} steps"
            )
            card = client_model_card(self.setup, f"Grown {target} {self.small.family.name} classifier", origin, metrics)
            config = self.model.target_config
            names = self.setup.label_names
            save_model(self.small.family, grown, config, self.small.preprocessor, out_dir, owner, names, card)
        return {
            "num-examples": result.num_examples,
            "accuracy": result.accuracy,
            "grown-accuracy": before.accuracy,
            "precision": result.precision,
            "loss": result.loss,
            "trainable-params": self.trainable_params,
            "model-params": sum(p.numel() for p in grown.parameters()),
            "finetune-seconds": seconds,
            "eval-seconds": eval_seconds,
            "compute-threads": torch.get_num_threads(),
        }
