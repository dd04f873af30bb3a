"""An open model-family registry: a family from outside the package registers and grows; unknown models fail clearly."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from fedgrow_core.growth.families import (
    ModelFamily,
    UnknownModelFamilyError,
    family_for,
    family_names,
    get_family,
    register_family,
)
from fedgrow_core.growth.grown_model import GrownModel
from fedgrow_core.growth.ligo import DualLiGO, LiGO
from fedgrow_core.growth.shapes import TransformerShape
from tests.toy_family import ToyFamily, ToyTransformer

SMALL = {"vocab": 50, "layers": 2, "hidden": 16, "ffn": 32, "heads": 2, "eps": 1e-6, "num_labels": 3}
INTER, TARGET = TransformerShape(3, 24, 48, 2), TransformerShape(4, 48, 96, 4)
DOCS = Path(__file__).parents[1] / "docs" / "architecture.md"


def _small() -> ToyTransformer:
    torch.manual_seed(0)
    return ToyTransformer(SMALL).eval()


def test_a_family_from_outside_the_package_is_registered_and_found_by_its_models():
    assert "toy" in family_names() and {"bert", "vit"} <= set(family_names())
    assert isinstance(get_family("toy"), ToyFamily)
    assert isinstance(family_for(_small()), ToyFamily)
    assert get_family("toy").shape(_small()) == TransformerShape(2, 16, 32, 2)


def test_the_toy_family_grows_through_a_dual_ligo_and_its_grown_model_is_an_ordinary_toy_model(tmp_path):
    small, family = _small(), get_family("toy")
    local = LiGO(family.shape(small), INTER, tie_layers=True, seed=1)
    operator = DualLiGO(local, LiGO(INTER, TARGET, seed=2))
    grown = GrownModel(family, small, operator, num_labels=3)
    ids = torch.randint(0, SMALL["vocab"], (4, 7), generator=torch.Generator().manual_seed(3))
    logits = grown(ids)
    assert logits.shape == (4, 3) and torch.isfinite(logits).all()

    # an independent computation: the materialised target model, a plain ToyTransformer of the target shape
    model = grown.to_family_model().eval()
    assert isinstance(model, ToyTransformer) and family.shape(model) == TARGET
    with torch.no_grad():
        torch.testing.assert_close(model(ids), grown(ids), rtol=1e-4, atol=1e-5)

    # the operators learn: every width matrix and depth coefficient of both LiGOs gets a gradient
    grown(ids).logsumexp(dim=-1).sum().backward()
    trained = [n for n, p in operator.named_parameters() if p.requires_grad]
    assert trained and all(operator.get_parameter(n).grad is not None for n in trained)
    assert any(float(operator.get_parameter(n).grad.abs().sum()) > 0 for n in trained if "depth" in n)

    grown.save_pretrained(tmp_path / "grown")  # the family's own format, loaded back by the family alone
    with torch.no_grad():
        torch.testing.assert_close(family.load(tmp_path / "grown")(ids), model(ids))


def test_depth_growth_with_identity_init_preserves_the_toy_models_function():
    small, family = _small(), get_family("toy")
    deeper = TransformerShape(4, 16, 32, 2)  # depth only: the new pre-LN layers start as identities
    operator = LiGO(family.shape(small), deeper, depth_init="identity", depth_noise=0.0)
    grown = GrownModel(family, small, operator, num_labels=3)
    ids = torch.randint(0, SMALL["vocab"], (2, 5), generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(
            family.final_features(grown.to_family_model().eval(), ids),
            small.forward_features(ids),
            rtol=1e-5,
            atol=1e-5,
        )


def test_a_model_no_family_grows_is_refused_naming_the_registered_families(tmp_path):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    from fedgrow_core.zoo.registry import load_small_model

    config = RobertaConfig(
        vocab_size=60, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32
    )
    roberta = RobertaForSequenceClassification(config)
    with pytest.raises(UnknownModelFamilyError, match=r"RobertaForSequenceClassification.*'bert', 'vit'"):
        family_for(roberta)
    roberta.save_pretrained(tmp_path / "roberta")
    with pytest.raises(UnknownModelFamilyError, match="registered families"):
        load_small_model(str(tmp_path / "roberta"), num_labels=2)
    with pytest.raises(UnknownModelFamilyError, match=r"unknown model family 'gpt2'; registered families"):
        get_family("gpt2")


def test_a_second_family_under_a_taken_name_is_refused():
    class Impostor(ToyFamily):
        pass

    with pytest.raises(ValueError, match="'toy' is already registered"):
        register_family(Impostor)
    with pytest.raises(TypeError, match="ModelFamily subclass"):
        register_family(object)


def test_the_architecture_doc_names_every_method_a_family_must_implement():
    text = DOCS.read_text()
    section = text.split("## Adding a model family", 1)[1].split("\n## ", 1)[0]
    required = sorted(
        name for name in dir(ModelFamily) if getattr(getattr(ModelFamily, name), "__isabstractmethod__", False)
    )
    missing = [name for name in required if not re.search(rf"`{name}`", section)]
    assert not missing, f"docs/architecture.md, 'Adding a model family', does not name {missing}"
    assert "register_family" in section and "tests/toy_family.py" in section


def test_a_family_of_an_installed_package_registers_through_its_entry_point(monkeypatch):
    import sys
    from importlib.metadata import EntryPoint

    import fedgrow_core.growth.families.registry as registry
    import fedgrow_core.plugins as plugins

    point = EntryPoint(name="toy", value="tests.toy_family", group=registry.PLUGIN_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point] if group == registry.PLUGIN_GROUP else [])
    monkeypatch.setattr(plugins, "_LOADED", set())
    monkeypatch.delitem(sys.modules, "tests.toy_family")  # restored afterwards, with the class this module holds
    registry.unregister_family("toy")
    try:
        assert "toy" in family_names()  # the first lookup imported the plugin, which registered its family
        assert get_family("toy").name == "toy" and type(get_family("toy")) is not ToyFamily  # a fresh import
    finally:
        registry.unregister_family("toy")
        register_family(ToyFamily)
