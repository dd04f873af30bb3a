"""BERT encoders from ``transformers`` (``BertModel``, ``BertForSequenceClassification``)."""

from __future__ import annotations

import contextlib
import copy
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch
from torch import Tensor, nn
from transformers import (
    AutoModelForSequenceClassification,
    BertConfig,
    BertForSequenceClassification,
    BertModel,
)
from transformers.utils import logging as hf_logging

from fedgrow_core.growth.families.base import ModelFamily
from fedgrow_core.growth.families.registry import register_family
from fedgrow_core.growth.ligo import LAYER_PARAMS, AxisSpec
from fedgrow_core.growth.shapes import TransformerShape

_RES = ("res", "out")
_NORM = ("res", "norm")
_EMBED_SPACES: dict[str, AxisSpec] = {
    "embeddings.word_embeddings.weight": (None, _RES),
    "embeddings.position_embeddings.weight": (None, _RES),
    "embeddings.token_type_embeddings.weight": (None, _RES),
    "embeddings.LayerNorm.weight": (_NORM,),
    "embeddings.LayerNorm.bias": (_RES,),
    "pooler.dense.weight": (_RES, ("res", "in")),
    "pooler.dense.bias": (_RES,),
}
#: canonical layer kind -> name inside ``encoder.layer.<i>``
_LAYER_NAMES = {
    "attn.q": "attention.self.query",
    "attn.k": "attention.self.key",
    "attn.v": "attention.self.value",
    "attn.o": "attention.output.dense",
    "attn_norm": "attention.output.LayerNorm",
    "ffn.in": "intermediate.dense",
    "ffn.out": "output.dense",
    "ffn_norm": "output.LayerNorm",
}


def _layer_key(kind: str, i: int) -> str:
    module, param = kind.rsplit(".", 1)
    return f"encoder.layer.{i}.{_LAYER_NAMES[module]}.{param}"


def _encoder(model: nn.Module) -> BertModel:
    if isinstance(model, BertModel):
        return model
    inner = getattr(model, "bert", None)
    if isinstance(inner, BertModel):
        return inner
    raise ValueError(
        f"the 'bert' family expects a transformers BertModel or a model with a .bert "
        f"BertModel (e.g. BertForSequenceClassification), got {type(model).__name__}"
    )


