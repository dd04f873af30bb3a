"""What a mode is: the phases its clients serve, the server's plan, its constraints and outputs.

A mode (``mode`` in the run config) is one :class:`Mode` object, registered by
name with :func:`fedgrow_core.modes.register_mode`. The ServerApp runs its
:attr:`Mode.plan`, step by step, then the final phase; the ClientApp serves each
phase with the handler :attr:`Mode.handlers` names for it; :class:`RunConfig`
checks a run against :meth:`Mode.config_problems`. Nothing else in the apps
looks at a mode's name. Fed-Grow and the baselines it is compared with are
:mod:`fedgrow_core.modes.fedgrow` and :mod:`fedgrow_core.modes.baselines`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from types import MappingProxyType
from typing import Protocol

from fedgrow_core.protocol import ALWAYS_SERVED, Phase


class ModeKeys(Protocol):
    """The run-config keys a mode's constraints read (a :class:`fedgrow_core.run_config.RunConfig` has them)."""

    dp_clipping: str
    resume_from: str
    global_tie_layers: bool
    global_rank: int


class Handler(StrEnum):
    """The client's handlers (``client_app``): what a node does with one phase's message."""

    #: Train Local-LiGO, Global-LiGO and head (or a private LiGO); reply with the Global-LiGO update if shared.
    GROW = "grow"
    #: Train the private small model; reply with metrics only.
    TRAIN_SMALL = "train-small"
    #: Train the received target-shaped model; reply with its weights.
    TRAIN_TARGET = "train-target"
    #: Reply with the target model's seeded random initialisation.
    COLLECT_TARGET = "collect-target"
    #: Materialise the grown model, fine-tune, evaluate and save it.
    FINAL_GROWN = "final-grown"
    #: Fine-tune, evaluate and save the private small model.
    FINAL_SMALL = "final-small"
    #: Load the received target model, fine-tune, evaluate and save it.
    FINAL_TARGET = "final-target"


class GlobalLigo(StrEnum):
    """Whether a mode's clients train a Global-LiGO, and whether it travels."""

    NONE = "none"
    #: Each client trains one, from the common initialisation, and never sends it.
    PRIVATE = "private"
    #: Each client trains one and sends its update; the strategy aggregates them.
    SHARED = "shared"


@dataclass(frozen=True)
class Collect:
    """Ask every node for its target model's starting weights and average them (``collect`` phase)."""


@dataclass(frozen=True)
class SharedRounds:
    """``num-server-rounds`` rounds of the run's strategy over shared tensors.

    Attributes
    ----------
    phase : Phase
        The rounds' phase.
    from_global_ligo : bool
        Start from the initial Global-LiGO (:func:`fedgrow_core.protocol.initial_global_ligo`);
        else from the previous step's arrays.
    encoded : bool
        Replies carry the run's ``update-encoding`` (else float32 values).
    diagnostics : bool
        Log each round's relative change and update cosine (a float64 copy of
        every reply: right for a Global-LiGO, costly for whole models).
    """

    phase: Phase
    from_global_ligo: bool = False
    encoded: bool = False
    diagnostics: bool = False


@dataclass(frozen=True)
class LocalRounds:
    """``num-server-rounds`` rounds in which every node trains privately and replies with metrics only."""

    phase: Phase


#: One step of a mode's server plan, before the final phase.
Step = Collect | SharedRounds | LocalRounds


