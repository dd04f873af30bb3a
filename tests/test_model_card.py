"""A saved final model carries its class names and a model card whose loading lines work as written."""

from __future__ import annotations

import re

import pytest
import torch

from fedgrow_core.clients.model_card import model_card
from fedgrow_core.clients.model_export import class_names, save_model
from fedgrow_core.growth.families import get_family
from tests.conftest import make_bert, make_vit

METRICS = {"accuracy": 0.75, "precision": 0.5, "num-examples": 40}


def _card(family, labels):
    return model_card(
        title="A test classifier",
        origin="made in a test",
        family=family.name,
        load_example=family.load_example,
        dataset="`digits`",
        partition="partition 0",
        metrics=METRICS,
        label_names=labels,
    )


def _load_as_the_card_says(folder):
    """Run the card's Python block, with the folder in place of "."; returns its namespace."""
    card = (folder / "README.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", card, flags=re.S)
    namespace: dict = {}
    exec(code.replace('"."', repr(str(folder))).replace("local-dir:.", f"local-dir:{folder}"), namespace)  # noqa: S102
    return namespace


@pytest.mark.parametrize("name", ["bert", "vit"])
def test_a_saved_model_loads_as_its_card_says_with_the_same_logits_and_class_names(name, tmp_path):
    family = get_family(name)
    labels = ["zero", "one", "two"]
    model = (make_bert(num_labels=3) if name == "bert" else make_vit(num_classes=3)).eval()
    config = family.target_config(model, family.shape(model), 3)
    folder = save_model(family, model, config, None, tmp_path / "m", label_names=labels, card=_card(family, labels))
    loaded = _load_as_the_card_says(folder)
    assert loaded["labels"] in (labels, dict(enumerate(labels)))
    assert class_names(folder) == labels
    inputs = (
        {"input_ids": torch.randint(1, 100, (2, 7), generator=torch.Generator().manual_seed(0))}
        if name == "bert"
        else {"x": torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))}
    )
    with torch.no_grad():
        ours = family.logits(model(**inputs) if name == "bert" else model(inputs["x"]))
        theirs = loaded["model"].eval()
        theirs = family.logits(theirs(**inputs) if name == "bert" else theirs(inputs["x"]))
    torch.testing.assert_close(theirs, ours, rtol=1e-4, atol=1e-5)
    text = (folder / "README.md").read_text()
    assert "accuracy\n  0.7500, macro precision 0.5000" in text and "0: `zero`, 1: `one`, 2: `two`" in text


def test_a_model_saved_without_class_names_is_refused_naming_its_folder(tmp_path):
    family = get_family("bert")
    model = make_bert(num_labels=2)
    folder = save_model(family, model, family.target_config(model, family.shape(model), 2), None, tmp_path / "bare")
    with pytest.raises(ValueError, match=r"bare/config.json holds no class names"):
        class_names(folder)
    with pytest.raises(ValueError, match="no readable config.json"):
        class_names(tmp_path / "nowhere")