@register_family
class BertFamily(ModelFamily):
    """BERT via ``transformers``.

    The target is a ``BertForSequenceClassification`` whose non-shape settings
    (vocabulary, positions, activation, epsilon) are the client model's. A source
    ``BertModel`` without a pooler gets an identity pooler (weight ``I``, bias 0)
    before growth. The task head is ``classifier`` (``Linear(D_t, num_labels)``)
    applied to the pooled ``[CLS]`` state, as in ``transformers``.
    """

    name = "bert"
    norm_position = "post"
    load_example = (
        "from transformers import AutoModelForSequenceClassification, AutoTokenizer\n\n"
        'model = AutoModelForSequenceClassification.from_pretrained("{path}")\n'
        'tokenizer = AutoTokenizer.from_pretrained("{path}")\n'
        "labels = model.config.id2label  # class index -> name"
    )

    @classmethod
    def handles(cls, model: nn.Module) -> bool:
        """A ``transformers`` ``BertModel``, or a model holding one as ``.bert``."""
        return isinstance(model, BertModel) or isinstance(getattr(model, "bert", None), BertModel)

    def probe_inputs(self, model: nn.Module, generator: torch.Generator) -> tuple[tuple, dict]:
        """2 sequences of 16 token ids from ``[1000, vocab)``, past the special ids (``[1, vocab)`` if tiny)."""
        vocab = _encoder(model).config.vocab_size
        low = 1000 if vocab > 2000 else 1
        ids = torch.randint(low, vocab, (2, 16), generator=generator)
        return (), {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def final_features(self, model: nn.Module, *args: Any, **kwargs: Any) -> Tensor:
        """The encoder's ``last_hidden_state``."""
        return _encoder(model)(*args, **kwargs).last_hidden_state

    def shape(self, model: nn.Module) -> TransformerShape:
        """Shape from the ``BertConfig``: layers, hidden, intermediate, heads."""
        cfg = _encoder(model).config
        return TransformerShape(cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads)

    def extract(self, model: nn.Module) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Canonical weights; see :class:`~fedgrow_core.growth.families.base.ModelFamily`."""
        bert = _encoder(model)
        sd = {k: v.detach().clone() for k, v in bert.state_dict().items()}
        if "pooler.dense.weight" not in sd:
            d = bert.config.hidden_size
            sd["pooler.dense.weight"] = torch.eye(d)
            sd["pooler.dense.bias"] = torch.zeros(d)
        embed = {k: sd[k] for k in _EMBED_SPACES}
        n = bert.config.num_hidden_layers
        layers = {kind: torch.stack([sd[_layer_key(kind, i)] for i in range(n)]) for kind in LAYER_PARAMS}
        return embed, layers

    def embed_spaces(self, embed: Mapping[str, Tensor]) -> dict[str, AxisSpec]:
        """Residual-stream spaces of embeddings, embedding norm and pooler."""
        return {k: _EMBED_SPACES[k] for k in embed}

    def batch_rows(self, embed: Mapping[str, Tensor], kwargs: dict[str, Any], config: BertConfig) -> tuple[dict, dict]:
        """Word-embedding rows of the batch's tokens and position rows up to its length.

        Word embeddings: one row per token of ``input_ids`` ``(B, T)``, so the
        grown table is ``(p + 1 + B * T, D)`` instead of ``(vocab, D)``, with
        ``p`` the padding id (``config.pad_token_id``, normally 0). Rows ``0..p``
        are the table's own, so the padding token still indexes
        ``padding_idx`` and gets no gradient, as in the full table; every other
        token indexes its own row. No ``unique`` (a host sync on CUDA): repeated
        tokens are grown more than once, which is exact. Position embeddings:
        the first ``T`` rows, unless ``position_ids`` are given. Rows are
        ``index_select``-ed, so the gradient of the word-embedding growth is the
        full table's restricted to the rows read, i.e. identical
        (``tests/test_batch_rows.py`` checks logits and every gradient).
        """
        embed = dict(embed)
        ids = kwargs.get("input_ids")
        if ids is None or kwargs.get("inputs_embeds") is not None:
            return embed, kwargs
        words = "embeddings.word_embeddings.weight"
        pad = config.pad_token_id
        lead = 0 if pad is None else int(pad) + 1
        flat = ids.reshape(-1)
        rows = torch.cat([torch.arange(lead, device=ids.device), flat])
        embed[words] = embed[words].index_select(0, rows)
        new_ids = torch.arange(lead, lead + flat.numel(), device=ids.device).view_as(ids)
        if pad is not None:
            new_ids = torch.where(ids == pad, torch.full_like(ids, int(pad)), new_ids)
        kwargs = {**kwargs, "input_ids": new_ids}
        if kwargs.get("position_ids") is None:
            positions = "embeddings.position_embeddings.weight"
            embed[positions] = embed[positions][: ids.shape[-1]]
        return embed, kwargs

    def linear_module(self, kind: str, layer: int) -> str | None:
        """``bert.encoder.layer.<i>.<module>`` (every linear kind has its own module)."""
        return f"bert.encoder.layer.{layer}.{_LAYER_NAMES[kind]}"

    def tokens(self, args: tuple, kwargs: dict[str, Any], config: BertConfig) -> int | None:
        """``input_ids.numel()`` (batch x sequence); ``None`` for ``inputs_embeds`` or positional inputs."""
        ids = kwargs.get("input_ids")
        return None if ids is None else ids.numel()

    def target_config(
        self, model: nn.Module, target: TransformerShape, num_labels: int, norm_scale: float = 1.0
    ) -> BertConfig:
        """The client's ``BertConfig`` with the target shape, ``num_labels`` and scaled ``layer_norm_eps``."""
        cfg = copy.deepcopy(_encoder(model).config)
        cfg.layer_norm_eps = cfg.layer_norm_eps * norm_scale**2
        cfg.num_hidden_layers = target.layers
        cfg.hidden_size = target.hidden
        cfg.intermediate_size = target.ffn
        cfg.num_attention_heads = target.heads
        cfg.num_labels = num_labels
        cfg.architectures = ["BertForSequenceClassification"]
        return cfg

    def build_key(self, config: BertConfig) -> str | None:
        """``config`` as JSON without where the client's model came from, with the attention implementation.

        ``BertConfig.to_json_string`` leaves out ``_attn_implementation``, which
        the built model reads at every forward (eager or SDPA attention), and
        keeps ``_name_or_path`` and ``transformers_version``, which neither the
        build nor the model reads.

        Parameters
        ----------
        config : BertConfig
            A configuration :meth:`target_config` returned.

        Returns
        -------
        str or None
            The key (``None`` if the configuration holds what JSON cannot).
        """
        data = config.to_dict()
        for unread in ("_name_or_path", "transformers_version"):
            data.pop(unread, None)
        for read in ("_attn_implementation", "_experts_implementation"):
            data[read] = getattr(config, read, None)
        return super().build_key(data)  # a dict: its JSON, or None

    def build(self, config: BertConfig) -> nn.Module:
        """``BertForSequenceClassification(config)``, randomly initialised."""
        return BertForSequenceClassification(config)

    def to_state_dict(self, embed: Mapping[str, Tensor], layers: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """``BertForSequenceClassification`` keys (``bert.`` prefix), no classifier."""
        sd = {f"bert.{k}": v for k, v in embed.items()}
        for kind, stack in layers.items():
            # unbind, not stack[i]: one backward node instead of L zero-filled copies
            for i, w in enumerate(stack.unbind(0)):
                sd[f"bert.{_layer_key(kind, i)}"] = w
        return sd

    def head_names(self) -> tuple[str, str]:
        """``("classifier.weight", "classifier.bias")``."""
        return "classifier.weight", "classifier.bias"

    def logits(self, output: Any) -> Tensor:
        """``output.logits``."""
        return output.logits

    def with_labels(self, config: BertConfig, label_names: list[str]) -> BertConfig:
        """A copy of ``config`` with ``id2label`` and ``label2id`` from the class names."""
        cfg = copy.deepcopy(config)
        cfg.id2label = dict(enumerate(label_names))
        cfg.label2id = {name: i for i, name in enumerate(label_names)}
        return cfg

    def save(self, model: nn.Module, config: Any, path: str | Path) -> None:
        """``save_pretrained`` (config.json + model.safetensors), without its per-shard progress bar."""
        if config is not None and getattr(config, "id2label", None):  # the class names travel in config.json
            model.config.id2label, model.config.label2id = dict(config.id2label), dict(config.label2id)
        with quiet_transformers(report=True):
            model.save_pretrained(path)

    def load(self, path: str | Path) -> nn.Module:
        """``AutoModelForSequenceClassification.from_pretrained(path)``, without its progress bar."""
        with quiet_transformers(report=True):
            return AutoModelForSequenceClassification.from_pretrained(path)


@contextlib.contextmanager
def quiet_transformers(report: bool = False) -> Iterator[None]:
    """Within the block, no transformers progress bars and, unless ``report``, no load report.

    Loading a pre-trained encoder into a model with a fresh task head makes
    transformers report the ``classifier`` weights as missing, which is what
    the caller asked for (``report=False`` silences it; errors are still
    logged); loading and saving show a progress bar per file. The previous
    verbosity and progress-bar setting return after the block.
    """
    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if not report:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
