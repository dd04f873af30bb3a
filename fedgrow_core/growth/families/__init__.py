"""Model families that LiGO can grow, registered by name: ``bert`` (transformers) and ``vit`` (timm) built in.

A family registers where it is defined (:func:`register_family`); importing
this package registers the built-in ones.
"""

from __future__ import annotations

from fedgrow_core.growth.families.base import ModelFamily
from fedgrow_core.growth.families.bert import BertFamily
from fedgrow_core.growth.families.registry import (
    UnknownModelFamilyError,
    family_for,
    family_names,
    get_family,
    register_family,
    unregister_family,
)
from fedgrow_core.growth.families.vit import VitFamily

__all__ = [
    "BertFamily",
    "ModelFamily",
    "UnknownModelFamilyError",
    "VitFamily",
    "family_for",
    "family_names",
    "get_family",
    "register_family",
    "unregister_family",
]
