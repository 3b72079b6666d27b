"""Channel dependency graph, found by tracing one forward pass.

How it works: a ``TorchFunctionMode`` sees every torch function the model calls (``F.conv2d``, ``F.linear``,
``F.batch_norm``, ``torch.cat``, ``Tensor.view``, ``Tensor.__add__``, ...) with its real input and output
tensors, so Python control flow, torchvision's and Hugging Face's models trace as they run. Every output
channel of a layer (a conv's filters, a linear's output features, an embedding's features) gets a *slot*.
The trace propagates, per tensor, which dimension carries which slots, through elementwise ops, views,
permutes, concatenation, chunking and pooling. Ops that tie channels together unite their slots
(union-find): a residual add unites the channels of both summands, a depthwise conv ties each input
channel to its output channel, a channel shuffle ties the same column of every shuffle group. Parameters
and buffers that touch a dimension (a conv's input channels, a BatchNorm's scale and running stats, a
LayerNorm, a ConvNeXt layer scale, a ViT position embedding) are *attached* to the slots of that
dimension. A *unit* is a set of united slots: it is removed as a whole, from every attached parameter.

Anything the trace does not understand makes the slots it touches *frozen* (never pruned), with the reason
recorded; so an unknown op costs pruning opportunity, never correctness. Slots reaching the model's outputs
are frozen, so output shapes never change.

Attention modules are traced as one op whose units are whole heads: Hugging Face BERT-style
self-attention (``query`` / ``key`` / ``value`` Linear children and ``attention_head_size``) and
``nn.MultiheadAttention`` (whose embedding width is kept, since PyTorch ties it to the q/k/v width; pruned
instances become :class:`pruning.channels.attention.PrunedMultiheadAttention`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

__all__ = ["DependencyGraph", "ChannelGroup", "Attachment", "TraceError", "normalize_inputs", "run_model"]


class TraceError(ValueError):
    """The model could not be traced (its forward failed, or, with ``strict=True``, an op is unsupported)."""


# --------------------------------------------------------------------------------------------------------
# inputs


def normalize_inputs(example_inputs, fn: str = "prune_channels") -> tuple[tuple, dict]:
    """Turn ``example_inputs`` (a tensor, a tuple/list of positional inputs, or a dict of keyword inputs)
    into ``(args, kwargs)``.

    Raises:
        TypeError: any other type.
    """
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    if isinstance(example_inputs, dict):
        return (), dict(example_inputs)
    raise TypeError(
        f"{fn}(): expected example_inputs to be a Tensor, a tuple/list of positional inputs or a dict of "
        f"keyword inputs, got {type(example_inputs).__name__}"
    )


def run_model(model: nn.Module, example_inputs):
    args, kwargs = normalize_inputs(example_inputs)
    return model(*args, **kwargs)


def _flatten_tensors(obj, out: list) -> list:
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, dict) or hasattr(obj, "to_tuple"):
        values = obj.values() if isinstance(obj, dict) else obj.to_tuple()
        for v in values:
            _flatten_tensors(v, out)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            _flatten_tensors(v, out)
    return out


# --------------------------------------------------------------------------------------------------------
# tensor states


@dataclass
class _Lab:
    """A tensor whose dims ``[start, start + labels.ndim)`` carry channel slots ``labels`` (int64 array)."""

    start: int
    labels: np.ndarray

    @property
    def stop(self) -> int:
        return self.start + self.labels.ndim


@dataclass
class _PRef:
    """A tensor that is a view of a parameter/buffer: ``dims[i]`` is the parameter dim of tensor dim i."""

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
class ChannelGroup:
    """A set of coupled channel dimensions, pruned together with one ratio.

    Attributes:
        index: position in ``DependencyGraph.groups``.
        units: root slot of every unit (a unit is removed as a whole), in a stable order.
        unit_channels: channels of the group's first space per unit (1 for plain channels, the head size for
            attention heads, the group width for grouped convs).
        spaces: names of the layers whose outputs belong to the group (``module:op``).
        params: names of the parameters attached to the group.
        frozen_reason: why the group cannot be pruned, or ``None``.
        frozen_units: units that must be kept (with the group still prunable otherwise).
        partial_spaces: for a group joined by a concatenation, the units of each space that holds only some
            of the group's units (at least one of them is kept so no layer is left with zero channels).
    """

    index: int
    units: list
    unit_channels: int
    spaces: list
    params: list
    frozen_reason: str | None = None
    frozen_units: set = field(default_factory=set)
    partial_spaces: list = field(default_factory=list)

    @property
    def prunable(self) -> bool:
        return self.frozen_reason is None and len(self.units) - len(self.frozen_units) > 0 and len(self.units) > 1

    @property
    def channels(self) -> int:
        return len(self.units) * self.unit_channels


_UNARY = {
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "selu", "selu_", "celu", "softplus", "mish", "dropout", "dropout_", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "contiguous", "clone", "detach",
    "float", "half", "double", "bfloat16", "to", "type", "type_as", "abs", "neg", "__neg__", "exp", "log",
    "sqrt", "rsqrt", "square", "erf", "clamp", "clamp_", "clip", "clamp_min", "clamp_min_", "requires_grad_",
    "cpu", "cuda", "sin", "cos", "reciprocal", "logsigmoid", "prelu_scalar",
}
_BINARY = {
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
    "__itruediv__", "true_divide", "maximum", "minimum", "pow", "__pow__",
}
_POOL = {
    "max_pool1d": 1, "max_pool2d": 2, "max_pool3d": 3, "avg_pool1d": 1, "avg_pool2d": 2, "avg_pool3d": 3,
    "adaptive_avg_pool1d": 1, "adaptive_avg_pool2d": 2, "adaptive_avg_pool3d": 3, "adaptive_max_pool1d": 1,
    "adaptive_max_pool2d": 2, "adaptive_max_pool3d": 3, "lp_pool2d": 2, "max_pool2d_with_indices": 2,
    "adaptive_max_pool2d_with_indices": 2, "boolean_dispatch": 2,
}
_REDUCE = {"mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod"}
_IGNORED_OUTPUT = {"__get__", "size", "dim", "numel", "__len__", "__bool__", "item", "tolist", "__format__"}
_NEUTRAL = {"new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like",
            "empty_like", "full_like", "rand_like", "randn_like", "randint_like", "is_floating_point", "is_complex",
            "get_device", "is_contiguous", "data_ptr", "element_size", "stride", "storage_offset"}
_FACTORY = {"randn", "rand", "zeros", "ones", "empty", "full", "arange", "tensor", "zeros_like", "ones_like",
            "empty_like", "randn_like", "rand_like", "full_like", "linspace", "eye", "as_tensor"}


# --------------------------------------------------------------------------------------------------------
# the tracer


class _Tracer(TorchFunctionMode):
    def __init__(self, graph: "DependencyGraph"):
        super().__init__()
        self.g = graph

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        g = self.g
        if g._paused:
            top = next((p for p in reversed(g._paused) if p is not None), None)
            if top is not None and top[2] is not None and getattr(func, "__name__", "") == "linear":
                top[2].append((id(args[0]) if args else None, _arg(args, kwargs, 1, "weight")))
            return out
        try:
            g._record(func, args, kwargs, out)
        except TraceError:
            raise
        except Exception as e:  # noqa: BLE001  # a bug in a rule must never corrupt pruning: freeze what the op touched
            g._freeze_inputs(args, kwargs, f"internal error while tracing {_fname(func)}: {e!r}")
        return out


def _fname(func) -> str:
    return getattr(func, "__name__", None) or str(func)


def _arg(args, kwargs, i, name, default=None):
    if len(args) > i:
        return args[i]
    return kwargs.get(name, default)


def _iter_tensors(obj):
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from _iter_tensors(v)
    elif isinstance(obj, dict):
        for v in obj.values():
            yield from _iter_tensors(v)


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


class DependencyGraph:
    """The channel dependency graph of ``model``, found by running it once on ``example_inputs``.

    Args:
        model: the ``nn.Module`` to analyse. It is run once in eval mode under ``torch.no_grad()``;
            hooks are added for the run and removed afterwards; nothing else changes.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ignore: modules (or their qualified names) whose output channels must not be pruned.
        strict: raise :class:`TraceError` on the first op that touches channels and is not understood,
            instead of freezing its channels.

    Attributes:
        groups: the :class:`ChannelGroup` list.
        attachments: parameter / buffer name -> list of :class:`Attachment`.
        frozen: human-readable reasons why some channels were kept (``module: op: why``).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` has an unsupported type.
        TraceError: the forward pass failed (the message names the module), or an unsupported op in strict mode.
        ValueError: a name in ``ignore`` is not a submodule of ``model``.
    """

    def __init__(self, model: nn.Module, example_inputs, *, ignore=(), strict: bool = False, opaque=()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"DependencyGraph: expected an nn.Module, got {type(model).__name__}")
        args, kwargs = normalize_inputs(example_inputs, "DependencyGraph")
        self.model = model
        self.strict = strict
        self._param_names = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(id(p), name)
        for name, b in model.named_buffers(remove_duplicate=False):
            self._param_names.setdefault(id(b), name)
        self._mod_names = {id(m): n for n, m in model.named_modules()}
        ignore_names = set()
        for item in ignore:
            if isinstance(item, nn.Module):
                if id(item) not in self._mod_names:
                    raise ValueError(f"DependencyGraph: ignore contains a {type(item).__name__} that is not a "
                                     "submodule of the model")
                ignore_names.add(self._mod_names[id(item)])
            elif isinstance(item, str):
                if item not in dict(model.named_modules()):
                    raise ValueError(f"DependencyGraph: ignore names {item!r}, which is not a submodule of the "
                                     "model")
                ignore_names.add(item)
            else:
                raise TypeError(f"DependencyGraph: ignore items must be nn.Module or str, got "
                                f"{type(item).__name__}")
        self.ignore = frozenset(ignore_names)
        self.opaque = dict(opaque) if isinstance(opaque, dict) else {n: "kept on request" for n in opaque}
        self._opaque_start: dict[str, list] = {}

        # union-find over slots
        self._parent: list[int] = []
        self._slot_space: list[int] = []
        self.spaces: list[str] = []          # name of each slot space
        self._space_width: list[int] = []    # channels per slot (the head size for attention heads)
        self._frozen: dict[int, str] = {}    # slot -> reason
        self._state: dict[int, object] = {}  # id(tensor) -> _Lab | _PRef
        self._alive: list = []               # keep traced tensors alive so ids stay unique
        self.attachments: dict[str, list[Attachment]] = {}
        self._unsafe_params: dict[str, str] = {}
        # (parameter, dim) used at least once against an input whose channels are not traced (e.g. the model
        # input): if a tied use elsewhere attaches that dim, its channels must be kept
        self._untraced_param_dims: dict[tuple[str, int], str] = {}
        self.conv_groups: dict[str, int] = {}     # grouped conv module -> output channels per group
        self.group_norms: dict[str, int] = {}     # GroupNorm module -> channels per group
        self.layer_norms: dict[str, np.ndarray] = {}
        self.attention: dict[str, dict] = {}      # attention module -> head bookkeeping
        self._paused: list = []
        self._mod_stack: list[str] = []
        self.frozen: list[str] = []
        self._trace(model, args, kwargs)
        self._finalize()

    # ---------------------------------------------------------------- union-find
    def _new(self, n: int, space: str, width: int = 1) -> np.ndarray:
        sid = len(self.spaces)
        self.spaces.append(space)
        self._space_width.append(width)
        base = len(self._parent)
        self._parent.extend(range(base, base + n))
        self._slot_space.extend([sid] * n)
        return np.arange(base, base + n, dtype=np.int64)

    def find(self, s: int) -> int:
        p = self._parent
        root = s
        while p[root] != root:
            root = p[root]
        while p[s] != root:
            p[s], s = root, p[s]
        return root

    def _union(self, a, b) -> None:
        a = np.asarray(a).reshape(-1)
        b = np.asarray(b).reshape(-1)
        assert a.shape == b.shape, (a.shape, b.shape)
        for x, y in zip(a.tolist(), b.tolist()):
            rx, ry = self.find(x), self.find(y)
            if rx != ry:
                self._parent[max(rx, ry)] = min(rx, ry)

    def _freeze(self, labels, reason: str, unsupported: bool = True) -> None:
        if self.strict and unsupported:
            raise TraceError(f"prune_channels(strict=True): {reason}")
        for s in np.asarray(labels).reshape(-1).tolist():
            self._frozen.setdefault(s, reason)
        if reason not in self.frozen:
            self.frozen.append(reason)

    # ---------------------------------------------------------------- tracing
    def _where(self) -> str:
        return self._mod_stack[-1] if self._mod_stack else "<model>"

    def _attention_spec(self, module: nn.Module):
        if isinstance(module, nn.MultiheadAttention):
            return "mha"
        names = ("query", "key", "value")
        if all(isinstance(getattr(module, n, None), nn.Linear) for n in names) and isinstance(
            getattr(module, "attention_head_size", None), int
        ) and isinstance(getattr(module, "num_attention_heads", None), int):
            return "bert"
        return None

    def _trace(self, model, args, kwargs):
        handles = []
        for name, m in model.named_modules():
            handles.append(m.register_forward_pre_hook(self._pre_hook(name, m), with_kwargs=True))
            handles.append(m.register_forward_hook(self._post_hook(name, m), with_kwargs=True))
        was_training = {n: m.training for n, m in model.named_modules()}
        model.eval()
        try:
            with torch.no_grad(), _Tracer(self):
                out = model(*args, **kwargs)
        except TraceError:
            raise
        except Exception as e:
            raise TraceError(
                f"prune_channels(): the model's forward pass failed in {self._where()!r} "
                f"({type(e).__name__}: {e})"
            ) from e
        finally:
            for h in handles:
                h.remove()
            for n, m in model.named_modules():
                m.training = was_training[n]
            self._mod_stack.clear()
            self._paused.clear()
        for t in _flatten_tensors(out, []):
            st = self._state.get(id(t))
            if isinstance(st, _Lab):
                self._freeze(st.labels, "model output: output shapes are kept", False)
        self.example_output_shapes = [tuple(t.shape) for t in _flatten_tensors(out, [])]

    def _pre_hook(self, name, module):
        spec = self._attention_spec(module)

        def hook(mod, args, kwargs):
            self._mod_stack.append(name)
            if name in self.opaque:
                self._opaque_start.setdefault(name, []).append(len(self._parent))
                for t in _iter_tensors((args, kwargs)):
                    st = self._get(t)
                    if isinstance(st, _Lab):
                        self._freeze(st.labels, f"{name}: {self.opaque[name]}", False)
            if spec is not None and not self._paused:
                hidden = args[0] if args else kwargs.get("hidden_states", kwargs.get("query"))
                self._paused.append((name, hidden, [] if spec == "bert" else None, spec, args, kwargs))
            elif self._paused:
                self._paused.append(None)
            return None

        return hook

    def _post_hook(self, name, module):
        def hook(mod, args, kwargs, output):
            if self._mod_stack:
                self._mod_stack.pop()
            if self._paused:
                top = self._paused.pop()
                if top is not None:
                    self._record_attention(name, module, top, output)
            if name in self.opaque:
                start = self._opaque_start[name].pop()
                self._freeze(np.arange(start, len(self._parent)), f"{name}: {self.opaque[name]}", False)
                for t in _iter_tensors(output):
                    st = self._get(t)
                    if isinstance(st, _Lab):
                        self._freeze(st.labels, f"{name}: {self.opaque[name]}", False)
            if name in self.ignore:
                for t in _iter_tensors(output):
                    st = self._state.get(id(t))
                    if isinstance(st, _Lab):
                        self._freeze(st.labels, f"{name}: listed in ignore", False)
            return None

        return hook

    def _set(self, t, st) -> None:
        if isinstance(t, torch.Tensor):
            self._alive.append(t)
            if st is None:
                self._state.pop(id(t), None)
            else:
                self._state[id(t)] = st

    def _get(self, t):
        if not isinstance(t, torch.Tensor):
            return None
        st = self._state.get(id(t))
        if st is None and id(t) in self._param_names:
            return _PRef(self._param_names[id(t)], tuple(range(t.dim())))
        return st

    def _attach(self, name: str, dim: int, labels: np.ndarray, kind: str) -> None:
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        lst = self.attachments.setdefault(name, [])
        for a in lst:
            if a.dim == dim:
                if len(a.labels) != len(labels):
                    self._unsafe_params[name] = f"{name} is used with two different shapes"
                    return
                self._union(a.labels, labels)
                return
        lst.append(Attachment(name, dim, labels, kind))

    def _freeze_inputs(self, args, kwargs, reason: str) -> None:
        for t in _iter_tensors((args, kwargs)):
            st = self._get(t)
            if isinstance(st, _Lab):
                self._freeze(st.labels, reason)
            elif isinstance(st, _PRef):
                self._unsafe_params.setdefault(st.name, reason)

    def _record(self, func, args, kwargs, out) -> None:
        name = _fname(func)
        if name in _IGNORED_OUTPUT or not any(isinstance(t, torch.Tensor) for t in _iter_tensors(out)):
            return
        tensors_in = list(_iter_tensors((args, kwargs)))
        states = [self._get(t) for t in tensors_in]
        where = self._where()
        if name in _FACTORY or name in _NEUTRAL:
            return  # a new tensor that only borrows dtype/device/shape: no channel flows into it
        if not any(states) and name not in ("conv1d", "conv2d", "conv3d", "linear", "embedding"):
            return  # nothing tracked flows through (e.g. masks built from the input)
        handler = getattr(self, "_op_" + name.strip("_"), None)
        if func is F.batch_norm or func is F.instance_norm:
            handler = self._op_batch_norm_f
        elif func is torch.batch_norm:
            handler = self._op_batch_norm_t
        elif func is torch.embedding:
            handler = self._op_embedding_t
        elif name in _UNARY:
            handler = self._op_unary
        elif name in _BINARY:
            handler = self._op_binary
        elif name in _POOL or name.endswith("pool2d") or name.endswith("pool1d"):
            handler = self._op_pool
        elif name in _REDUCE:
            handler = self._op_reduce
        if handler is None:
            self._freeze_inputs(args, kwargs, f"{where}: op {name!r} is not supported by the channel tracer")
            return
        handler(name, args, kwargs, out, where)

    # ---------------------------------------------------------------- layers
    def _op_conv(self, name, args, kwargs, out, where):
        x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        groups = int(_arg(args, kwargs, 6, "groups", 1))
        sx, sw = self._get(x), self._get(w)
        if not isinstance(sw, _PRef) or sw.dims != tuple(range(w.dim())):
            self._freeze_inputs(args, kwargs, f"{where}: {name} with a computed weight")
            return
        wname = sw.name
        cout = w.shape[0]
        labels = self._new(cout, f"{where}:{name}")
        self._attach(wname, 0, labels, "out")
        if b is not None:
            sb = self._get(b)
            if isinstance(sb, _PRef):
                self._attach(sb.name, 0, labels, "out")
        x_ok = isinstance(sx, _Lab) and sx.start == 1 and sx.labels.ndim == 1 and x.dim() == w.dim()
        if groups == 1:
            if x_ok:
                self._attach(wname, 1, sx.labels, "in")
            else:
                self._untraced_param_dims.setdefault((wname, 1), f"{where}: {name} on an untraced input")
                if isinstance(sx, _Lab):
                    self._freeze(sx.labels, f"{where}: {name} input channels not on dim 1")
        else:
            mod = wname.rsplit(".", 1)[0] if "." in wname else ""
            self.conv_groups[mod] = cout // groups
            if x_ok:
                cin_g = sx.labels.size // groups
                for a in range(groups):
                    block = np.concatenate([sx.labels[a * cin_g:(a + 1) * cin_g],
                                            labels[a * (cout // groups):(a + 1) * (cout // groups)]])
                    self._union(block[:-1], block[1:])
            else:
                if isinstance(sx, _Lab):
                    self._freeze(sx.labels, f"{where}: grouped {name} input channels not on dim 1")
                self._freeze(labels, f"{where}: grouped {name} whose input channels are not traced")
        self._set(out, _Lab(1, labels))

    _op_conv1d = _op_conv2d = _op_conv3d = _op_conv

    def _op_linear(self, name, args, kwargs, out, where):
        x, w, b = args[0], _arg(args, kwargs, 1, "weight"), _arg(args, kwargs, 2, "bias")
        sx, sw = self._get(x), self._get(w)
        if not isinstance(sw, _PRef) or sw.dims != (0, 1):
            self._freeze_inputs(args, kwargs, f"{where}: linear with a computed weight")
            return
        if isinstance(sx, _Lab) and sx.start == x.dim() - 1:
            self._attach(sw.name, 1, sx.labels, "in")
        else:
            self._untraced_param_dims.setdefault((sw.name, 1), f"{where}: linear on an untraced input")
            if isinstance(sx, _Lab):
                self._freeze(sx.labels, f"{where}: linear on a dim other than the traced channels")
        labels = self._new(w.shape[0], f"{where}:linear")
        self._attach(sw.name, 0, labels, "out")
        if b is not None and isinstance(self._get(b), _PRef):
            self._attach(self._get(b).name, 0, labels, "out")
        self._set(out, _Lab(out.dim() - 1, labels))

    def _op_embedding(self, name, args, kwargs, out, where):
        self._embedding(_arg(args, kwargs, 1, "weight"), out, where)

    def _op_embedding_t(self, name, args, kwargs, out, where):
        self._embedding(args[0], out, where)

    def _embedding(self, w, out, where):
        sw = self._get(w)
        if not isinstance(sw, _PRef):
            return
        labels = self._new(w.shape[1], f"{where}:embedding")
        self._attach(sw.name, 1, labels, "out")
        self._set(out, _Lab(out.dim() - 1, labels))

    def _norm_params(self, x, params, where, name, dim=1):
        sx = self._get(x)
        if isinstance(sx, _Lab) and sx.start == dim and sx.labels.ndim == 1:
            for p in params:
                sp = self._get(p)
                if isinstance(sp, _PRef):
                    self._attach(sp.name, 0, sx.labels, "norm")
            return sx
        if isinstance(sx, _Lab) and not (sx.stop <= dim or sx.start > dim):
            self._freeze(sx.labels, f"{where}: {name} over a reshaped channel dim")
            return None
        return sx

    def _op_batch_norm_f(self, name, args, kwargs, out, where):
        x = args[0]  # F.batch_norm and F.instance_norm share the argument order
        params = [_arg(args, kwargs, i, n) for i, n in
                  ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
        self._set(out, self._norm_params(x, [p for p in params if p is not None], where, name))

    def _op_batch_norm_t(self, name, args, kwargs, out, where):
        params = [args[i] for i in (1, 2, 3, 4) if len(args) > i and args[i] is not None]
        self._set(out, self._norm_params(args[0], params, where, name))

    def _op_layer_norm(self, name, args, kwargs, out, where):
        x = args[0]
        shape = tuple(_arg(args, kwargs, 1, "normalized_shape"))
        w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
        sx = self._get(x)
        if not isinstance(sx, _Lab):
            return
        if sx.start >= x.dim() - len(shape) and not (len(shape) == 1 and sx.start == x.dim() - 1
                                                      and sx.labels.ndim == 1):
            self._freeze(sx.labels, f"{where}: layer_norm over a multi-dim channel block")
            return
        if len(shape) == 1 and sx.start == x.dim() - 1 and sx.labels.ndim == 1:
            for p in (w, b):
                sp = self._get(p) if p is not None else None
                if isinstance(sp, _PRef):
                    self._attach(sp.name, 0, sx.labels, "norm")
            self.layer_norms[where] = sx.labels
        elif sx.stop > x.dim() - len(shape):
            self._freeze(sx.labels, f"{where}: layer_norm across the traced channels and other dims")
            return
        self._set(out, sx)

    def _op_group_norm(self, name, args, kwargs, out, where):
        x = args[0]
        ng = int(_arg(args, kwargs, 1, "num_groups"))
        w, b = _arg(args, kwargs, 2, "weight"), _arg(args, kwargs, 3, "bias")
        sx = self._get(x)
        if not (isinstance(sx, _Lab) and sx.start == 1 and sx.labels.ndim == 1):
            if isinstance(sx, _Lab):
                self._freeze(sx.labels, f"{where}: group_norm over a reshaped channel dim")
            return
        cg = sx.labels.size // ng
        for a in range(ng):
            blk = sx.labels[a * cg:(a + 1) * cg]
            self._union(blk[:-1], blk[1:])
        for p in (w, b):
            sp = self._get(p) if p is not None else None
            if isinstance(sp, _PRef):
                self._attach(sp.name, 0, sx.labels, "norm")
        self.group_norms[where] = cg
        self._set(out, sx)

    def _record_attention(self, name, module, top, output):
        _, hidden, linear_calls, spec, args, kwargs = top
        out_t = output[0] if isinstance(output, (tuple, list)) else output
        sh = self._get(hidden) if isinstance(hidden, torch.Tensor) else None
        if spec == "mha":
            self._record_mha(name, module, args, kwargs, output, out_t)
            return
        q, k, v = module.query, module.key, module.value
        ids = {id(w): x for x, w in linear_calls}
        self_attn = all(ids.get(id(m.weight)) == id(hidden) for m in (q, k, v))
        heads, hd = module.num_attention_heads, module.attention_head_size
        if not self_attn or not isinstance(out_t, torch.Tensor) or out_t.shape[-1] != heads * hd:
            for t in _iter_tensors((args, kwargs)):
                st = self._get(t)
                if isinstance(st, _Lab):
                    self._freeze(st.labels, f"{name}: attention that is not plain self-attention")
            return
        if isinstance(sh, _Lab):
            if sh.start == hidden.dim() - 1 and sh.labels.ndim == 1:
                for m in (q, k, v):
                    self._attach(self._param_names[id(m.weight)], 1, sh.labels, "in")
            else:
                self._freeze(sh.labels, f"{name}: attention input channels not in the last dim")
        head_slots = self._new(heads, f"{name}:heads", hd)
        labels = np.repeat(head_slots, hd)
        for m in (q, k, v):
            self._attach(self._param_names[id(m.weight)], 0, labels, "out")
            if m.bias is not None:
                self._attach(self._param_names[id(m.bias)], 0, labels, "out")
        self.attention[name] = {"head_size": hd, "labels": labels}
        self._set(out_t, _Lab(out_t.dim() - 1, labels))
        for t in _iter_tensors(output):
            if t is not out_t:
                self._set(t, None)

    def _record_mha(self, name, module, args, kwargs, output, out_t):
        """``nn.MultiheadAttention``: its embedding width (inputs and outputs) is kept, because PyTorch's
        module ties it to the head layout; its heads are units (q / k / v rows and out_proj columns)."""
        from .attention import mha_supported

        keep_reason = f"{name}: nn.MultiheadAttention keeps its embedding width (heads can be pruned)"
        for t in _iter_tensors((args, kwargs)):
            st = self._get(t)
            if isinstance(st, _Lab):
                self._freeze(st.labels, keep_reason, False)
        if isinstance(out_t, torch.Tensor):
            labels = self._new(out_t.shape[-1], f"{name}:mha_out")
            self._freeze(labels, keep_reason, False)
            self._set(out_t, _Lab(out_t.dim() - 1, labels))
        for t in _iter_tensors(output):
            if t is not out_t:
                self._set(t, None)
        why = mha_supported(module)
        if why is not None:
            self.frozen.append(f"{name}: {why}")
            return
        heads, hd = module.num_heads, module.head_dim
        head_slots = self._new(heads, f"{name}:heads", hd)
        labels = np.repeat(head_slots, hd)
        pn = self._param_names
        if module._qkv_same_embed_dim:
            self._attach(pn[id(module.in_proj_weight)], 0, np.concatenate([labels] * 3), "out")
        else:
            for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
                self._attach(pn[id(w)], 0, labels, "out")
        if module.in_proj_bias is not None:
            self._attach(pn[id(module.in_proj_bias)], 0, np.concatenate([labels] * 3), "out")
        self._attach(pn[id(module.out_proj.weight)], 1, labels, "in")
        self.attention[name] = {"head_size": hd, "labels": labels, "kind": "mha"}

    # ---------------------------------------------------------------- elementwise
    def _op_unary(self, name, args, kwargs, out, where):
        x = args[0] if args else next(iter(kwargs.values()))
        st = self._get(x)
        for t in list(_iter_tensors(args[1:]))+list(_iter_tensors(kwargs)):
            if self._get(t) is not None and t is not x:
                self._freeze_inputs(args, kwargs, f"{where}: {name} with a traced second operand")
                return
        if isinstance(st, _Lab) or (isinstance(st, _PRef) and name in ("contiguous", "clone", "to", "float",
                                                                         "detach", "type_as", "half")):
            self._set(out, st)
        elif isinstance(st, _PRef):
            self._unsafe_params.setdefault(st.name, f"{where}: {name} on a parameter")

    def _op_binary(self, name, args, kwargs, out, where):
        operands = [a for a in list(args) + list(kwargs.values()) if isinstance(a, torch.Tensor)]
        if len(operands) == 1:
            self._op_unary(name, (operands[0],), {}, out, where)
            return
        oshape = tuple(out.shape)
        nd = len(oshape)
        labs = []
        for t in operands:
            st = self._get(t)
            off = nd - t.dim()
            if isinstance(st, _Lab):
                labs.append((t, _Lab(st.start + off, st.labels)))
        if not labs:
            for t in operands:
                st = self._get(t)
                if isinstance(st, _PRef):
                    self._unsafe_params.setdefault(st.name, f"{where}: {name} between parameters")
            return
        ref = None
        for t, st in labs:
            if st.labels.shape == oshape[st.start:st.stop]:
                ref = st
                break
        if ref is None:
            self._freeze_inputs(args, kwargs, f"{where}: {name} broadcasts the traced channels")
            return
        for t in operands:
            st = self._get(t)
            off = nd - t.dim()
            tshape = (1,) * off + tuple(t.shape)
            seg = tshape[ref.start:ref.stop]
            if all(s == 1 for s in seg):
                if isinstance(st, _Lab):
                    self._freeze(st.labels, f"{where}: {name} broadcasts traced channels")
                continue
            if seg != ref.labels.shape:
                self._freeze_inputs(args, kwargs, f"{where}: {name} with mismatched channel shapes")
                return
            if isinstance(st, _Lab):
                if st.start + off == ref.start and st.labels.shape == ref.labels.shape:
                    self._union(st.labels, ref.labels)
                else:
                    self._freeze_inputs(args, kwargs, f"{where}: {name} of tensors with channels on "
                                                      "different dims")
                    return
            elif isinstance(st, _PRef) and ref.labels.ndim == 1:
                pd_ = ref.start - off
                pdim = st.dims[pd_] if 0 <= pd_ < len(st.dims) else None
                if pdim is None:
                    self._freeze(ref.labels, f"{where}: {name} with a reshaped parameter")
                else:
                    self._attach(st.name, pdim, ref.labels, "other")
            else:
                self._freeze(ref.labels, f"{where}: {name} with an untraced tensor of the same channel size")
        self._set(out, ref)

    # ---------------------------------------------------------------- pooling and reductions
    def _op_pool(self, name, args, kwargs, out, where):
        x = args[0]
        st = self._get(x)
        k = _POOL.get(name, 2)
        if isinstance(st, _Lab):
            if st.stop <= x.dim() - k and isinstance(out, torch.Tensor) and out.dim() == x.dim():
                self._set(out, st)
            elif isinstance(out, tuple) and st.stop <= x.dim() - k:
                self._set(out[0], st)
            else:
                self._freeze(st.labels, f"{where}: {name} over the traced channel dim")

    _op_interpolate = _op_pool
    _op_upsample = _op_pool

    def _op_pad(self, name, args, kwargs, out, where):
        x = args[0]
        pad = list(_arg(args, kwargs, 1, "pad"))
        st = self._get(x)
        if not isinstance(st, _Lab):
            return
        touched = set()
        for i in range(0, len(pad), 2):
            if pad[i] or pad[i + 1]:
                touched.add(x.dim() - 1 - i // 2)
        if touched & set(range(st.start, st.stop)):
            self._freeze(st.labels, f"{where}: pad along the traced channels")
        else:
            self._set(out, st)

    def _op_reduce(self, name, args, kwargs, out, where):
        x = args[0]
        st = self._get(x)
        if not isinstance(st, _Lab):
            if isinstance(st, _PRef):
                self._unsafe_params.setdefault(st.name, f"{where}: {name} of a parameter")
            return
        dim = _arg(args, kwargs, 1, "dim")
        if name == "norm":
            dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
        keep = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
        if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
            self._freeze(st.labels, f"{where}: {name} over all dims")
            return
        dims = {_norm_dim(d, x.dim()) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if dims & set(range(st.start, st.stop)):
            self._freeze(st.labels, f"{where}: {name} over the traced channels")
            return
        shift = 0 if keep else sum(1 for d in dims if d < st.start)
        o = out[0] if isinstance(out, tuple) else out
        self._set(o, _Lab(st.start - shift, st.labels))

    def _op_max(self, name, args, kwargs, out, where):
        if isinstance(out, torch.Tensor) and len([a for a in args if isinstance(a, torch.Tensor)]) > 1:
            self._op_binary(name, args, kwargs, out, where)
        else:
            self._op_reduce(name, args, kwargs, out, where)

    _op_min = _op_max

    def _op_softmax(self, name, args, kwargs, out, where):
        x = args[0]
        st = self._get(x)
        if not isinstance(st, _Lab):
            return
        dim = _norm_dim(int(_arg(args, kwargs, 1, "dim")), x.dim())
        if st.start <= dim < st.stop:
            self._freeze(st.labels, f"{where}: {name} across the traced channels")
        else:
            self._set(out, st)

    _op_log_softmax = _op_softmax

    # ---------------------------------------------------------------- shape ops
    def _reshape(self, x, st, out_shape, where, name):
        in_shape = tuple(x.shape)
        out_shape = tuple(out_shape)
        if isinstance(st, _PRef):
            return None
        pin = [1]
        for s in in_shape:
            pin.append(pin[-1] * s)
        pout = [1]
        for s in out_shape:
            pout.append(pout[-1] * s)
        s0, e0 = st.start, st.stop
        # widen the block to boundaries common to both shapes
        while pin[s0] not in pout and s0 > 0:
            s0 -= 1
        while pin[e0] not in pout and e0 < len(in_shape):
            e0 += 1
        if pin[s0] not in pout or pin[e0] not in pout:
            self._freeze(st.labels, f"{where}: {name} mixes the traced channels with other dims")
            return None
        j0 = pout.index(pin[s0])
        j1 = len(pout) - 1 - pout[::-1].index(pin[e0])
        while j0 < j1 and out_shape[j0] == 1 and pout[j0 + 1] == pin[s0]:
            j0 += 1
        lab = st.labels.reshape((1,) * (st.start - s0) + st.labels.shape + (1,) * (e0 - st.stop))
        lab = np.broadcast_to(lab, in_shape[s0:e0]).reshape(out_shape[j0:j1])
        if lab.ndim > 1:
            # keep the result rectangular after pruning: a slot removes a whole hyperplane of the last axis
            flat = lab.reshape(-1, lab.shape[-1])
            for row in flat[1:]:
                self._union(flat[0], row)
        elif lab.ndim == 0:
            self._freeze(st.labels, f"{where}: {name} turns the traced channels into a scalar")
            return None
        return _Lab(j0, np.ascontiguousarray(lab))

    def _op_view(self, name, args, kwargs, out, where):
        x = args[0]
        st = self._get(x)
        if isinstance(st, _Lab):
            self._set(out, self._reshape(x, st, out.shape, where, name))
        elif isinstance(st, _PRef):
            ps = tuple(x.shape)
            if tuple(out.shape) == ps:
                self._set(out, st)
            elif tuple(s for s in out.shape if s != 1) == tuple(s for s in ps if s != 1):
                src = [d for d, s in zip(st.dims, ps) if s != 1]
                it = iter(src)
                self._set(out, _PRef(st.name, tuple(next(it) if s != 1 else None for s in out.shape)))
            else:
                self._unsafe_params.setdefault(st.name, f"{where}: {name} of a parameter")

    _op_reshape = _op_view
    _op_flatten = _op_view
    _op_unflatten = _op_view
    _op_view_as = _op_view
    _op_reshape_as = _op_view

    def _op_squeeze(self, name, args, kwargs, out, where):
        self._op_view(name, args[:1], {}, out, where)

    _op_unsqueeze = _op_squeeze

    def _op_permute(self, name, args, kwargs, out, where):
        x = args[0]
        nd = x.dim()
        if name == "permute":
            perm = _arg(args, kwargs, 1, "dims")
            if isinstance(perm, int):
                perm = args[1:]
            perm = [_norm_dim(int(d), nd) for d in perm]
        elif name in ("transpose", "swapaxes", "swapdims"):
            a, b = _norm_dim(int(_arg(args, kwargs, 1, "dim0")), nd), _norm_dim(int(_arg(args, kwargs, 2, "dim1")), nd)
            perm = list(range(nd))
            perm[a], perm[b] = perm[b], perm[a]
        elif name == "t":
            perm = list(range(nd))[::-1]
        else:  # movedim
            src, dst = _arg(args, kwargs, 1, "source"), _arg(args, kwargs, 2, "destination")
            src = [src] if isinstance(src, int) else list(src)
            dst = [dst] if isinstance(dst, int) else list(dst)
            src = [_norm_dim(d, nd) for d in src]
            dst = [_norm_dim(d, nd) for d in dst]
            perm = [None] * nd
            for s, d in zip(src, dst):
                perm[d] = s
            rest = iter(d for d in range(nd) if d not in src)
            perm = [p if p is not None else next(rest) for p in perm]
        st = self._get(x)
        if isinstance(st, _PRef):
            self._set(out, _PRef(st.name, tuple(st.dims[p] for p in perm)))
            return
        if not isinstance(st, _Lab):
            return
        block = list(range(st.start, st.stop))
        pos = sorted(perm.index(d) for d in block)
        if pos != list(range(pos[0], pos[0] + len(pos))):
            self._freeze(st.labels, f"{where}: {name} splits the traced channel block")
            return
        order = [perm[p] - st.start for p in pos]
        self._set(out, _Lab(pos[0], np.ascontiguousarray(st.labels.transpose(order))))

    _op_transpose = _op_swapaxes = _op_swapdims = _op_t = _op_movedim = _op_permute

    def _op_expand(self, name, args, kwargs, out, where):
        x = args[0]
        st = self._get(x)
        off = out.dim() - x.dim()
        if isinstance(st, _Lab):
            if tuple(out.shape[st.start + off:st.stop + off]) == st.labels.shape:
                self._set(out, _Lab(st.start + off, st.labels))
            else:
                self._freeze(st.labels, f"{where}: {name} of the traced channels")
        elif isinstance(st, _PRef):
            self._set(out, _PRef(st.name, (None,) * off + st.dims))

    _op_expand_as = _op_expand

    def _op_cat(self, name, args, kwargs, out, where):
        tensors = list(_arg(args, kwargs, 0, "tensors"))
        dim = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), out.dim())
        sts = [self._get(t) for t in tensors]
        labs = [s for s in sts if isinstance(s, _Lab)]
        if not labs:
            self._freeze_inputs(args, kwargs, f"{where}: {name} of parameters")
            return
        if all(isinstance(s, _Lab) and s.start == dim and s.labels.ndim == 1 for s in sts):
            self._set(out, _Lab(dim, np.concatenate([s.labels for s in sts])))
            return
        ref = labs[0]
        if ref.start <= dim < ref.stop:
            self._freeze_inputs(args, kwargs, f"{where}: {name} along the traced channels of partly untraced "
                                              "tensors")
            return
        for t, s in zip(tensors, sts):
            if isinstance(s, _Lab):
                if s.start == ref.start and s.labels.shape == ref.labels.shape:
                    self._union(s.labels, ref.labels)
                else:
                    self._freeze_inputs(args, kwargs, f"{where}: {name} of tensors with different channel dims")
                    return
            elif isinstance(s, _PRef) and ref.labels.ndim == 1 and s.dims[ref.start] is not None \
                    and t.shape[ref.start] == ref.labels.size:
                self._attach(s.name, s.dims[ref.start], ref.labels, "other")
            else:
                self._freeze(ref.labels, f"{where}: {name} with an untraced tensor")
        self._set(out, ref)

    _op_concat = _op_concatenate = _op_cat

    def _op_chunk(self, name, args, kwargs, out, where):
        x = args[0]
        st = self._get(x)
        if not isinstance(st, _Lab):
            return
        nd = x.dim()
        default = 0
        dim = _norm_dim(int(_arg(args, kwargs, 2, "dim", default)), nd)
        outs = list(out)
        if st.start <= dim < st.stop:
            sizes = [o.shape[dim] for o in outs]
            if st.labels.ndim != 1 or len(set(sizes)) != 1 or (name == "split" and
                                                               not isinstance(_arg(args, kwargs, 1, "split_size_or_sections"), int)):
                self._freeze(st.labels, f"{where}: {name} into unequal or fixed-size parts of the traced channels")
                return
            m = sizes[0]
            parts = st.labels.reshape(len(outs), m)
            for row in parts[1:]:
                self._union(parts[0], row)
            for o, row in zip(outs, parts):
                self._set(o, _Lab(st.start, np.ascontiguousarray(row)))
        else:
            for o in outs:
                self._set(o, st)

    _op_split = _op_chunk

    def _op_unbind(self, name, args, kwargs, out, where):
        x = args[0]
        st = self._get(x)
        if not isinstance(st, _Lab):
            return
        dim = _norm_dim(int(_arg(args, kwargs, 1, "dim", 0)), x.dim())
        if st.start <= dim < st.stop:
            self._freeze(st.labels, f"{where}: unbind of the traced channels")
            return
        for o in out:
            self._set(o, _Lab(st.start - (1 if dim < st.start else 0), st.labels))

    def _op_getitem(self, name, args, kwargs, out, where):
        x, idx = args[0], args[1]
        st = self._get(x)
        if not isinstance(st, (_Lab, _PRef)):
            return
        if not isinstance(idx, tuple):
            idx = (idx,)
        if any(isinstance(i, (torch.Tensor, list)) for i in idx):
            self._freeze_inputs((x,), {}, f"{where}: advanced indexing of traced channels")
            return
        n_real = sum(1 for i in idx if i is not None and i is not Ellipsis)
        if Ellipsis in idx:
            k = idx.index(Ellipsis)
            idx = idx[:k] + (slice(None),) * (x.dim() - n_real) + idx[k + 1:]
        idx = idx + (slice(None),) * (x.dim() - sum(1 for i in idx if i is not None))
        d_in = d_out = 0
        mapping = {}
        for i in idx:
            if i is None:
                d_out += 1
                continue
            if isinstance(i, slice):
                full = i == slice(None) or range(*i.indices(x.shape[d_in])) == range(x.shape[d_in])
                mapping[d_in] = (d_out, full)
                d_out += 1
            else:
                mapping[d_in] = (None, False)
            d_in += 1
        if isinstance(st, _PRef):
            dims = [None] * out.dim()
            for din, (dout, full) in mapping.items():
                if dout is not None and full:
                    dims[dout] = st.dims[din]
            self._set(out, _PRef(st.name, tuple(dims)))
            return
        block = list(range(st.start, st.stop))
        targets = [mapping[d] for d in block]
        if any(t[0] is None or not t[1] for t in targets):
            self._freeze(st.labels, f"{where}: indexing into the traced channels")
            return
        self._set(out, _Lab(targets[0][0], st.labels))

    def _op_roll(self, name, args, kwargs, out, where):
        x = args[0]
        st = self._get(x)
        if not isinstance(st, _Lab):
            return
        dims = _arg(args, kwargs, 2, "dims")
        dims = [dims] if isinstance(dims, int) else list(dims or [])
        if not dims or {_norm_dim(d, x.dim()) for d in dims} & set(range(st.start, st.stop)):
            self._freeze(st.labels, f"{where}: roll along the traced channels")
        else:
            self._set(out, st)

    def _op_contiguous(self, name, args, kwargs, out, where):
        self._set(out, self._get(args[0]))

    # ---------------------------------------------------------------- results
    def _finalize(self) -> None:
        for (pname, dim), reason in self._untraced_param_dims.items():
            for a in self.attachments.get(pname, []):
                if a.dim == dim:  # a tied parameter, also used where its input channels are fixed
                    self._freeze(a.labels, f"{reason} (tied parameter {pname})", False)
        for pname, reason in self._unsafe_params.items():
            reason, unsupported = reason if isinstance(reason, tuple) else (reason, True)
            for a in self.attachments.get(pname, []):
                self._freeze(a.labels, f"{reason} (parameter {pname})", unsupported)
        n = len(self._parent)
        roots = np.array([self.find(s) for s in range(n)], dtype=np.int64)
        self._roots = roots
        # groups: units (roots) that share a slot space
        gparent = list(range(n))

        def gfind(a):
            while gparent[a] != a:
                gparent[a] = gparent[gparent[a]]
                a = gparent[a]
            return a

        first_root_of_space: dict[int, int] = {}
        for s in range(n):
            sp = self._slot_space[s]
            r = int(roots[s])
            if sp in first_root_of_space:
                a, b = gfind(first_root_of_space[sp]), gfind(r)
                if a != b:
                    gparent[max(a, b)] = min(a, b)
            else:
                first_root_of_space[sp] = r
        frozen_roots = {}
        for s, why in self._frozen.items():
            frozen_roots.setdefault(int(roots[s]), why)
        by_group: dict[int, list[int]] = {}
        for s in range(n):
            r = int(roots[s])
            if r == s:
                by_group.setdefault(gfind(r), []).append(r)
        self.groups = []
        params_by_root: dict[int, set] = {}
        for pname, lst in self.attachments.items():
            for a in lst:
                for r in set(roots[a.labels].tolist()):
                    params_by_root.setdefault(r, set()).add(pname)
        self.root_group = {}
        for gi, (g, units) in enumerate(sorted(by_group.items())):
            self.groups.append(ChannelGroup(len(self.groups), units, 1, [], []))
            for u in units:
                self.root_group[u] = len(self.groups) - 1
        # spaces, params, unit width
        space_slots: dict[int, list[int]] = {}
        for s in range(n):
            space_slots.setdefault(self._slot_space[s], []).append(s)
        for sp, slots in space_slots.items():
            grp = self.groups[self.root_group[int(roots[slots[0]])]]
            grp.spaces.append(self.spaces[sp])
            if len(grp.spaces) == 1:
                # channels of one unit in this space (slots per unit present here, times the space's width)
                present = len({int(r) for r in roots[slots]})
                grp.unit_channels = max(1, len(slots) * self._space_width[sp] // present)
        for grp in self.groups:
            ps = set()
            for u in grp.units:
                ps |= params_by_root.get(u, set())
            grp.params = sorted(ps)
            fz = {u for u in grp.units if u in frozen_roots}
            grp.frozen_units = fz
            if len(fz) == len(grp.units):
                grp.frozen_reason = frozen_roots[next(iter(fz))]
            elif not grp.params:
                grp.frozen_reason = "no parameters depend on these channels"
            else:
                # the units present in a space must all have the same number of slots there, else a removal
                # could leave a layer with a ragged shape. A unit may be absent from a space: a concatenation
                # couples parts that are otherwise separate (e.g. cat([a, b]) scaled by an SE gate), and
                # removing a unit then shrinks only the spaces it appears in.
                for sp, slots in space_slots.items():
                    if self.root_group[int(roots[slots[0]])] != grp.index:
                        continue
                    cnt = {}
                    for s in slots:
                        cnt[int(roots[s])] = cnt.get(int(roots[s]), 0) + 1
                    if len(set(cnt.values())) > 1:
                        grp.frozen_reason = "its channels are coupled in units of unequal sizes"
                        break
                    if len(cnt) < len(grp.units):
                        grp.partial_spaces.append(frozenset(cnt))
        self.frozen_roots = frozen_roots

    def root_of(self, labels: np.ndarray) -> np.ndarray:
        """Unit (root slot) of each slot in ``labels``."""
        return self._roots[np.asarray(labels, dtype=np.int64)]

    def summary(self) -> str:
        """One line per group: channels, units, prunable or why not, and a few of its layers."""
        lines = []
        for g in self.groups:
            state = "prunable" if g.prunable else f"kept ({g.frozen_reason or 'a single unit'})"
            lines.append(f"group {g.index}: {g.channels} channels in {len(g.units)} units, {state}; "
                         f"{', '.join(g.spaces[:3])}{' ...' if len(g.spaces) > 3 else ''}")
        return "\n".join(lines)
