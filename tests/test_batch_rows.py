"""Growing only the embedding rows a batch reads: same logits and gradients as growing whole tables."""

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from tests.conftest import make_bert


def _dual_grown(seed=0):
    small = make_bert(layers=2, hidden=32, heads=4, ffn=64, num_labels=3, vocab_size=100, max_positions=32)
    fam = get_family("bert")
    s = fam.shape(small)
    inter, target = TransformerShape(3, 48, 96, 4), TransformerShape(4, 72, 128, 6)
    model = GrownModel(fam, small, DualLiGO(LiGO(s, inter, tie_layers=True), LiGO(inter, target, seed=1)), 3)
    # move every operator entry off its one-hot init so that every gradient is non-trivial
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def _full_table_logits(model, kwargs):
    """Independent path: grow the whole vocabulary and position tables, then let BERT index them."""
    tensors = {**model.grown_state_dict(), **model.template_buffers.as_dict()}
    return model.family.logits(functional_call(model._template[0], tensors, (), kwargs, strict=True))


def _grads(model, logits, labels):
    model.zero_grad(set_to_none=True)
    F.cross_entropy(logits, labels).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.numel()}


@pytest.fixture
def padded_batch():
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(1, 100, (3, 10), generator=g)
    ids[:, 0] = 7  # a repeated token
    ids[0, 6:] = 0  # padding (pad_token_id 0)
    ids[2, 9:] = 0
    mask = (ids != 0).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


@pytest.mark.parametrize("attend_padding", [False, True])
def test_batch_rows_give_the_full_tables_logits_and_gradients(padded_batch, attend_padding):
    """With padding attended, pad tokens reach the loss, so ``padding_idx`` (no gradient to row 0) matters."""
    if attend_padding:
        padded_batch["attention_mask"] = torch.ones_like(padded_batch["attention_mask"])
    model = _dual_grown()
    labels = torch.tensor([0, 2, 1])
    fast = model(**padded_batch)
    fast_grads = _grads(model, fast, labels)
    full = _full_table_logits(model, padded_batch)
    full_grads = _grads(model, full, labels)
    torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-6)
    assert set(fast_grads) == set(full_grads)
    moved = 0
    for name, grad in full_grads.items():
        torch.testing.assert_close(fast_grads[name], grad, rtol=1e-4, atol=1e-6, msg=name)
        moved += bool(grad.abs().sum() > 0)
    assert moved > len(full_grads) / 2  # (key biases get exactly zero: softmax ignores them)
    for name in ("operator.global_.width.res", "operator.local.width.res", "operator.global_.depth.attn_q_weight"):
        assert full_grads[name].abs().sum() > 0, name


def test_batch_rows_read_one_word_row_per_token_and_keep_the_padding_row(padded_batch):
    model = _dual_grown()
    embed, kwargs = model.family.batch_rows(model.small_embed.as_dict(), padded_batch, model.target_config)
    words = embed["embeddings.word_embeddings.weight"]
    ids, new_ids = padded_batch["input_ids"], kwargs["input_ids"]
    assert words.shape == (1 + ids.numel(), 32)  # row 0 (padding) + one per token, not the 100-row vocabulary
    assert embed["embeddings.position_embeddings.weight"].shape == (10, 32)
    full = model.small_embed.as_dict()["embeddings.word_embeddings.weight"]
    torch.testing.assert_close(words[new_ids], full[ids], rtol=0, atol=0)
    assert bool((new_ids[ids == 0] == 0).all()) and bool((new_ids[ids != 0] > 0).all())


def test_explicit_position_ids_and_inputs_embeds_read_whole_tables():
    model = _dual_grown()
    fam, embed = model.family, model.small_embed.as_dict()
    ids = torch.randint(1, 100, (2, 5))
    with_pos, _ = fam.batch_rows(embed, {"input_ids": ids, "position_ids": torch.arange(5)[None]}, model.target_config)
    assert with_pos["embeddings.position_embeddings.weight"].shape[0] == 32
    no_ids, kwargs = fam.batch_rows(embed, {"inputs_embeds": torch.zeros(2, 5, 72)}, model.target_config)
    assert no_ids["embeddings.word_embeddings.weight"].shape[0] == 100 and "input_ids" not in kwargs
