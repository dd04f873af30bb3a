"""Operator training: fp32 materialisation under autocast, parameter groups and the learning-rate schedule."""

import pytest
import torch
import torch.nn.functional as F

from fedgrow_core import DualLiGO, GrownModel, LiGO, TransformerShape, get_family
from fedgrow_core.clients.growth_client import growth_param_groups, growth_schedule, seek_schedule
from fedgrow_core.run_config import RunConfig
from tests.conftest import make_bert


def _grown(token_batch):
    small = make_bert()
    s = get_family("bert").shape(small)
    return GrownModel(get_family("bert"), small, LiGO(s, TransformerShape(4, 64, 128, 8), depth_noise=0.0), 3).eval()


def _loss(grown, token_batch):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = grown(**token_batch)
    return F.cross_entropy(logits.float(), torch.tensor([0, 1, 2]))


def test_a_small_depth_coefficient_change_reaches_the_fp32_weights_under_bf16_autocast(token_batch):
    grown = _grown(token_batch)
    before = _loss(grown, token_batch)
    before.backward()
    depth = grown.operator.depth["attn_v_weight"]
    assert depth.grad.dtype == torch.float32 and depth.grad.abs().sum() > 0
    batch = grown.family.batch_rows(grown.small_embed.as_dict(), dict(token_batch), grown.target_config)[0]
    grown_weights = []
    for step in (0.0, 1e-3):  # bf16 cannot hold 1 + 1e-3: materialised in bf16 this change would vanish
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            depth[1, 1] += step
            weights = grown.grown_state_dict()  # export and fine-tuning: every weight materialised
            _, linears = grown._grow_factored(batch, 36)  # training: the linear layers' factors
        assert all(w.dtype == torch.float32 for w in weights.values())
        assert all(f.weight.dtype == torch.float32 for fs in linears.values() for f in fs)
        grown_weights.append((weights["bert.encoder.layer.1.attention.self.value.weight"], linears["attn.v"][1].weight))
    for old, new in zip(*grown_weights, strict=True):  # the fp32 weights the bf16 matmuls start from carry it
        torch.testing.assert_close(new, old * 1.001, rtol=1e-5, atol=1e-7)
    # what bf16 materialisation would have done: the depth product rounds the change away
    stack = grown.small_layers.as_dict()["attn.v.weight"]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        c = grown.operator.depth["attn_v_weight"].detach()
        lossy = torch.einsum("ij,j...->i...", c, stack)[1]
        c0 = c.clone()
        c0[1, 1] -= 1e-3
        torch.testing.assert_close(lossy, torch.einsum("ij,j...->i...", c0, stack)[1], rtol=0, atol=0)


def test_param_groups_split_depth_width_and_head_with_their_own_rates(token_batch):
    grown = _grown(token_batch)
    run = RunConfig(lr_depth=1e-2, lr_width=1e-3, lr_head=5e-3, weight_decay=0.05)
    groups = {g["name"]: g for g in growth_param_groups(grown, run)}
    assert {k: g["lr"] for k, g in groups.items()} == {"depth": 1e-2, "width": 1e-3, "head": 5e-3}
    # decay pulls towards 0: only the head gets it, never the operators' one-hot selections
    assert {k: g["weight_decay"] for k, g in groups.items()} == {"depth": 0.0, "width": 0.0, "head": 0.05}
    ids = {k: {id(p) for p in g["params"]} for k, g in groups.items()}
    names = {id(p): n for n, p in grown.named_parameters()}
    assert all(".depth." in names[i] for i in ids["depth"]) and len(ids["depth"]) == 16
    width = {f"operator.width.{s}" for s in ("res", "q", "k", "v", "ffn")}
    assert {names[i] for i in ids["width"]} == width | {f"operator.split.{s}" for s in ("res", "v", "ffn")}
    assert {names[i] for i in ids["head"]} == {"head.weight", "head.bias"}


