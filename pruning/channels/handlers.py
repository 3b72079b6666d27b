"""The built-in op handlers of the channel tracer, registered with :func:`~pruning.channels.tracer.register_op_handler`.

Each handler follows one op's channels through the public :class:`~pruning.channels.tracer.ChannelTrace` API:

* layers make new slots and attach their parameters: ``conv1d/2d/3d`` (a grouped conv ties each group's
  input channels to its output channels, so a unit is a whole group), ``linear``, ``embedding``, and ``addmm``
  with a parameter as its second matrix (transformers' ``Conv1D``, weight ``[in, out]``);
* normalisation attaches its scale, shift and running statistics: ``batch_norm``, ``instance_norm``,
  ``layer_norm`` (over the channel dim only), ``group_norm`` (a unit is a norm group);
* elementwise ops pass channels through (:func:`unary`); binary ops unite the channels of both operands
  (a residual add, a squeeze-and-excitation gate) and attach a parameter operand (a layer scale);
* pooling, reductions and softmax over other dims pass them through;
* ``pad`` along other dims passes them through; shape ops are in :mod:`pruning.channels.shape_handlers`;
* factories and metadata queries (``zeros_like``, ``size``, ...) carry no channels.

Anything else the handlers do not recognise keeps the channels it touches. :func:`unary` is also the
handler to register for a user's own elementwise op.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.nn import functional as F

from ..batches import iter_tensors
from .tracer import Channels, OpCall, ParamView, register_op_handler

__all__ = ["unary", "no_channels", "norm_dim", "traced_input"]

# Handed a parameter view, these ops return the same parameter (so a later use of it attaches as usual).
_PARAM_PRESERVING = ("contiguous", "clone", "to", "float", "detach", "type_as", "half")


def norm_dim(d: int, ndim: int) -> int:
    """``d`` as a non-negative dim of a tensor with ``ndim`` dims."""
    return d + ndim if d < 0 else d


def traced_input(call: OpCall) -> Channels | None:
    """The channels the op's first argument carries, or ``None`` when it carries none."""
    st = call.trace.state(call.args[0])
    return st if isinstance(st, Channels) else None


def no_channels(call: OpCall) -> None:
    """Handler of ops whose output carries no channels (factories, ``zeros_like``, ``size``, ...)."""


# ---------------------------------------------------------------- layers
def _conv(call: OpCall) -> None:
    tr = call.trace
    x, w, b = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    groups = int(call.arg(6, "groups", 1))
    sx, sw = tr.state(x), tr.state(w)
    if not isinstance(sw, ParamView) or sw.dims != tuple(range(w.dim())):
        call.freeze_inputs(f"{call.where}: {call.name} with a computed weight")
        return
    cout = w.shape[0]
    labels = tr.new_slots(cout, f"{call.where}:{call.name}")
    tr.attach(sw.name, 0, labels, "out")
    sb = tr.state(b) if b is not None else None
    if isinstance(sb, ParamView):
        tr.attach(sb.name, 0, labels, "out")
    x_ok = isinstance(sx, Channels) and sx.start == 1 and sx.labels.ndim == 1 and x.dim() == w.dim()
    if groups == 1:
        if x_ok:
            tr.attach(sw.name, 1, sx.labels, "in")
        else:
            tr.fix_parameter_dim(sw.name, 1, f"{call.where}: {call.name} on an untraced input")
            if isinstance(sx, Channels):
                tr.freeze(sx.labels, f"{call.where}: {call.name} input channels not on dim 1")
    elif x_ok:
        cin_g, cout_g = sx.labels.size // groups, cout // groups
        for a in range(groups):
            block = np.concatenate([sx.labels[a * cin_g:(a + 1) * cin_g], labels[a * cout_g:(a + 1) * cout_g]])
            tr.unite(block[:-1], block[1:])
    else:
        if isinstance(sx, Channels):
            tr.freeze(sx.labels, f"{call.where}: grouped {call.name} input channels not on dim 1")
        tr.freeze(labels, f"{call.where}: grouped {call.name} whose input channels are not traced")
    tr.set_state(call.out, Channels(1, labels))


