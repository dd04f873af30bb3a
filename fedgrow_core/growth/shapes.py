"""Transformer shapes and the growth-compatibility checks (no tensors allocated)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TransformerShape:
    """Shape of a transformer encoder, the part that LiGO grows.

    Parameters
    ----------
    layers : int
        Number of transformer blocks (``L``).
    hidden : int
        Residual-stream width (``D``), equal to ``heads * head_dim``.
    ffn : int
        Width of the feed-forward hidden layer (``F``).
    heads : int
        Number of attention heads (``H``).

    Raises
    ------
    ValueError
        If a size is not a positive integer or ``hidden`` is not divisible by
        ``heads``.
    """

    layers: int
    hidden: int
    ffn: int
    heads: int

    def __post_init__(self) -> None:
        for name in ("layers", "hidden", "ffn", "heads"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TransformerShape.{name} must be a positive integer, got {value!r}")
        if self.hidden % self.heads:
            raise ValueError(
                f"TransformerShape: hidden={self.hidden} is not divisible by "
                f"heads={self.heads}; hidden must equal heads * head_dim"
            )

    @property
    def head_dim(self) -> int:
        """Width of one attention head, ``hidden // heads``."""
        return self.hidden // self.heads

    def __str__(self) -> str:
        return f"{self.layers}x{self.hidden} (ffn {self.ffn}, {self.heads} heads)"


def validate_growth(source: TransformerShape, target: TransformerShape) -> None:
    """Check that ``source`` can be grown into ``target`` by a LiGO operator.

    Growth only adds layers, heads, head dimensions and FFN units
    (Wang et al. 2023, Sec. 3: width and depth *expansion*). Each source head is
    kept inside one target head, so both the number of heads and the head
    dimension must not shrink.

    Parameters
    ----------
    source, target : TransformerShape
        Shapes before and after growth.

    Raises
    ------
    ValueError
        Naming every dimension of ``target`` that is smaller than in ``source``.
    """
    problems = []
    for name in ("layers", "hidden", "ffn", "heads", "head_dim"):
        small, large = getattr(source, name), getattr(target, name)
        if large < small:
            problems.append(f"{name} {small} -> {large}")
    if problems:
        raise ValueError(
            f"cannot grow {source} into {target}: growth never shrinks a dimension, "
            f"but {', '.join(problems)}. Heads and head dimension are grown "
            "separately (each source head stays inside one target head), so the "
            "target needs heads >= source heads and head_dim >= source head_dim."
        )
