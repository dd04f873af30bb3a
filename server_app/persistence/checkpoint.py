"""Server checkpoint after every growth round, and resume from it (``resume-from``).

One ``safetensors`` file, ``<run folder>/checkpoint.safetensors``, written to a
temporary file and renamed (``os.replace``) so a crash leaves the previous
round's checkpoint intact. It holds

* ``global/<name>``: the Global-LiGO after the round;
* ``strategy/<name>``: the strategy's own state (:func:`strategy_state`), e.g.
  FedAdam's first and second moments;
* ``rng/numpy``: NumPy's global Mersenne-Twister key (central DP's noise does
  not draw from it: :func:`server_app.trust.central_dp.secure_gaussian`);

and, as ``safetensors`` string metadata, JSON of the round number, the round-log
entries so far, the run config (to refuse a resume with different settings),
Python's ``random`` state (Flower samples nodes with it), the strategy's
scalar state, and ``sha256``: a SHA-256 over every tensor and every other
metadata field (:func:`content_hash`). The file is fsync'ed before the rename
and the folder after it.

Nothing in a checkpoint is trusted on resume (:func:`check_resumable`): the
hash must match (it detects corruption and truncation, not a party that can
rewrite the file and its hash); the Global-LiGO must have exactly the names and
shapes of ``initial_global_ligo(run)``, all finite; the round must be in
``[1, num-server-rounds]``; strategy tensors must be known state of known
tensors, finite; and only the scalars in ``_STRATEGY_SCALARS`` are restored,
each range-checked.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord
from flwr.serverapp.strategy import Strategy
from safetensors import safe_open
from safetensors.numpy import load_file, save_file

from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RESUMABLE_CHANGES, ConfigError, RunConfig

CHECKPOINT_FILE = "checkpoint.safetensors"
FORMAT = "fedgrow-checkpoint/1"
#: Array-valued state of Flower's built-in strategies and of centred clipping (attribute -> kind), saved when set.
_STRATEGY_ARRAYS = {"m_t": "dict", "v_t": "dict", "momentum_vector": "list", "centred_clip_momentum": "dict"}
#: Scalar state of Flower's built-in strategies and wrappers (adaptive clipping's norm).
_STRATEGY_SCALARS = ("clipping_norm",)


@dataclass
class Checkpoint:
    """What a resumed run starts from.

    Attributes
    ----------
    server_round : int
        Rounds completed (the next round is ``server_round + 1``).
    global_ligo : ArrayRecord
        The Global-LiGO after that round.
    entries : list of dict
        The round-log entries of rounds ``1..server_round``.
    strategy : dict
        ``{"arrays": {name: ndarray}, "scalars": {name: float}}``, for
        :func:`load_strategy_state`.
    run_config : dict
        The run config the checkpoint was written under (``RunConfig`` field names).
    """

    server_round: int
    global_ligo: ArrayRecord
    entries: list[dict]
    strategy: dict
    run_config: dict
    python_random: Any = None
    numpy_random: Any = None

    def restore_rng(self) -> None:
        """Set Python's and NumPy's global RNGs to their state at the checkpoint."""
        if self.python_random is not None:
            version, internal, gauss = self.python_random
            random.setstate((version, tuple(internal), gauss))
        if self.numpy_random is not None:
            random_key, meta = self.numpy_random
            np.random.set_state((meta["name"], random_key, meta["pos"], meta["has_gauss"], meta["cached_gaussian"]))


def _wrapped(strategy: Strategy) -> list[Strategy]:
    """The strategy and, through wrappers' ``strategy`` attribute (Flower's DP wrappers), the ones inside."""
    chain = [strategy]
    while isinstance(getattr(chain[-1], "strategy", None), Strategy):
        chain.append(chain[-1].strategy)
    return chain


def strategy_state(strategy: Strategy) -> dict:
    """The strategy's own state between rounds.

    A strategy with ``state_dict()`` (returning this function's format) is asked
    for it; otherwise the known state of Flower's built-in strategies is taken:
    ``m_t``, ``v_t`` (FedAdam, FedYogi, FedAdagrad), ``momentum_vector``
    (FedAvgM), ``centred_clip_momentum`` (centred clipping) and
    ``clipping_norm`` (adaptive-clipping DP), through wrappers.

    Returns
    -------
    dict
        ``{"arrays": {"<depth>.<attr>.<key>": ndarray}, "scalars": {"<depth>.<attr>": float}}``.
    """
    if hasattr(strategy, "state_dict"):
        return strategy.state_dict()
    arrays, scalars = {}, {}
    for depth, s in enumerate(_wrapped(strategy)):
        for attr, kind in _STRATEGY_ARRAYS.items():
            value = getattr(s, attr, None)
            # a user's strategy may use these names for other things (a float momentum, say): only state of
            # the known kind is state
            if not value or not isinstance(value, dict if kind == "dict" else (list, tuple)):
                continue
            items = value.items() if kind == "dict" else enumerate(value)
            arrays.update({f"{depth}.{attr}.{k}": np.ascontiguousarray(v) for k, v in items})
        for attr in _STRATEGY_SCALARS:
            if isinstance(getattr(s, attr, None), (int, float)):
                scalars[f"{depth}.{attr}"] = float(getattr(s, attr))
    return {"arrays": arrays, "scalars": scalars}


#: Attributes a strategy changes while aggregating (Flower's built-ins and wrappers).
_ROUND_STATE = ("m_t", "v_t", "momentum_vector", "centred_clip_momentum", "clipping_norm", "current_arrays")


def snapshot_state(strategy: Strategy) -> list[dict]:
    """A deep copy of what aggregating one round may change, through wrappers (see :func:`restore_state`).

    A strategy with ``state_dict()`` is snapshotted through it; otherwise the
    attributes in ``_ROUND_STATE`` of each strategy in the wrapper chain.

    Returns
    -------
    list of dict
        One ``{attribute: deep copy}`` per strategy in the chain, outermost
        first (or one ``{"state_dict": ...}``).
    """
    if hasattr(strategy, "state_dict"):
        return [{"state_dict": copy.deepcopy(strategy.state_dict())}]
    return [{a: copy.deepcopy(getattr(s, a)) for a in _ROUND_STATE if hasattr(s, a)} for s in _wrapped(strategy)]


def state_is_finite(strategy: Strategy) -> bool:
    """Whether every tensor and scalar of :func:`strategy_state` is finite (FedAdam's ``v_t`` can overflow to inf)."""
    state = strategy_state(strategy)
    arrays_ok = all(np.isfinite(np.asarray(v, np.float64)).all() for v in state["arrays"].values())
    return arrays_ok and all(np.isfinite(float(v)) for v in state["scalars"].values())


def restore_state(strategy: Strategy, saved: list[dict]) -> None:
    """Put back a :func:`snapshot_state` (a refused round leaves no trace in the strategy)."""
    if hasattr(strategy, "load_state_dict") and saved and "state_dict" in saved[0]:
        strategy.load_state_dict(saved[0]["state_dict"])
        return
    for s, attrs in zip(_wrapped(strategy), saved, strict=False):
        for attr, value in attrs.items():
            setattr(s, attr, value)


def load_strategy_state(strategy: Strategy, state: dict) -> None:
    """Put :func:`strategy_state`'s output back (``load_state_dict`` if the strategy has one)."""
    if hasattr(strategy, "load_state_dict"):
        strategy.load_state_dict(state)
        return
    chain = _wrapped(strategy)
    for key, value in state["arrays"].items():
        depth, attr, name = key.split(".", 2)
        target = chain[int(depth)]
        if _STRATEGY_ARRAYS[attr] == "dict":
            setattr(target, attr, {**(getattr(target, attr, None) or {}), name: value})
        else:
            vector = list(getattr(target, attr, None) or [])
            vector += [None] * (int(name) + 1 - len(vector))
            vector[int(name)] = value
            setattr(target, attr, vector)
    for key, value in state["scalars"].items():
        depth, attr = key.split(".", 1)
        setattr(chain[int(depth)], attr, value)


def _config_json(run: RunConfig) -> dict:
    return {name: str(getattr(run, name)) for name in type(run).model_fields}


def write_checkpoint(
    run_dir: Path, run: RunConfig, server_round: int, global_ligo: ArrayRecord, strategy: Strategy, entries: list[dict]
) -> Path:
    """Write the checkpoint of round ``server_round`` atomically (temporary file, then rename).

    Returns
    -------
    Path
        ``run_dir / "checkpoint.safetensors"``.
    """
    state = strategy_state(strategy)
    np_name, np_key, np_pos, np_has_gauss, np_cached = np.random.get_state()
    tensors = {f"global/{k}": np.ascontiguousarray(v.numpy()) for k, v in global_ligo.items()}
    tensors.update({f"strategy/{k}": v for k, v in state["arrays"].items()})
    tensors["rng/numpy"] = np.asarray(np_key)
    version, internal, gauss = random.getstate()
    metadata = {
        "format": FORMAT,
        "round": str(server_round),
        "entries": json.dumps(entries),
        "run-config": json.dumps(_config_json(run)),
        "strategy-scalars": json.dumps(state["scalars"]),
        "python-random": json.dumps([version, list(internal), gauss]),
        "numpy-random": json.dumps(
            {"name": np_name, "pos": int(np_pos), "has_gauss": int(np_has_gauss), "cached_gaussian": float(np_cached)}
        ),
    }
    metadata["sha256"] = content_hash(tensors, metadata)
    path = run_dir / CHECKPOINT_FILE
    tmp = run_dir / f".{CHECKPOINT_FILE}.{os.getpid()}.tmp"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        folder = os.open(run_dir, os.O_RDONLY)
        try:
            os.fsync(folder)
        finally:
            os.close(folder)
    except Exception as err:  # noqa: BLE001 - safetensors raises its own type (e.g. a header over 100 MB)
        raise OSError(f"cannot write the checkpoint {path}: {getattr(err, 'strerror', None) or err}") from err
    return path


def content_hash(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> str:
    """SHA-256 hex digest of the tensors (name, dtype, shape, bytes; by name) and the metadata but ``sha256``.

    Parameters
    ----------
    tensors : dict of str to ndarray
        What the checkpoint file holds, any shapes.
    metadata : dict of str to str
        Its string metadata; a ``sha256`` key is skipped.

    Returns
    -------
    str
        64 hex characters (FIPS 180-4 SHA-256 via ``hashlib``).
    """
    digest = hashlib.sha256()
    for name in sorted(tensors):
        value = np.ascontiguousarray(tensors[name])
        digest.update(f"{name}|{value.dtype}|{value.shape}|".encode())
        digest.update(value.tobytes())
    for key in sorted(k for k in metadata if k != "sha256"):
        digest.update(f"{key}={metadata[key]}|".encode())
    return digest.hexdigest()


def read_checkpoint(run_dir: str | Path) -> Checkpoint:
    """Read ``<run_dir>/checkpoint.safetensors``.

    Raises
    ------
    ConfigError
        If the file is missing or not a Fed-Grow checkpoint (naming ``resume-from``).
    """
    path = Path(run_dir) / CHECKPOINT_FILE
    if not path.is_file():
        raise ConfigError([f"resume-from = {str(run_dir)!r}: no {CHECKPOINT_FILE} there (expected a run folder)"])
    where = f"resume-from = {str(run_dir)!r}: {path}"
    try:
        with safe_open(str(path), framework="numpy") as f:
            metadata = f.metadata() or {}
        if metadata.get("format") != FORMAT:
            raise ConfigError([f"{where} is not a {FORMAT} file"])
        tensors = load_file(str(path))
    except ConfigError:
        raise
    except Exception as err:  # noqa: BLE001 - safetensors raises its own error type for truncated files
        raise ConfigError(
            [f"{where} cannot be read ({type(err).__name__}: {err}); it is damaged or truncated"]
        ) from err
    if metadata.get("sha256") != content_hash(tensors, metadata):
        raise ConfigError([f"{where}: integrity hash does not match its contents (damaged or altered)"])
    try:
        arrays = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("strategy/")}
        glob = {k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith("global/")}
        return Checkpoint(
            server_round=int(metadata["round"]),
            global_ligo=ArrayRecord({k: Array(glob[k]) for k in sorted(glob)}),
            entries=json.loads(metadata["entries"]),
            strategy={"arrays": arrays, "scalars": json.loads(metadata["strategy-scalars"])},
            run_config=json.loads(metadata["run-config"]),
            python_random=json.loads(metadata["python-random"]),
            numpy_random=(tensors["rng/numpy"], json.loads(metadata["numpy-random"])),
        )
    except (KeyError, ValueError, TypeError) as err:
        raise ConfigError([f"{where}: malformed checkpoint field ({type(err).__name__}: {err})"]) from err


def check_resumable(checkpoint: Checkpoint, run: RunConfig) -> None:
    """Refuse to resume under settings other than the checkpoint's.

    Raises
    ------
    ConfigError
        One problem per run-config key that differs (except
        ``RESUMABLE_CHANGES``), or if ``num-server-rounds`` is below the rounds
        already done.
    """
    now = _config_json(run)
    problems = [
        f"{k.replace('_', '-')} = {now.get(k)!r}, but the checkpoint in resume-from was written with {v!r}"
        for k, v in checkpoint.run_config.items()
        if k not in RESUMABLE_CHANGES and now.get(k) != v
    ]
    if run.num_server_rounds < checkpoint.server_round:
        problems.append(
            f"num-server-rounds = {run.num_server_rounds}: the checkpoint has already done "
            f"{checkpoint.server_round} rounds"
        )
    problems += content_problems(checkpoint, run)
    if problems:
        raise ConfigError(problems)


def content_problems(checkpoint: Checkpoint, run: RunConfig) -> list[str]:
    """What in a checkpoint's contents a run must not trust (empty if nothing).

    Checks the round, the Global-LiGO against ``initial_global_ligo(run)`` (names,
    shapes, float32, finite), the strategy tensors (known attribute, known
    tensor, its shape, finite) and the scalars (known, finite, in range).
    """
    p = []
    if not 1 <= checkpoint.server_round <= run.num_server_rounds:
        p.append(f"checkpoint round {checkpoint.server_round}: expected an integer in [1, {run.num_server_rounds}]")
    expected = {k: tuple(v.shape) for k, v in initial_global_ligo(run).state_dict().items()}
    got = {k: tuple(a.shape) for k, a in checkpoint.global_ligo.items()}
    if set(got) != set(expected):
        extra, missing = sorted(set(got) - set(expected)), sorted(set(expected) - set(got))
        p.append(f"checkpoint Global-LiGO tensors differ from the run's: extra {extra[:5]}, missing {missing[:5]}")
    for name, array in checkpoint.global_ligo.items():
        if name in expected and (got[name] != expected[name] or str(array.dtype) != "float32"):
            p.append(f"checkpoint tensor {name!r}: {got[name]} {array.dtype}, expected {expected[name]} float32")
        elif not np.isfinite(array.numpy()).all():
            p.append(f"checkpoint tensor {name!r} holds NaN or Inf")
    ordered = list(expected.values())  # FedAvgM's momentum list follows the Global-LiGO's order
    for key, value in checkpoint.strategy["arrays"].items():
        depth, attr, name = (key.split(".", 2) + ["", ""])[:3]
        kind = _STRATEGY_ARRAYS.get(attr)
        known = name in expected if kind == "dict" else name.isdigit() and int(name) < len(expected)
        if not (depth.isdigit() and int(depth) <= _MAX_WRAPPER_DEPTH) or kind is None or not known:
            p.append(f"checkpoint strategy tensor {key!r}: not a known strategy state")
            continue
        want = expected[name] if kind == "dict" else ordered[int(name)]
        if tuple(value.shape) != want:
            p.append(f"checkpoint strategy tensor {key!r}: shape {tuple(value.shape)}, expected {want}")
        elif not np.isfinite(value).all():
            p.append(f"checkpoint strategy tensor {key!r} holds NaN or Inf")
    for key, value in checkpoint.strategy["scalars"].items():
        depth, _, attr = key.partition(".")
        if not (depth.isdigit() and int(depth) <= _MAX_WRAPPER_DEPTH) or attr not in _STRATEGY_SCALARS:
            p.append(f"checkpoint strategy scalar {key!r}: only {list(_STRATEGY_SCALARS)} may be restored")
        elif not isinstance(value, (int, float)) or not _scalar_range(run)[0] <= value <= _scalar_range(run)[1]:
            low, high = _scalar_range(run)
            p.append(f"checkpoint strategy scalar {key!r} = {value!r}: expected a number in [{low:g}, {high:g}]")
    p += _rng_problems(checkpoint)
    if not isinstance(checkpoint.entries, list) or not all(_entry_ok(e) for e in checkpoint.entries):
        p.append(f"checkpoint round log: expected a list of round entries with {sorted(_ENTRY_FIELDS)}")
    return p


#: Fields of a round-log entry the summary reads, and their types.
_ENTRY_FIELDS = {
    "round": int,
    "phase": str,
    "replies": int,
    "accepted_nodes": list,
    "failed": int,
    "rejected": list,
    "seconds": (int, float),
    "client_metrics": dict,
    "upload_bytes": dict,
}


def _entry_ok(entry: object) -> bool:
    return isinstance(entry, dict) and all(isinstance(entry.get(k), t) for k, t in _ENTRY_FIELDS.items())


#: Wrappers around the strategy a checkpoint may hold state of (the central-DP wrapper: depth 0, FedAvg: 1).
_MAX_WRAPPER_DEPTH = 1


def _rng_problems(checkpoint: Checkpoint) -> list[str]:
    """Why the stored Python and NumPy RNG states cannot be restored (their shapes as ``random`` and NumPy need)."""
    problems = []
    state = checkpoint.python_random
    ok = (
        isinstance(state, list)
        and len(state) == 3
        and state[0] == 3  # random.getstate()'s version
        and isinstance(state[1], list)
        and len(state[1]) == 625
        and all(isinstance(v, int) and 0 <= v < 2**32 for v in state[1])
        and 0 <= state[1][-1] <= 624  # the position word
        and (state[2] is None or isinstance(state[2], float))
    )
    if not ok:
        problems.append("checkpoint python-random: not a Python random state (version, 625 words, gauss)")
    key, meta = checkpoint.numpy_random if checkpoint.numpy_random is not None else (None, None)
    ok = (
        isinstance(key, np.ndarray)
        and key.shape == (624,)
        and key.dtype == np.uint32
        and isinstance(meta, dict)
        and meta.get("name") == "MT19937"
        and isinstance(meta.get("pos"), int)
        and 0 <= meta["pos"] <= 624
        and meta.get("has_gauss") in (0, 1)
        and isinstance(meta.get("cached_gaussian"), float)
    )
    if not ok:
        problems.append("checkpoint numpy-random: not a NumPy MT19937 state (624 uint32 words, position 0..624)")
    return problems


def _scalar_range(run: RunConfig) -> tuple[float, float]:
    """Range of a restored clipping norm: what ``dp-clipping-norm`` is (fixed), or within 1000x of it (adaptive)."""
    if run.dp_clipping == "fixed":
        return run.dp_clipping_norm, run.dp_clipping_norm
    return run.dp_clipping_norm / 1000, run.dp_clipping_norm * 1000
