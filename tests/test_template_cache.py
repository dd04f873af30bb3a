"""Target templates built once per process: replaying a build's random draws leaves torch's stream where it would be."""

import copy
import random
from collections import OrderedDict

import pytest
import torch
from conftest import make_bert, make_vit, tiny_bert_folder

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.growth import template_cache
from fedgrow_core.growth.families.bert import BertFamily
from fedgrow_core.growth.families.vit import VitFamily
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig

TARGET = TransformerShape(3, 48, 96, 4)


@pytest.fixture(autouse=True)
def fresh_cache(monkeypatch):
    """Every test starts as a new process does, with no template kept."""
    monkeypatch.setattr(template_cache, "_TEMPLATES", OrderedDict())


def _config(family, small):
    return family.target_config(small, TARGET, 3)


@pytest.mark.parametrize(("name", "small"), [("vit", lambda: make_vit(num_classes=3)), ("bert", make_bert)])
def test_a_replayed_build_leaves_torchs_stream_where_the_build_does(name, small):
    family = get_family(name)
    config = _config(family, small())
    torch.manual_seed(5)
    family.build(config)
    after_plain_build = torch.get_rng_state()
    torch.manual_seed(5)
    first = template_cache.target_template(family, config)  # built for real, its draws recorded and checked
    assert torch.equal(torch.get_rng_state(), after_plain_build)  # the checks leave the stream as the build did
    assert first.draws and all(p.is_meta for p in first.module.parameters())
    for seed in (0, 7):
        torch.manual_seed(seed)
        built = family.build(config)
        after_build = torch.get_rng_state()
        torch.manual_seed(seed)
        kept = template_cache.target_template(family, config)
        assert kept is first  # the same template, shared
        assert torch.equal(torch.get_rng_state(), after_build)
        expected = {k: (v.shape, v.dtype) for k, v in built.state_dict().items()}
        assert {k: (v.shape, v.dtype) for k, v in kept.module.state_dict().items()} == expected
        assert kept.buffers.keys() == dict(built.named_buffers()).keys()
        for key, value in built.named_buffers():
            assert torch.equal(kept.buffers[key], value), key


@pytest.mark.parametrize(
    ("op", "layout"),
    [
        ("uniform_", lambda: torch.empty(4, 6).t()),  # not contiguous
        ("uniform_", lambda: torch.empty(3, 1, 5)),
        ("uniform_", lambda: torch.empty(0, 3)),
        ("uniform_", lambda: torch.empty(())),
        ("normal_", lambda: torch.empty(10)),  # under the 16 of the vectorised path
        ("normal_", lambda: torch.empty(37)),
        ("normal_", lambda: torch.empty(6, 8)[:, ::2]),
        ("uniform_", lambda: torch.empty(9, dtype=torch.float64)),
        ("random_", lambda: torch.empty(11, dtype=torch.int64)),
        ("bernoulli_", lambda: torch.empty(20)),
        ("normal_", lambda: torch.empty(16)),  # the vectorised path, a whole number of 16s
        ("normal_", lambda: torch.empty(4, 12)),
        ("normal_", lambda: torch.empty(3, 1, 33)),  # 99: its last 16 drawn again
        ("normal_", lambda: torch.empty(40, 2).t()),  # not contiguous: element by element
        ("uniform_", lambda: torch.empty(300, 7)),
        ("normal_", lambda: torch.empty(20, dtype=torch.float64)),
        ("uniform_", lambda: torch.empty(17, dtype=torch.float16)),
    ],
)
@pytest.mark.parametrize("spare_normal", [False, True])
def test_replay_draws_what_the_op_draws_on_any_layout(op, layout, spare_normal):
    """A replay advances the generator as the op on the tensor itself does, from a state with or without a
    spare normal value (which a ``normal_`` of fewer than 16 elements leaves in the generator)."""
    tensor = layout()
    recorder = template_cache._RecordRandomOps()
    torch.manual_seed(3)
    if spare_normal:
        torch.empty(3).normal_()
    before = torch.get_rng_state()
    with recorder:
        getattr(tensor, op)()
    after = torch.get_rng_state()
    assert recorder.replayable and len(recorder.ops) == 1
    torch.set_rng_state(before)
    template_cache.replay(recorder.ops)
    assert torch.equal(torch.get_rng_state(), after)


