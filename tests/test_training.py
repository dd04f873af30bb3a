import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from tests.conftest import make_bert, make_vit


def _digits():
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32).view(-1, 1, 8, 8) / 16.0
    return x, torch.tensor(y)


def _pretrained_small_vit(x, y, steps=150):
    """A tiny ViT pre-trained on digits, as an image client would own."""
    small = make_vit(layers=2, hidden=32, heads=2, ffn=64, seed=0).train()
    opt = torch.optim.AdamW(small.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(small(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return small.eval()


def test_training_the_operators_lowers_the_loss_on_real_digits():
    x, y = _digits()
    small = _pretrained_small_vit(x, y)
    fam = get_family("vit")
    source = fam.shape(small)
    inter, target = TransformerShape(3, 48, 96, 3), TransformerShape(4, 64, 128, 4)
    dual = DualLiGO(LiGO(source, inter, tie_layers=True, seed=1), LiGO(inter, target, seed=2))
    grown = GrownModel(fam, small, dual, num_labels=10).train()
    opt = torch.optim.AdamW(grown.parameters(), lr=2e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(40):
        idx = torch.randint(0, len(x), (64,), generator=g)
        loss = F.cross_entropy(grown(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.6 * first, (first, last)
    grown.eval()
    with torch.no_grad():
        acc = (grown(x).argmax(1) == y).float().mean().item()
    assert acc > 0.5  # chance is 0.1


def test_only_operators_and_head_change_and_small_model_is_bit_for_bit_unchanged(token_batch):
    small = make_bert()
    before = {k: v.clone() for k, v in small.state_dict().items()}
    fam = get_family("bert")
    source = fam.shape(small)
    inter, target = TransformerShape(3, 48, 96, 6), TransformerShape(4, 64, 128, 8)
    dual = DualLiGO(LiGO(source, inter, tie_layers=True, seed=1), LiGO(inter, target, seed=2))
    grown = GrownModel(fam, small, dual, num_labels=3).train()
    trainable = {n for n, p in grown.named_parameters() if p.requires_grad}
    assert trainable == set(grown.state_dict())
    assert all(n.startswith(("operator.local.", "operator.global_.", "head.")) for n in trainable)
    start = {k: v.clone() for k, v in grown.state_dict().items()}
    frozen = {k: v.clone() for k, v in grown.small_layers.as_dict().items()}
    opt = torch.optim.AdamW(grown.parameters(), lr=1e-2)
    labels = torch.tensor([0, 1, 2])
    for _ in range(3):
        loss = F.cross_entropy(grown(**token_batch), labels)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = grown.state_dict()
    changed = {k for k in after if not torch.equal(after[k], start[k])}
    # every operator width/depth tensor and the head received a gradient and moved
    assert changed == set(after), set(after) - changed
    for k, v in small.state_dict().items():
        assert torch.equal(v, before[k]), k
    for k, v in grown.small_layers.as_dict().items():
        assert torch.equal(v, frozen[k]), k
        assert not v.requires_grad