def _linear(call: OpCall) -> None:
    tr = call.trace
    x, w, b = call.args[0], call.arg(1, "weight"), call.arg(2, "bias")
    sx, sw = tr.state(x), tr.state(w)
    if not isinstance(sw, ParamView) or sw.dims != (0, 1):
        call.freeze_inputs(f"{call.where}: linear with a computed weight")
        return
    if isinstance(sx, Channels) and sx.start == x.dim() - 1:
        tr.attach(sw.name, 1, sx.labels, "in")
    else:
        tr.fix_parameter_dim(sw.name, 1, f"{call.where}: linear on an untraced input")
        if isinstance(sx, Channels):
            tr.freeze(sx.labels, f"{call.where}: linear on a dim other than the traced channels")
    labels = tr.new_slots(w.shape[0], f"{call.where}:linear")
    tr.attach(sw.name, 0, labels, "out")
    sb = tr.state(b) if b is not None else None
    if isinstance(sb, ParamView):
        tr.attach(sb.name, 0, labels, "out")
    tr.set_state(call.out, Channels(call.out.dim() - 1, labels))


def _addmm(call: OpCall) -> None:
    """``torch.addmm(bias, x, weight)`` with ``weight`` a ``[in, out]`` parameter: a Linear layer stored transposed
    (transformers' ``Conv1D``; ``x`` is its input flattened to ``[rows, in]``)."""
    tr = call.trace
    b, x, w = call.args[0], call.arg(1, "mat1"), call.arg(2, "mat2")
    sx, sw = tr.state(x), tr.state(w)
    if not isinstance(sw, ParamView) or sw.dims != (0, 1):
        call.freeze_inputs(f"{call.where}: addmm whose second matrix is not a parameter")
        return
    if isinstance(sx, Channels) and sx.start == 1 and sx.labels.ndim == 1:
        tr.attach(sw.name, 0, sx.labels, "in")
    else:
        tr.fix_parameter_dim(sw.name, 0, f"{call.where}: addmm on an untraced input")
        if isinstance(sx, Channels):
            tr.freeze(sx.labels, f"{call.where}: addmm on a dim other than the traced channels")
    labels = tr.new_slots(w.shape[1], f"{call.where}:addmm")
    tr.attach(sw.name, 1, labels, "out")
    sb = tr.state(b)
    if isinstance(sb, ParamView) and b.dim() == 1:
        tr.attach(sb.name, 0, labels, "out")
    elif isinstance(sb, Channels) and sb.start == b.dim() - 1 and sb.labels.shape == labels.shape:
        tr.unite(sb.labels, labels)  # a traced tensor added to the product: a residual
    elif sb is not None:
        tr.freeze(labels, f"{call.where}: addmm adds a tensor the tracer cannot align with its output")
    tr.set_state(call.out, Channels(call.out.dim() - 1, labels))


def _embedding_of(call: OpCall, w) -> None:
    tr = call.trace
    sw = tr.state(w)
    if not isinstance(sw, ParamView):
        return
    labels = tr.new_slots(w.shape[1], f"{call.where}:embedding")
    tr.attach(sw.name, 1, labels, "out")
    tr.set_state(call.out, Channels(call.out.dim() - 1, labels))


def _embedding(call: OpCall) -> None:  # F.embedding(input, weight)
    _embedding_of(call, call.arg(1, "weight"))


def _embedding_weight_first(call: OpCall) -> None:  # torch.embedding(weight, input)
    _embedding_of(call, call.args[0])


# ---------------------------------------------------------------- normalisation
def _norm_params(call: OpCall, x, params) -> None:
    tr = call.trace
    sx = tr.state(x)
    if isinstance(sx, Channels) and sx.start == 1 and sx.labels.ndim == 1:
        for p in params:
            sp = tr.state(p)
            if isinstance(sp, ParamView):
                tr.attach(sp.name, 0, sx.labels, "norm")
    elif isinstance(sx, Channels) and not (sx.stop <= 1 or sx.start > 1):
        tr.freeze(sx.labels, f"{call.where}: {call.name} over a reshaped channel dim")
        sx = None
    tr.set_state(call.out, sx)


