"""The interface a model family implements to be grown by LiGO."""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import Tensor, nn

from fedgrow_core.growth.ligo import AxisSpec
from fedgrow_core.growth.shapes import TransformerShape


class ModelFamily(ABC):
    """Thin adapter between a model family and LiGO's canonical weights.

    Canonical weights are two dicts: ``embed`` (non-layer tensors named as in the
    family's own state dict, with an :data:`~fedgrow_core.growth.ligo.AxisSpec` each from
    :meth:`embed_spaces`) and ``layers`` (per-layer tensors stacked ``(L, ...)``,
    keyed by :data:`~fedgrow_core.growth.ligo.LAYER_PARAMS`).
    """

    name: str
    #: Python lines that load a folder :meth:`save` wrote with the family's library alone (``{path}``: the folder);
    #: a saved model's card shows them.
    load_example: str = "# a {name} model: load it with the library that saved it (ModelFamily.load)"
    #: ``"pre"`` (LayerNorm before each sublayer, residual stream never normalised:
    #: timm ViT) or ``"post"`` (LayerNorm after each residual sum: BERT). Decides
    #: what width and depth growth can preserve (:mod:`fedgrow_core.growth.preservation`).
    norm_position: str

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """Whether this family grows ``model`` (:func:`~fedgrow_core.growth.families.family_for` asks each in turn).

        The default, ``False``, leaves the family to be named explicitly (:func:`get_family`).
        """
        return False

    def probe_inputs(self, model: nn.Module, generator: torch.Generator) -> tuple[tuple, dict]:
        """A small random batch of ``model``'s inputs, to measure what growth preserves.

        Returns
        -------
        tuple of (tuple, dict)
            Positional and keyword inputs of the model's forward.

        Raises
        ------
        NotImplementedError
            The default: the family measures nothing (growth then only logs why it is not exact).
        """
        raise NotImplementedError(f"model family {self.name!r} has no probe inputs")

    def final_features(self, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        """Final token features ``(batch, tokens, D)`` of ``model`` (after its final LayerNorm) on an input batch.

        Raises
        ------
        NotImplementedError
            The default (see :meth:`probe_inputs`).
        """
        raise NotImplementedError(f"model family {self.name!r} has no final features")

    @abstractmethod
    def shape(self, model: nn.Module) -> TransformerShape:
        """Shape of ``model``'s encoder."""

    @abstractmethod
    def extract(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Canonical ``(embed, layers)`` weights of ``model`` (detached copies)."""

    @abstractmethod
    def embed_spaces(self, embed: Mapping[str, Tensor]) -> dict[str, AxisSpec]:
        """Axis spec of every tensor in ``embed``."""

    def batch_rows(self, embed: Mapping[str, Tensor], kwargs: dict[str, Any], config: Any) -> tuple[dict, dict]:
        """The source embedding rows one batch reads, and the batch's inputs re-indexed onto them.

        Growing only these rows gives the same logits and the same gradients as
        growing the whole tables and indexing them (a row's growth does not
        depend on the other rows). The default reads every row unchanged.

        Parameters
        ----------
        embed : mapping
            Canonical source ``embed`` tensors (:meth:`extract`).
        kwargs : dict
            The batch's keyword inputs to the target model's forward.
        config : Any
            The target configuration (:meth:`target_config`).

        Returns
        -------
        tuple of (dict, dict)
            ``embed`` with some tables replaced by the rows the batch reads, and
            ``kwargs`` with ids that index those rows.
        """
        return dict(embed), kwargs

    def linear_module(self, kind: str, layer: int) -> str | None:
        """Name of the target classifier's ``nn.Linear`` that computes a linear layer kind.

        Families that name it let :class:`~fedgrow_core.growth.grown_model.GrownModel`
        evaluate those layers in factored form (:mod:`fedgrow_core.growth.linear_chain`).
        Kinds that share one fused module (timm's ``attn.qkv`` computes
        ``attn.q``, ``attn.k`` and ``attn.v``) return the same name; its output
        is their outputs concatenated in :data:`~fedgrow_core.growth.linear_chain.LINEAR_KINDS`
        order. The default, ``None``, materialises every grown weight.

        Parameters
        ----------
        kind : str
            A linear kind without ``.weight`` (``"attn.q"``, ..., ``"ffn.out"``).
        layer : int
            Target layer index.

        Returns
        -------
        str or None
            A dotted module name in the classifier :meth:`build` returns, or
            ``None`` (the default) when the family has no such module.
        """
        return None

    def tokens(self, args: tuple, kwargs: dict[str, Any], config: Any) -> int | None:
        """Vectors each linear layer is applied to for a batch.

        Parameters
        ----------
        args, kwargs : tuple, dict
            The batch's inputs to the target model's forward (after :meth:`batch_rows`).
        config : Any
            The target configuration (:meth:`target_config`).

        Returns
        -------
        int or None
            Tokens (batch x sequence), which :func:`~fedgrow_core.growth.linear_chain.plan_linear`
            plans for; ``None`` (the default) materialises every grown weight.
        """
        return None

    @abstractmethod
    def target_config(
        self, model: nn.Module, target: TransformerShape, num_labels: int, norm_scale: float = 1.0
    ) -> Any:
        """Configuration of the target model: ``model``'s, with ``target``'s shape.

        ``norm_scale`` is the growth's LayerNorm weight factor
        (:func:`~fedgrow_core.growth.expansion.residual_selection`): the target's
        LayerNorm epsilon is the source's times ``norm_scale**2``, so that
        ``sqrt(var' + eps')`` is exactly ``norm_scale * sqrt(var + eps)``.
        """

    @abstractmethod
    def build(self, config: Any) -> nn.Module:
        """A randomly initialised target classifier from :meth:`target_config`."""

    def build_key(self, config: Any) -> str | None:
        """Text naming everything :meth:`build` reads of ``config``, and what the built model reads when it runs.

        Two configurations with the same key must build the same model
        (structure, buffers, and the random draws of its initialisation) and run
        it the same way: :mod:`~fedgrow_core.growth.template_cache` builds a key's
        template once per process and shares it. The default is the whole
        configuration (a transformers config's JSON, else a dict's); a family
        whose configuration carries what neither reads (e.g. each client's input
        statistics) leaves it out.

        Parameters
        ----------
        config : Any
            A configuration :meth:`target_config` returned.

        Returns
        -------
        str or None
            The key; ``None`` when no reliable text can be made (then every
            template is built, none shared).
        """
        try:
            if hasattr(config, "to_json_string"):
                return config.to_json_string()
            return json.dumps(config, sort_keys=True)
        except (TypeError, ValueError):  # not plain JSON data: no key
            return None

    @abstractmethod
    def to_state_dict(self, embed: Mapping[str, Tensor], layers: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Family state dict (without task head) from grown canonical weights."""

    @abstractmethod
    def head_names(self) -> tuple[str, str]:
        """State-dict names of the task head's weight and bias."""

    @abstractmethod
    def logits(self, output: Any) -> Tensor:
        """Logits ``(batch, num_labels)`` from the model's forward output."""

    def with_labels(self, config: Any, label_names: list[str]) -> Any:
        """``config`` carrying the class names, by class index, so that :meth:`save` writes them.

        The default returns ``config`` unchanged (the family saves no names).
        """
        return config

    @abstractmethod
    def save(self, model: nn.Module, config: Any, path: str | Path) -> None:
        """Save a built target model in its library's own checkpoint format.

        The folder loads with that library alone, no project code
        (``transformers``' ``from_pretrained``, ``timm.create_model("local-dir:...")``),
        to the same logits.

        Parameters
        ----------
        model : nn.Module
            A model :meth:`build` returns (or one of the same configuration).
        config : Any
            Its :meth:`target_config`.
        path : str or Path
            Folder to write; created if missing.
        """

    @abstractmethod
    def load(self, path: str | Path) -> nn.Module:
        """Load a folder :meth:`save` wrote, with the library's own loader."""
