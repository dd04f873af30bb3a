"""One parse per run context: the run config and the node's policy, read once and reused by every message.

Flower gives each message the node's ``Context``, whose ``run_config`` and
``node_config`` are the same for every message of a run. Parsing and checking
them (:meth:`RunConfig.from_flower`, :meth:`NodePolicy.from_node_config`) is
done once per (run, node) and kept while the two configs are unchanged; a
config that differs in any key is parsed afresh, so a cached view never
outlives the config it was read from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property

from flwr.app import Context

from fedgrow_core.modes import Mode, get_mode
from fedgrow_core.node_policy import NodePolicy, run_fingerprint
from fedgrow_core.run_config import RunConfig
from fedgrow_core.training import resolve_device

from .guards import RefusedMessage, check_policy, node_policy

#: Views kept per process: a simulation actor serves several nodes in turn.
_MAX_VIEWS = 64


@dataclass(frozen=True)
class NodeView:
    """One node's view of a run: the server's run config, the node's policy, the run as the node runs it.

    Attributes
    ----------
    run : RunConfig
        The server's run config, checked.
    policy : NodePolicy
        The node's policy (its node config).
    effective : RunConfig
        ``run`` with the node's own folders and columns (:meth:`NodePolicy.effective_run`).
    """

    run: RunConfig
    policy: NodePolicy
    effective: RunConfig
    mode: Mode = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "mode", get_mode(self.run.mode))

    @property
    def key(self) -> tuple:
        """What the node's cached client objects are built from: partition, partitions, model, dataset."""
        return (self.policy.partition_id, self.policy.num_partitions, self.policy.model, self.policy.dataset)

    @cached_property
    def fingerprint(self) -> str:
        """:func:`fedgrow_core.node_policy.run_fingerprint` of :attr:`run` (SHA-256 hex)."""
        return run_fingerprint(self.run)


_POLICIES: dict[tuple, tuple[dict, NodePolicy]] = {}
_VIEWS: dict[tuple, tuple[dict, dict, NodeView]] = {}


def _remember(cache: dict, key: tuple, value: tuple) -> None:
    cache.pop(key, None)
    cache[key] = value
    while len(cache) > _MAX_VIEWS:
        cache.pop(next(iter(cache)))


def cached_policy(context: Context) -> NodePolicy:
    """The node's policy (:func:`client_app.guards.node_policy`), parsed once per node config.

    Raises
    ------
    NodePolicyError
        If the node config is not a valid policy (nothing is kept).
    """
    key = (context.run_id, context.node_id)
    node_config = dict(context.node_config)
    kept = _POLICIES.get(key)
    if kept is not None and kept[0] == node_config:
        return kept[1]
    policy = node_policy(node_config)
    _remember(_POLICIES, key, (node_config, policy))
    return policy


def node_view(context: Context) -> NodeView:
    """The run config and the node's policy, checked one against the other before any work; parsed once per run.

    Raises
    ------
    ConfigError
        If the run config is malformed.
    NodePolicyError
        If the node config is not a valid policy.
    RefusedMessage
        If the run config asks what the policy does not allow, or the node's device
        (:meth:`NodePolicy.effective_run`) is one this machine lacks.
    """
    key = (context.run_id, context.node_id)
    run_config, node_config = dict(context.run_config), dict(context.node_config)
    kept = _VIEWS.get(key)
    if kept is not None and kept[0] == run_config and kept[1] == node_config:
        return kept[2]
    run = RunConfig.from_flower(run_config)
    policy = cached_policy(context)
    check_policy(run, policy)
    view = NodeView(run, policy, policy.effective_run(run))
    try:  # hardware this node lacks is its refusal, with the reason (the run goes on without it)
        resolve_device(view.effective.device)
    except ValueError as err:
        raise RefusedMessage(f"{err} (node config `device` sets this node's own)") from None
    _remember(_VIEWS, key, (run_config, node_config, view))
    return view