@dataclass(frozen=True)
class Mode:
    """One mode of the app: Fed-Grow or a baseline it is compared with.

    Every mode gives each client ``num-server-rounds * local-steps +
    finetune-steps`` optimiser steps on the same rows.

    Attributes
    ----------
    name : str
        The run config's ``mode``.
    description : str
        One line: what the rounds do (docs/method.md, "Modes").
    plan : tuple of Step
        The server's steps before the final phase, in order; the final phase
        receives the arrays the last step left (nothing after local rounds).
    handlers : mapping of Phase to Handler
        The client's handler of each round phase and of :attr:`Phase.FINAL`.
    global_ligo : GlobalLigo
        Whether clients train a Global-LiGO, and whether it travels.
    operator : str
        ``"dual"`` (Local-LiGO then Global-LiGO, Fed-Grow's Dual-LiGO) or
        ``"single"`` (one private LiGO, small -> target), for :attr:`Handler.GROW`.
    checkpointed : bool
        The server checkpoints every round and clients keep their private
        state on disk under the run's tag; only such a mode can be resumed.
    central_dp : bool
        Central DP (``dp-clipping``) may wrap its strategy.
    model_kind : str
        Folder name of the model each client saves (``grown_model``, ``small_model``).
    in_folder_name : bool
        Whether the run folder's name carries the mode (the default mode's does not).
    """

    name: str
    description: str
    plan: tuple[Step, ...]
    handlers: Mapping[Phase, Handler]
    global_ligo: GlobalLigo = GlobalLigo.NONE
    operator: str = "dual"
    checkpointed: bool = False
    central_dp: bool = False
    model_kind: str = "grown_model"
    in_folder_name: bool = True
    _phases: frozenset[Phase] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if Phase.FINAL not in self.handlers:
            raise ValueError(f"mode {self.name!r}: no handler for phase {Phase.FINAL.value!r}")
        round_phases = {s.phase for s in self.plan if not isinstance(s, Collect)}
        round_phases |= {Phase.COLLECT} if any(isinstance(s, Collect) for s in self.plan) else set()
        missing = sorted(p.value for p in round_phases - set(self.handlers))
        if missing:
            raise ValueError(f"mode {self.name!r}: its plan sends phases {missing} that no handler serves")
        if sum(isinstance(s, SharedRounds) for s in self.plan) > 1:
            raise ValueError(f"mode {self.name!r}: at most one SharedRounds step (one strategy per run)")
        if self.checkpointed and self.shared_rounds is None:
            raise ValueError(f"mode {self.name!r}: only strategy rounds (SharedRounds) are checkpointed")
        if self.operator not in ("dual", "single"):
            raise ValueError(f"mode {self.name!r}: operator = {self.operator!r}, expected 'dual' or 'single'")
        object.__setattr__(self, "handlers", MappingProxyType(dict(self.handlers)))  # read-only once declared
        object.__setattr__(self, "_phases", frozenset(self.handlers) | ALWAYS_SERVED)

    def __hash__(self) -> int:
        return hash(self.name)

    @property
    def phases(self) -> frozenset[Phase]:
        """Every phase a client serves in this mode (its handlers' and :data:`~fedgrow_core.protocol.ALWAYS_SERVED`)."""
        return self._phases

    @property
    def shared_rounds(self) -> SharedRounds | None:
        """The plan's strategy rounds, or ``None`` (a mode has at most one such step)."""
        return next((s for s in self.plan if isinstance(s, SharedRounds)), None)

    def config_problems(self, run: ModeKeys) -> list[str]:
        """What of ``run`` this mode cannot serve, one ``key = value: why`` per problem.

        Central DP needs :attr:`central_dp`; ``resume-from`` needs
        :attr:`checkpointed`; ``global-tie-layers`` and ``global-rank`` shape
        the Global-LiGO, which needs one.
        """
        problems = []
        if run.dp_clipping != "off" and not self.central_dp:
            problems.append(
                f"dp-clipping = {run.dp_clipping!r}: mode {self.name!r} has no central DP (it aggregates nothing, "
                "or whole models with no shared reference to clip updates against)"
            )
        if run.resume_from and not self.checkpointed:
            problems.append(
                f"resume-from = {run.resume_from!r}: mode {self.name!r} is not checkpointed, so not resumed"
            )
        if self.global_ligo is GlobalLigo.NONE:
            for key, value in (("global-tie-layers", run.global_tie_layers), ("global-rank", run.global_rank)):
                if value:
                    problems.append(
                        f"{key} = {value!r}: this shapes the Global-LiGO, which mode {self.name!r} does not have"
                    )
        return problems
