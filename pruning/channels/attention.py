"""Attention modules in channel pruning: how they are traced (whole heads are units), and
``nn.MultiheadAttention`` with fewer heads than its embedding width implies.

Two kinds of attention module are traced as one op (:func:`attention_kind`, :func:`record_attention`):
Hugging Face BERT-style self-attention (``query`` / ``key`` / ``value`` Linear children,
``attention_head_size`` and ``num_attention_heads``), whose heads become units (the q / k / v rows of a head
and the matching input columns of the output projection go together), and ``nn.MultiheadAttention``, whose
heads are units too but whose embedding width is kept, since PyTorch ties it to the q / k / v width.

PyTorch's ``nn.MultiheadAttention`` derives ``head_dim = embed_dim // num_heads`` and requires q / k / v to be
``embed_dim`` wide, so removing heads needs a forward that keeps ``head_dim`` and lets the inner width
``num_heads * head_dim`` be smaller than ``embed_dim``. :class:`PrunedMultiheadAttention` is that forward;
``prune_channels`` switches the class of each pruned instance (only those; no global patching). Its
parameters keep their names and layouts (``in_proj_weight`` rows are ``[q heads | k heads | v heads]``).
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from ..batches import iter_tensors
from .tracer import ChannelTrace, Channels, ModuleCapture

__all__ = ["PrunedMultiheadAttention", "mha_supported", "attention_kind", "record_attention"]


def mha_supported(m: nn.MultiheadAttention) -> str | None:
    """``None`` if the heads of ``m`` can be pruned, else the reason they cannot."""
    if m.bias_k is not None or m.bias_v is not None:
        return "add_bias_kv=True is not supported for head pruning"
    if m.add_zero_attn:
        return "add_zero_attn=True is not supported for head pruning"
    return None


def _additive(mask, dtype):
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(mask, float("-inf"))
    return mask.to(dtype)


class PrunedMultiheadAttention(nn.MultiheadAttention):
    """An ``nn.MultiheadAttention`` whose ``num_heads * head_dim`` may be smaller than ``embed_dim``.

    Same call signature and outputs as ``nn.MultiheadAttention.forward`` (batched or unbatched inputs,
    ``key_padding_mask``, ``attn_mask`` of shape ``(L, S)`` or ``(N * num_heads, L, S)``, ``need_weights``,
    ``average_attn_weights``, ``is_causal`` with an ``attn_mask``). Not built directly: ``prune_channels``
    converts pruned instances.
    """

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        unbatched = query.dim() == 2
        if unbatched:
            bdim = 0 if self.batch_first else 1
            query, key, value = query.unsqueeze(bdim), key.unsqueeze(bdim), value.unsqueeze(bdim)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        if self.batch_first:  # work in (L, N, E) like the reference implementation
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        L, N, _ = query.shape
        S = key.shape[0]
        h, d = self.num_heads, self.head_dim
        inner = h * d
        b = self.in_proj_bias
        bq, bk, bv = (None, None, None) if b is None else b.split(inner)
        if self._qkv_same_embed_dim:
            wq, wk, wv = self.in_proj_weight.split(inner)
        else:
            wq, wk, wv = self.q_proj_weight, self.k_proj_weight, self.v_proj_weight
        q = F.linear(query, wq, bq).reshape(L, N * h, d).transpose(0, 1)
        k = F.linear(key, wk, bk).reshape(S, N * h, d).transpose(0, 1)
        v = F.linear(value, wv, bv).reshape(S, N * h, d).transpose(0, 1)
        mask = _additive(attn_mask, q.dtype)
        if mask is not None:
            mask = mask.view(1, 1, L, S) if mask.dim() == 2 else mask.view(N, h, L, S)
        kpm = _additive(key_padding_mask, q.dtype)
        if kpm is not None:
            kpm = kpm.view(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        if not need_weights:  # the fused kernel, as nn.MultiheadAttention uses
            out = F.scaled_dot_product_attention(q.view(N, h, L, d), k.view(N, h, S, d), v.view(N, h, S, d),
                                                 attn_mask=mask, dropout_p=self.dropout if self.training else 0.0)
            out = out.view(N * h, L, d)
            attn = None
        else:
            scores = torch.bmm(q, k.transpose(1, 2)) * d ** -0.5
            if mask is not None:
                scores = (scores.view(N, h, L, S) + mask).view(N * h, L, S)
            attn = torch.softmax(scores, dim=-1)
            out = torch.bmm(F.dropout(attn, p=self.dropout, training=self.training), v)
        out = out.transpose(0, 1).reshape(L * N, inner)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias).view(L, N, -1)
        if self.batch_first:
            out = out.transpose(0, 1)
        if unbatched:
            out = out.squeeze(1 if not self.batch_first else 0)
        weights = None
        if need_weights:
            weights = attn.view(N, h, L, S)
            if average_attn_weights:
                weights = weights.mean(1)
            if unbatched:
                weights = weights.squeeze(0)
        return out, weights


# ---------------------------------------------------------------- tracing


def attention_kind(module: nn.Module) -> str | None:
    """``"mha"`` for ``nn.MultiheadAttention``, ``"bert"`` for BERT-style self-attention, else ``None``."""
    if isinstance(module, nn.MultiheadAttention):
        return "mha"
    names = ("query", "key", "value")
    if all(isinstance(getattr(module, n, None), nn.Linear) for n in names) and isinstance(
        getattr(module, "attention_head_size", None), int
    ) and isinstance(getattr(module, "num_attention_heads", None), int):
        return "bert"
    return None


def record_attention(trace: ChannelTrace, capture: ModuleCapture, output) -> None:
    """Record a captured attention module, now that it has returned ``output``, as one op whose units are
    its heads."""
    out_t = output[0] if isinstance(output, (tuple, list)) else output
    if capture.kind == "mha":
        _record_mha(trace, capture, output, out_t)
    else:
        _record_bert(trace, capture, output, out_t)
    for t in iter_tensors(output):
        if t is not out_t:
            trace.set_state(t, None)


def _head_labels(trace: ChannelTrace, name: str, heads: int, head_size: int) -> np.ndarray:
    return np.repeat(trace.new_slots(heads, f"{name}:heads", head_size), head_size)


def _record_bert(trace: ChannelTrace, capture: ModuleCapture, output, out_t) -> None:
    name, module = capture.name, capture.module
    hidden = capture.args[0] if capture.args else capture.kwargs.get("hidden_states", capture.kwargs.get("query"))
    q, k, v = module.query, module.key, module.value
    inputs = {id(w): x for x, w in capture.linear_calls}
    self_attention = all(inputs.get(id(m.weight)) == id(hidden) for m in (q, k, v))
    heads, hd = module.num_attention_heads, module.attention_head_size
    if not self_attention or not isinstance(out_t, torch.Tensor) or out_t.shape[-1] != heads * hd:
        trace.freeze_channels_in((capture.args, capture.kwargs), f"{name}: attention that is not plain self-attention")
        return
    sh = trace.state(hidden)
    in_labels = None
    if isinstance(sh, Channels):
        if sh.start == hidden.dim() - 1 and sh.labels.ndim == 1:
            in_labels = sh.labels
            for m in (q, k, v):
                trace.attach(trace.param_name(m.weight), 1, sh.labels, "in")
        else:
            trace.freeze(sh.labels, f"{name}: attention input channels not in the last dim")
    labels = _head_labels(trace, name, heads, hd)
    for m in (q, k, v):
        trace.attach(trace.param_name(m.weight), 0, labels, "out")
        if m.bias is not None:
            trace.attach(trace.param_name(m.bias), 0, labels, "out")
    trace.attention[name] = {"head_size": hd, "labels": labels, "kind": "bert", "input_labels": in_labels}
    trace.set_state(out_t, Channels(out_t.dim() - 1, labels))


def _record_mha(trace: ChannelTrace, capture: ModuleCapture, output, out_t) -> None:
    """``nn.MultiheadAttention``: its embedding width (inputs and outputs) is kept, because PyTorch's module
    ties it to the head layout; its heads are units (q / k / v rows and out_proj columns)."""
    name, module = capture.name, capture.module
    keep_reason = f"{name}: nn.MultiheadAttention keeps its embedding width (heads can be pruned)"
    trace.freeze_channels_in((capture.args, capture.kwargs), keep_reason, False)
    if isinstance(out_t, torch.Tensor):
        labels = trace.new_slots(out_t.shape[-1], f"{name}:mha_out")
        trace.freeze(labels, keep_reason, False)
        trace.set_state(out_t, Channels(out_t.dim() - 1, labels))
    why = mha_supported(module)
    if why is not None:
        trace.frozen.append(f"{name}: {why}")
        return
    labels = _head_labels(trace, name, module.num_heads, module.head_dim)
    pn = trace.param_name
    if module._qkv_same_embed_dim:
        trace.attach(pn(module.in_proj_weight), 0, np.concatenate([labels] * 3), "out")
    else:
        for w in (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight):
            trace.attach(pn(w), 0, labels, "out")
    if module.in_proj_bias is not None:
        trace.attach(pn(module.in_proj_bias), 0, np.concatenate([labels] * 3), "out")
    trace.attach(pn(module.out_proj.weight), 1, labels, "in")
    trace.attention[name] = {"head_size": module.head_dim, "labels": labels, "kind": "mha"}
