"""Hugging Face layers in channel pruning: transformers' ``Conv1D`` and decoder self-attention.

transformers is never imported here: its layers are recognised by class name, module and structure.

* ``Conv1D`` (GPT-2's projections, weight ``[in, out]``, ``torch.addmm(bias, x.view(-1, in), weight)``) is traced
  by the ``addmm`` handler of :mod:`pruning.channels.handlers`; surgery updates its ``nx`` / ``nf``
  (:func:`is_hf_conv1d`).
* Decoder self-attention is traced as one op (like BERT's in :mod:`pruning.channels.attention`), because what
  happens inside (rotary embeddings, the key / value cache, ``repeat_kv``, fused attention kernels) is not a
  channel op the tracer could follow. Two layouts (:func:`decoder_attention_layout`):

  - ``"decoder"``: ``q_proj`` / ``k_proj`` / ``v_proj`` Linear children, an output projection (``o_proj``,
    ``out_proj`` or ``dense``) and an integer ``head_dim`` (Llama, Mistral, Qwen2, Qwen3, Gemma, Phi, OPT). With
    grouped-query attention (fewer key / value heads than query heads) a unit is a whole **KV group**: one key /
    value head and the ``num_key_value_groups`` query heads that share it, so ``num_key_value_groups`` stays and
    ``repeat_kv`` still pairs every query head with its own key / value head. Without it a unit is one head.
  - ``"gpt2"``: a ``c_attn`` Conv1D producing ``[q | k | v]`` (split by ``split_size``) and a ``c_proj`` Conv1D;
    a head's q, k and v columns of ``c_attn`` and its ``c_proj`` rows go together.

  Surgery then sets the module's own head counts (:func:`set_head_counts`): ``num_heads`` (OPT), ``split_size`` and
  ``num_heads`` (GPT-2), ``num_key_value_heads`` where a module keeps one.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from ..batches import iter_tensors
from .tracer import ChannelTrace, Channels, ModuleCapture

__all__ = ["is_hf_conv1d", "AttentionLayout", "decoder_attention_layout", "record_decoder_attention",
           "set_head_counts"]

_OUT_NAMES = ("o_proj", "out_proj", "dense")


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.pytorch_utils.Conv1D`` (by class name and module): a 2-D ``weight``
    ``[in, out]`` and integer ``nx`` / ``nf``."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and isinstance(getattr(module, "nx", None), int) and isinstance(getattr(module, "nf", None), int))


@dataclass(frozen=True)
class AttentionLayout:
    """Where a decoder attention module keeps its projections and how its heads are laid out.

    Attributes:
        kind: ``"decoder"`` (separate q / k / v Linears) or ``"gpt2"`` (one ``c_attn`` Conv1D).
        inputs: the projections reading the hidden states (``(q, k, v)`` or ``(c_attn,)``), as child names.
        out: the output projection's child name.
        head_dim: channels per head.
        heads: query heads; ``kv_heads``: key / value heads (``heads`` is a multiple of it).
    """

    kind: str
    inputs: tuple
    out: str
    head_dim: int
    heads: int
    kv_heads: int

    @property
    def group(self) -> int:
        """Query heads per key / value head (``num_key_value_groups``)."""
        return self.heads // self.kv_heads


def _int(module: nn.Module, name: str):
    value = getattr(module, name, None)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def decoder_attention_layout(module: nn.Module) -> AttentionLayout | None:
    """The :class:`AttentionLayout` of a Hugging Face decoder self-attention module, or ``None`` for anything else
    (see the module docstring for what is recognised)."""
    hd = _int(module, "head_dim")
    if not hd or hd < 1:
        return None
    children = dict(module.named_children())
    if all(isinstance(children.get(n), nn.Linear) for n in ("q_proj", "k_proj", "v_proj")):
        out = next((n for n in _OUT_NAMES if isinstance(children.get(n), nn.Linear)), None)
        q, k, v = children["q_proj"], children["k_proj"], children["v_proj"]
        if out is None or q.out_features % hd or k.out_features % hd or k.out_features != v.out_features:
            return None
        heads, kv = q.out_features // hd, k.out_features // hd
        if not kv or heads % kv or children[out].in_features != q.out_features:
            return None
        groups = _int(module, "num_key_value_groups")
        if groups is not None and groups != heads // kv:
            return None
        if _int(module, "num_heads") not in (None, heads):
            return None
        return AttentionLayout("decoder", ("q_proj", "k_proj", "v_proj"), out, hd, heads, kv)
    c_attn, c_proj = children.get("c_attn"), children.get("c_proj")
    heads, split = _int(module, "num_heads"), _int(module, "split_size")
    if (c_attn is not None and c_proj is not None and is_hf_conv1d(c_attn) and is_hf_conv1d(c_proj)
            and heads and split == heads * hd and c_attn.nf == 3 * split and c_proj.nx == split
            and not getattr(module, "is_cross_attention", False) and "q_attn" not in children):
        return AttentionLayout("gpt2", ("c_attn",), "c_proj", hd, heads, heads)
    return None


def _width(layer: nn.Module, dim_out: bool) -> int:
    """Output (``dim_out``) or input size of a Linear or a Conv1D."""
    if isinstance(layer, nn.Linear):
        return layer.out_features if dim_out else layer.in_features
    return layer.nf if dim_out else layer.nx


def _attach_layer(trace: ChannelTrace, layer: nn.Module, labels: np.ndarray, side: str) -> None:
    """Attach ``labels`` to a Linear's or Conv1D's output (``side="out"``, with the bias) or input dim."""
    conv1d = not isinstance(layer, nn.Linear)
    dim = (1 if conv1d else 0) if side == "out" else (0 if conv1d else 1)
    trace.attach(trace.param_name(layer.weight), dim, labels, side)
    if side == "out" and layer.bias is not None:
        trace.attach(trace.param_name(layer.bias), 0, labels, "out")


def record_decoder_attention(trace: ChannelTrace, capture: ModuleCapture, layout: AttentionLayout, output) -> None:
    """Record a captured decoder attention module, now that it returned ``output``, as one op whose units are whole
    KV groups (heads without grouped-query attention), and whose output carries new channels: its output
    projection's."""
    name, module = capture.name, capture.module
    hidden = capture.args[0] if capture.args else capture.kwargs.get("hidden_states")
    out_t = output[0] if isinstance(output, (tuple, list)) else output
    for t in iter_tensors(output):
        if t is not out_t:
            trace.set_state(t, None)
    children = dict(module.named_children())
    inputs = [children[n] for n in layout.inputs]
    out_proj = children[layout.out]
    calls: dict[int, list] = {}
    for child, x in capture.module_calls:
        calls.setdefault(id(child), []).append(x)
    self_attention = (isinstance(hidden, torch.Tensor)
                      and all(calls.get(id(m)) == [id(hidden)] for m in inputs)
                      and len(calls.get(id(out_proj), [])) == 1)
    if not self_attention or not isinstance(out_t, torch.Tensor) or out_t.shape[-1] != _width(out_proj, True):
        trace.freeze_channels_in((capture.args, capture.kwargs), f"{name}: attention that is not plain self-attention")
        return
    sh = trace.state(hidden)
    in_labels = None
    if isinstance(sh, Channels) and sh.start == hidden.dim() - 1 and sh.labels.ndim == 1:
        in_labels = sh.labels
        for m in inputs:
            _attach_layer(trace, m, in_labels, "in")
    else:
        for m in inputs:
            pname = trace.param_name(m.weight)
            trace.fix_parameter_dim(pname, 0 if is_hf_conv1d(m) else 1, f"{name}: attention on an untraced input")
        if isinstance(sh, Channels):
            trace.freeze(sh.labels, f"{name}: attention input channels not in the last dim")
    hd, g = layout.head_dim, layout.group
    units = trace.new_slots(layout.kv_heads, f"{name}:heads", g * hd)
    q_labels, kv_labels = np.repeat(units, g * hd), np.repeat(units, hd)
    if layout.kind == "gpt2":
        _attach_layer(trace, inputs[0], np.concatenate([q_labels] * 3), "out")
    else:
        for m, labels in zip(inputs, (q_labels, kv_labels, kv_labels)):
            _attach_layer(trace, m, labels, "out")
    _attach_layer(trace, out_proj, q_labels, "in")
    own = {id(p) for m in (*inputs, out_proj) for p in m.parameters()}
    for pname, p in module.named_parameters():
        if id(p) not in own and tuple(p.shape) != (hd,):  # a per-head tensor the trace cannot follow
            trace.freeze(units, f"{name}: its parameter {pname} of shape {tuple(p.shape)} may hold per-head values; "
                                "heads kept")
    out_labels = trace.new_slots(_width(out_proj, True), f"{name}.{layout.out}:linear")
    _attach_layer(trace, out_proj, out_labels, "out")
    trace.attention[name] = {"head_size": g * hd, "labels": q_labels, "kind": layout.kind, "layout": layout,
                             "input_labels": in_labels}
    trace.set_state(out_t, Channels(out_t.dim() - 1, out_labels))


def set_head_counts(module: nn.Module, layout: AttentionLayout, kept_units: int) -> tuple[int, int]:
    """After surgery, set the attributes ``module``'s forward reads to ``kept_units`` KV groups (heads); returns the
    query and key / value head counts. ``head_dim`` and ``num_key_value_groups`` do not change."""
    heads, kv = kept_units * layout.group, kept_units
    for attr in ("num_heads", "num_attention_heads", "n_head"):
        if _int(module, attr) is not None:
            setattr(module, attr, heads)
    for attr in ("num_key_value_heads", "num_kv_heads"):
        if _int(module, attr) is not None:
            setattr(module, attr, kv)
    if layout.kind == "gpt2":
        module.split_size = heads * layout.head_dim
    return heads, kv
