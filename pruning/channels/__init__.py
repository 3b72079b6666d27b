"""Dependency-aware filter / channel pruning: physically smaller models.

    prune_channels(model, example_inputs, ratio=0.5, ...) -> smaller model (or (model, report))
    DependencyGraph(model, example_inputs)                -> coupled channel groups, found by tracing
    ChannelPruningReport                                  -> params / MACs before and after, per layer, groups
    mask_channels(model, report)                          -> the equivalent masked dense model (for checks)
    bn_scale_penalty(model, strength)                     -> network-slimming L1 penalty on norm scales
    PrunedMultiheadAttention                              -> what a head-pruned nn.MultiheadAttention becomes
"""
from __future__ import annotations

from .attention import PrunedMultiheadAttention
from .graph import ChannelGroup, DependencyGraph, TraceError
from .importance import bn_scale_penalty, group_importance
from .prune import apply_channel_pruning, mask_channels, prune_channels, select_units
from .report import ChannelPruningReport, GroupReport, LayerStats, count_macs, count_params

__all__ = [
    "prune_channels",
    "ChannelPruningReport",
    "DependencyGraph",
    "ChannelGroup",
    "TraceError",
    "mask_channels",
    "bn_scale_penalty",
    "PrunedMultiheadAttention",
    "group_importance",
    "select_units",
    "apply_channel_pruning",
    "GroupReport",
    "LayerStats",
    "count_macs",
    "count_params",
]
