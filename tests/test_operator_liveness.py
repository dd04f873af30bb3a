"""Every operator tensor learns: at initialisation each trainable Local- and Global-LiGO tensor gets a gradient.

On a real batch (rotten-tomatoes sentences through the real MiniLMs; Fashion-MNIST
images through small timm ViTs), at the shapes of the default run and of the
presets, with the operators every client builds (``client_operator``).
"""

import pytest
import torch
import torch.nn.functional as F
from datasets import Dataset

from fedgrow_core import GrownModel, TransformerShape, get_family
from fedgrow_core.clients.growth_client import client_operator
from fedgrow_core.data.preprocessing import ImageTransform, make_dataloader, model_inputs
from fedgrow_core.data.sources import load_data_source
from fedgrow_core.growth.diagnostics import gradient_norms
from fedgrow_core.growth.ligo import LiGO
from fedgrow_core.run_config import RunConfig
from fedgrow_core.zoo.vit_pretrain import VitSpec, build_vit
from tests.conftest import needs_fashion_mnist


def _batch(rows: Dataset, preprocessor, n: int = 16) -> dict:
    return next(iter(make_dataloader(rows.select(range(n)), preprocessor, n, max_length=48)))


def _dead(model: GrownModel, batch: dict) -> dict[str, float]:
    args, kwargs = model_inputs(batch)
    loss = F.cross_entropy(model(*args, **kwargs), batch["labels"])
    norms = gradient_norms(model, loss, prefix="operator.")
    assert any(n.startswith("operator.local.") for n in norms) and any(n.startswith("operator.global_.") for n in norms)
    assert any(".split." in n for n in norms)  # the read weights are trained too
    return {n: g for n, g in norms.items() if not g > 0}


@pytest.fixture(scope="module")
def sentences():
    return load_data_source("rotten-tomatoes")["train"].shuffle(seed=0)


@pytest.fixture(scope="module")
def images():
    return load_data_source("fashion-mnist")["train"].shuffle(seed=0)


@pytest.mark.parametrize("model_name", ["minilm-l3", "minilm-l6"])
@pytest.mark.parametrize(
    ("intermediate", "target"),
    [("7x480x1536x12", "8x768x1536x12"), ("7x480x1536x12", "8x576x1536x12")],  # default run, text preset
)
def test_every_operator_tensor_of_a_real_minilm_gets_a_gradient(sentences, model_name, intermediate, target):
    registry = pytest.importorskip("fedgrow_core.zoo.registry")
    try:
        small = registry.load_small_model(model_name, 2)
    except registry.MissingAssetError as err:
        pytest.skip(str(err))
    run = RunConfig(intermediate_shape=intermediate, target_shape=target, client_models=model_name)
    op = client_operator(run, small.family.shape(small.model), 0)
    model = GrownModel(small.family, small.model, op, 2)
    assert _dead(model, _batch(sentences, small.preprocessor)) == {}


@pytest.mark.parametrize(
    ("spec", "intermediate", "target", "depth_init"),
    [
        ("2x64", "5x256x1024x8", "6x384x1536x12", "stackbert"),  # the image comparison
        ("4x192", "5x256x1024x8", "6x384x1536x12", "stackbert"),
        ("2x64", "4x192x768x6", "8x384x1536x12", "stackbert"),  # the image preset
        ("2x256x8x256", "4x320x320x10", "6x384x384x12", "identity"),  # the paper-shaped preset
        ("4x256x8x256", "4x320x320x10", "6x384x384x12", "identity"),
    ],
)
@needs_fashion_mnist
def test_every_operator_tensor_of_a_vit_gets_a_gradient(images, spec, intermediate, target, depth_init):
    small = build_vit(VitSpec.parse(spec), 28, 7, 1, 10, seed=1).eval()
    with torch.no_grad():  # timm starts biases at 0 and LayerNorms at (1, 0); pre-training moves them
        for name, p in small.named_parameters():
            if p.dim() == 1:
                p.add_(0.02 * torch.randn(p.shape, generator=torch.Generator().manual_seed(len(name))))
    fam = get_family("vit")
    run = RunConfig(
        task="image", intermediate_shape=intermediate, target_shape=target, depth_init=depth_init, client_models="x"
    )
    model = GrownModel(fam, small, client_operator(run, fam.shape(small), 0), 10)
    assert _dead(model, _batch(images, ImageTransform(img_size=(28, 28), mean=[0.286], std=[0.353]))) == {}


def test_the_previously_dead_spaces_now_learn():
    """A residual step made only of mean rows, and a head dim grown by less than 2x, on a tiny BERT."""
    from tests.conftest import make_bert

    small = make_bert(layers=2, hidden=32, heads=4, ffn=64, num_labels=2, vocab_size=100)
    fam = get_family("bert")
    op = LiGO(fam.shape(small), TransformerShape(2, 40, 64, 4))  # 32 -> 40: mean rows only; head dim 8 -> 10
    model = GrownModel(fam, small, op, 2)
    ids = torch.randint(1, 100, (4, 12), generator=torch.Generator().manual_seed(0))
    loss = F.cross_entropy(model(input_ids=ids, attention_mask=torch.ones_like(ids)), torch.tensor([0, 1, 0, 1]))
    norms = gradient_norms(model, loss, prefix="operator.")
    assert norms["operator.split.res"] > 0  # the mean rows' read weight: they can start being read
    assert norms["operator.width.q"] > 0  # the extra query rows see non-zero key rows (zero ones gave exactly 0)
    assert norms["operator.width.k"] > 0


def test_clients_of_one_width_share_the_intermediate_coordinates():
    """Local-LiGOs of clients of one width but different depths and partitions draw the same width matrices."""
    run = RunConfig(intermediate_shape="4x320x320x10", target_shape="6x384x384x12", depth_init="identity")
    a = client_operator(run, TransformerShape(2, 256, 256, 8), partition_id=0).local
    b = client_operator(run, TransformerShape(4, 256, 256, 8), partition_id=7).local
    for name, tensor in a.state_dict().items():
        if not name.startswith("depth."):
            assert torch.equal(tensor, b.state_dict()[name]), name
    c = client_operator(run.model_copy(update={"seed": 1}), TransformerShape(2, 256, 256, 8), partition_id=0).local
    assert not torch.equal(a.width["ffn"], c.width["ffn"])  # the run's seed decides the convention
