"""Dependency-aware filter / channel pruning: physically smaller models.

    prune_channels(model, example_inputs, ratio=0.5, ...) -> smaller model (or (model, report))
    DependencyGraph(model, example_inputs)                -> coupled channel groups, found by tracing
    register_op_handler(op, handler)                      -> teach the tracer an op it does not know
    ChannelPruningReport                                  -> params / MACs before and after, per layer, groups
    mask_channels(model, report)                          -> the equivalent masked dense model (for checks)
    bn_scale_penalty(model, strength)                     -> network-slimming L1 penalty on norm scales
    PrunedMultiheadAttention                              -> what a head-pruned nn.MultiheadAttention becomes

Modules, each importing only those above it: ``tracer`` (slots, the handler registry), ``report`` (MACs and
parameter counts), ``handlers`` and ``shape_handlers`` (the built-in op handlers), ``attention`` (attention
modules), ``hf_modules`` (Hugging Face decoder attention, whole KV groups, and transformers' ``Conv1D``),
``grouping`` (united slots -> channel groups), ``graph`` (:class:`DependencyGraph`), ``importance`` (group
importance), ``hf_config`` (what a Hugging Face config can state, and its update), ``prune`` (selection and model
surgery).
"""
from __future__ import annotations

from .attention import PrunedMultiheadAttention
from .grouping import ChannelGroup
from .graph import DependencyGraph
from .importance import bn_scale_penalty, group_importance
from .prune import apply_channel_pruning, mask_channels, prune_channels, select_units
from .report import ChannelPruningReport, GroupReport, LayerStats, count_macs, count_params
from .tracer import OpCall, TraceError, register_op_handler

__all__ = [
    "prune_channels",
    "ChannelPruningReport",
    "DependencyGraph",
    "ChannelGroup",
    "TraceError",
    "register_op_handler",
    "OpCall",
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
