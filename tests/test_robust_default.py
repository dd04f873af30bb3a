"""One hostile node of three against the app's default defence: the real apps, in this process.

The real ServerApp and ClientApp (:class:`benchmarks.in_process_grid.InProcessGrid`)
run ``benchmarks.robustness``'s small-ViT federation of 3 nodes under the
app's default run config (strategy, clip, weight cap), once honest and once
with the last node playing the sign-flip attack (its own honest update
reversed, at the clip bound; :mod:`benchmarks.attacks`). The drag of the final
Global-LiGO must stay within :data:`DEFAULT_BOUND` and the run must not be
reversed; the same attack against clip-only FedAvg must drag it further and
reverse it, so the bound is not met by an attack that does nothing.

:data:`DEFAULT_BOUND` is a regression bound: the default measured 1.15 here
(``benchmarks.robustness``), and no strategy reached the goal of 0.5
(docs/reliability-and-privacy.md says why).
"""

import json

import pytest
from safetensors.numpy import load_file

from benchmarks.robustness import drag, run_federation, small_vit_config
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig
from server_app.persistence.checkpoint import read_checkpoint

#: Regression bound on the default's drag under a sign flip at N = 3 (measured: 1.15; the goal of 0.5 is not met).
DEFAULT_BOUND = 1.25


@pytest.fixture(scope="module")
def finals(tmp_path_factory):
    work = tmp_path_factory.mktemp("robust-default")
    base = small_vit_config(work)
    runs = {}
    for run_id, (name, overrides, attack) in enumerate(
        [
            ("honest", {}, "honest"),
            ("sign-flip", {}, "sign-flip"),
            ("fedavg-honest", {"strategy": "fedavg"}, "honest"),
            ("fedavg-sign-flip", {"strategy": "fedavg"}, "sign-flip"),
        ],
        start=1,
    ):
        config = {**base, **overrides, "output-dir": str(work / name)}
        runs[name] = run_federation(config, 3, run_id, attack)
    initial = {k: v.detach().numpy() for k, v in initial_global_ligo(RunConfig.from_flower(base)).state_dict().items()}
    return runs, initial, RunConfig.from_flower(base)


def _global_ligo(run_dir):
    return load_file(str(run_dir / "global_ligo.safetensors"))


def test_the_default_keeps_one_sign_flipping_node_of_three_within_its_bound(finals):
    runs, initial, _ = finals
    value, alignment = drag(_global_ligo(runs["sign-flip"]), _global_ligo(runs["honest"]), initial)
    assert value <= DEFAULT_BOUND, f"drag {value:.3f} > {DEFAULT_BOUND}"
    assert alignment > 0, f"the attack reversed the run (alignment {alignment:+.3f})"


def test_the_attack_is_real_clip_only_fedavg_is_reversed_by_it(finals):
    runs, initial, run = finals
    if run.strategy == "fedavg":
        pytest.skip("the default is FedAvg")
    value, alignment = drag(_global_ligo(runs["fedavg-sign-flip"]), _global_ligo(runs["fedavg-honest"]), initial)
    assert value > DEFAULT_BOUND and alignment < 0, (value, alignment)


def test_the_hostile_reply_was_accepted_and_every_round_aggregated(finals):
    runs, _, _ = finals
    hostile = 1003  # the last of the grid's node ids
    entries = read_checkpoint(runs["sign-flip"]).entries
    assert len(entries) == 5
    for entry in entries:
        assert entry["aggregated"] and hostile in entry["accepted_nodes"] and not entry["rejected"], entry
    summary = json.loads((runs["sign-flip"] / "summary.json").read_text())
    assert len(summary["clients"]) == 3
