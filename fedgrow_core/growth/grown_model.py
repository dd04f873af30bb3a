"""A client's grown model: frozen small weights -> (Dual-)LiGO -> target forward."""

from __future__ import annotations

import copy
import logging
import weakref
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn
from torch.func import functional_call

from fedgrow_core.growth.families import ModelFamily
from fedgrow_core.growth.ligo import LAYER_PARAMS, DualLiGO, LiGO, grow_tensor
from fedgrow_core.growth.linear_chain import INPUT_READERS, LINEAR_KINDS, GrownLinear, grow_linear_stack
from fedgrow_core.growth.preservation import operator_width_gaps, probe_gap
from fedgrow_core.growth.template_cache import TEMPLATE_LOCK, target_template

log = logging.getLogger(__name__)

#: The factored copy of each meta template, and its slots (shared as the meta template is).
_FACTORED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class TensorStore(nn.Module):
    """Named tensors held as non-persistent buffers (they move with ``.to()``).

    Used for the frozen small-model weights and the target template's buffers:
    they follow the module's device but never enter its ``state_dict``.
    """

    def __init__(self, tensors: Mapping[str, Tensor]) -> None:
        super().__init__()
        self._names = list(tensors)
        for i, name in enumerate(self._names):
            self.register_buffer(f"t{i}", tensors[name].detach().clone(), persistent=False)

    def as_dict(self) -> dict[str, Tensor]:
        """The tensors under their original names."""
        return {name: getattr(self, f"t{i}") for i, name in enumerate(self._names)}