@pytest.mark.parametrize(
    ("op", "layout", "expected"),
    [
        ("uniform_", lambda: torch.empty(4, 6).t(), 24),
        ("uniform_", lambda: torch.empty(0, 3), 0),
        ("normal_", lambda: torch.empty(4, 12), 48),
        ("normal_", lambda: torch.empty(37), 37 + 16),
        ("normal_", lambda: torch.empty(10), None),
        ("normal_", lambda: torch.empty(40, 2).t(), None),
        ("uniform_", lambda: torch.empty(9, dtype=torch.float64), None),
        ("bernoulli_", lambda: torch.empty(20), None),
    ],
)
def test_fixed_draws_counts_the_numbers_the_op_takes(op, layout, expected):
    """Counted ops advance the generator as drawing that many numbers does; the others are not counted."""
    tensor = layout()
    recorder = template_cache._RecordRandomOps()
    torch.manual_seed(4)
    with recorder:
        getattr(tensor, op)()
    after = torch.get_rng_state()
    assert template_cache.fixed_draws(recorder.ops[0]) == expected
    if expected is not None:
        torch.manual_seed(4)
        torch.empty(expected, dtype=torch.int32).random_()  # one 32-bit number each, as ATen draws them
        assert torch.equal(torch.get_rng_state(), after)


def test_a_replay_runs_counted_ops_as_one_draw_and_the_others_as_themselves():
    """Consecutive counted ops are merged into one advance; an op that is not counted runs as it is."""
    recorder = template_cache._RecordRandomOps()
    with recorder:
        torch.empty(5, 7).uniform_()
        torch.empty(64).normal_()
        torch.empty(3).normal_()  # under 16: run as it is
        torch.empty(2, 9).uniform_()
    replayed = template_cache._RecordRandomOps()
    with replayed:
        template_cache.replay(recorder.ops)
    assert [(d.op._schema.name, d.size, d.dtype) for d in replayed.ops] == [
        ("aten::random_", (35 + 64,), torch.uint8),
        ("aten::normal_", (3,), torch.float32),
        ("aten::random_", (18,), torch.uint8),
    ]


def test_an_advance_over_several_chunks_draws_every_number(monkeypatch):
    monkeypatch.setattr(template_cache, "ADVANCE_CHUNK", 5)
    torch.manual_seed(6)
    torch.empty(23).uniform_()
    after = torch.get_rng_state()
    torch.manual_seed(6)
    template_cache._advance(23)  # chunks of 5, 5, 5, 5 and 3
    assert torch.equal(torch.get_rng_state(), after)


def test_a_wrong_count_makes_a_build_unreplayable_never_a_wrong_stream(monkeypatch):
    """Were a count of ATen's draws wrong, the first build's check would fail: every call then builds."""
    real = template_cache.fixed_draws
    monkeypatch.setattr(template_cache, "fixed_draws", lambda d: None if real(d) is None else real(d) + 1)
    family = get_family("vit")
    config = _config(family, make_vit(num_classes=3))
    first = template_cache.target_template(family, config)
    assert first.draws is None
    torch.manual_seed(8)
    family.build(config)
    after_build = torch.get_rng_state()
    torch.manual_seed(8)
    again = template_cache.target_template(family, config)
    assert again.module is not first.module and torch.equal(torch.get_rng_state(), after_build)


class _PythonRandomVit(VitFamily):
    """A family whose build also draws from Python's generator (not torch's): its draws cannot be replayed."""

    name = "vit-python-random"

    def build(self, config):
        random.random()
        return super().build(config)


class _RandomBufferBert(BertFamily):
    """A family whose template keeps a buffer drawn at random: each build's own, never shared."""

    name = "bert-random-buffer"

    def build(self, config):
        model = super().build(config)
        model.register_buffer("noise", torch.empty(5).uniform_())
        return model


