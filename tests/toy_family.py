"""A model family from outside the package: a tiny pre-LN transformer classifier in plain PyTorch.

The complete example of docs/architecture.md, "Adding a model family": the
model, and the :class:`ModelFamily` adapter that maps its weights to LiGO's
canonical names (:data:`fedgrow_core.growth.ligo.LAYER_PARAMS`) and back,
registered with :func:`register_family` where it is defined.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from fedgrow_core.growth.families import ModelFamily, register_family
from fedgrow_core.growth.ligo import LAYER_PARAMS, AxisSpec
from fedgrow_core.growth.shapes import TransformerShape

_RES, _NORM = ("res", "out"), ("res", "norm")
#: Canonical layer kind -> the block's module (``nn.Linear`` or ``nn.LayerNorm``).
_MODULES = {
    "attn.q": "q",
    "attn.k": "k",
    "attn.v": "v",
    "attn.o": "o",
    "attn_norm": "norm1",
    "ffn.in": "fc1",
    "ffn.out": "fc2",
    "ffn_norm": "norm2",
}
_EMBED = {"embed.weight": (None, _RES), "norm.weight": (_NORM,), "norm.bias": (_RES,)}


class ToyBlock(nn.Module):
    """Pre-LN block: ``x + o(attn(norm1 x))``, then ``x + fc2(gelu(fc1(norm2 x)))``."""

    def __init__(self, hidden: int, ffn: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.norm1, self.norm2 = nn.LayerNorm(hidden, eps=eps), nn.LayerNorm(hidden, eps=eps)
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.fc1, self.fc2 = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        h = self.norm1(x)
        q, k, v = (m(h).view(b, t, self.heads, d // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        x = x + self.o(nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d))
        return x + self.fc2(nn.functional.gelu(self.fc1(self.norm2(x))))


class ToyTransformer(nn.Module):
    """Token embedding, pre-LN blocks, final LayerNorm, mean-pooled linear head; ``config`` a plain dict."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        c = self.config
        self.embed = nn.Embedding(c["vocab"], c["hidden"])
        self.blocks = nn.ModuleList(ToyBlock(c["hidden"], c["ffn"], c["heads"], c["eps"]) for _ in range(c["layers"]))
        self.norm = nn.LayerNorm(c["hidden"], eps=c["eps"])
        self.head = nn.Linear(c["hidden"], c["num_labels"])

    def forward_features(self, input_ids: Tensor) -> Tensor:
        x = self.embed(input_ids)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)

    def forward(self, input_ids: Tensor) -> Tensor:
        return self.head(self.forward_features(input_ids).mean(dim=1))


@register_family
class ToyFamily(ModelFamily):
    """The ``toy`` family: :class:`ToyTransformer` models, grown like timm's pre-LN ViTs."""

    name = "toy"
    norm_position = "pre"

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        return isinstance(model, ToyTransformer)

    def probe_inputs(self, model: nn.Module, generator: torch.Generator) -> tuple[tuple, dict]:
        return (torch.randint(0, model.config["vocab"], (2, 8), generator=generator),), {}

    def final_features(self, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        return model.forward_features(*args, **kwargs)

    def shape(self, model: nn.Module) -> TransformerShape:
        c = model.config
        return TransformerShape(c["layers"], c["hidden"], c["ffn"], c["heads"])

    def extract(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
        layers = {
            kind: torch.stack(
                [
                    sd[f"blocks.{i}.{_MODULES[kind.rsplit('.', 1)[0]]}.{kind.rsplit('.', 1)[1]}"]
                    for i in range(len(model.blocks))
                ]
            )
            for kind in LAYER_PARAMS
        }
        return {k: sd[k] for k in _EMBED}, layers

    def embed_spaces(self, embed: Mapping[str, Tensor]) -> dict[str, AxisSpec]:
        return {k: _EMBED[k] for k in embed}

    def target_config(self, model: nn.Module, target: TransformerShape, num_labels: int, norm_scale: float = 1.0):
        c = model.config
        return {
            **c,
            "layers": target.layers,
            "hidden": target.hidden,
            "ffn": target.ffn,
            "heads": target.heads,
            "num_labels": num_labels,
            "eps": c["eps"] * norm_scale**2,
        }

    def build(self, config: Any) -> nn.Module:
        return ToyTransformer(config)

    def to_state_dict(self, embed: Mapping[str, Tensor], layers: Mapping[str, Tensor]) -> dict[str, Tensor]:
        sd = dict(embed)
        for kind, stacked in layers.items():
            module, param = kind.rsplit(".", 1)
            for i, w in enumerate(stacked.unbind(0)):
                sd[f"blocks.{i}.{_MODULES[module]}.{param}"] = w
        return sd

    def head_names(self) -> tuple[str, str]:
        return "head.weight", "head.bias"

    def logits(self, output: Any) -> Tensor:
        return output

    def save(self, model: nn.Module, config: Any, path: str | Path) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps(config))
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path / "model.safetensors")

    def load(self, path: str | Path) -> nn.Module:
        model = ToyTransformer(json.loads((Path(path) / "config.json").read_text()))
        model.load_state_dict(load_file(Path(path) / "model.safetensors"))
        return model.eval()
