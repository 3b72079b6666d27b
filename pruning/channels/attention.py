"""``nn.MultiheadAttention`` with fewer heads than its embedding width implies.

PyTorch's ``nn.MultiheadAttention`` derives ``head_dim = embed_dim // num_heads`` and requires q / k / v to be
``embed_dim`` wide, so removing heads needs a forward that keeps ``head_dim`` and lets the inner width
``num_heads * head_dim`` be smaller than ``embed_dim``. :class:`PrunedMultiheadAttention` is that forward;
``prune_channels`` switches the class of each pruned instance (only those; no global patching). Its
parameters keep their names and layouts (``in_proj_weight`` rows are ``[q heads | k heads | v heads]``).
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

__all__ = ["PrunedMultiheadAttention", "mha_supported"]


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
