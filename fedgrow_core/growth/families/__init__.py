"""Model families that LiGO can grow: ``bert`` (transformers) and ``vit`` (timm)."""

from __future__ import annotations

from fedgrow_core.growth.families.base import ModelFamily
from fedgrow_core.growth.families.bert import BertFamily
from fedgrow_core.growth.families.vit import VitFamily

FAMILIES: dict[str, type[ModelFamily]] = {"bert": BertFamily, "vit": VitFamily}


def get_family(name: str) -> ModelFamily:
    """The adapter registered under ``name``.

    Raises
    ------
    ValueError
        For an unknown family, listing the known ones.
    """
    if name not in FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known families: {sorted(FAMILIES)}")
    return FAMILIES[name]()


__all__ = ["FAMILIES", "BertFamily", "ModelFamily", "VitFamily", "get_family"]