def _batch_norm_functional(call: OpCall) -> None:
    # F.batch_norm and F.instance_norm share the argument order
    params = [call.arg(i, n) for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))]
    _norm_params(call, call.args[0], [p for p in params if p is not None])


def _batch_norm_native(call: OpCall) -> None:  # torch.batch_norm(input, weight, bias, mean, var, ...)
    params = [call.args[i] for i in (1, 2, 3, 4) if len(call.args) > i and call.args[i] is not None]
    _norm_params(call, call.args[0], params)


def _attach_norm(call: OpCall, params, labels) -> None:
    for p in params:
        sp = call.trace.state(p) if p is not None else None
        if isinstance(sp, ParamView):
            call.trace.attach(sp.name, 0, labels, "norm")


def _layer_norm(call: OpCall) -> None:
    tr = call.trace
    x, sx = call.args[0], traced_input(call)
    if sx is None:
        return
    shape = tuple(call.arg(1, "normalized_shape"))
    last_dim_only = len(shape) == 1 and sx.start == x.dim() - 1 and sx.labels.ndim == 1
    if sx.start >= x.dim() - len(shape) and not last_dim_only:
        tr.freeze(sx.labels, f"{call.where}: layer_norm over a multi-dim channel block")
        return
    if last_dim_only:
        _attach_norm(call, (call.arg(2, "weight"), call.arg(3, "bias")), sx.labels)
        tr.layer_norms[call.where] = sx.labels
    elif sx.stop > x.dim() - len(shape):
        tr.freeze(sx.labels, f"{call.where}: layer_norm across the traced channels and other dims")
        return
    tr.set_state(call.out, sx)


def _group_norm(call: OpCall) -> None:
    tr = call.trace
    sx = tr.state(call.args[0])
    if not (isinstance(sx, Channels) and sx.start == 1 and sx.labels.ndim == 1):
        if isinstance(sx, Channels):
            tr.freeze(sx.labels, f"{call.where}: group_norm over a reshaped channel dim")
        return
    ng = int(call.arg(1, "num_groups"))
    cg = sx.labels.size // ng
    for a in range(ng):
        blk = sx.labels[a * cg:(a + 1) * cg]
        tr.unite(blk[:-1], blk[1:])
    _attach_norm(call, (call.arg(2, "weight"), call.arg(3, "bias")), sx.labels)
    tr.set_state(call.out, sx)


# ---------------------------------------------------------------- elementwise
def _pass_through(call: OpCall, x, others) -> None:
    tr = call.trace
    st = tr.state(x)
    for t in others:
        if t is not x and tr.state(t) is not None:
            call.freeze_inputs(f"{call.where}: {call.name} with a traced second operand")
            return
    if isinstance(st, Channels) or (isinstance(st, ParamView) and call.name in _PARAM_PRESERVING):
        tr.set_state(call.out, st)
    elif isinstance(st, ParamView):
        tr.keep_parameter(st.name, f"{call.where}: {call.name} on a parameter")


def unary(call: OpCall) -> None:
    """Handler of an elementwise op of one tensor (its first argument): the output carries the input's
    channels. A second traced tensor among the arguments keeps them instead."""
    x = call.args[0] if call.args else next(iter(call.kwargs.values()))
    _pass_through(call, x, list(iter_tensors((call.args[1:], call.kwargs))))


