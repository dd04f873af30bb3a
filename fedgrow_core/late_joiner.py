r"""Grow a newcomer's small model with a published Global-LiGO: Fed-Grow's offer to a late joiner.

An organisation that was not in the federation holds a small model and its own
data. It trains its own Local-LiGO and task head, with the federation's final
Global-LiGO (``global_ligo.safetensors`` of a run folder) frozen or trainable,
then fine-tunes the grown model and saves it (Shen et al., Sec. 4: the
Global-LiGO carries what the federation learned about growing; the Local-LiGO
adapts the client's own shape). Nothing is sent anywhere.

    fedgrow-grow --global-ligo outputs/<run>/global_ligo.safetensors \\
        --model vit:3x256x8x256 --dataset my-rows.parquet --preset presets/paper-image.toml \\
        --out grown/ growth-steps=80

The run config (``--preset``, then ``key=value``) must be the federation's for the
shapes and seed (``intermediate-shape``, ``target-shape``, ``depth-init``,
``seed``, ``global-rank``, ``global-tie-layers``). ``growth-steps`` and
``eval-every`` set the budget; ``finetune-steps`` and the learning rates are the
run config's.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from flwr.common.config import flatten_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from fedgrow_core.clients.growth_client import GrowthClient
from fedgrow_core.clients.model_client import ModelClient
from fedgrow_core.clients.setup import ClientSetup
from fedgrow_core.protocol import initial_global_ligo
from fedgrow_core.run_config import RunConfig, parse_overrides, pyproject_config

#: How the newcomer treats the Global-LiGO: the federation's, frozen or trained further; the
#: initial operator of the run config (no federation); or no growth at all (its small model alone).
Arm = Literal["frozen", "trainable", "initial", "small"]
ARMS = ("frozen", "trainable", "initial", "small")


class GlobalLigoFileError(ValueError):
    """Raised when a Global-LiGO file does not fit the run config; the text names the tensor and what was expected."""


def load_global_ligo(path: str | Path, run: RunConfig) -> dict[str, Tensor]:
    """Read a published Global-LiGO and check it against the run config's operator.

    Parameters
    ----------
    path : str or Path
        A ``safetensors`` file (``global_ligo.safetensors`` of a run folder).
    run : RunConfig
        The federation's run config: :func:`~fedgrow_core.protocol.initial_global_ligo`
        gives every expected name and shape.

    Returns
    -------
    dict of str to torch.Tensor
        The tensors, float32, under their ``LiGO.state_dict()`` names.

    Raises
    ------
    GlobalLigoFileError
        If the file cannot be read, lacks a tensor or has an unexpected one, or a
        tensor has another shape or dtype than expected, or holds NaN or Inf.
        Every problem is listed, each naming the tensor and the expected value.
    """
    try:
        state = load_file(str(path))
    except (OSError, SafetensorError) as err:
        raise GlobalLigoFileError(f"cannot read the Global-LiGO file {str(path)!r}: {err}") from None
    expected = initial_global_ligo(run).state_dict()
    problems = [f"missing tensor {k!r}, expected shape {tuple(v.shape)}" for k, v in expected.items() if k not in state]
    problems += [
        f"unexpected tensor {k!r}: the run config's Global-LiGO has no such tensor" for k in state if k not in expected
    ]
    for name, want in expected.items():
        got = state.get(name)
        if got is None:
            continue
        if tuple(got.shape) != tuple(want.shape):
            problems.append(f"tensor {name!r} has shape {tuple(got.shape)}, expected {tuple(want.shape)}")
        elif got.dtype != torch.float32:
            problems.append(f"tensor {name!r} has dtype {got.dtype}, expected torch.float32")
        elif not bool(torch.isfinite(got).all()):
            problems.append(f"tensor {name!r} holds NaN or Inf")
    if problems:
        raise GlobalLigoFileError(
            f"the Global-LiGO file {str(path)!r} does not fit the run config:\n  " + "\n  ".join(problems)
        )
    return state


@dataclass
class GrowthCurve:
    """A newcomer's result: accuracy against steps, before and after fine-tuning.

    Attributes
    ----------
    arm : str
        One of :data:`ARMS`.
    steps : list of int
        Optimiser steps taken at each evaluation (growth, then fine-tuning).
    accuracy : list of float
        Accuracy on the first ``eval-max-examples`` test rows at each of ``steps``.
    grown_accuracy : float or None
        All test rows, after growth and before fine-tuning (``None`` for ``small``).
    final_accuracy : float
        All test rows, after fine-tuning.
    test_examples : int
    """

    arm: str
    steps: list[int] = field(default_factory=list)
    accuracy: list[float] = field(default_factory=list)
    grown_accuracy: float | None = None
    final_accuracy: float = math.nan
    test_examples: int = 0


def grow_newcomer(
    run: RunConfig,
    setup: ClientSetup,
    arm: Arm,
    global_ligo: Mapping[str, Tensor] | None = None,
    growth_steps: int = 80,
    eval_every: int = 10,
    out_dir: str | Path | None = None,
) -> GrowthCurve:
    """Grow (or, for ``small``, just train) a newcomer's model and record its curve.

    Parameters
    ----------
    run : RunConfig
        The federation's run config (shapes, seed, learning rates, ``finetune-steps``).
    setup : ClientSetup
        The newcomer's rows and small model (not modified: the ``small`` arm trains a copy).
    arm : {"frozen", "trainable", "initial", "small"}
        ``frozen``/``trainable``: ``global_ligo`` fixed or trained with the
        Local-LiGO and head; ``initial``: the run config's initial Global-LiGO,
        trained; ``small``: no growth, the small model trained for the same steps.
    global_ligo : mapping, optional
        Checked tensors (:func:`load_global_ligo`); needed by ``frozen`` and ``trainable``.
    growth_steps, eval_every : int
        Steps of growth (or small-model training) and how often to evaluate (steps).
    out_dir : str or Path, optional
        Where to save the final model (family format); not saved when ``None``.

    Returns
    -------
    GrowthCurve

    Raises
    ------
    ValueError
        For an unknown ``arm``, a missing ``global_ligo``, steps < 1, or
        ``growth_steps`` not a multiple of ``eval_every``; and from the
        operator, if the small model cannot grow to the intermediate shape.
    """
    if arm not in ARMS:
        raise ValueError(f"arm must be one of {ARMS}, got {arm!r}")
    if arm in ("frozen", "trainable") and global_ligo is None:
        raise ValueError(f"arm {arm!r} needs a Global-LiGO")
    if growth_steps < 1 or eval_every < 1 or growth_steps % eval_every:
        raise ValueError(
            f"growth-steps = {growth_steps}, eval-every = {eval_every}: expected positive integers, growth-steps a "
            "multiple of eval-every"
        )
    rounds = growth_steps // eval_every
    warmup = min(run.head_warmup_steps, growth_steps)  # the run's head warm-up, within this budget
    run = run.model_copy(update={"num_server_rounds": rounds, "local_steps": eval_every, "head_warmup_steps": warmup})
    setup = copy.copy(setup)
    setup.run = run
    curve = GrowthCurve(arm)
    if arm == "small":
        small, family = copy.deepcopy(setup.small.model), setup.small.family
        client = ModelClient(
            setup, small, family.target_config(small, family.shape(small), setup.num_labels), run.lr_finetune
        )
        curve.steps.append(0)
        curve.accuracy.append(client.evaluate_round())
        for r in range(rounds):
            curve.steps.append((r + 1) * eval_every)
            curve.accuracy.append(client.train_round(eval_every)["eval-accuracy"])
        result = client.finetune_and_evaluate(run.finetune_steps, out_dir)
    else:
        client = GrowthClient(run, setup.partition_id, 1, setup=setup)
        state = dict(global_ligo) if arm != "initial" else initial_global_ligo(run).state_dict()
        client.load_global_state(state)
        if arm == "frozen":
            client.freeze_global()
        curve.steps.append(0)
        curve.accuracy.append(client.evaluate_round())
        for r in range(rounds):
            _, metrics = client.train_round(client.global_state())
            curve.steps.append((r + 1) * eval_every)
            curve.accuracy.append(metrics["eval-accuracy"])
        result = client.finetune_and_evaluate(client.global_state(), out_dir)
        curve.grown_accuracy = result["grown-accuracy"]
    curve.final_accuracy = result["accuracy"]
    curve.test_examples = result["num-examples"]
    return curve


def _run_config(preset: Path | None, overrides: list[str]) -> tuple[RunConfig, dict]:
    """The run config (``pyproject.toml``, then ``preset``, then ``overrides``) and the budget keys taken out of it."""
    preset_keys = (
        [f"{k}={json.dumps(v)}" for k, v in flatten_dict(tomllib.loads(preset.read_text())).items()] if preset else []
    )
    rest = parse_overrides(overrides, usage="key=value")
    ours = {k: rest.pop(k) for k in ("growth-steps", "eval-every") if k in rest}
    root = Path(__file__).resolve().parent.parent / "pyproject.toml"
    return RunConfig.from_flower({**pyproject_config(root, preset_keys), **rest}), ours


def main(argv: list[str] | None = None) -> GrowthCurve:
    """``fedgrow-grow``: grow a small model with a published Global-LiGO; prints one JSON line."""
    parser = argparse.ArgumentParser(prog="fedgrow-grow", description=__doc__.split("\n\n")[0])
    parser.add_argument("--global-ligo", type=Path, help="the federation's global_ligo.safetensors")
    parser.add_argument("--arm", choices=ARMS, default="trainable", help="how to use it (default: trainable)")
    parser.add_argument("--model", required=True, help="the small model: folder, zoo name or vit:LxD spec")
    parser.add_argument("--dataset", required=True, help="the newcomer's rows: a load_data_source source")
    parser.add_argument("--preset", type=Path, help="the federation's run-config TOML")
    parser.add_argument("--out", type=Path, help="folder to save the grown model in (default: not saved)")
    parser.add_argument("overrides", nargs="*", help="run-config key=value, and growth-steps=, eval-every=")
    args = parser.parse_args(argv)
    try:
        run, ours = _run_config(args.preset, args.overrides)
        state = load_global_ligo(args.global_ligo, run) if args.global_ligo else None
        if args.arm in ("frozen", "trainable") and state is None:
            raise ValueError(f"--arm {args.arm} needs --global-ligo")
    except ValueError as err:
        print(f"fedgrow-grow: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    try:
        setup = ClientSetup.load(run, 0, 1, model=args.model, dataset=args.dataset)
        curve = grow_newcomer(
            run, setup, args.arm, state, int(ours.get("growth-steps", 80)), int(ours.get("eval-every", 10)), args.out
        )
    except ValueError as err:  # a model that cannot grow to the shapes, a bad budget, data of another task
        print(f"fedgrow-grow: {err}", file=sys.stderr)
        raise SystemExit(2) from None
    print(json.dumps(curve.__dict__))
    return curve


if __name__ == "__main__":
    main()
