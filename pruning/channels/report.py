"""What channel pruning did: parameters and MACs before and after (counted by ``torch.utils.flop_counter``),
per layer and in total, and the groups that were pruned or kept (with the reason)."""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ..batches import call_model, eval_mode

__all__ = ["LayerStats", "GroupReport", "ChannelPruningReport", "count_macs", "count_params"]


@dataclass(frozen=True)
class LayerStats:
    """Parameters and MACs of one leaf module before and after pruning."""

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int


@dataclass(frozen=True)
class GroupReport:
    """One coupled channel group.

    Attributes:
        index: group index in the dependency graph.
        layers: the layers (``module:op``) whose output channels form the group.
        channels_before, channels_after: channels of the group's first layer.
        units_before, units_after: prunable units (channels, heads or conv groups).
        kept_reason: why the group was not pruned (``None`` when it was pruned).
    """

    index: int
    layers: tuple
    channels_before: int
    channels_after: int
    units_before: int
    units_after: int
    kept_reason: str | None = None


@dataclass(frozen=True)
class ChannelPruningReport:
    """Result of :func:`pruning.prune_channels`.

    Attributes:
        params_before, params_after: parameter counts of the whole model.
        macs_before, macs_after: multiply-accumulates of one forward pass on ``example_inputs``
            (``torch.utils.flop_counter.FlopCounterMode`` FLOPs / 2).
        layers: ``{module name: LayerStats}`` for every leaf module with parameters or MACs.
        groups: a :class:`GroupReport` per coupled channel group (pruned and kept).
        kept: distinct reasons why channels were kept (unsupported ops, outputs, ``ignore``).
        param_keep: ``{parameter or buffer name: {dim: kept indices}}`` relative to the ORIGINAL model;
            :func:`pruning.channels.mask_channels` uses it to build the equivalent masked dense model.
        importance, ratio, steps: the settings used.
        config_updates: ``{config field: (before, after)}`` written into a Hugging Face model's ``config``
            (``prune_channels(hf_config="update")``, see :mod:`pruning.channels.hf_config`).
    """

    params_before: int
    params_after: int
    macs_before: int
    macs_after: int
    layers: dict = field(default_factory=dict)
    groups: tuple = ()
    kept: tuple = ()
    param_keep: dict = field(default_factory=dict)
    importance: str = "l1"
    ratio: float = 0.0
    steps: int = 1
    config_updates: dict = field(default_factory=dict)

    @property
    def mac_reduction(self) -> float:
        """``macs_before / macs_after`` (2.0 means half the MACs)."""
        return self.macs_before / max(self.macs_after, 1)

    @property
    def param_reduction(self) -> float:
        """``params_before / params_after``."""
        return self.params_before / max(self.params_after, 1)

    @property
    def pruned_groups(self) -> tuple:
        return tuple(g for g in self.groups if g.channels_after < g.channels_before)

    def summary(self, max_layers: int = 20) -> str:
        """A readable text table: totals, the largest layers, pruned and kept groups."""
        lines = [
            f"params {self.params_before:,} -> {self.params_after:,} ({self.param_reduction:.2f}x fewer)",
            f"MACs   {self.macs_before:,} -> {self.macs_after:,} ({self.mac_reduction:.2f}x fewer)",
            f"groups pruned: {len(self.pruned_groups)} of {len(self.groups)}",
            "",
            f"{'layer':<40} {'params':>21} {'MACs':>27}",
        ]
        top = sorted(self.layers.items(), key=lambda kv: -kv[1].macs_before)[:max_layers]
        for name, s in top:
            lines.append(f"{name[:40]:<40} {s.params_before:>10,}>{s.params_after:<10,} "
                         f"{s.macs_before:>13,}>{s.macs_after:<13,}")
        if self.config_updates:
            lines.append("")
            lines.append("model.config: " + ", ".join(f"{k} {b} -> {a}" for k, (b, a) in self.config_updates.items()))
        if self.kept:
            lines.append("")
            lines.append("kept channels:")
            lines.extend(f"  {k}" for k in self.kept[:max_layers])
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()


class _PassThrough(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        return func(*args, **(kwargs or {}))


def count_params(model: nn.Module) -> int:
    """Number of parameters (shared ones counted once)."""
    return sum(p.numel() for p in model.parameters())


def count_macs(model: nn.Module, example_inputs, *, return_output: bool = False):
    """MACs of one forward pass (eval mode, no grad) with ``torch.utils.flop_counter.FlopCounterMode``.

    Returns:
        ``(total MACs, {leaf module name: MACs})``, plus the model's output with ``return_output=True``.
    """
    from torch.utils.flop_counter import FlopCounterMode

    # the pass-through function mode turns off fused fast paths (nn.MultiheadAttention's
    # _native_multi_head_attention) whose FLOPs the counter cannot see, so every model is counted alike
    with eval_mode(model), torch.no_grad(), _PassThrough(), FlopCounterMode(display=False) as fc:
        output = call_model(model, example_inputs, "example_inputs")
    counts = fc.get_flop_counts()
    root = type(model).__name__
    leaves = {n for n, m in model.named_modules() if next(m.children(), None) is None}
    per = {}
    for key, ops in counts.items():
        name = key[len(root) + 1:] if key.startswith(root + ".") else key
        if name in leaves:
            per[name] = int(sum(ops.values())) // 2
    if return_output:
        return int(fc.get_total_flops()) // 2, per, output
    return int(fc.get_total_flops()) // 2, per


def layer_stats(before: nn.Module, after: nn.Module, macs_b: dict, macs_a: dict) -> dict:
    """Per-leaf-module :class:`LayerStats` (modules with neither parameters nor MACs are left out)."""
    out = {}
    after_mods = dict(after.named_modules())
    for name, m in before.named_modules():
        if next(m.children(), None) is not None:
            continue
        pb = sum(p.numel() for p in m.parameters(recurse=False))
        ma = after_mods.get(name)
        pa = sum(p.numel() for p in ma.parameters(recurse=False)) if ma is not None else 0
        if pb or macs_b.get(name):
            out[name] = LayerStats(pb, pa, macs_b.get(name, 0), macs_a.get(name, 0))
    return out