def _binary(call: OpCall) -> None:
    tr = call.trace
    operands = [a for a in list(call.args) + list(call.kwargs.values()) if isinstance(a, torch.Tensor)]
    if len(operands) == 1:
        _pass_through(call, operands[0], ())
        return
    oshape = tuple(call.out.shape)
    nd = len(oshape)
    labs = []
    for t in operands:
        st = tr.state(t)
        if isinstance(st, Channels):
            labs.append(Channels(st.start + nd - t.dim(), st.labels))
    if not labs:
        for t in operands:
            st = tr.state(t)
            if isinstance(st, ParamView):
                tr.keep_parameter(st.name, f"{call.where}: {call.name} between parameters")
        return
    ref = next((st for st in labs if st.labels.shape == oshape[st.start:st.stop]), None)
    if ref is None:
        call.freeze_inputs(f"{call.where}: {call.name} broadcasts the traced channels")
        return
    for t in operands:
        st = tr.state(t)
        off = nd - t.dim()
        seg = ((1,) * off + tuple(t.shape))[ref.start:ref.stop]
        if all(s == 1 for s in seg):
            if isinstance(st, Channels):
                tr.freeze(st.labels, f"{call.where}: {call.name} broadcasts traced channels")
            continue
        if seg != ref.labels.shape:
            call.freeze_inputs(f"{call.where}: {call.name} with mismatched channel shapes")
            return
        if isinstance(st, Channels):
            if st.start + off == ref.start and st.labels.shape == ref.labels.shape:
                tr.unite(st.labels, ref.labels)
            else:
                call.freeze_inputs(f"{call.where}: {call.name} of tensors with channels on different dims")
                return
        elif isinstance(st, ParamView) and ref.labels.ndim == 1:
            pd_ = ref.start - off
            pdim = st.dims[pd_] if 0 <= pd_ < len(st.dims) else None
            if pdim is None:
                tr.freeze(ref.labels, f"{call.where}: {call.name} with a reshaped parameter")
            else:
                tr.attach(st.name, pdim, ref.labels, "other")
        else:
            tr.freeze(ref.labels, f"{call.where}: {call.name} with an untraced tensor of the same channel size")
    tr.set_state(call.out, ref)


# ---------------------------------------------------------------- pooling and reductions
def _pool(spatial_dims: int):
    def handler(call: OpCall) -> None:
        x, out, st = call.args[0], call.out, traced_input(call)
        if st is None:
            return
        if st.stop <= x.dim() - spatial_dims and isinstance(out, torch.Tensor) and out.dim() == x.dim():
            call.trace.set_state(out, st)
        elif isinstance(out, tuple) and st.stop <= x.dim() - spatial_dims:
            call.trace.set_state(out[0], st)
        else:
            call.trace.freeze(st.labels, f"{call.where}: {call.name} over the traced channel dim")

    return handler


