"""The channel tracer: slots and their union-find, what each traced tensor carries, and the op-handler registry.

A ``TorchFunctionMode`` (:class:`Tracer`) sees every torch function the model calls (``F.conv2d``,
``F.linear``, ``torch.cat``, ``Tensor.view``, ``Tensor.__add__``, ...) with its real inputs and output, and
hands it to the handler registered for that function (:func:`register_op_handler`). Every output channel of
a layer gets a *slot*; a handler says, through the :class:`ChannelTrace` it is given, which dims of the
output carry which slots (:class:`Channels`), which slots must be removed together (:meth:`ChannelTrace.unite`),
which parameter dims follow them (:meth:`ChannelTrace.attach`) and which must be kept
(:meth:`ChannelTrace.freeze`). An op without a handler keeps the channels it touches (or, with
``strict=True``, raises :class:`TraceError`): an unknown op costs pruning opportunity, never correctness.

Writing a handler
-----------------
A handler is ``handler(call: OpCall) -> None``. ``call.args`` / ``call.kwargs`` / ``call.out`` are the op's
real inputs and output, ``call.arg(i, name)`` reads an argument given by position or keyword, and
``call.trace`` is the public API:

* ``trace.state(t)``: what a tensor carries: :class:`Channels` (dims ``[start, start + labels.ndim)`` carry
  the slots ``labels``), :class:`ParamView` (a view of a parameter / buffer), or ``None`` (nothing traced);
* ``trace.set_state(t, state)``: declare what the output carries (``None``: nothing);
* ``trace.new_slots(n, space)``: ``n`` new slots (a layer's output channels), ``space`` naming the layer;
* ``trace.unite(a, b)``: slots ``a[i]`` and ``b[i]`` are removed together;
* ``trace.attach(param_name, dim, labels, kind)``: that parameter dim loses index ``i`` when slot
  ``labels[i]`` goes;
* ``trace.freeze(labels, reason)`` / ``call.freeze_inputs(reason)``: keep those channels, saying why.

:mod:`pruning.channels.handlers` holds the built-in handlers, written against the same API.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..batches import iter_tensors
from ..registry import Registration, Registry

__all__ = [
    "TraceError",
    "Channels",
    "ParamView",
    "Attachment",
    "ModuleCapture",
    "OpCall",
    "ChannelTrace",
    "Tracer",
    "OpHandler",
    "register_op_handler",
    "op_name",
]


class TraceError(ValueError):
    """The model could not be traced (its forward failed, or, with ``strict=True``, an op is unsupported)."""


@dataclass
class Channels:
    """A tensor whose dims ``[start, start + labels.ndim)`` carry the channel slots ``labels`` (int64 array)."""

    start: int
    labels: np.ndarray

    @property
    def stop(self) -> int:
        return self.start + self.labels.ndim


@dataclass
class ParamView:
    """A tensor that is a view of parameter / buffer ``name``: ``dims[i]`` is the parameter dim of tensor dim
    ``i`` (``None`` for a dim the parameter does not have, e.g. after ``unsqueeze``)."""

    name: str
    dims: tuple


@dataclass
class Attachment:
    """Parameter ``name``'s dim ``dim`` follows ``labels`` (one slot per index); ``kind`` says what it is:
    ``"out"`` (a producer's output rows), ``"in"`` (a consumer's input columns), ``"norm"`` (a normalisation
    layer's scale, shift or running statistic), ``"other"``."""

    name: str
    dim: int
    labels: np.ndarray
    kind: str


@dataclass
class ModuleCapture:
    """A module traced as one op (attention): its call, the ``F.linear`` calls made inside it as
    ``(id(input), weight)``, and the submodules called inside it as ``(module, id(first tensor input))``."""

    name: str
    module: nn.Module
    kind: str
    args: tuple
    kwargs: dict
    linear_calls: list = field(default_factory=list)
    module_calls: list = field(default_factory=list)


def op_name(func) -> str:
    """The name the registry and messages use for a torch function (``"conv2d"``, ``"__add__"``, ...)."""
    return getattr(func, "__name__", None) or str(func)


class ChannelTrace:
    """The state of one trace, and the operations op handlers use (see the module docstring).

    Attributes:
        model: the traced model.
        strict: :meth:`freeze` of an unsupported op raises :class:`TraceError`.
        attachments: parameter / buffer name -> its :class:`Attachment` list.
        frozen: distinct human-readable reasons why channels were kept.
        frozen_slots: slot -> the first reason it was frozen.
        spaces: name of each slot space (``module:op``); ``slot_space[s]`` is the space of slot ``s``;
            ``space_width[i]``: channels per slot of space ``i`` (the head size for attention heads).
        kept_parameters: parameter -> reason; every channel attached to it is kept.
        fixed_parameter_dims: ``(parameter, dim)`` -> reason: the dim met an input whose channels are not
            traced (e.g. the model input), so wherever else it is attached its channels are kept.
        layer_norms: module -> the slots a LayerNorm without parameters normalises.
        attention: attention module -> head bookkeeping (``head_size``, ``labels``, ``kind``).
        module_stack: names of the modules being run, innermost last.
        captures: the open attention captures (``None`` for modules entered inside one).
    """

    def __init__(self, model: nn.Module, strict: bool = False):
        self.model = model
        self.strict = strict
        self._param_names: dict[int, str] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(id(p), name)
        for name, b in model.named_buffers(remove_duplicate=False):
            self._param_names.setdefault(id(b), name)
        self._parent: list[int] = []
        self.slot_space: list[int] = []
        self.spaces: list[str] = []
        self.space_width: list[int] = []
        self.frozen_slots: dict[int, str] = {}
        self.frozen: list[str] = []
        self.attachments: dict[str, list[Attachment]] = {}
        self.kept_parameters: dict[str, str] = {}
        self.fixed_parameter_dims: dict[tuple[str, int], str] = {}
        self.layer_norms: dict[str, np.ndarray] = {}
        self.attention: dict[str, dict] = {}
        self.module_stack: list[str] = []
        self.captures: list[ModuleCapture | None] = []
        self._state: dict[int, object] = {}  # id(tensor) -> Channels | ParamView
        self._alive: list = []  # traced tensors stay alive so their ids stay unique

    # ---------------------------------------------------------------- slots
    @property
    def num_slots(self) -> int:
        return len(self._parent)

    def new_slots(self, n: int, space: str, width: int = 1) -> np.ndarray:
        """``n`` new slots forming the space ``space``; ``width`` channels per slot. Returns their labels."""
        sid = len(self.spaces)
        self.spaces.append(space)
        self.space_width.append(width)
        base = len(self._parent)
        self._parent.extend(range(base, base + n))
        self.slot_space.extend([sid] * n)
        return np.arange(base, base + n, dtype=np.int64)

    def find(self, s: int) -> int:
        """The root slot of ``s``'s unit (path-compressing)."""
        p = self._parent
        root = s
        while p[root] != root:
            root = p[root]
        while p[s] != root:
            p[s], s = root, p[s]
        return root

    def unite(self, a, b) -> None:
        """Slots ``a[i]`` and ``b[i]`` (equal shapes) are removed together."""
        a = np.asarray(a).reshape(-1)
        b = np.asarray(b).reshape(-1)
        assert a.shape == b.shape, (a.shape, b.shape)
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def freeze(self, labels, reason: str, unsupported: bool = True) -> None:
        """Keep the slots ``labels``. ``unsupported``: the reason is an op the tracer does not understand
        (with ``strict=True`` that raises :class:`TraceError` instead); ``False`` for deliberate keeps
        (model outputs, ``ignore``)."""
        if self.strict and unsupported:
            raise TraceError(f"prune_channels(strict=True): {reason}")
        for s in np.asarray(labels).reshape(-1).tolist():
            self.frozen_slots.setdefault(s, reason)
        if reason not in self.frozen:
            self.frozen.append(reason)

    # ---------------------------------------------------------------- tensors and parameters
    def param_name(self, t: torch.Tensor) -> str | None:
        """The qualified name of a parameter / buffer of the model, or ``None``."""
        return self._param_names.get(id(t))

    def state(self, t) -> Channels | ParamView | None:
        """What ``t`` carries (a parameter / buffer itself is a :class:`ParamView` of all its dims)."""
        if not isinstance(t, torch.Tensor):
            return None
        st = self._state.get(id(t))
        if st is None and id(t) in self._param_names:
            return ParamView(self._param_names[id(t)], tuple(range(t.dim())))
        return st

    def set_state(self, t, st: Channels | ParamView | None) -> None:
        """Declare what tensor ``t`` carries (``None``: nothing traced); non-tensors are ignored."""
        if isinstance(t, torch.Tensor):
            self._alive.append(t)
            if st is None:
                self._state.pop(id(t), None)
            else:
                self._state[id(t)] = st

    def attach(self, name: str, dim: int, labels, kind: str) -> None:
        """Parameter / buffer ``name`` loses index ``i`` of ``dim`` when slot ``labels[i]`` is removed.
        ``kind``: ``"out"``, ``"in"``, ``"norm"`` or ``"other"`` (see :class:`Attachment`)."""
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        lst = self.attachments.setdefault(name, [])
        for a in lst:
            if a.dim == dim:
                if len(a.labels) != len(labels):
                    self.keep_parameter(name, f"{name} is used with two different shapes")
                    return
                self.unite(a.labels, labels)
                return
        lst.append(Attachment(name, dim, labels, kind))

    def keep_parameter(self, name: str, reason: str) -> None:
        """Keep every channel attached to parameter ``name``: it is used in a way the tracer does not follow
        (the first reason given is reported)."""
        self.kept_parameters.setdefault(name, reason)

    def fix_parameter_dim(self, name: str, dim: int, reason: str) -> None:
        """Parameter ``name``'s ``dim`` met an untraced input, so its width is fixed wherever it is attached."""
        self.fixed_parameter_dims.setdefault((name, dim), reason)

    def freeze_tensors(self, tensors: Iterable[torch.Tensor], reason: str) -> None:
        """Keep every channel the ``tensors`` carry, and every parameter they are views of."""
        for t in tensors:
            st = self.state(t)
            if isinstance(st, Channels):
                self.freeze(st.labels, reason)
            elif isinstance(st, ParamView):
                self.keep_parameter(st.name, reason)

    def freeze_channels_in(self, obj, reason: str, unsupported: bool = True) -> None:
        """Keep the channels every tensor inside ``obj`` (nested tuples / lists / mappings) carries; parameters
        are left alone. ``unsupported`` as in :meth:`freeze`."""
        for t in iter_tensors(obj):
            st = self.state(t)
            if isinstance(st, Channels):
                self.freeze(st.labels, reason, unsupported)

    def where(self) -> str:
        """The innermost module being run (``""`` for the model itself; ``"<model>"`` outside any module)."""
        return self.module_stack[-1] if self.module_stack else "<model>"

    # ---------------------------------------------------------------- ops
    def record(self, func, args: tuple, kwargs: dict, out) -> None:
        """Dispatch one traced op to its handler (an op no input of which is traced is skipped, unless its
        handler creates channels)."""
        if not any(True for _ in iter_tensors(out)):
            return
        name = op_name(func)
        entry = _HANDLERS.get(func) if _hashable(func) else None
        if entry is None:
            entry = _HANDLERS.get(name) or _HANDLERS.get(name.strip("_"))
        if (entry is None or not entry.creates_channels) and not any(
            self.state(t) is not None for t in iter_tensors((args, kwargs))
        ):
            return  # nothing tracked flows through (e.g. masks built from the input)
        call = OpCall(name, func, args, kwargs, out, self.where(), self)
        if entry is None:
            call.freeze_inputs(f"{call.where}: op {name!r} is not supported by the channel tracer")
            return
        entry.handler(call)


def _hashable(func) -> bool:
    try:
        hash(func)
    except TypeError:
        return False
    return True


@dataclass
class OpCall:
    """One traced op as its handler sees it.

    Attributes:
        name: the op's name (``"conv2d"``, ``"__add__"``, ``"view"``, ...).
        func: the torch function itself.
        args, kwargs: its real arguments.
        out: its real output.
        where: the qualified name of the innermost module running it (``""`` in the model's own forward).
        trace: the :class:`ChannelTrace` to read and record channels with.
    """

    name: str
    func: object
    args: tuple
    kwargs: dict
    out: object
    where: str
    trace: ChannelTrace

    def arg(self, i: int, name: str, default=None):
        """Argument ``i`` when given by position, else keyword ``name``, else ``default``."""
        if len(self.args) > i:
            return self.args[i]
        return self.kwargs.get(name, default)

    def freeze_inputs(self, reason: str) -> None:
        """Keep every channel (and parameter) among the op's inputs."""
        self.trace.freeze_tensors(iter_tensors((self.args, self.kwargs)), reason)


@dataclass(frozen=True)
class OpHandler:
    """A registered handler and whether it runs on ops none of whose inputs are traced."""

    handler: Callable[[OpCall], None]
    creates_channels: bool = False


_HANDLERS = Registry()


def register_op_handler(op, handler: Callable[[OpCall], None], *, creates_channels: bool = False) -> Registration:
    """Teach the channel tracer an op: ``handler(call)`` runs for every traced call of ``op``.

    Args:
        op: a torch function or any callable the tracer sees (``torch.sinc``, ``torch.ops.mylib.op``,
            ``F.my_function``...), matched by identity; or a name, matched against the function's
            ``__name__`` (also with leading / trailing underscores stripped, so ``"getitem"`` matches
            ``Tensor.__getitem__``). An identity match wins over a name. Registering an op that already has
            a handler replaces it until the registration is removed.
        handler: ``handler(call: OpCall) -> None``; see :mod:`pruning.channels.tracer` for the API.
        creates_channels: also call it when no input carries traced channels (ops that make new channels,
            like ``conv2d`` on the model input); by default such calls are skipped.

    Returns:
        A :class:`pruning.registry.Registration`: ``.remove()`` (or a ``with`` block) unregisters it.

    Raises:
        TypeError: ``op`` is neither a string nor a hashable callable, or ``handler`` is not callable.
    """
    if isinstance(op, str):
        key = op
    elif callable(op) and _hashable(op):
        key = op
    else:
        raise TypeError(f"register_op_handler(): expected op as a torch function or a name, got {type(op).__name__}")
    if not callable(handler):
        raise TypeError(f"register_op_handler(): expected handler(call) -> None, got {type(handler).__name__}")
    return _HANDLERS.register(key, OpHandler(handler, creates_channels))


class Tracer(TorchFunctionMode):
    """Records every torch function call into ``trace`` while active. Inside an attention capture only the
    ``F.linear`` calls are noted (the module is recorded as a whole when it returns)."""

    def __init__(self, trace: ChannelTrace):
        super().__init__()
        self.trace = trace

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        trace = self.trace
        if trace.captures:
            capture = next((c for c in reversed(trace.captures) if c is not None), None)
            if capture is not None and capture.kind == "bert" and op_name(func) == "linear":
                weight = args[1] if len(args) > 1 else kwargs.get("weight")
                capture.linear_calls.append((id(args[0]) if args else None, weight))
            return out
        try:
            trace.record(func, args, kwargs, out)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001  # a bug in a handler must never corrupt pruning: keep what it touched
            trace.freeze_tensors(iter_tensors((args, kwargs)), f"internal error while tracing {op_name(func)}: {e!r}")
        return out
