"""FedGrow core: LiGO / Dual-LiGO growth of transformers, and the federated protocol around it.

The growth engine (``growth``, ``zoo``) does not use Flower; the protocol, run
config and data partitions use Flower's records, config parsing and
``flwr-datasets``, but nothing of a ServerApp, ClientApp or Grid.

Shen et al., "Federating to Grow Transformers with Constrained Resources without
Model Sharing" (arXiv 2406.13450); Wang et al., "Learning to Grow Pretrained
Models for Efficient Transformer Training" (ICLR 2023).
"""

from fedgrow_core.accounting import GrowthAccounting, count_parameters, growth_accounting, tensor_bytes
from fedgrow_core.data.partitions import FederatedData, federate, label_histogram, print_label_histogram
from fedgrow_core.data.preprocessing import ImageTransform, make_dataloader
from fedgrow_core.data.sources import DataSourceError, load_data_source
from fedgrow_core.growth.expansion import Expansion
from fedgrow_core.growth.families import ModelFamily, family_for, family_names, get_family, register_family
from fedgrow_core.growth.grown_model import GrownModel
from fedgrow_core.growth.ligo import LAYER_PARAMS, SPACES, DualLiGO, LiGO, apply_growth
from fedgrow_core.growth.shapes import TransformerShape, validate_growth
from fedgrow_core.zoo.registry import (
    MissingAssetError,
    SmallModel,
    ZooModel,
    load_small_model,
    register_zoo_model,
    zoo_models,
)

__all__ = [
    "LAYER_PARAMS",
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
    "ZooModel",
    "TransformerShape",
    "apply_growth",
    "count_parameters",
    "family_for",
    "family_names",
    "federate",
    "get_family",
    "growth_accounting",
    "label_histogram",
    "load_data_source",
    "load_small_model",
    "make_dataloader",
    "print_label_histogram",
    "register_family",
    "register_zoo_model",
    "tensor_bytes",
    "validate_growth",
    "zoo_models",
]
