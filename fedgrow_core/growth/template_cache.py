"""Target templates built once per process, and the random draws their builds would have made, replayed.

A :class:`~fedgrow_core.growth.grown_model.GrownModel` runs its target model
functionally (``torch.func.functional_call``) on a template that holds no
weights (the ``meta`` device). Building that template with its family
(``timm.create_model``, ``BertForSequenceClassification``) initialises every
target weight at random, only to drop it: the image preset's 8 x 384 ViT draws
28 M random numbers for 14 M weights it never uses. The draws still matter,
because they advance torch's random stream, from which the round then draws its
batch order and dropout masks; skipping them would change every result.

:func:`target_template` builds a family's template for real the first time a
process asks for a configuration (as far as the build reads it:
:meth:`~fedgrow_core.growth.families.base.ModelFamily.build_key`; every client's
ViT configuration carries its own input statistics, which the build does not
read), and records the random operations the build
ran (every ATen op tagged ``nondeterministic_seeded``). It then checks that
replaying those operations on a scratch buffer, from the same generator state,
leaves torch's CPU generator exactly where the build left it, that the build
drew nothing from Python's or numpy's generators, and that no random draw wrote
a buffer the template keeps. When all three hold, later calls hand out the same
meta template (shared, never copied) and its buffers, and replay the draws
instead of building: on one core, 0.09 s instead of 0.15 s for that ViT, most of
it the random numbers themselves. When any check fails, every call builds.
"""

from __future__ import annotations

import random
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedgrow_core.growth.families import ModelFamily

#: Configurations kept per process (least recently used dropped first).
MAX_TEMPLATES = 8


@dataclass(frozen=True)
class RandomOp:
    """One random operation of a build: ``op`` applied in place to a tensor of this layout, with ``args``."""

    op: Any
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    args: tuple
    kwargs: dict


@dataclass(frozen=True)
class Template:
    """A family's target template on ``meta`` and what rebuilding it would draw.

    Attributes
    ----------
    module : torch.nn.Module
        The template, parameters and buffers on the ``meta`` device; shared by every caller.
    buffers : dict of str to Tensor
        Its buffers' values (e.g. BERT's ``position_ids``), from the real build.
    draws : list of RandomOp, or None
        The build's random operations, in order; ``None`` when replaying them does
        not reproduce the build (module doc), and every call builds.
    """

    module: nn.Module
    buffers: dict[str, Tensor]
    draws: list[RandomOp] | None


class _RecordRandomOps(TorchDispatchMode):
    """Record every ``nondeterministic_seeded`` op; ``replayable`` turns False for one that is not in place."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[RandomOp] = []
        self.targets: list[int] = []  # the storage each op wrote
        self.replayable = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            target = args[0] if args and isinstance(args[0], Tensor) else None
            in_place = func._schema.name.endswith("_") and target is not None and target.device.type == "cpu"
            if not in_place or kwargs.get("generator") is not None:
                self.replayable = False
            else:
                self.ops.append(RandomOp(func, tuple(target.shape), target.stride(), target.dtype, args[1:], kwargs))
                self.targets.append(target.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def replay(draws: list[RandomOp]) -> None:
    """Run ``draws`` on a scratch buffer: torch's CPU generator advances exactly as in the build they came from."""
    need: dict[torch.dtype, int] = {}
    for d in draws:
        extent = 1 + sum((n - 1) * s for n, s in zip(d.size, d.stride, strict=True)) if all(d.size) else 0
        need[d.dtype] = max(need.get(d.dtype, 0), extent)
    scratch = {dtype: torch.empty(n, dtype=dtype) for dtype, n in need.items()}
    for d in draws:
        d.op(scratch[d.dtype].as_strided(d.size, d.stride), *d.args, **d.kwargs)


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _other_generators() -> tuple:
    return random.getstate(), repr(np.random.get_state())


def _build_and_record(family: ModelFamily, config: Any) -> Template:
    """Build for real, recording the random ops, and decide whether replaying them reproduces the build."""
    before, others = torch.get_rng_state(), _other_generators()
    recorder = _RecordRandomOps()
    with recorder:
        model = family.build(config)
    after = torch.get_rng_state()
    buffers = _buffers(model)
    drawn_into = {b.untyped_storage().data_ptr() for b in model.buffers()} & set(recorder.targets)
    draws = recorder.ops if recorder.replayable and not drawn_into and _other_generators() == others else None
    if draws is not None:
        torch.set_rng_state(before)
        replay(draws)
        if not torch.equal(torch.get_rng_state(), after):
            draws = None
        torch.set_rng_state(after)
    return Template(model.to("meta"), buffers, draws)


_TEMPLATES: OrderedDict[tuple, Template] = OrderedDict()


def _key(family: ModelFamily, config: Any) -> tuple:
    """The family and what its build reads of the configuration (:meth:`ModelFamily.build_key`)."""
    return family.name, family.build_key(config)


def target_template(family: ModelFamily, config: Any) -> Template:
    """The target template of ``config`` on ``meta``, with torch's random stream advanced as ``family.build`` would.

    The first call per configuration in a process builds (module doc); later
    ones return the same :class:`Template` and replay its draws, or, when they
    cannot be replayed, build a template of their own. Use it only for the
    template's structure and buffers: its weights are on ``meta``, and it may be
    shared, so callers must not change it beyond setting its training mode
    before each use.

    Parameters
    ----------
    family : ModelFamily
        Builds the template (:meth:`ModelFamily.build`).
    config : Any
        The family's target configuration (:meth:`ModelFamily.target_config`).

    Returns
    -------
    Template
        Its ``module`` on ``meta``, its buffers, and the draws replayed (``None``: it was built).
    """
    key = _key(family, config)
    kept = _TEMPLATES.get(key)
    if kept is None:
        kept = _TEMPLATES[key] = _build_and_record(family, config)
        while len(_TEMPLATES) > MAX_TEMPLATES:
            _TEMPLATES.popitem(last=False)
        return kept
    _TEMPLATES.move_to_end(key)
    if kept.draws is None:  # not replayable: build, as every call would without this cache
        model = family.build(config)
        buffers = _buffers(model)  # before the move to meta, which is in place
        return Template(model.to("meta"), buffers, None)
    replay(kept.draws)
    return kept