class _OwnGeneratorVit(VitFamily):
    """A family whose build draws from a generator of its own: not torch's global stream."""

    name = "vit-own-generator"

    def build(self, config):
        model = super().build(config)
        torch.empty(4).uniform_(generator=torch.Generator().manual_seed(1))
        return model


class _ReseedingVit(VitFamily):
    """A family whose build reseeds torch's generator: a replay of its draws ends elsewhere."""

    name = "vit-reseeding"

    def build(self, config):
        model = super().build(config)
        torch.manual_seed(int(torch.randint(1000, ())))
        return model


class _OutOfPlaceVit(VitFamily):
    """A family whose build draws a new tensor (``torch.randn``), not in place."""

    name = "vit-out-of-place"

    def build(self, config):
        model = super().build(config)
        torch.randn(3)
        return model


class _ValueDependentVit(VitFamily):
    """A family whose build draws as many numbers as a number it drew says."""

    name = "vit-value-dependent"

    def build(self, config):
        model = super().build(config)
        torch.empty(int(torch.empty(()).uniform_() * 10**6) + 1).uniform_()
        return model


@pytest.mark.parametrize(
    ("family", "small"),
    [
        (_PythonRandomVit(), lambda: make_vit(num_classes=3)),
        (_RandomBufferBert(), make_bert),
        (_OwnGeneratorVit(), lambda: make_vit(num_classes=3)),
        (_ReseedingVit(), lambda: make_vit(num_classes=3)),
        (_OutOfPlaceVit(), lambda: make_vit(num_classes=3)),
        (_ValueDependentVit(), lambda: make_vit(num_classes=3)),
    ],
)
def test_a_build_that_cannot_be_replayed_is_built_every_time(family, small, monkeypatch):
    config = _config(family, small())
    builds = []
    real_build = type(family).build
    monkeypatch.setattr(type(family), "build", lambda self, c: builds.append(1) or real_build(self, c))
    first = template_cache.target_template(family, config)
    assert first.draws is None and len(builds) in (1, 2)  # 2: the check's second build ran
    built = len(builds)
    torch.manual_seed(3)
    random.seed(3)
    again = template_cache.target_template(family, config)
    after = torch.get_rng_state()
    assert len(builds) == built + 1 and again.module is not first.module  # built again: nothing is shared
    torch.manual_seed(3)
    random.seed(3)
    real_build(family, config)
    assert torch.equal(torch.get_rng_state(), after)
    if "noise" in first.buffers:
        assert not torch.equal(first.buffers["noise"], again.buffers["noise"])


def test_shared_templates_run_in_each_grown_models_own_mode():
    """Two grown models share a BERT template with dropout: each forward runs in its own model's mode."""
    family = get_family("bert")
    small = make_bert(dropout=0.3)
    shape = family.shape(small)

    def grown():
        return GrownModel(family, small, DualLiGO(LiGO(shape, shape, tie_layers=True), LiGO(shape, TARGET)), 3)

    training, evaluating = grown(), grown()
    assert training._template[0] is evaluating._template[0]
    training.train()
    evaluating.eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    reference = evaluating(input_ids=ids, attention_mask=mask)
    torch.manual_seed(0)
    dropped = training(input_ids=ids, attention_mask=mask)
    assert not torch.allclose(dropped, training.eval()(input_ids=ids, attention_mask=mask))  # dropout applied
    training.train()
    torch.testing.assert_close(evaluating(input_ids=ids, attention_mask=mask), reference)  # and not here
    torch.manual_seed(0)
    torch.testing.assert_close(training(input_ids=ids, attention_mask=mask), dropped)


def _bert_run(folder):
    return RunConfig.from_flower(
        {
            "client-models": tiny_bert_folder(folder, 2, 32, 2, 64, 0, dropout=0.1),
            "intermediate-shape": "2x32x64x2",
            "target-shape": "3x64x128x4",
            "local-steps": 3,
            "batch-size": 8,
            "max-train-examples": 64,
            "max-length": 32,
        }
    )