class GrownModel(nn.Module):
    """Grow a frozen small model through a LiGO or Dual-LiGO operator and run it.

    The small model's weights are copied once into non-trainable buffers; every
    forward grows the target weights from them inside the autograd graph and runs
    a target-shaped module (kept on the ``meta`` device, so it holds no weights)
    with :func:`torch.func.functional_call`. For families that name their linear
    layers (:meth:`ModelFamily.linear_module`: BERT, ViT), those layers are
    :class:`~fedgrow_core.growth.linear_chain.GrownLinear` stand-ins that apply the
    width factors not worth materialising for the batch to the activations
    instead (:mod:`fedgrow_core.growth.linear_chain`); the logits and gradients are those
    of the materialised weights. Gradients reach only the operator(s) and the
    task head. ``state_dict()`` holds exactly the operator and head tensors.

    Parameters
    ----------
    family : ModelFamily
        Adapter of the small model's family.
    small_model : torch.nn.Module
        The client's pre-trained small model; never modified.
    operator : LiGO or DualLiGO
        Growth operator whose ``source`` is the small model's shape.
    num_labels : int
        Number of classes of the task head ``Linear(D_target, num_labels)``.
        When the small model has a head of that many classes, the head starts
        as the small head read through the residual input side
        (``W_head B_res^T``), so the grown model starts from the small model's
        predictions wherever growth keeps its features; otherwise it is
        initialised as the family initialises its own classifier.

    Notes
    -----
    The target templates are built once per process and target
    (:mod:`~fedgrow_core.growth.template_cache`, which replays the random draws of
    the build so that the random stream goes on as if each model had built its
    own) and shared by the grown models of that target: a forward holds
    :data:`~fedgrow_core.growth.template_cache.TEMPLATE_LOCK` and sets the
    templates' training mode to its model's first, so forwards in one process
    run one at a time.

    The grown weights (in factored form, the partly grown ones) are computed in
    float32 with autocast disabled, and the width factors left for the
    activations run in float32 too (:mod:`fedgrow_core.growth.linear_chain`); only the
    target model's forward runs under the caller's autocast (e.g. bf16 on
    CUDA). bf16 cannot represent ``1 + 1e-3``, so materialising under autocast
    would lose the small updates of depth coefficients and width matrices.
    A width growth that is not exact at initialisation
    (:func:`~fedgrow_core.growth.preservation.width_gaps`) is logged as one warning that
    names every dimension of both operators (e.g. ``hidden 384 -> 480``) and gives the
    measured max |difference| of the final features on a random probe batch
    (:func:`~fedgrow_core.growth.preservation.probe_gap`); the reasons are logged at DEBUG.

    Raises
    ------
    ValueError
        If the operator's source shape is not the small model's shape, or
        ``num_labels < 1``; checked before the target template is allocated.
    """

    def __init__(
        self,
        family: ModelFamily,
        small_model: nn.Module,
        operator: LiGO | DualLiGO,
        num_labels: int,
    ) -> None:
        shape = family.shape(small_model)
        if operator.source != shape:
            raise ValueError(
                f"the operator grows from {operator.source}, but the small {family.name} model has shape {shape}"
            )
        if not isinstance(num_labels, int) or num_labels < 1:
            raise ValueError(f"num_labels must be a positive integer, got {num_labels!r}")
        super().__init__()
        self.family = family
        self.operator = operator
        self.target_config = family.target_config(small_model, operator.target, num_labels, operator.norm_scale)
        embed, layers = family.extract(small_model)
        self.small_embed = TensorStore(embed)
        self.small_layers = TensorStore(layers)
        self._embed_spaces = family.embed_spaces(embed)

        gaps = operator_width_gaps(operator, family.norm_position)

        w_name, b_name = family.head_names()
        small_sd = small_model.state_dict()
        grows_head = small_sd.get(w_name, torch.empty(0)).shape == (num_labels, shape.hidden)
        if grows_head:  # no weight of the template is read: its structure, kept per process (template_cache)
            kept = target_template(family, self.target_config)
            template, buffers = kept.module, kept.buffers
        else:  # the head starts as the family's own initialisation: this build's
            template = family.build(self.target_config)
            buffers = dict(template.named_buffers())
        self.head = nn.Linear(operator.target.hidden, num_labels)
        with torch.no_grad():
            if grows_head:
                chains = operator.width_chains()
                self.head.weight.copy_(grow_tensor(small_sd[w_name].float(), (None, ("res", "in")), chains))
                self.head.bias.copy_(small_sd[b_name])
            else:
                sd = template.state_dict()
                self.head.weight.copy_(sd[w_name])
                self.head.bias.copy_(sd[b_name])
        self.template_buffers = TensorStore(buffers)
        if not grows_head:
            template = template.to("meta")
        # Not submodules: their parameters live on "meta" and are always replaced; they may be shared with the
        # process's other grown models of this target (template_cache), so a forward sets their mode first.
        self._template = [template]
        self._factored = self._factored_template(family, operator.target.layers)
        if gaps:
            try:
                with torch.random.fork_rng():  # measuring must not change the run's random stream
                    bound = f"{probe_gap(family, small_model, self.to_family_model()):.3g}"
            except NotImplementedError:  # a family that has no probe batch
                bound = "not measured"
            log.warning(
                "width growth of this %s model is not exact at initialisation (%s); measured: max |diff| %s of "
                "the final features on a random probe batch (width and depth growth together); why: docs/method.md, "
                "'What growth preserves'",
                family.name,
                ", ".join(gap.split(":")[0] for gap in gaps),
                bound,
            )
            log.debug("width growth of this %s model: %s", family.name, "; ".join(gaps))

    def _factored_template(self, family: ModelFamily, layers: int) -> dict[tuple[str, int], tuple[GrownLinear, int]]:
        """A second meta template whose linear layers are :class:`GrownLinear`: a copy of the first.

        Copying the meta template holds no weights and costs a fraction of
        building the family's model again; grown models that share their first
        template (:mod:`~fedgrow_core.growth.template_cache`) share this one too.
        Returns its slots, ``(kind, layer) -> (module, part)`` (empty when the
        family names no linear modules); kinds that share a fused module get its
        parts in :data:`~fedgrow_core.growth.linear_chain.LINEAR_KINDS` order.
        """
        if family.linear_module(LINEAR_KINDS[0], 0) is None:
            return {}
        with TEMPLATE_LOCK:
            kept = _FACTORED.get(self._template[0])
            if kept is None:
                template = copy.deepcopy(self._template[0])
                slots = {}
                for i in range(layers):
                    names: dict[str, list[str]] = {}
                    for kind in LINEAR_KINDS:
                        names.setdefault(family.linear_module(kind, i), []).append(kind)
                    for name, kinds in names.items():
                        linear = template.get_submodule(name)
                        module = GrownLinear(linear.in_features, linear.out_features, parts=len(kinds))
                        template.set_submodule(name, module)
                        slots.update({(kind, i): (module, part) for part, kind in enumerate(kinds)})
                kept = _FACTORED[self._template[0]] = (template, slots)
        self._template.append(kept[0])
        return kept[1]

    def train(self, mode: bool = True) -> GrownModel:
        """Set training mode here and in the target templates (dropout; :meth:`forward` sets theirs again)."""
        super().train(mode)
        for template in self._template:
            template.train(mode)
        return self

    def grown_state_dict(self, embed: Mapping[str, Tensor] | None = None) -> dict[str, Tensor]:
        """Materialise the target model's state dict (differentiable).

        Parameters
        ----------
        embed : mapping, optional
            Source ``embed`` tensors to grow instead of the small model's own,
            e.g. only the embedding rows a batch reads
            (:meth:`ModelFamily.batch_rows`). Default: the whole tables.

        Returns
        -------
        dict
            Every parameter of the family's target classifier, shapes of the target
            shape (embedding tables with the rows of ``embed``), with the task head
            included.
        """
        small_embed = self.small_embed.as_dict() if embed is None else embed
        # fp32, whatever autocast the caller runs under (class Notes)
        with torch.autocast(next(iter(small_embed.values())).device.type, enabled=False):
            grown, layers = self.operator.grow(small_embed, self.small_layers.as_dict(), self._embed_spaces)
        return self._with_head(grown, layers)

    def _with_head(self, grown: Mapping[str, Tensor], layers: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """The family state dict of grown canonical tensors, with the task head."""
        sd = self.family.to_state_dict(grown, layers)
        w_name, b_name = self.family.head_names()
        sd[w_name], sd[b_name] = self.head.weight, self.head.bias
        return sd

    def forward(self, *args: Any, **kwargs: Any) -> Tensor:
        """Logits of the grown model, ``(batch, num_labels)``.

        Takes the family model's own inputs (``input_ids``, ``attention_mask``, ...
        for BERT; an image batch ``(B, C, H, W)`` for ViT). Only the embedding
        rows the batch reads are grown (:meth:`ModelFamily.batch_rows`): the
        same logits and gradients as growing whole tables, without a
        vocabulary-sized product per step.
        """
        embed, kwargs = self.family.batch_rows(self.small_embed.as_dict(), kwargs, self.target_config)
        tokens = self.family.tokens(args, kwargs, self.target_config)
        if not self._factored or tokens is None:
            tensors = {**self.grown_state_dict(embed), **self.template_buffers.as_dict()}
            with TEMPLATE_LOCK:
                out = functional_call(self._template[0].train(self.training), tensors, args, kwargs, strict=True)
            return self.family.logits(out)
        slots = self._factored
        sd, linears = self._grow_factored(embed, tokens)
        tensors = {**sd, **self.template_buffers.as_dict()}
        with TEMPLATE_LOCK:  # the factors are set on the (possibly shared) template for this forward only
            for kind, factors in linears.items():
                for i, f in enumerate(factors):
                    module, part = slots[kind, i]
                    module.factors[part] = f
            try:
                out = functional_call(self._template[1].train(self.training), tensors, args, kwargs, strict=True)
            finally:
                for module, _ in slots.values():
                    module.clear()
        return self.family.logits(out)

    def _grow_factored(self, embed: Mapping[str, Tensor], tokens: int) -> tuple[dict[str, Tensor], dict]:
        """Grown tensors of the factored template, and the linear layers' factors for ``tokens`` tokens.

        Every weight is grown as in :meth:`grown_state_dict` except the
        linear layers' weights, which :func:`~fedgrow_core.growth.linear_chain.grow_linear_stack`
        grows only as far as is cheapest for this batch.
        """
        weights = [f"{kind}.weight" for kind in LINEAR_KINDS]
        with torch.autocast(next(iter(embed.values())).device.type, enabled=False):
            chains = self.operator.width_chains()
            grown, layers = self.operator.grow(embed, self.small_layers.as_dict(), self._embed_spaces, weights)
            linears = {}
            inputs: dict = {}
            for kind in LINEAR_KINDS:
                (out_space, _), (in_space, _) = LAYER_PARAMS[f"{kind}.weight"]
                linears[kind] = grow_linear_stack(
                    layers.pop(f"{kind}.weight"),
                    layers.pop(f"{kind}.bias", None),
                    chains[out_space],
                    chains[in_space],
                    tokens,
                    inputs=inputs,
                    space=in_space,
                    readers=INPUT_READERS.get(kind, 1),
                )
        return self._with_head(grown, layers), linears

    @torch.no_grad()
    def to_family_model(self) -> nn.Module:
        """An ordinary family model (``BertForSequenceClassification`` / timm ViT).

        Its weights are the materialised grown weights, detached; it loads with
        ``strict=True``.
        """
        model = self.family.build(self.target_config)
        model.load_state_dict({k: v.detach() for k, v in self.grown_state_dict().items()}, strict=True)
        return model.eval()

    def save_pretrained(self, path: str | Path) -> None:
        """Save the grown model in the family's own format (see ``family.save``)."""
        self.family.save(self.to_family_model(), self.target_config, path)
