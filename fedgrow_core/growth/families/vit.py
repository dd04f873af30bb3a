"""Vision Transformers from ``timm`` (``timm.models.vision_transformer.VisionTransformer``)."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from timm.layers import LayerNorm
from timm.models import save_for_hf
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from fedgrow_core.growth.families.base import ModelFamily
from fedgrow_core.growth.families.registry import register_family
from fedgrow_core.growth.ligo import LAYER_PARAMS, AxisSpec
from fedgrow_core.growth.shapes import TransformerShape

_RES = ("res", "out")
_NORM = ("res", "norm")
#: The timm architecture name used to build targets; every structural argument
#: is passed explicitly, so the name only selects the VisionTransformer class.
ARCHITECTURE = "vit_base_patch16_224"
#: The files ``timm.models.save_for_hf(..., safe_serialization=True)`` writes.
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
#: The LayerNorm epsilon of a ViT that ``timm.create_model`` builds from ``model_args``
#: (``VisionTransformer`` defaults ``norm_layer`` to timm's ``LayerNorm``).
TIMM_NORM_EPS = LayerNorm(1).eps

_EMBED_SPACES: dict[str, AxisSpec] = {
    "patch_embed.proj.weight": (_RES, None, None, None),
    "patch_embed.proj.bias": (_RES,),
    "cls_token": (None, None, _RES),
    "pos_embed": (None, None, _RES),
    "norm.weight": (_NORM,),
    "norm.bias": (_RES,),
    "fc_norm.weight": (_NORM,),
    "fc_norm.bias": (_RES,),
}
_SIMPLE = {
    "attn.o": "attn.proj",
    "attn_norm": "norm1",
    "ffn.in": "mlp.fc1",
    "ffn.out": "mlp.fc2",
    "ffn_norm": "norm2",
}
_QKV = ("attn.q", "attn.k", "attn.v")


def _check_supported(model: nn.Module) -> VisionTransformer:
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"the 'vit' family expects a timm VisionTransformer, got {type(model).__name__}")
    unsupported = []
    if model.cls_token is None:
        unsupported.append("class_token=False")
    if getattr(model, "reg_token", None) is not None:
        unsupported.append("reg_tokens > 0")
    if model.no_embed_class:
        unsupported.append("no_embed_class=True")
    if not isinstance(model.norm_pre, nn.Identity):
        unsupported.append("pre_norm=True")
    blk = model.blocks[0]
    for name in ("ls1", "ls2", "attn.q_norm", "attn.k_norm", "attn.norm", "mlp.norm"):
        if not isinstance(blk.get_submodule(name), nn.Identity):
            unsupported.append(f"blocks.*.{name} (layer scale / qk-norm / scale-norm)")
    if blk.attn.qkv.bias is None:
        unsupported.append("qkv_bias=False")
    if unsupported:
        raise ValueError(
            "the 'vit' family supports the plain timm ViT (cls token, pre-LN blocks, "
            f"qkv bias); this model has: {', '.join(unsupported)}"
        )
    return model


@register_family
class VitFamily(ModelFamily):
    """Plain ViT classifiers via ``timm``.

    The fused ``attn.qkv`` projection is split into canonical ``attn.q/k/v`` and
    fused back on export. The target is built with
    ``timm.create_model(ARCHITECTURE, pretrained=False, **model_args)`` where
    ``model_args`` fixes image size, patch size, channels, pooling and the target
    shape (``mlp_ratio = F / D``); the task head is timm's ``head``. Models are
    saved with ``timm.models.save_for_hf`` and load with
    ``timm.create_model("local-dir:<folder>", pretrained=True)``.
    """

    name = "vit"
    norm_position = "pre"
    load_example = (
        "import timm\n\n"
        'model = timm.create_model("local-dir:{path}", pretrained=True).eval()\n'
        "transform = timm.data.create_transform(**timm.data.resolve_data_config({{}}, model=model))\n"
        'labels = model.pretrained_cfg["label_names"]  # class index -> name'
    )

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """A timm ``VisionTransformer`` (unsupported variants are refused by :meth:`shape` with the reason)."""
        return isinstance(model, VisionTransformer)

    def probe_inputs(self, model: nn.Module, generator: torch.Generator) -> tuple[tuple, dict]:
        """2 standard-normal images at the model's input size."""
        size = tuple(model.patch_embed.img_size)
        return (torch.randn(2, model.patch_embed.proj.in_channels, *size, generator=generator),), {}

    def final_features(self, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        """Timm's ``forward_features`` (tokens after the final norm)."""
        return model.forward_features(*args, **kwargs)

    def shape(self, model: nn.Module) -> TransformerShape:
        """Shape from the blocks: depth, ``embed_dim``, ``fc1`` width, heads."""
        vit = _check_supported(model)
        blk = vit.blocks[0]
        return TransformerShape(len(vit.blocks), vit.embed_dim, blk.mlp.fc1.out_features, blk.attn.num_heads)

    def extract(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Canonical weights; see :class:`~fedgrow_core.growth.families.base.ModelFamily`."""
        vit = _check_supported(model)
        sd = {k: v.detach().clone() for k, v in vit.state_dict().items()}
        embed = {k: sd[k] for k in _EMBED_SPACES if k in sd}
        n, d = len(vit.blocks), vit.embed_dim
        layers: dict[str, list[Tensor]] = {kind: [] for kind in LAYER_PARAMS}
        for i in range(n):
            for param in ("weight", "bias"):
                qkv = sd[f"blocks.{i}.attn.qkv.{param}"]
                for j, kind in enumerate("qkv"):
                    layers[f"attn.{kind}.{param}"].append(qkv[j * d : (j + 1) * d])
            for kind, name in _SIMPLE.items():
                for param in ("weight", "bias"):
                    layers[f"{kind}.{param}"].append(sd[f"blocks.{i}.{name}.{param}"])
        return embed, {k: torch.stack(v) for k, v in layers.items()}

    def embed_spaces(self, embed: Mapping[str, Tensor]) -> dict[str, AxisSpec]:
        """Residual-stream spaces of patch embedding, tokens and final norms."""
        return {k: _EMBED_SPACES[k] for k in embed}

    def linear_module(self, kind: str, layer: int) -> str | None:
        """``blocks.<i>.attn.qkv`` for ``attn.q/k/v`` (one fused module), else ``blocks.<i>.<module>``."""
        return f"blocks.{layer}.{'attn.qkv' if kind in _QKV else _SIMPLE[kind]}"

    def tokens(self, args: tuple, kwargs: dict[str, Any], config: dict) -> int | None:
        """``B * (patches + 1)`` for an image batch ``(B, C, H, W)`` (the class token included).

        The image is the forward's first positional argument or ``x``; ``None``
        when neither is a 4-d tensor.
        """
        x = args[0] if args else kwargs.get("x")
        if not isinstance(x, Tensor) or x.dim() != 4:
            return None
        ph, pw = config["model_args"]["patch_size"]
        return x.shape[0] * ((x.shape[-2] // ph) * (x.shape[-1] // pw) + 1)

    def target_config(
        self, model: nn.Module, target: TransformerShape, num_labels: int, norm_scale: float = 1.0
    ) -> dict:
        """``timm.create_model`` arguments of the target, its LayerNorm epsilon and preprocessing.

        Parameters
        ----------
        model : nn.Module
            The source timm ``VisionTransformer``.
        target : TransformerShape
            Target depth, width, FFN width and heads (``mlp_ratio = ffn / hidden``).
        num_labels : int
            Classes of the target's ``head``.
        norm_scale : float
            The growth's LayerNorm weight factor; ``norm_eps`` is the source's
            epsilon times ``norm_scale**2``.

        Returns
        -------
        dict
            JSON-serialisable: ``architecture`` (timm name), ``norm_eps``,
            ``model_args`` (``timm.create_model`` keyword arguments; image and
            patch sizes in pixels) and ``data_config`` (per-channel ``mean`` and
            ``std`` of inputs in [0, 1], the source's normalisation as
            ``timm.data.resolve_input_data_config`` resolves it from its
            ``pretrained_cfg``; the target reads the same images).

        Raises
        ------
        ValueError
            If ``model`` is not a plain timm ViT (see the class docstring).
        """
        vit = _check_supported(model)
        pe = vit.patch_embed
        source = timm.data.resolve_input_data_config(vit, args=_channel_stats(vit))
        return {
            "architecture": ARCHITECTURE,
            "norm_eps": vit.norm.eps * norm_scale**2,
            "data_config": {"mean": list(source["mean"]), "std": list(source["std"])},
            "model_args": {
                "img_size": list(pe.img_size),
                "patch_size": list(pe.patch_size),
                "in_chans": pe.proj.in_channels,
                "embed_dim": target.hidden,
                "depth": target.layers,
                "num_heads": target.heads,
                "mlp_ratio": target.ffn / target.hidden,
                "qkv_bias": True,
                "class_token": True,
                "global_pool": vit.global_pool,
                "num_classes": num_labels,
            },
        }

    def build_key(self, config: dict) -> str:
        """What :meth:`build` reads of ``config``: ``architecture``, ``model_args`` and ``norm_eps``.

        ``data_config`` (the source's input statistics, each client's own) is
        left out; the timm model reads nothing else when it runs.

        Parameters
        ----------
        config : dict
            A configuration :meth:`target_config` returned.

        Returns
        -------
        str
            Those three entries as JSON, keys sorted.
        """
        return json.dumps({k: config.get(k) for k in ("architecture", "model_args", "norm_eps")}, sort_keys=True)

    def build(self, config: dict) -> nn.Module:
        """``timm.create_model(architecture, pretrained=False, **model_args)``, LayerNorm eps ``norm_eps``."""
        args = dict(config["model_args"])
        args["img_size"], args["patch_size"] = tuple(args["img_size"]), tuple(args["patch_size"])
        model = timm.create_model(config["architecture"], pretrained=False, **args)
        if "norm_eps" in config:
            for module in model.modules():
                if isinstance(module, nn.LayerNorm):
                    module.eps = config["norm_eps"]
        return model

    def to_state_dict(self, embed: Mapping[str, Tensor], layers: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Timm ``VisionTransformer`` keys (``qkv`` fused), no ``head``.

        Kinds missing from ``layers`` (linear layers a factored forward computes
        elsewhere) are left out; ``qkv`` needs all of q, k and v or none.

        Raises
        ------
        ValueError
            If some but not all of ``attn.q/k/v`` of a parameter are given.
        """
        sd = dict(embed)
        for param in ("weight", "bias"):
            present = [f"attn.{k}.{param}" in layers for k in "qkv"]
            if any(present) and not all(present):
                raise ValueError(f"attn.q/k/v.{param} must be all present or all absent, got {present} for q, k, v")
            if all(present):
                qkv = torch.cat([layers[f"attn.{k}.{param}"] for k in "qkv"], dim=1)
                # unbind, not stack[i]: one backward node instead of L zero-filled copies
                for i, w in enumerate(qkv.unbind(0)):
                    sd[f"blocks.{i}.attn.qkv.{param}"] = w
            for kind, name in _SIMPLE.items():
                if f"{kind}.{param}" in layers:
                    for i, w in enumerate(layers[f"{kind}.{param}"].unbind(0)):
                        sd[f"blocks.{i}.{name}.{param}"] = w
        return sd

    def head_names(self) -> tuple[str, str]:
        """``("head.weight", "head.bias")``."""
        return "head.weight", "head.bias"

    def logits(self, output: Any) -> Tensor:
        """The model output itself (timm returns logits)."""
        return output

    def with_labels(self, config: dict, label_names: list[str]) -> dict:
        """``config`` with ``label_names`` (timm's ``pretrained_cfg["label_names"]`` once saved)."""
        return {**config, "label_names": list(label_names)}

    def save(self, model: nn.Module, config: Any, path: str | Path) -> None:
        """Save with ``timm.models.save_for_hf``: ``config.json`` and ``model.safetensors``.

        ``config.json`` holds timm's ``architecture``, ``num_classes``,
        ``model_args`` (``config["model_args"]``) and ``pretrained_cfg``
        (``input_size`` from the model, ``mean`` and ``std`` from
        ``config["data_config"]`` when given), so ``timm.create_model(
        "local-dir:<path>", pretrained=True)`` rebuilds the model with no
        project code.

        ``model_args`` cannot carry a LayerNorm epsilon (timm's ``norm_layer``
        argument is a class or a registered name). A model whose LayerNorms
        use another epsilon than timm's default (growth scales it by
        ``norm_scale**2``) is saved as an equivalent model with timm's default:
        every tensor that writes the residual stream (patch embedding, class
        token, position embedding, ``attn.proj``, ``mlp.fc2``) is multiplied by
        ``c = sqrt(TIMM_NORM_EPS / eps)``. Every reader of the residual stream
        is a LayerNorm, and ``LN_eps0(c x) = LN_eps(x)`` exactly when
        ``eps0 = c**2 eps``, so the logits are unchanged (up to float rounding);
        ``model`` itself is not modified.

        Parameters
        ----------
        model : nn.Module
            A plain timm ``VisionTransformer`` built by ``timm.create_model``.
        config : dict
            Its :meth:`target_config` (``model_args``, optional ``data_config``).
        path : str or Path
            Folder to write; created if missing.

        Raises
        ------
        ValueError
            If ``model`` is not a plain timm ViT, if its LayerNorms differ in
            epsilon or sit elsewhere than ``norm1``/``norm2``/``norm``/``fc_norm``
            while the epsilon is not timm's, or (from timm) if ``model_args``
            disagree with the model's image size, channels, classes or pooling.
        """
        save_for_hf(
            _with_timm_norm_eps(_check_supported(model)),
            str(path),
            model_args=config["model_args"],
            safe_serialization=True,
            data_config=config.get("data_config") or None,
            # the architecture's default pretrained_cfg names a pre-training these weights did not have
            model_config={
                "pretrained_cfg": {"tag": None, "license": None},
                **({"label_names": list(config["label_names"])} if config.get("label_names") else {}),
            },
        )

    def load(self, path: str | Path) -> nn.Module:
        """``timm.create_model("local-dir:<path>", pretrained=True)``: a folder :meth:`save` wrote.

        Raises
        ------
        FileNotFoundError
            If ``path`` has no ``config.json`` (from timm).
        RuntimeError
            If the weights do not fit the configured model (from timm's strict load).
        """
        return timm.create_model(f"local-dir:{path}", pretrained=True)


def _channel_stats(vit: VisionTransformer) -> dict[str, tuple[float, ...]]:
    """The model's per-channel ``mean`` and ``std``, averaged over channels where they do not match its inputs.

    The value timm's ``resolve_input_data_config`` takes then, computed here so that timm does not
    warn (twice per model) about a 3-channel ImageNet default on a 1-channel ViT.
    """
    cfg, channels = vit.pretrained_cfg or {}, vit.patch_embed.proj.in_channels
    stats = {}
    for key, default in (("mean", timm.data.IMAGENET_DEFAULT_MEAN), ("std", timm.data.IMAGENET_DEFAULT_STD)):
        value = cfg.get(key) or default
        value = (value,) if isinstance(value, (int, float)) else tuple(value)
        stats[key] = value if len(value) in (1, channels) else (sum(value) / len(value),)
    return stats


def _with_timm_norm_eps(model: VisionTransformer) -> VisionTransformer:
    """``model``, or a copy with LayerNorm epsilon :data:`TIMM_NORM_EPS` and the same logits (see ``VitFamily.save``).

    Raises
    ------
    ValueError
        If the LayerNorms differ in epsilon, or one of them does not read the
        residual stream, while the epsilon is not timm's.
    """
    norms = {name: m for name, m in model.named_modules() if isinstance(m, nn.LayerNorm)}
    eps = {m.eps for m in norms.values()}
    if eps <= {TIMM_NORM_EPS}:
        return model
    readers = {"norm", "fc_norm"} | {f"blocks.{i}.norm{j}" for i in range(len(model.blocks)) for j in (1, 2)}
    if len(eps) > 1 or set(norms) - readers:
        raise ValueError(
            f"cannot save a ViT with LayerNorm eps {sorted(eps)} (timm's is {TIMM_NORM_EPS}) as a timm checkpoint: "
            f"the eps must be one value and every LayerNorm must read the residual stream, got {sorted(norms)}"
        )
    scale = math.sqrt(TIMM_NORM_EPS / eps.pop())
    folded = copy.deepcopy(model)
    writers = ["patch_embed.proj", "cls_token", "pos_embed"]
    writers += [f"blocks.{i}.{name}" for i in range(len(model.blocks)) for name in ("attn.proj", "mlp.fc2")]
    with torch.no_grad():
        for name, param in folded.named_parameters():
            if any(name == w or name.startswith(f"{w}.") for w in writers):
                param.mul_(scale)
    for module in folded.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = TIMM_NORM_EPS
    return folded
