"""FedGrow core: LiGO / Dual-LiGO growth of transformers, without Flower.

Shen et al., "Federating to Grow Transformers with Constrained Resources without
Model Sharing" (arXiv 2406.13450); Wang et al., "Learning to Grow Pretrained
Models for Efficient Transformer Training" (ICLR 2023).
"""

from fedgrow_core.accounting import GrowthAccounting, count_parameters, growth_accounting, tensor_bytes
from fedgrow_core.data.partitions import FederatedData, federate, label_histogram, print_label_histogram
from fedgrow_core.data.preprocessing import ImageTransform, make_dataloader
from fedgrow_core.data.sources import DataSourceError, load_data_source
from fedgrow_core.growth.expansion import Expansion
from fedgrow_core.growth.families import FAMILIES, ModelFamily, get_family
from fedgrow_core.growth.grown_model import GrownModel
from fedgrow_core.growth.ligo import LAYER_PARAMS, SPACES, DualLiGO, LiGO, apply_growth
from fedgrow_core.growth.shapes import TransformerShape, validate_growth
from fedgrow_core.zoo.registry import MODEL_ZOO, MissingAssetError, SmallModel, load_small_model

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