def _pad(call: OpCall) -> None:
    x, st = call.args[0], traced_input(call)
    if st is None:
        return
    pad = list(call.arg(1, "pad"))
    touched = {x.dim() - 1 - i // 2 for i in range(0, len(pad), 2) if pad[i] or pad[i + 1]}
    if touched & set(range(st.start, st.stop)):
        call.trace.freeze(st.labels, f"{call.where}: pad along the traced channels")
    else:
        call.trace.set_state(call.out, st)


def _reduce(call: OpCall) -> None:
    tr = call.trace
    x, args, kwargs = call.args[0], call.args, call.kwargs
    st = tr.state(x)
    if not isinstance(st, Channels):
        if isinstance(st, ParamView):
            tr.keep_parameter(st.name, f"{call.where}: {call.name} of a parameter")
        return
    dim = call.arg(1, "dim")
    if call.name == "norm":
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    keep = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        tr.freeze(st.labels, f"{call.where}: {call.name} over all dims")
        return
    dims = {norm_dim(d, x.dim()) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    if dims & set(range(st.start, st.stop)):
        tr.freeze(st.labels, f"{call.where}: {call.name} over the traced channels")
        return
    shift = 0 if keep else sum(1 for d in dims if d < st.start)
    out = call.out[0] if isinstance(call.out, tuple) else call.out
    tr.set_state(out, Channels(st.start - shift, st.labels))


def _max_min(call: OpCall) -> None:
    # torch.max(a, b) is elementwise, torch.max(x, dim) a reduction
    if isinstance(call.out, torch.Tensor) and len([a for a in call.args if isinstance(a, torch.Tensor)]) > 1:
        _binary(call)
    else:
        _reduce(call)


def _along_other_dim(what: str):
    """Handler of ops along one dim (``dim`` argument 1) that keep every other dim as it is."""

    def handler(call: OpCall) -> None:
        x, st = call.args[0], traced_input(call)
        if st is None:
            return
        dim = norm_dim(int(call.arg(1, "dim")), x.dim())
        if st.start <= dim < st.stop:
            call.trace.freeze(st.labels, f"{call.where}: {call.name} {what} the traced channels")
        else:
            call.trace.set_state(call.out, st)

    return handler


# ---------------------------------------------------------------- the table
_UNARY = (
    "relu", "relu_", "relu6", "hardtanh", "hardtanh_", "gelu", "silu", "silu_", "sigmoid", "sigmoid_",
    "tanh", "tanh_", "hardswish", "hardswish_", "hardsigmoid", "hardsigmoid_", "leaky_relu", "leaky_relu_",
    "elu", "elu_", "selu", "selu_", "celu", "softplus", "mish", "dropout", "dropout_", "dropout1d",
    "dropout2d", "dropout3d", "alpha_dropout", "feature_alpha_dropout", "contiguous", "clone", "detach",
    "float", "half", "double", "bfloat16", "to", "type", "type_as", "abs", "neg", "__neg__", "exp", "log",
    "sqrt", "rsqrt", "square", "erf", "clamp", "clamp_", "clip", "clamp_min", "clamp_min_", "requires_grad_",
    "cpu", "cuda", "sin", "cos", "reciprocal", "logsigmoid", "prelu_scalar",
)
_BINARY = (
    "add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__", "__isub__",
    "mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__", "__rtruediv__",
    "__itruediv__", "true_divide", "maximum", "minimum", "pow", "__pow__",
)
_POOLS = ("max_pool", "avg_pool", "adaptive_avg_pool", "adaptive_max_pool", "lp_pool", "fractional_max_pool")
_REDUCE = ("mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod")
_NO_CHANNELS = (
    # metadata queries
    "__get__", "size", "dim", "numel", "__len__", "__bool__", "item", "tolist", "__format__", "is_floating_point",
    "is_complex", "get_device", "is_contiguous", "data_ptr", "element_size", "stride", "storage_offset",
    # new tensors that only borrow dtype / device / shape
    "new_zeros", "new_ones", "new_empty", "new_full", "new_tensor", "zeros_like", "ones_like", "empty_like",
    "full_like", "rand_like", "randn_like", "randint_like", "randn", "rand", "zeros", "ones", "empty", "full",
    "arange", "tensor", "linspace", "eye", "as_tensor",
)

for _op in _UNARY:
    register_op_handler(_op, unary)
for _op in _BINARY:
    register_op_handler(_op, _binary)
for _op in _REDUCE:
    register_op_handler(_op, _reduce)
for _op in _NO_CHANNELS:
    register_op_handler(_op, no_channels)
for _base in _POOLS:
    for _k in (1, 2, 3):
        register_op_handler(f"{_base}{_k}d", _pool(_k))
        register_op_handler(f"{_base}{_k}d_with_indices", _pool(_k))
for _op in ("boolean_dispatch", "interpolate", "upsample"):
    register_op_handler(_op, _pool(2))
for _op in ("conv1d", "conv2d", "conv3d"):
    register_op_handler(_op, _conv, creates_channels=True)
register_op_handler("linear", _linear, creates_channels=True)
register_op_handler("addmm", _addmm, creates_channels=True)
register_op_handler("embedding", _embedding, creates_channels=True)
register_op_handler(torch.embedding, _embedding_weight_first, creates_channels=True)
register_op_handler(F.batch_norm, _batch_norm_functional)
register_op_handler(F.instance_norm, _batch_norm_functional)
register_op_handler(torch.batch_norm, _batch_norm_native)
register_op_handler("layer_norm", _layer_norm)
register_op_handler("group_norm", _group_norm)
register_op_handler("pad", _pad)
for _op in ("max", "min"):
    register_op_handler(_op, _max_min)
register_op_handler("softmax", _along_other_dim("across"))
register_op_handler("log_softmax", _along_other_dim("across"))
