"""FedGrow core: LiGO / Dual-LiGO growth of transformers, without Flower.

Shen et al., "Federating to Grow Transformers with Constrained Resources without
Model Sharing" (arXiv 2406.13450); Wang et al., "Learning to Grow Pretrained
Models for Efficient Transformer Training" (ICLR 2023).
"""

from .accounting import GrowthAccounting, count_parameters, growth_accounting, tensor_bytes
from .data_sources import DataSourceError, load_data_source
from .expansion import Expansion
from .families import FAMILIES, ModelFamily, get_family
from .grown_model import GrownModel
from .ligo import LAYER_PARAMS, SPACES, DualLiGO, LiGO, apply_growth
from .partitions import FederatedData, federate, label_histogram, print_label_histogram
from .preprocessing import ImageTransform, make_dataloader
from .shapes import TransformerShape, validate_growth
from .zoo import MODEL_ZOO, MissingAssetError, SmallModel, load_small_model

__all__ = [
    "FAMILIES",
    "LAYER_PARAMS",
    "MODEL_ZOO",
    "SPACES",
    "DataSourceError",
    "DualLiGO",
    "Expansion",
    "FederatedData",
    "GrowthAccounting",
    "GrownModel",
    "ImageTransform",
    "LiGO",
    "MissingAssetError",
    "ModelFamily",
    "SmallModel",
    "TransformerShape",
    "apply_growth",
    "count_parameters",
    "federate",
    "get_family",
    "growth_accounting",
    "label_histogram",
    "load_data_source",
    "load_small_model",
    "make_dataloader",
    "print_label_histogram",
    "tensor_bytes",
    "validate_growth",
]
