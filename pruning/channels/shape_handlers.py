"""Channel-tracer handlers of shape ops, registered with :func:`~pruning.channels.tracer.register_op_handler`.

They follow where a tensor's channel block goes: views and reshapes (``flatten`` before a ``Linear`` expands
each channel to its spatial positions; a channel shuffle ties the same column of every shuffle group),
permutes, ``expand``, ``cat`` (channel offsets along the channel dim; along another dim the operands'
channels are united), ``chunk`` / ``split`` into equal parts (channel ``k`` of every part goes together),
``unbind``, indexing with full slices along the channels, and ``roll`` along other dims. Anything that
would cut the channel block apart keeps its channels.
"""
from __future__ import annotations

import numpy as np
import torch

from .handlers import norm_dim, traced_input
from .tracer import Channels, OpCall, ParamView, register_op_handler

__all__: list[str] = []


def _reshape_channels(call: OpCall, x, st: Channels, out_shape) -> Channels | None:
    """Where the channel block of ``x`` lands after a reshape to ``out_shape``, or ``None`` (frozen)."""
    tr = call.trace
    in_shape = tuple(x.shape)
    out_shape = tuple(out_shape)
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
        tr.freeze(st.labels, f"{call.where}: {call.name} mixes the traced channels with other dims")
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
            tr.unite(flat[0], row)
    elif lab.ndim == 0:
        tr.freeze(st.labels, f"{call.where}: {call.name} turns the traced channels into a scalar")
        return None
    return Channels(j0, np.ascontiguousarray(lab))


def _view(call: OpCall) -> None:
    tr = call.trace
    x, out = call.args[0], call.out
    st = tr.state(x)
    if isinstance(st, Channels):
        tr.set_state(out, _reshape_channels(call, x, st, out.shape))
    elif isinstance(st, ParamView):
        ps = tuple(x.shape)
        if tuple(out.shape) == ps:
            tr.set_state(out, st)
        elif tuple(s for s in out.shape if s != 1) == tuple(s for s in ps if s != 1):
            it = iter([d for d, s in zip(st.dims, ps) if s != 1])
            tr.set_state(out, ParamView(st.name, tuple(next(it) if s != 1 else None for s in out.shape)))
        else:
            tr.keep_parameter(st.name, f"{call.where}: {call.name} of a parameter")


def _permutation(call: OpCall) -> list[int]:
    nd = call.args[0].dim()
    if call.name == "permute":
        perm = call.arg(1, "dims")
        if isinstance(perm, int):
            perm = call.args[1:]
        return [norm_dim(int(d), nd) for d in perm]
    if call.name in ("transpose", "swapaxes", "swapdims"):
        a, b = norm_dim(int(call.arg(1, "dim0")), nd), norm_dim(int(call.arg(2, "dim1")), nd)
        perm = list(range(nd))
        perm[a], perm[b] = perm[b], perm[a]
        return perm
    if call.name == "t":
        return list(range(nd))[::-1]
    src, dst = call.arg(1, "source"), call.arg(2, "destination")  # movedim
    src = [norm_dim(d, nd) for d in ([src] if isinstance(src, int) else list(src))]
    dst = [norm_dim(d, nd) for d in ([dst] if isinstance(dst, int) else list(dst))]
    perm = [None] * nd
    for s, d in zip(src, dst):
        perm[d] = s
    rest = iter(d for d in range(nd) if d not in src)
    return [p if p is not None else next(rest) for p in perm]


def _permute(call: OpCall) -> None:
    tr = call.trace
    perm = _permutation(call)
    st = tr.state(call.args[0])
    if isinstance(st, ParamView):
        tr.set_state(call.out, ParamView(st.name, tuple(st.dims[p] for p in perm)))
        return
    if not isinstance(st, Channels):
        return
    pos = sorted(perm.index(d) for d in range(st.start, st.stop))
    if pos != list(range(pos[0], pos[0] + len(pos))):
        tr.freeze(st.labels, f"{call.where}: {call.name} splits the traced channel block")
        return
    order = [perm[p] - st.start for p in pos]
    tr.set_state(call.out, Channels(pos[0], np.ascontiguousarray(st.labels.transpose(order))))


def _expand(call: OpCall) -> None:
    tr = call.trace
    x, out = call.args[0], call.out
    st = tr.state(x)
    off = out.dim() - x.dim()
    if isinstance(st, Channels):
        if tuple(out.shape[st.start + off:st.stop + off]) == st.labels.shape:
            tr.set_state(out, Channels(st.start + off, st.labels))
        else:
            tr.freeze(st.labels, f"{call.where}: {call.name} of the traced channels")
    elif isinstance(st, ParamView):
        tr.set_state(out, ParamView(st.name, (None,) * off + st.dims))


