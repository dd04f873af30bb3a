import torch

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from tests.conftest import make_bert, make_vit


def _dual(fam, small, inter, target):
    source = fam.shape(small)
    return DualLiGO(LiGO(source, inter, tie_layers=True, seed=1), LiGO(inter, target, seed=2))


def test_bert_export_reloads_with_auto_model_to_identical_logits(tmp_path, token_batch):
    from transformers import AutoModelForSequenceClassification, BertForSequenceClassification

    small = make_bert()
    fam = get_family("bert")
    target = TransformerShape(4, 64, 128, 8)
    grown = GrownModel(fam, small, _dual(fam, small, TransformerShape(3, 48, 96, 6), target), 3).eval()
    with torch.no_grad():
        expected = grown(**token_batch)
    grown.save_pretrained(tmp_path / "grown")
    assert (tmp_path / "grown" / "model.safetensors").exists()
    reloaded = AutoModelForSequenceClassification.from_pretrained(tmp_path / "grown").eval()
    assert isinstance(reloaded, BertForSequenceClassification)
    cfg = reloaded.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads) == (4, 64, 128, 8)
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**token_batch).logits, expected, rtol=1e-5, atol=1e-6)


def test_vit_export_loads_strictly_into_timm_create_model(tmp_path, image_batch):
    import json

    import timm
    from safetensors.torch import load_file

    small = make_vit()
    fam = get_family("vit")
    target = TransformerShape(4, 64, 128, 4)
    grown = GrownModel(fam, small, _dual(fam, small, TransformerShape(3, 48, 96, 3), target), 10).eval()
    with torch.no_grad():
        expected = grown(image_batch)
    grown.save_pretrained(tmp_path / "vit")
    cfg = json.loads((tmp_path / "vit" / "config.json").read_text())
    args = cfg["model_args"]
    model = timm.create_model(
        cfg["architecture"],
        pretrained=False,
        **{**args, "img_size": tuple(args["img_size"]), "patch_size": tuple(args["patch_size"])},
    )
    model.load_state_dict(load_file(str(tmp_path / "vit" / "model.safetensors")), strict=True)
    assert len(model.blocks) == 4 and model.embed_dim == 64
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(image_batch), expected, rtol=1e-5, atol=1e-6)
