"""Vision Transformers from ``timm`` (``timm.models.vision_transformer.VisionTransformer``)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import timm
import torch
from safetensors.torch import load_file, save_file
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from fedgrow_core.growth.families.base import ModelFamily
from fedgrow_core.growth.ligo import LAYER_PARAMS, AxisSpec
from fedgrow_core.growth.shapes import TransformerShape

_RES = ("res", "out")
_NORM = ("res", "norm")
#: The timm architecture name used to build targets; every structural argument
#: is passed explicitly, so the name only selects the VisionTransformer class.
ARCHITECTURE = "vit_base_patch16_224"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"

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


class VitFamily(ModelFamily):
    """Plain ViT classifiers via ``timm``.

    The fused ``attn.qkv`` projection is split into canonical ``attn.q/k/v`` and
    fused back on export. The target is built with
    ``timm.create_model(ARCHITECTURE, pretrained=False, **model_args)`` where
    ``model_args`` fixes image size, patch size, channels, pooling and the target
    shape (``mlp_ratio = F / D``); the task head is timm's ``head``.
    """

    name = "vit"
    norm_position = "pre"

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
        """``timm.create_model`` arguments of the target, and its LayerNorm epsilon (JSON-serialisable)."""
        vit = _check_supported(model)
        pe = vit.patch_embed
        return {
            "architecture": ARCHITECTURE,
            "norm_eps": vit.norm.eps * norm_scale**2,
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

    def save(self, model: nn.Module, config: Any, path: str | Path) -> None:
        """``config.json`` (architecture + model_args) and ``model.safetensors``."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / CONFIG_FILE).write_text(json.dumps(config, indent=2))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path / WEIGHTS_FILE))

    def load(self, path: str | Path) -> nn.Module:
        """``timm.create_model`` from ``config.json``, weights loaded ``strict=True``."""
        path = Path(path)
        model = self.build(json.loads((path / CONFIG_FILE).read_text()))
        model.load_state_dict(load_file(str(path / WEIGHTS_FILE)), strict=True)
        return model