def _cat(call: OpCall) -> None:
    tr = call.trace
    tensors = list(call.arg(0, "tensors"))
    dim = norm_dim(int(call.arg(1, "dim", 0)), call.out.dim())
    sts = [tr.state(t) for t in tensors]
    labs = [s for s in sts if isinstance(s, Channels)]
    if not labs:
        call.freeze_inputs(f"{call.where}: {call.name} of parameters")
        return
    if all(isinstance(s, Channels) and s.start == dim and s.labels.ndim == 1 for s in sts):
        tr.set_state(call.out, Channels(dim, np.concatenate([s.labels for s in sts])))
        return
    ref = labs[0]
    if ref.start <= dim < ref.stop:
        call.freeze_inputs(f"{call.where}: {call.name} along the traced channels of partly untraced tensors")
        return
    for t, s in zip(tensors, sts):
        if isinstance(s, Channels):
            if s.start == ref.start and s.labels.shape == ref.labels.shape:
                tr.unite(s.labels, ref.labels)
            else:
                call.freeze_inputs(f"{call.where}: {call.name} of tensors with different channel dims")
                return
        elif isinstance(s, ParamView) and ref.labels.ndim == 1 and s.dims[ref.start] is not None \
                and t.shape[ref.start] == ref.labels.size:
            tr.attach(s.name, s.dims[ref.start], ref.labels, "other")
        else:
            tr.freeze(ref.labels, f"{call.where}: {call.name} with an untraced tensor")
    tr.set_state(call.out, ref)


def _chunk(call: OpCall) -> None:
    tr, x, st = call.trace, call.args[0], traced_input(call)
    if st is None:
        return
    dim = norm_dim(int(call.arg(2, "dim", 0)), x.dim())
    outs = list(call.out)
    if not st.start <= dim < st.stop:
        for o in outs:
            tr.set_state(o, st)
        return
    sizes = [o.shape[dim] for o in outs]
    fixed_sizes = call.name == "split" and not isinstance(call.arg(1, "split_size_or_sections"), int)
    if st.labels.ndim != 1 or len(set(sizes)) != 1 or fixed_sizes:
        tr.freeze(st.labels, f"{call.where}: {call.name} into unequal or fixed-size parts of the traced channels")
        return
    parts = st.labels.reshape(len(outs), sizes[0])
    for row in parts[1:]:
        tr.unite(parts[0], row)
    for o, row in zip(outs, parts):
        tr.set_state(o, Channels(st.start, np.ascontiguousarray(row)))


def _unbind(call: OpCall) -> None:
    st = traced_input(call)
    if st is None:
        return
    dim = norm_dim(int(call.arg(1, "dim", 0)), call.args[0].dim())
    if st.start <= dim < st.stop:
        call.trace.freeze(st.labels, f"{call.where}: unbind of the traced channels")
        return
    for o in call.out:
        call.trace.set_state(o, Channels(st.start - (1 if dim < st.start else 0), st.labels))


def _index_mapping(x, idx) -> dict:
    """Input dim -> (output dim or None, whether it is kept whole) for basic indexing ``x[idx]``."""
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
    return mapping


def _getitem(call: OpCall) -> None:
    tr = call.trace
    x, idx = call.args[0], call.args[1]
    st = tr.state(x)
    if not isinstance(st, (Channels, ParamView)):
        return
    idx = idx if isinstance(idx, tuple) else (idx,)
    if any(isinstance(i, (torch.Tensor, list)) for i in idx):
        tr.freeze_tensors([x], f"{call.where}: advanced indexing of traced channels")
        return
    mapping = _index_mapping(x, idx)
    if isinstance(st, ParamView):
        dims = [None] * call.out.dim()
        for din, (dout, full) in mapping.items():
            if dout is not None and full:
                dims[dout] = st.dims[din]
        tr.set_state(call.out, ParamView(st.name, tuple(dims)))
        return
    targets = [mapping[d] for d in range(st.start, st.stop)]
    if any(t[0] is None or not t[1] for t in targets):
        tr.freeze(st.labels, f"{call.where}: indexing into the traced channels")
        return
    tr.set_state(call.out, Channels(targets[0][0], st.labels))


def _roll(call: OpCall) -> None:
    x, st = call.args[0], traced_input(call)
    if st is None:
        return
    dims = call.arg(2, "dims")
    dims = [dims] if isinstance(dims, int) else list(dims or [])
    if not dims or {norm_dim(d, x.dim()) for d in dims} & set(range(st.start, st.stop)):
        call.trace.freeze(st.labels, f"{call.where}: roll along the traced channels")
    else:
        call.trace.set_state(call.out, st)


for _op in ("view", "reshape", "flatten", "unflatten", "view_as", "reshape_as", "squeeze", "unsqueeze"):
    register_op_handler(_op, _view)
for _op in ("permute", "transpose", "swapaxes", "swapdims", "t", "movedim"):
    register_op_handler(_op, _permute)
for _op in ("expand", "expand_as"):
    register_op_handler(_op, _expand)
for _op in ("cat", "concat", "concatenate"):
    register_op_handler(_op, _cat)
for _op in ("chunk", "split"):
    register_op_handler(_op, _chunk)
register_op_handler("unbind", _unbind)
register_op_handler("getitem", _getitem)
register_op_handler("roll", _roll)
