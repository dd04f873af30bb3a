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
:meth:`~fedgrow_core.growth.families.base.ModelFamily.build_key`, with torch's
default dtype and device; every client's ViT configuration carries its own
input statistics, which the build does not read), and records the random
operations the build ran: every ATen op tagged ``nondeterministic_seeded``.
It keeps the template for replaying only when all of these hold:

* every such op is one of :data:`REPLAYABLE` (in place, on a CPU tensor, from
  torch's default generator), whose use of the generator depends on the
  tensor's layout and the op's arguments, not on the tensor's contents;
* the build drew nothing from Python's or numpy's generators;
* replaying the ops on a scratch buffer from the build's starting state leaves
  torch's CPU generator exactly where the build left it;
* a second build, from another generator state, runs the same ops on the same
  layouts and gives the same buffers (so neither depends on the values drawn).

Then later calls hand out the same meta template (shared, never copied) and its
buffers, and replay the draws instead of building. A replay advances the
generator without the ops' arithmetic where ATen's CPU kernels fix how many
numbers an op takes (:func:`fixed_draws`), and runs the op itself on a scratch
buffer otherwise. Inside :func:`forked_stream`, whose draws are thrown away, it
does not run at all. These checks are necessary
conditions that catch the ways a build can escape a replay that we know of, not
a proof; any that fails makes every call build, as without this module. The
cost per build is measured in ``docs/testing.md`` (the scale benchmark's trace).
"""

from __future__ import annotations

import contextlib
import math
import random
import threading
import types
from collections import OrderedDict
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from fedgrow_core.growth.families import ModelFamily

#: Build keys kept per process (least recently used dropped first).
MAX_TEMPLATES = 8
#: The random ops a replay may run: in place, and drawing as many numbers for a tensor as its layout and the
#: op's arguments say, whatever the tensor holds.
REPLAYABLE = frozenset(
    f"aten::{name}_"
    for name in ("uniform", "normal", "bernoulli", "random", "exponential", "geometric", "log_normal", "cauchy")
)
#: Held while a template is built, handed out or run (``GrownModel.forward``): templates are shared in a process.
TEMPLATE_LOCK = threading.RLock()
#: Most 32-bit numbers a replay draws into its scratch buffer at once (one byte each: 4 MiB).
ADVANCE_CHUNK = 1 << 22
#: Whether this thread is inside :func:`forked_stream`.
_FORKED = threading.local()


@dataclass(frozen=True)
class RandomOp:
    """One random op of a build: ``op`` in place on a tensor of this ``size``, ``stride`` and ``dtype``.

    ``contiguous`` is the tensor's ``is_contiguous()`` when the op ran, ``args`` and ``kwargs`` the op's
    arguments after the tensor.
    """

    op: Any
    size: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    args: tuple
    kwargs: dict
    contiguous: bool = False


@dataclass(frozen=True)
class Template:
    """A family's target template on ``meta`` and what rebuilding it would draw.

    Attributes
    ----------
    module : torch.nn.Module
        The template, parameters and buffers on the ``meta`` device; shared
        with every later caller of the same build key when ``draws`` is set.
    buffers : mapping of str to Tensor
        Its buffers' values (e.g. BERT's ``position_ids``), from the real build (read-only).
    draws : list of RandomOp, or None
        The build's random ops, in order; ``None`` when they cannot be replayed
        (module doc): then every call builds a template of its own.
    """

    module: nn.Module
    buffers: Mapping[str, Tensor]
    draws: list[RandomOp] | None


class _RecordRandomOps(TorchDispatchMode):
    """Record every ``nondeterministic_seeded`` op of a build.

    ``replayable`` turns False for one that is not in :data:`REPLAYABLE`, writes
    no CPU tensor in place, or names a generator of its own.
    """

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[RandomOp] = []
        self.targets: list[int] = []  # the storage each op wrote
        self.replayable = True

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204 - torch's signature
        kwargs = kwargs or {}
        if torch.Tag.nondeterministic_seeded in func.tags:
            target = args[0] if args and isinstance(args[0], Tensor) else None
            own_generator = kwargs.get("generator") is not None or any(isinstance(a, torch.Generator) for a in args)
            if func._schema.name not in REPLAYABLE or target is None or target.device.type != "cpu" or own_generator:
                self.replayable = False
            else:
                layout = (tuple(target.shape), target.stride(), target.dtype)
                self.ops.append(RandomOp(func, *layout, args[1:], kwargs, target.is_contiguous()))
                self.targets.append(target.untyped_storage().data_ptr())
        return func(*args, **kwargs)


def fixed_draws(draw: RandomOp) -> int | None:
    """How many 32-bit numbers ``draw`` takes from torch's CPU generator, whatever its state.

    Follows ATen's CPU kernels (``aten/src/ATen/native/cpu/DistributionTemplates.h``) for ``float32``:
    ``uniform_`` takes one number per element on any layout; ``normal_`` on a contiguous tensor of ``n``
    >= 16 elements takes ``n`` (then transforms them 16 at a time) and 16 more when ``n`` is not a
    multiple of 16 (its last 16 values are drawn again). Other ops, dtypes and layouts (e.g. ``normal_``
    under 16 elements, which keeps a spare value in the generator) are not counted. A wrong count could
    not give a wrong stream: the first build of a template checks that its replay ends exactly where the
    build left the generator, and a template whose replay does not is built every time
    (:func:`target_template`).

    Parameters
    ----------
    draw : RandomOp
        A recorded op.

    Returns
    -------
    int or None
        The numbers it takes (0 for an empty tensor); ``None``: not counted, the op itself is replayed.
    """
    if draw.dtype != torch.float32 or "generator" in draw.kwargs:
        return None
    numel = math.prod(draw.size)
    name = draw.op._schema.name
    if name == "aten::uniform_":
        return numel
    if name == "aten::normal_" and numel >= 16 and draw.contiguous:
        return numel + (16 if numel % 16 else 0)
    return None


def _advance(count: int) -> None:
    """Draw ``count`` 32-bit numbers from torch's CPU generator into a scratch buffer (``uint8.random_``)."""
    if count <= 0:
        return
    scratch = torch.empty(min(count, ADVANCE_CHUNK), dtype=torch.uint8)
    while count > 0:
        step = min(count, scratch.numel())
        scratch[:step].random_()  # one 32-bit number per element, whatever the dtype's range
        count -= step


def replay(draws: list[RandomOp]) -> None:
    """Advance torch's CPU generator exactly as ``draws`` did in the build they were recorded from.

    Runs of ops whose draws are fixed by their layout (:func:`fixed_draws`)
    draw that many numbers at once; every other op runs on a view of a
    scratch buffer with its tensor's layout (what they write is thrown away).

    Parameters
    ----------
    draws : list of RandomOp
        Ops of :data:`REPLAYABLE`, in the order the build ran them.
    """
    steps: list[RandomOp | int] = []
    for d in draws:  # consecutive fixed counts merged into one
        count = fixed_draws(d)
        if count is None:
            steps.append(d)
        elif steps and isinstance(steps[-1], int):
            steps[-1] += count
        else:
            steps.append(count)
    need: dict[torch.dtype, int] = {}
    for d in steps:  # elements a view of this size and stride spans
        if isinstance(d, RandomOp):
            extent = 1 + sum((n - 1) * s for n, s in zip(d.size, d.stride, strict=True)) if all(d.size) else 0
            need[d.dtype] = max(need.get(d.dtype, 0), extent)
    scratch = {dtype: torch.empty(n, dtype=dtype) for dtype, n in need.items()}
    for d in steps:
        if isinstance(d, int):
            _advance(d)
        else:
            d.op(scratch[d.dtype].as_strided(d.size, d.stride), *d.args, **d.kwargs)


@contextlib.contextmanager
def forked_stream() -> Iterator[None]:
    """A fork of torch's random streams (``torch.random.fork_rng``), put back on exit; no replay runs inside.

    Whatever the block draws from torch's default generator is thrown away with the fork, so
    :func:`target_template` hands out a kept template without replaying its draws. Use it only for a
    block that keeps nothing it draws from that generator, e.g. a client built only to load its kept
    state, which replaces every value drawn (a block that reseeds the generator and keeps what it then
    draws would draw a different stream without the replay).

    Yields
    ------
    None
        Inside the fork (nested forks nest).
    """
    with torch.random.fork_rng():
        outer = getattr(_FORKED, "active", False)
        _FORKED.active = True
        try:
            yield
        finally:
            _FORKED.active = outer


def _buffers(model: nn.Module) -> dict[str, Tensor]:
    return {name: b.detach().clone() for name, b in model.named_buffers()}


def _other_generators() -> tuple:
    return random.getstate(), repr(np.random.get_state())


def _recorded_build(family: ModelFamily, config: Any) -> tuple[nn.Module, _RecordRandomOps]:
    recorder = _RecordRandomOps()
    with recorder:
        model = family.build(config)
    return model, recorder


def _replays(family: ModelFamily, config: Any, model: nn.Module, recorder: _RecordRandomOps, before: Tensor) -> bool:
    """Whether the recorded build can be replayed (module doc); torch's generator is left where the build left it."""
    after = torch.get_rng_state()
    drawn_into = {b.untyped_storage().data_ptr() for b in model.buffers()} & set(recorder.targets)
    if not recorder.replayable or drawn_into:
        return False
    try:
        torch.set_rng_state(before)
        replay(recorder.ops)
        if not torch.equal(torch.get_rng_state(), after):
            return False
        with torch.random.fork_rng():  # again, from another state: the same ops and buffers
            torch.manual_seed(int(torch.randint(2**62, ())))
            second, again = _recorded_build(family, config)
        buffers, other = _buffers(model), _buffers(second)
        same_buffers = buffers.keys() == other.keys() and all(torch.equal(buffers[k], other[k]) for k in buffers)
        layouts = [(d.op, d.size, d.stride, d.dtype, d.args, d.kwargs) for d in recorder.ops]
        return (
            again.replayable
            and same_buffers
            and layouts == [(d.op, d.size, d.stride, d.dtype, d.args, d.kwargs) for d in again.ops]
        )
    except Exception:  # noqa: BLE001 - a replay that fails is one that is not used
        return False
    finally:
        torch.set_rng_state(after)


def _build_and_record(family: ModelFamily, config: Any) -> Template:
    """Build for real, recording the random ops, and decide whether replaying them reproduces the build."""
    before, others = torch.get_rng_state(), _other_generators()
    model, recorder = _recorded_build(family, config)
    unchanged = _other_generators() == others
    replayable = unchanged and _replays(family, config, model, recorder, before)
    buffers = types.MappingProxyType(_buffers(model))
    return Template(model.to("meta"), buffers, recorder.ops if replayable else None)


_TEMPLATES: OrderedDict[tuple, Template] = OrderedDict()


def _key(family: ModelFamily, config: Any) -> tuple | None:
    """The family, what its build reads of ``config``, torch's default dtype and device; ``None``: no key."""
    text = family.build_key(config)
    if text is None:
        return None
    return family.name, text, torch.get_default_dtype(), str(torch.get_default_device())


def target_template(family: ModelFamily, config: Any) -> Template:
    """The target template of ``config`` on ``meta``, with torch's random stream advanced as ``family.build`` would.

    The first call per build key in a process builds (module doc); later ones
    return the same :class:`Template` and replay its draws (not inside
    :func:`forked_stream`, which throws them away), or, when those
    cannot be replayed or the family gives no key, build a template of their
    own. Use it only for the template's structure and buffers: its weights are
    on ``meta``, and it may be shared, so a caller changes nothing of it but
    its training mode, under :data:`TEMPLATE_LOCK`.

    Parameters
    ----------
    family : ModelFamily
        Builds the template (:meth:`ModelFamily.build`).
    config : Any
        The family's target configuration (:meth:`ModelFamily.target_config`).

    Returns
    -------
    Template
        Its ``module`` on ``meta``, its buffers, and its build's draws (``None``:
        not replayable; such a template is the caller's own).

    Raises
    ------
    Exception
        Whatever ``family.build(config)`` raises, from a build (nothing is kept).
    """
    key = _key(family, config)
    with TEMPLATE_LOCK:
        kept = _TEMPLATES.get(key) if key is not None else None
        if kept is None or kept.draws is None:
            if key is not None and kept is None:
                kept = _TEMPLATES[key] = _build_and_record(family, config)
                while len(_TEMPLATES) > MAX_TEMPLATES:
                    _TEMPLATES.popitem(last=False)
                return kept
            model = family.build(config)  # not replayable, or no key: as every call would without this module
            buffers = types.MappingProxyType(_buffers(model))  # before the move to meta, which is in place
            return Template(model.to("meta"), buffers, None)
        _TEMPLATES.move_to_end(key)
        if not getattr(_FORKED, "active", False):  # inside forked_stream the draws are thrown away anyway
            replay(kept.draws)
        return kept
