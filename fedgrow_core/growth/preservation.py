"""What a LiGO operator keeps of the small model's function at initialisation, and measuring it.

Width growth (LEMON, Wang et al., "Lossless model expansion", ICLR 2024, Sec. 4.1)
is exact at initialisation, with the operator of :mod:`fedgrow_core.growth.ligo`, for:

* **pre-LN models** (timm ViT) at every width the config accepts: the residual
  stream is grown by average expansion (copies, then mean rows) and LayerNorm
  weights are rescaled (:func:`~fedgrow_core.growth.expansion.residual_selection`);
* **post-LN models** (BERT) when the target hidden size is a multiple of the
  source's. There the LayerNorm output *is* the residual stream. A linear width
  map ``A`` keeps ``LN(A z) = A LN(z)`` for all inputs and generic LayerNorm
  gains only if every row of ``A`` is a one-hot copy and every source feature
  is copied equally often, which needs ``d2 = k d1``; mean rows cannot stay
  means after a LayerNorm. This is a limit of every linear width operator, not
  of the initialisation.
* **head dimension**: exact when it is kept or grows at least twofold (the
  extra key rows rescale the logits, :func:`~fedgrow_core.growth.expansion.head_selection`);
  a growth by a factor in ``(1, 2)`` leaves logits scaled by
  ``sqrt(d_head / d_head')``.

Depth growth with ``depth_init="identity"`` is exact for pre-LN models (a new
block with zero residual-branch outputs is the identity). For post-LN BERT a
new layer still applies its LayerNorms to the residual stream, ``LN(h) != h``,
so no depth initialisation of this form preserves the function; LiGO (Wang et
al. 2023) promises nothing for depth either.

:func:`width_gaps` and :func:`depth_gaps` name what is not exact before any
tensor is allocated; :func:`feature_gap` measures it, and :func:`probe_gap` measures
it on a random probe batch (what :class:`~fedgrow_core.growth.grown_model.GrownModel`'s
warning reports).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from fedgrow_core.growth.ligo import DualLiGO, LiGO
from fedgrow_core.growth.shapes import TransformerShape

if TYPE_CHECKING:
    from fedgrow_core.growth.families.base import ModelFamily


def width_gaps(source: TransformerShape, target: TransformerShape, norm_position: str) -> list[str]:
    """Reasons why width growth ``source -> target`` is not exact at initialisation (empty: exact).

    Parameters
    ----------
    source, target : TransformerShape
        One growth step (Local-LiGO or Global-LiGO).
    norm_position : {"pre", "post"}
        The family's LayerNorm placement (``ModelFamily.norm_position``).

    Returns
    -------
    list of str
        One message per dimension, ``"<dimension> <from> -> <to>: <reason>"``
        (e.g. ``"hidden 384 -> 480: a post-LN model keeps ..."``).
    """
    gaps = []
    if norm_position == "post" and target.hidden % source.hidden:
        gaps.append(
            f"hidden {source.hidden} -> {target.hidden}: a post-LN model keeps its function only when the "
            f"target hidden size is a multiple of the source's (e.g. {2 * source.hidden})"
        )
    if source.head_dim < target.head_dim < 2 * source.head_dim:
        gaps.append(
            f"head_dim {source.head_dim} -> {target.head_dim}: attention logits are exact only when the head "
            f"dimension is kept or grows at least twofold; here they shrink by "
            f"sqrt({source.head_dim}/{target.head_dim})"
        )
    return gaps


def operator_width_gaps(operator: LiGO | DualLiGO, norm_position: str) -> list[str]:
    """:func:`width_gaps` of every growth step of ``operator``, in order (empty: exact).

    Parameters
    ----------
    operator : LiGO or DualLiGO
        One LiGO, or a Dual-LiGO: its Local-LiGO's gaps, then its Global-LiGO's.
    norm_position : {"pre", "post"}
        The family's LayerNorm placement (``ModelFamily.norm_position``).

    Returns
    -------
    list of str
        The messages of :func:`width_gaps`.
    """
    legs = (operator.local, operator.global_) if isinstance(operator, DualLiGO) else (operator,)
    return [gap for leg in legs for gap in width_gaps(leg.source, leg.target, norm_position)]


def depth_gaps(depth_init: str, source_layers: int, target_layers: int, norm_position: str) -> list[str]:
    """Reasons why depth growth is not exact at initialisation (empty: exact)."""
    if source_layers == target_layers:  # every depth init is then the identity matrix
        return []
    if depth_init != "identity":
        return [f"layers {source_layers} -> {target_layers}: depth-init {depth_init!r} copies layers (not exact)"]
    if norm_position == "post":
        return [f"layers {source_layers} -> {target_layers}: a new post-LN layer applies LayerNorm to the stream"]
    return []


@torch.no_grad()
def feature_gap(small_features: Tensor, grown_features: Tensor) -> float:
    """Max |difference| of the grown model's final features on the source coordinates.

    Parameters
    ----------
    small_features : torch.Tensor
        ``(..., D_s)`` final token features of the small model (after its final
        LayerNorm), e.g. ``(batch, tokens, D_s)``.
    grown_features : torch.Tensor
        ``(..., D_t)`` the same of the grown model; the residual stream keeps the
        source coordinates first (the ``res`` space is not permuted).

    Returns
    -------
    float
        ``max |grown[..., :D_s] - small|``.
    """
    d = small_features.shape[-1]
    return float((grown_features[..., :d].float() - small_features.float()).abs().max())


@torch.no_grad()
def probe_gap(family: ModelFamily, small: nn.Module, grown: nn.Module, seed: int = 0) -> float:
    """Max |difference| of final features (source coordinates) between ``small`` and ``grown`` on a probe batch.

    Parameters
    ----------
    family : ModelFamily
        The models' family: its ``probe_inputs`` and ``final_features``.
    small : nn.Module
        The small model.
    grown : nn.Module
        The grown model as an ordinary family model (``GrownModel.to_family_model()``).
    seed : int
        Seed of the family's ``probe_inputs``.

    Returns
    -------
    float
        :func:`feature_gap` on the probe batch (both models in eval mode, CPU).

    Raises
    ------
    NotImplementedError
        If the family does not implement ``probe_inputs`` or ``final_features``.
    """
    args, kwargs = family.probe_inputs(small, torch.Generator().manual_seed(seed))
    was_training = small.training
    small.eval()
    try:
        ref = family.final_features(small, *args, **kwargs)
        return feature_gap(ref, family.final_features(grown.eval(), *args, **kwargs))
    finally:
        small.train(was_training)