def _same_tensors(first, second):
    return first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)


def test_a_growth_client_built_from_a_kept_template_trains_exactly_as_one_built_from_scratch(tmp_path):
    """The first client of a process builds its template; the next replays its draws: the same round, bit for bit."""
    run = _bert_run(tmp_path / "bert")
    sent = initial_global_ligo(run).state_dict()

    def round_from_seed():
        torch.manual_seed(11)
        client = GrowthClient(run, 0, 3)
        built = torch.get_rng_state()
        reply, metrics = client.train_round({k: v.clone() for k, v in sent.items()})
        return built, reply, client.private_state(), metrics["train-loss"]

    cold = round_from_seed()
    assert len(template_cache._TEMPLATES) == 1 and next(iter(template_cache._TEMPLATES.values())).draws
    warm = round_from_seed()
    assert torch.equal(cold[0], warm[0]) and cold[3] == warm[3]
    assert _same_tensors(cold[1], warm[1]) and _same_tensors(cold[2], warm[2])


def test_a_client_built_in_a_forked_stream_skips_the_replay_and_trains_as_the_client_that_kept_the_state(
    tmp_path, monkeypatch
):
    """A client rebuilt only to load its kept state (the stream forked and put back) replays no draws, and its
    next round is the round of the client that never left, bit for bit."""
    run = _bert_run(tmp_path / "bert")
    sent = initial_global_ligo(run).state_dict()
    torch.manual_seed(11)
    held = GrowthClient(run, 0, 3)  # builds the template and records its draws
    held.train_round({k: v.clone() for k, v in sent.items()})
    kept, aggregate = held.private_state(), {k: v + 0.01 for k, v in held.global_state().items()}
    replays = []
    real_replay = template_cache.replay
    monkeypatch.setattr(template_cache, "replay", lambda draws: replays.append(1) or real_replay(draws))
    torch.manual_seed(12)
    outside = torch.get_rng_state()
    with template_cache.forked_stream():
        rebuilt = GrowthClient(run, 0, 3)
        rebuilt.load_private_state(kept)
    assert replays == [] and torch.equal(torch.get_rng_state(), outside)
    GrowthClient(run, 0, 3)  # outside the fork the draws are replayed
    assert replays == [1]

    def next_round(client):
        torch.manual_seed(13)
        reply, metrics = client.train_round({k: v.clone() for k, v in aggregate.items()})
        return reply, client.private_state(), metrics["train-loss"], torch.get_rng_state()

    ours, theirs = next_round(rebuilt), next_round(held)
    assert _same_tensors(ours[0], theirs[0]) and _same_tensors(ours[1], theirs[1])
    assert ours[2] == theirs[2] and torch.equal(ours[3], theirs[3])


def test_configurations_that_differ_only_in_what_the_build_does_not_read_share_a_template():
    """Each client's ViT configuration carries its own input statistics; the build reads only the architecture."""
    family = get_family("vit")
    config = _config(family, make_vit(num_classes=3))
    own_statistics = {**config, "data_config": {"mean": [0.2], "std": [0.4]}}
    other_shape = {**config, "model_args": {**config["model_args"], "embed_dim": 64}}
    first = template_cache.target_template(family, config)
    assert template_cache.target_template(family, own_statistics) is first
    other = template_cache.target_template(family, other_shape)
    assert other is not first and other.module.cls_token.shape[-1] == 64


def test_bert_configurations_that_run_attention_differently_do_not_share_a_template():
    """The built BERT reads its attention implementation at every forward; where the small model came from, never."""
    family = get_family("bert")
    config = _config(family, make_bert())
    moved = copy.deepcopy(config)
    moved._name_or_path = "/elsewhere/small-bert"
    other = copy.deepcopy(config)
    other._attn_implementation = "eager" if config._attn_implementation != "eager" else "sdpa"
    first = template_cache.target_template(family, config)
    assert template_cache.target_template(family, moved) is first
    assert template_cache.target_template(family, other) is not first
