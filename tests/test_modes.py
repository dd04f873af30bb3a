"""Modes are registered objects: one registered from outside the package runs through the real apps.

The mode registered here is the built-in ``independent-dual-ligo`` under
another name, declared in this module alone; run through the real ServerApp
and ClientApp in this process (:class:`benchmarks.in_process_grid.InProcessGrid`),
it must give the built-in mode's accuracies exactly, so nothing in the apps
depends on a mode's name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from flwr.app import Context, RecordDict

import client_app.app as fedgrow_client
import server_app.app as fedgrow_server
from benchmarks.in_process_grid import federation
from benchmarks.robustness import small_vit_config
from fedgrow_core.modes import (
    Collect,
    GlobalLigo,
    Handler,
    LocalRounds,
    Mode,
    get_mode,
    mode_names,
    register_mode,
    unregister_mode,
)
from fedgrow_core.protocol import Phase
from fedgrow_core.run_config import ConfigError, RunConfig

ROOT = Path(__file__).resolve().parents[1]
OUTSIDER = Mode(
    name="outsider-dual-ligo",
    description="Dual-LiGO trained privately by each client, nothing sent (declared in a test)",
    plan=(LocalRounds(Phase.GROW),),
    handlers={Phase.GROW: Handler.GROW, Phase.FINAL: Handler.FINAL_GROWN},
    global_ligo=GlobalLigo.PRIVATE,
)
TINY = {
    "pretrain-steps": 20,
    "num-server-rounds": 2,
    "local-steps": 2,
    "max-train-examples": 200,
    "max-test-examples": 40,
    "finetune-steps": 2,
}


@pytest.fixture
def outsider():
    register_mode(OUTSIDER)
    yield OUTSIDER
    unregister_mode(OUTSIDER.name)


def _run(config: dict, run_id: int) -> dict:
    grid = federation(fedgrow_client.app, 2, config, run_id, {"node-policy": "open"})
    grid.run_server(fedgrow_server.main, Context(run_id, 0, {}, RecordDict(), dict(config)))
    (summary,) = Path(config["output-dir"]).glob("*/summary.json")
    return {"folder": summary.parent.name, **json.loads(summary.read_text())}


def test_a_mode_registered_outside_the_package_runs_like_the_built_in_it_copies(outsider, tmp_path):
    base = {**small_vit_config(tmp_path), **TINY}
    built_in = _run({**base, "mode": "independent-dual-ligo", "output-dir": str(tmp_path / "built-in")}, 1)
    ours = _run({**base, "mode": outsider.name, "output-dir": str(tmp_path / "outsider")}, 2)
    assert ours["folder"].endswith(f"-image-{outsider.name}-geometric-median")
    assert [c["accuracy"] for c in ours["clients"]] == [c["accuracy"] for c in built_in["clients"]]
    assert len(ours["clients"]) == 2 and ours["mean_accuracy"] == built_in["mean_accuracy"]
    assert ours["upload_bytes_total"] == built_in["upload_bytes_total"]


def test_a_registered_mode_is_a_run_config_choice_and_brings_its_constraints(outsider):
    assert outsider.name in mode_names() and get_mode(outsider.name) is outsider
    assert RunConfig(mode=outsider.name, global_rank=4).global_rank == 4  # it has a Global-LiGO
    with pytest.raises(ConfigError, match=rf"resume-from = 'runs/x': mode '{outsider.name}' is not checkpointed"):
        RunConfig(mode=outsider.name, resume_from="runs/x")
    with pytest.raises(ConfigError, match=rf"dp-clipping = 'fixed': mode '{outsider.name}' has no central DP"):
        RunConfig(mode=outsider.name, strategy="fedavg", dp_clipping="fixed")
    unregister_mode(outsider.name)
    with pytest.raises(ConfigError, match=r"mode = 'outsider-dual-ligo': expected one of \['fedgrow'"):
        RunConfig(mode=outsider.name)


def test_a_mode_must_serve_every_phase_its_plan_sends():
    with pytest.raises(ValueError, match=r"its plan sends phases \['collect'\] that no handler serves"):
        Mode("broken", "", (Collect(),), {Phase.FINAL: Handler.FINAL_TARGET})
    with pytest.raises(ValueError, match="no handler for phase 'finetune-evaluate'"):
        Mode("broken", "", (LocalRounds(Phase.TRAIN_LOCAL),), {Phase.TRAIN_LOCAL: Handler.TRAIN_SMALL})
    with pytest.raises(ValueError, match="'fedgrow' is already registered"):
        register_mode(Mode("fedgrow", "", (), {Phase.FINAL: Handler.FINAL_SMALL}))


def test_no_code_outside_the_mode_registry_dispatches_on_a_mode_name():
    """The apps and the library read a mode's declarations, never its name (``mode == "..."`` and the like)."""
    names = "|".join(re.escape(m) for m in mode_names())
    dispatch = re.compile(rf"""mode\w*\s*(==|!=|\bin\b|\bnot in\b)\s*[(\[{{]?\s*["']({names})["']""")
    sources = [*ROOT.glob("server_app/**/*.py"), *ROOT.glob("client_app/**/*.py"), *ROOT.glob("fedgrow_core/**/*.py")]
    found = [
        f"{path.relative_to(ROOT)}:{n}: {line.strip()}"
        for path in sources
        if "fedgrow_core/modes" not in path.as_posix()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if dispatch.search(line)
    ]
    assert sources and not found, found


def test_a_mode_of_an_installed_package_registers_through_its_entry_point(monkeypatch):
    import sys
    from importlib.metadata import EntryPoint

    import fedgrow_core.modes.registry as registry
    import fedgrow_core.plugins as plugins

    point = EntryPoint(name="plugin", value="tests.mode_plugin", group=registry.PLUGIN_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [point] if group == registry.PLUGIN_GROUP else [])
    monkeypatch.setattr(plugins, "_LOADED", set())
    monkeypatch.delitem(sys.modules, "tests.mode_plugin", raising=False)
    try:
        assert get_mode("plugin-small-only").model_kind == "small_model"  # the first lookup imports the plugin
        assert RunConfig(mode="plugin-small-only").mode == "plugin-small-only"
    finally:
        unregister_mode("plugin-small-only")
    broken = EntryPoint(name="broken", value="tests.no_such_module", group=registry.PLUGIN_GROUP)
    monkeypatch.setattr(plugins, "entry_points", lambda group: [broken])
    monkeypatch.setattr(plugins, "_LOADED", set())
    with pytest.raises(ImportError, match=r"fedgrow.modes plugin 'broken' \(tests.no_such_module\) failed to import"):
        mode_names()


def test_every_registered_mode_is_the_open_profiles_alone():
    from fedgrow_core.node_policy import NodePolicy, NodePolicyError

    assert NodePolicy.from_node_config({"partition-id": 0}, simulation=True).modes == mode_names()
    with pytest.raises(NodePolicyError, match="allowed-modes = '\\*': every registered mode is the open profile's"):
        NodePolicy.from_node_config({"allowed-modes": "*", "partition-id": 0}, simulation=False)
