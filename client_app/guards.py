"""The client's side of the trust boundary: what a node serves, what it accepts, and what its errors may say.

The server is a party the client does not trust either. Every message is
checked before any work, in this order:

1. the node's policy (:class:`fedgrow_core.node_policy.NodePolicy`, from its
   node config; :func:`node_policy`) must allow the run config: the mode, the
   data and model it names, and the work it asks (:func:`check_policy`);
2. the run's mode must serve the message's phase
   (:attr:`fedgrow_core.modes.Mode.phases`), and the ``run-tag``, which
   names a folder on the node's disk, must be one safe path component
   (:func:`check_instruction`);
3. every received tensor must have the expected name, shape and dtype, be
   finite and within the policy's ``max-received-abs`` (:func:`check_received`),
   before it touches private state.

Error replies leave the node too. :func:`sanitised_errors_mod` turns every
exception into an error reply with the exception's type only, or for the
project's own refusals (:data:`REFUSALS`) their text with paths replaced by
``<path>``; the full traceback stays in the node's own log.
:class:`GuardedClientApp` does the same for a message no handler serves (an
unknown action), which Flower answers before any mod runs.
"""

from __future__ import annotations

import logging
import math
import re
import sys
from collections.abc import Callable, Mapping

from flwr.app import Context, Error, Message
from flwr.clientapp import ClientApp
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode
from torch import Tensor

from fedgrow_core.clients.model_export import NonFiniteModel, count_non_finite
from fedgrow_core.modes import get_mode
from fedgrow_core.node_policy import NodePolicy, NodePolicyError
from fedgrow_core.protocol import Instruction, Phase, ProtocolError
from fedgrow_core.run_config import ConfigError, RunConfig
from fedgrow_core.training import WorkLimitExceeded

_LOG = logging.getLogger(__name__)

_RUN_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: A quoted string holding a path separator or ``~``; then any bare token holding a separator.
_QUOTED_PATH = re.compile(r"""(['"])(?:(?!\1).)*[/\\~](?:(?!\1).)*\1""")
_BARE_PATH = re.compile(r"""[^\s'"(),;]*[/\\][^\s'"(),;]*""")


class RefusedMessage(RuntimeError):
    """Raised when a client refuses a server message; the text names the value and what was expected."""


#: The project's own refusals: their text (paths removed) may go into an error reply.
REFUSALS = (RefusedMessage, ConfigError, NodePolicyError, WorkLimitExceeded, NonFiniteModel)


