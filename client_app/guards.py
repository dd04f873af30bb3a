"""The client's side of the trust boundary: what a node serves, and what its errors may say.

The server is a party the client does not trust either. A message is served
only if the run's mode serves its phase
(:func:`fedgrow_core.protocol.served_phases`), and the node
operator may narrow the modes further with the node config key
``allowed-modes`` (comma-separated, e.g. ``--node-config "allowed-modes='fedgrow'"``):
a server that asks a ``fedgrow`` node for ``train-shared`` (a whole target model
trained on private rows) is refused. The server's ``run-tag`` names a folder on
the node's disk, so it must be one safe path component (:func:`check_run_tag`).

Error replies leave the node too. :func:`sanitised_errors_mod` turns every
exception into an error reply with the exception's type only, or for the
project's own refusals (:class:`RefusedMessage`, ``ConfigError``) their text
with absolute paths replaced by ``<path>``; the full traceback stays in the
node's own log.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping

from flwr.app import Context, Error, Message
from flwr.clientapp.typing import ClientAppCallable
from flwr.common.constant import ErrorCode

from fedgrow_core.protocol import Instruction, Phase, ProtocolError, served_phases
from fedgrow_core.run_config import MODES, ConfigError

_LOG = logging.getLogger(__name__)

_RUN_TAG = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")
#: A quoted string holding a path separator or ``~``; then any bare token holding a separator.
_QUOTED_PATH = re.compile(r"""(['"])(?:(?!\1).)*[/\\~](?:(?!\1).)*\1""")
_BARE_PATH = re.compile(r"""[^\s'"(),;]*[/\\][^\s'"(),;]*""")


class RefusedMessage(RuntimeError):
    """Raised when a client refuses a server message (a phase its mode does not serve, an unsafe run tag)."""


def allowed_modes(node_config: Mapping[str, object]) -> tuple[str, ...]:
    """The modes this node serves: node config ``allowed-modes`` (comma-separated), or every mode.

    Raises
    ------
    RefusedMessage
        If ``allowed-modes`` names an unknown mode.
    """
    raw = str(node_config.get("allowed-modes", "") or "")
    modes = tuple(m.strip() for m in raw.split(",") if m.strip()) or MODES
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise RefusedMessage(f"node config allowed-modes names unknown modes {unknown}; expected some of {list(MODES)}")
    return modes


def check_instruction(
    mode: str, config: Mapping[str, object], node_config: Mapping[str, object], default_phase: Phase | None = None
) -> Instruction:
    """The server's instruction (:meth:`~fedgrow_core.protocol.Instruction.from_record`) if this node serves it.

    ``default_phase`` is the phase of a message whose config names none.

    Raises
    ------
    RefusedMessage
        If the config record does not follow the protocol, the node's
        ``allowed-modes`` exclude ``mode``, ``mode`` does not serve the phase
        (the message names both and what is served), or the ``run-tag`` is not
        one safe path component (:func:`check_run_tag`).
    """
    try:
        instruction = Instruction.from_record(config, default_phase=default_phase)
    except ProtocolError as err:
        raise RefusedMessage(str(err)) from None
    check_phase(mode, instruction.phase, node_config)
    check_run_tag(instruction.run_tag)
    return instruction


def check_phase(mode: str, phase: Phase | str, node_config: Mapping[str, object]) -> Phase:
    """``phase`` if this node serves it in ``mode``.

    Raises
    ------
    RefusedMessage
        If the node's ``allowed-modes`` exclude ``mode``, or ``mode`` does not
        serve ``phase``; the message names both and what is served.
    """
    if mode not in allowed_modes(node_config):
        raise RefusedMessage(f"mode {mode!r} is not among this node's allowed-modes {list(allowed_modes(node_config))}")
    served = served_phases(mode)
    if phase not in served:
        raise RefusedMessage(f"phase {str(phase)[:40]!r} is not served in mode {mode!r}; it serves {sorted(served)}")
    return Phase(phase)


def check_run_tag(tag: object) -> str:
    """``tag`` as a string if it is empty or one safe path component (letters, digits, ``.``, ``_``, ``-``).

    Raises
    ------
    RefusedMessage
        For anything else (``..``, a separator, a leading dot, over 200 characters).
    """
    text = str(tag)
    if text and (not _RUN_TAG.match(text) or ".." in text):
        raise RefusedMessage(
            f"run-tag {text[:40]!r}: expected one path component of letters, digits, '.', '_' and '-' "
            "(at most 200, not starting with '.', no '..')"
        )
    return text


def sanitised_reason(err: BaseException) -> str:
    """What an error reply may say about ``err``: its type; for the project's own refusals, their text without paths."""
    if isinstance(err, (RefusedMessage, ConfigError)):
        text = _BARE_PATH.sub("<path>", _QUOTED_PATH.sub("'<path>'", str(err)))
        return f"{type(err).__name__}: {text}"[:2000]
    return f"{type(err).__name__} (details are in the node's own log)"


def sanitised_errors_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """ClientApp mod: reply to any exception with :func:`sanitised_reason`, logging the full traceback locally."""
    try:
        return call_next(msg, context)
    except Exception as err:  # noqa: BLE001 - every exception becomes an error reply; none leaves unsanitised
        _LOG.exception("ClientApp raised while serving a %s message", msg.metadata.message_type)
        return Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=sanitised_reason(err)), reply_to=msg)
