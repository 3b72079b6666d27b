"""pruning: the pruning front end (pure PyTorch, runs on the CPU, never imports ``sparsekernels``).

What passes to the runtime is plain tensors, masks and state dicts. Public names are resolved lazily.

    pruning.batches       the batch contract: Tensor / Mapping / (inputs, targets), calling the model
    pruning.transaction   all or nothing: snapshot a model, put it back when an operation fails
    pruning.plan_schema   the trust boundary of plan files (schema and limits)
    pruning.registry      the name -> entry tables users extend (criteria, tracer op handlers)
    pruning.patterns      N:M, unstructured and block masks
    pruning.masks         the weight_mask buffer a pruned layer carries
    pruning.sparsegpt     SparseGPT's per-layer OBS solver
    pruning.calibration   layer-input statistics and Taylor gradients over calibration batches
    pruning.importance    importance criteria behind one protocol, and their registry
    pruning.weights       prune_weights(): masks on Linear / Conv2d, the PruningReport
    pruning.training      mask enforcement, gradual schedules, fine-tuning, L1/L2 penalties
    pruning.plan          remove masks, save / load / apply pruning plans (safetensors + JSON)
    pruning.sensitivity   per-layer sensitivity analysis
    pruning.channels      dependency-aware filter / channel pruning (physically smaller models)

Each module imports only modules listed above it (``pruning.channels`` sits on top of the others).
"""
from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    # patterns
    "nm_mask": "pruning.patterns",
    "unstructured_mask": "pruning.patterns",
    "global_unstructured_masks": "pruning.patterns",
    "block_mask": "pruning.patterns",
    # one-shot weight pruning
    "prune_weights": "pruning.weights",
    "PruningReport": "pruning.weights",
    # training-time helpers
    "enforce_masks": "pruning.training",
    "cubic_sparsity_schedule": "pruning.training",
    "GradualPruner": "pruning.training",
    "finetune": "pruning.training",
    "FinetuneConfig": "pruning.training",
    "l1_penalty": "pruning.training",
    "l2_penalty": "pruning.training",
    # all or nothing
    "ModelSnapshot": "pruning.transaction",
    "all_or_nothing": "pruning.transaction",
    "read_only": "pruning.transaction",
    # persistence
    "remove_masks": "pruning.plan",
    "save_plan": "pruning.plan",
    "load_plan": "pruning.plan",
    "apply_plan": "pruning.plan",
    # analysis
    "sensitivity_analysis": "pruning.sensitivity",
    # public types and criteria
    "attach_mask_hooks": "pruning.training",
    "LayerPruning": "pruning.weights",
    "SkippedLayer": "pruning.weights",
    "PruningPlan": "pruning.plan",
    "SensitivityResult": "pruning.sensitivity",
    "Magnitude": "pruning.importance",
    "Taylor": "pruning.importance",
    "Wanda": "pruning.importance",
    "SparseGPT": "pruning.importance",
    "BNScale": "pruning.importance",
    "ScoreCriterion": "pruning.importance",
    "register_criterion": "pruning.importance",
    # N:M quality: channel permutation and the post-SparseGPT criteria
    "search_permutation": "pruning.permutation",
    "SearchConfig": "pruning.permutation",
    "permute_for_nm": "pruning.channels.permute",
    "PermutationReport": "pruning.channels.permute",
    "RIA": "pruning.nm_criteria",
    "ALPS": "pruning.nm_criteria",
    # channel pruning
    "prune_channels": "pruning.channels",
    "ChannelPruningReport": "pruning.channels",
    "DependencyGraph": "pruning.channels",
    "mask_channels": "pruning.channels",
    "bn_scale_penalty": "pruning.channels",
    "PrunedMultiheadAttention": "pruning.channels",
    "register_op_handler": "pruning.channels",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'pruning' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(__all__)