def test_the_global_ligo_has_its_own_rates(token_batch):
    small = make_bert(layers=2, hidden=32, heads=4, ffn=64, num_labels=3, vocab_size=100)
    fam = get_family("bert")
    inter, target = TransformerShape(3, 48, 96, 4), TransformerShape(4, 64, 128, 4)
    op = DualLiGO(LiGO(fam.shape(small), inter, tie_layers=True), LiGO(inter, target))
    grown = GrownModel(fam, small, op, 3)
    run = RunConfig(lr_depth=1e-2, lr_width=1e-3, lr_global_depth=2e-2, lr_global_width=3e-3)
    groups = {g["name"]: g for g in growth_param_groups(grown, run)}
    lrs = {k: g["lr"] for k, g in groups.items()}
    assert lrs == {"depth": 1e-2, "width": 1e-3, "global-depth": 2e-2, "global-width": 3e-3, "head": run.lr_head}
    names = {id(p): n for n, p in grown.named_parameters()}
    for k in ("global-depth", "global-width"):
        assert all(names[id(p)].startswith("operator.global_.") for p in groups[k]["params"])
    for k in ("depth", "width"):
        assert all(names[id(p)].startswith("operator.local.") for p in groups[k]["params"])
    assert sum(len(g["params"]) for g in groups.values()) == len(names)


def test_head_warmup_holds_the_operators_then_runs_their_schedule():
    run = RunConfig(num_server_rounds=2, local_steps=10, head_warmup_steps=4, lr_schedule="linear")
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(2)]
    opt = torch.optim.AdamW(
        [{"params": [params[0]], "lr": 1.0, "name": "global-width"}, {"params": [params[1]], "lr": 1.0, "name": "head"}]
    )
    sched = growth_schedule(opt, run)
    ops, head = [], []
    for _ in range(20):
        ops.append(opt.param_groups[0]["lr"])
        head.append(opt.param_groups[1]["lr"])
        opt.step()
        sched.step()
    assert ops[:4] == [0.0] * 4 and ops[4] == 1.0 and ops[5] < 1.0  # held, then its own linear decay over 16 steps
    torch.testing.assert_close(torch.tensor(ops[4:]), 1.0 - torch.arange(16) / 16.0)
    torch.testing.assert_close(torch.tensor(head), 1.0 - torch.arange(20) / 20.0)  # the head decays from step 0


def test_head_warmup_longer_than_the_growth_phase_is_refused():
    with pytest.raises(ValueError, match="21 head warm-up steps.*20 steps"):
        RunConfig(num_server_rounds=2, local_steps=10, head_warmup_steps=21)


def test_schedule_warms_up_decays_and_seeks_to_a_client_step():
    run = RunConfig(
        num_server_rounds=3, local_steps=10, warmup_steps=3, lr_schedule="cosine", lr_depth=1.0, lr_width=0.5
    )
    params = [torch.nn.Parameter(torch.zeros(1)) for _ in range(3)]
    opt = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, (1.0, 0.5, 0.25), strict=True)])
    sched = growth_schedule(opt, run)
    lrs = []
    for _ in range(30):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[0] == 0.0 and lrs[1] < lrs[2] < lrs[3] == 1.0  # linear warm-up to the peak
    assert all(a >= b for a, b in zip(lrs[3:], lrs[4:], strict=False)) and lrs[-1] < 0.01  # cosine decay
    # a client that resumes at step 17 gets the rate the uninterrupted schedule had there
    fresh = torch.optim.AdamW([{"params": [p], "lr": lr} for p, lr in zip(params, (1.0, 0.5, 0.25), strict=True)])
    seeked = growth_schedule(fresh, run)
    seek_schedule(seeked, 17)
    assert fresh.param_groups[0]["lr"] == lrs[17]
    assert fresh.param_groups[1]["lr"] == lrs[17] * 0.5
    seeked.step()
    assert fresh.param_groups[0]["lr"] == lrs[18]
