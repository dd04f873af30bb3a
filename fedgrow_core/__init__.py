"""FedGrow core: LiGO / Dual-LiGO growth of transformers, without Flower.

Shen et al., "Federating to Grow Transformers with Constrained Resources without
Model Sharing" (arXiv 2406.13450); Wang et al., "Learning to Grow Pretrained
Models for Efficient Transformer Training" (ICLR 2023).
"""

from .accounting import GrowthAccounting, count_parameters, growth_accounting, tensor_bytes
from .expansion import Expansion
from .families import FAMILIES, ModelFamily, get_family
from .grown_model import GrownModel
from .ligo import LAYER_PARAMS, SPACES, DualLiGO, LiGO, apply_growth
from .shapes import TransformerShape, validate_growth

__all__ = [
    "FAMILIES",
    "LAYER_PARAMS",
    "SPACES",
    "DualLiGO",
    "Expansion",
    "GrowthAccounting",
    "GrownModel",
    "LiGO",
    "ModelFamily",
    "TransformerShape",
    "apply_growth",
    "count_parameters",
    "get_family",
    "growth_accounting",
    "tensor_bytes",
    "validate_growth",
]