def in_simulation() -> bool:
    """Whether this process serves nodes of Flower's simulation engine (it runs ClientApps in Ray actors)."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return False
    return ray.get_runtime_context().get_actor_id() is not None


def node_policy(node_config: Mapping[str, object]) -> NodePolicy:
    """The node's policy: its node config, with the ``open`` profile inside Flower's simulation, else ``strict``.

    Raises
    ------
    NodePolicyError
        If the node config is not a valid policy.
    """
    return NodePolicy.from_node_config(node_config, simulation=in_simulation())


def check_policy(run: RunConfig, policy: NodePolicy) -> None:
    """Refuse a run config that asks what ``policy`` does not allow.

    Raises
    ------
    RefusedMessage
        Listing every problem (:meth:`NodePolicy.problems`) on one line (the server's preflight error shows
        each node's last line): the key, the value and the policy's limit.
    """
    problems = policy.problems(run)
    if problems:
        raise RefusedMessage("refused by this node's policy: " + "; ".join(problems))


def check_instruction(
    mode: str, config: Mapping[str, object], policy: NodePolicy, default_phase: Phase | None = None
) -> Instruction:
    """The server's instruction (:meth:`~fedgrow_core.protocol.Instruction.from_record`) if this node serves it.

    ``default_phase`` is the phase of a message whose config names none.

    Raises
    ------
    RefusedMessage
        If the config record does not follow the protocol, the policy's
        ``allowed-modes`` exclude ``mode``, ``mode`` does not serve the phase
        (the message names both and what is served), or the ``run-tag`` is not
        one safe path component (:func:`check_run_tag`).
    """
    try:
        instruction = Instruction.from_record(config, default_phase=default_phase)
    except ProtocolError as err:
        raise RefusedMessage(str(err)) from None
    check_phase(mode, instruction.phase, policy)
    check_run_tag(instruction.run_tag)
    return instruction


def check_phase(mode: str, phase: Phase | str, policy: NodePolicy) -> Phase:
    """``phase`` if this node serves it in ``mode``.

    Raises
    ------
    RefusedMessage
        If the policy's ``allowed-modes`` exclude ``mode``, or ``mode`` does not
        serve ``phase``; the message names both and what is served.
    """
    if mode not in policy.modes:
        raise RefusedMessage(f"mode {mode!r} is not among this node's allowed-modes {list(policy.modes)}")
    served = get_mode(mode).phases
    if phase not in served:
        raise RefusedMessage(f"phase {str(phase)[:40]!r} is not served in mode {mode!r}; it serves {sorted(served)}")
    return Phase(phase)


def check_received(received: Mapping[str, Tensor], expected: Mapping[str, Tensor], max_abs: float, what: str) -> None:
    """Refuse received tensors unless they match ``expected`` and are finite and bounded.

    Parameters
    ----------
    received : mapping of str to Tensor
        What the message carries.
    expected : mapping of str to Tensor
        Tensors of the names, shapes and dtypes the node expects (e.g. its own Global-LiGO).
    max_abs : float
        Largest ``|value|`` accepted (node config ``max-received-abs``).
    what : str
        What the tensors are, for the message (``"Global-LiGO"``).

    Raises
    ------
    RefusedMessage
        Naming the first tensor that is missing, extra, of another shape or
        dtype, not finite, or over ``max_abs``, and what was expected.
    """
    missing, extra = sorted(set(expected) - set(received)), sorted(set(received) - set(expected))
    if missing or extra:
        raise RefusedMessage(
            f"the received {what} does not match this node's: missing {[m[:40] for m in missing[:3]]}, "
            f"extra {[e[:40] for e in extra[:3]]} ({len(missing)} missing, {len(extra)} extra)"
        )
    for name, want in expected.items():
        got = received[name]
        if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
            raise RefusedMessage(
                f"tensor {name!r} of the received {what}: shape {tuple(got.shape)} {got.dtype}, "
                f"expected {tuple(want.shape)} {want.dtype}"
            )
        if got.numel() == 0:
            continue
        bad = count_non_finite(got)
        if bad:
            raise RefusedMessage(f"tensor {name!r} of the received {what} has {bad} non-finite values")
        peak = float(got.abs().max())
        if peak > max_abs:
            raise RefusedMessage(
                f"tensor {name!r} of the received {what}: max |value| {peak:.4g} is over this node's "
                f"max-received-abs = {max_abs:g}"
            )


def check_finite_reply(arrays: Mapping[str, Tensor] | None, metrics: Mapping[str, float], what: str) -> None:
    """Refuse to send a reply whose tensors or metrics are not finite (training diverged on what was received).

    Raises
    ------
    RefusedMessage
        Naming the first non-finite tensor or metric.
    """
    for key, value in metrics.items():
        if not math.isfinite(float(value)):
            raise RefusedMessage(f"{what} gave {key} = {value}; nothing is sent and this node's state is kept")
    for name, tensor in (arrays or {}).items():
        if count_non_finite(tensor):
            raise RefusedMessage(
                f"{what} gave non-finite values in {name[:40]!r}; nothing is sent and this node's state is kept"
            )


def check_run_tag(tag: object) -> str:
    """``tag`` as a string if it is empty or one safe path component (letters, digits, ``.``, ``_``, ``-``).

    Raises
    ------
    RefusedMessage
        For anything else (``..``, a separator, a leading dot, over 200 characters).
    """
    text = str(tag)
    if text and (not _RUN_TAG.fullmatch(text) or ".." in text):
        raise RefusedMessage(
            f"run-tag {text[:40]!r}: expected one path component of letters, digits, '.', '_' and '-' "
            "(at most 200, not starting with '.', no '..')"
        )
    return text


def sanitised_reason(err: BaseException) -> str:
    """What an error reply may say about ``err``: its type; for the project's own refusals, their text without paths."""
    if isinstance(err, REFUSALS):
        text = _BARE_PATH.sub("<path>", _QUOTED_PATH.sub("'<path>'", str(err)))
        return f"{type(err).__name__}: {text}"[:2000]
    return f"{type(err).__name__} (details are in the node's own log)"


def sanitised_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: reply to any exception with :func:`sanitised_reason`, logging the full traceback locally."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - every exception becomes an error reply; none leaves unsanitised
        return _error_reply(msg, err)


def _error_reply(msg: Message, err: Exception) -> Message:
    _LOG.exception("ClientApp raised while serving a %s message", str(msg.metadata.message_type)[:80])
    return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=sanitised_reason(err)), reply_to=msg)


class GuardedClientApp(ClientApp):
    """A ``ClientApp`` whose every reply is sanitised, including to messages no handler serves.

    Flower's ``ClientApp`` raises for a message type without a registered
    handler (``train.steal``) before any mod runs, and its runtime then sends
    the exception's text (in simulation, with a traceback). Here such a message
    gets the same sanitised error reply as any other failure (:func:`sanitised_reason`).

    Parameters
    ----------
    mods : list of callable, optional
        Flower mods around every registered handler.
    on_error_reply : callable, optional
        Called as ``on_error_reply(message, reply, context)`` with each error
        reply made here (the egress audit).
    """

    def __init__(self, mods: list | None = None, on_error_reply: Callable | None = None) -> None:
        super().__init__(mods=mods)
        self._on_error_reply = on_error_reply

    def __call__(self, message: Message, context: Context) -> Message:
        """Serve ``message``; any exception becomes a sanitised error reply."""
        try:
            return super().__call__(message, context)
        except Exception as err:  # noqa: BLE001 - nothing leaves the node unsanitised
            reply = _error_reply(message, err)
            if self._on_error_reply is not None:
                self._on_error_reply(message, reply, context)
            return reply
