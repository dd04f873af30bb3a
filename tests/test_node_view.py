"""One parse per run context: the ClientApp reads the run config and the node's policy once, not per message."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

import client_app.node_view as node_view_module
from client_app.node_view import cached_policy, node_view
from fedgrow_core.node_policy import NodePolicy
from fedgrow_core.run_config import ConfigError, RunConfig


def _context(run_config: dict, node_config: dict | None = None, run_id: int = 7, node_id: int = 11) -> Context:
    node = {"partition-id": 0, "num-partitions": 2, "node-policy": "open", **(node_config or {})}
    return Context(run_id, node_id, node, RecordDict(), dict(run_config))


@pytest.fixture
def parses(monkeypatch):
    """Count the run-config and node-config parses the view makes."""
    counts = {"run": 0, "node": 0}
    run_parse, node_parse = RunConfig.from_flower.__func__, NodePolicy.from_node_config.__func__

    def counted_run(cls, config):
        counts["run"] += 1
        return run_parse(cls, config)

    def counted_node(cls, config, **kwargs):
        counts["node"] += 1
        return node_parse(cls, config, **kwargs)

    monkeypatch.setattr(RunConfig, "from_flower", classmethod(counted_run))
    monkeypatch.setattr(NodePolicy, "from_node_config", classmethod(counted_node))
    monkeypatch.setattr(node_view_module, "_VIEWS", {})
    monkeypatch.setattr(node_view_module, "_POLICIES", {})
    return counts


def test_messages_of_one_run_context_share_one_parse(parses):
    context = _context({"seed": 3})
    first = node_view(context)
    assert node_view(context) is first and cached_policy(context) is first.policy
    assert parses == {"run": 1, "node": 1}
    assert first.run.seed == 3 and first.mode.name == "fedgrow"
    assert first.fingerprint == first.fingerprint and len(first.fingerprint) == 64


def test_a_changed_config_is_parsed_afresh_and_a_bad_one_is_never_kept(parses):
    context = _context({"seed": 3})
    first = node_view(context)
    context.run_config["seed"] = 4  # another run config under the same run id: never the old view
    second = node_view(context)
    assert second is not first and second.run.seed == 4 and parses["run"] == 2
    context.run_config["local-steps"] = 0
    with pytest.raises(ConfigError, match="local-steps = 0"):
        node_view(context)
    with pytest.raises(ConfigError, match="local-steps = 0"):  # refused again, not served from a cache
        node_view(context)
    assert parses["run"] == 4


def test_views_are_per_node():
    a, b = _context({"seed": 1}), _context({"seed": 1}, {"partition-id": 1}, node_id=12)
    assert node_view(a).policy.partition_id == 0 and node_view(b).policy.partition_id == 1
