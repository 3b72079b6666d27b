"""Which layers a pruning call works on, and why the others are left dense.

:func:`select_layers` picks the candidate layers (``nn.Linear``, ``nn.Conv2d`` and, for callers that read weights
through their GEMM view, Hugging Face ``Conv1D``) that take the pattern and the criterion, and lists every other
weight layer with the reason (:class:`SkippedLayer`): excluded by the filter, not eligible for the pattern, tied to
another module's weight, the model's output head (:func:`output_head`), missing from a per-layer budget.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .importance import ImportanceCriterion, criterion_names, pattern_labels
from .patterns import Pattern, gemm_shape, input_perm_problem, is_conv1d

__all__ = [
    "SkippedLayer",
    "LayerSelection",
    "select_layers",
    "check_pattern_support",
    "validate_sparsity",
    "layer_sparsity",
    "output_head",
    "HEAD_REASON",
]


@dataclass(frozen=True)
class SkippedLayer:
    """A weight layer left dense, and why."""

    name: str
    kind: str
    reason: str


def layer_sparsity(name: str, sparsity):
    """The budget for one layer, or ``None`` when a per-layer mapping leaves it out."""
    if isinstance(sparsity, Mapping):
        return sparsity.get(name)
    return sparsity


def validate_sparsity(fn: str, sparsity, pat: Pattern) -> None:
    """Check ``sparsity`` against the pattern (``None`` for N:M; else a float in [0, 1] or, except for
    ``"global"``, a mapping layer name -> float); raises ``TypeError`` / ``ValueError`` naming ``fn``."""
    def check_one(label, value):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"{fn}: expected {label} as a float in [0, 1], got {type(value).__name__}")
        if not 0.0 <= float(value) <= 1.0:  # also rejects NaN
            raise ValueError(f"{fn}: expected 0 <= {label} <= 1, got {value}")

    if pat.kind == "nm":
        if sparsity is not None:
            raise ValueError(
                f"{fn}: pattern {pat} fixes the sparsity at {pat.fixed_sparsity:g}; expected sparsity=None, got {sparsity!r}"
            )
        return
    if sparsity is None:
        raise ValueError(f"{fn}: pattern {pat!s} needs a sparsity (a float in [0, 1]), got None")
    if isinstance(sparsity, Mapping):
        if pat.kind == "global":
            raise TypeError(f"{fn}: pattern 'global' takes one float sparsity, got a per-layer mapping")
        for key, value in sparsity.items():
            if not isinstance(key, str):
                raise TypeError(f"{fn}: expected layer names as sparsity keys, got {type(key).__name__}")
            check_one(f"sparsity[{key!r}]", value)
        return
    check_one("sparsity", sparsity)


def check_pattern_support(fn: str, pat: Pattern, crit: ImportanceCriterion) -> None:
    """Raise ``ValueError`` (naming ``fn``) when ``crit`` does not support the pattern kind of ``pat``."""
    if pat.kind in crit.patterns:
        return
    if pat.kind == "global":
        raise ValueError(
            f"{fn}: pattern 'global' compares scores across layers; expected importance in "
            f"{criterion_names('weights', 'global')}, got {crit.name!r} (use 'unstructured' with a per-layer "
            "sparsity mapping instead)"
        )
    raise ValueError(f"{fn}: importance {crit.name!r} supports {pattern_labels(crit.patterns)} patterns, got {pat}")


def _eligibility(module: nn.Module, pat: Pattern, crit: ImportanceCriterion) -> str | None:
    """Why ``module`` cannot take this pattern / criterion, or ``None`` if it can."""
    weight = module.weight
    if isinstance(weight, nn.parameter.UninitializedParameter):
        return "lazy module not initialised yet (run a forward pass first)"
    if not weight.dtype.is_floating_point:
        return f"weight dtype {weight.dtype} is not floating point"
    if isinstance(module, nn.Conv2d) and weight.dim() != 4:
        return f"unexpected conv weight shape {tuple(weight.shape)}"
    rows, cols = gemm_shape(module)
    if pat.kind == "nm":
        conv = isinstance(module, nn.Conv2d)
        k = module.in_channels // module.groups if conv else cols
        what = "input channels per group" if conv else "input features"
        if k % pat.m:
            return f"{what} ({k}) not a multiple of m={pat.m}"
        problem = input_perm_problem(module)
        if problem is not None:
            return problem
    if pat.kind == "block":
        br, bc = pat.block
        if rows % br or cols % bc:
            return f"GEMM view {rows}x{cols} not divisible by the {br}x{bc} block"
    if crit.reads_layer_inputs and isinstance(module, nn.Conv2d) and module.groups != 1:
        return f"{crit.name} needs im2col statistics; grouped convolutions (groups={module.groups}) are not supported"
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """The model's output head: what ``model.get_output_embeddings()`` returns (a Hugging Face model's LM head,
    which maps the last hidden states to the vocabulary), or ``None`` for a model without that method or with no
    such head. No other layer is taken for a head: a plain module's last Linear is a layer like the others."""
    getter = getattr(model, "get_output_embeddings", None)
    if not callable(getter):
        return None
    try:
        head = getter()
    except (NotImplementedError, AttributeError):
        return None
    return head if isinstance(head, nn.Module) else None


HEAD_REASON = ("the model's output head (get_output_embeddings()), left dense by default: it maps every token to "
               "the vocabulary and loses the most quality per pruned weight (llm-compressor leaves lm_head out too); "
               "pass prune_head=True to prune it")


def _unsupported_reason(module: nn.Module, conv1d: bool) -> str | None:
    """Why a weight-bearing layer that this caller does not handle is left dense, or ``None`` for modules that are
    not such layers (embeddings, norms, containers...)."""
    weight = module._parameters.get("weight")
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        return None
    kind = type(module).__name__
    if is_conv1d(module):
        return None if conv1d else ("transformers Conv1D (weight stored [in, out]) is not supported here; only "
                                    "nn.Linear and nn.Conv2d are (prune_weights() prunes Conv1D)")
    if isinstance(module, nn.modules.conv._ConvNd):
        return f"{kind} is not supported; only nn.Linear, nn.Conv2d and transformers Conv1D are pruned"
    return None


@dataclass
class LayerSelection:
    """The layers one pruning call works on.

    Attributes:
        selected: name -> Linear / Conv2d (/ ``Conv1D``) to prune, in module order.
        skipped: the candidates left dense, with the reason.
        order: every candidate's name in module order (to sort ``skipped``).
    """

    selected: dict[str, nn.Module] = field(default_factory=dict)
    skipped: list[SkippedLayer] = field(default_factory=list)
    order: list[str] = field(default_factory=list)

    def skip(self, name: str, reason: str) -> None:
        """Move a selected layer to ``skipped`` with ``reason``."""
        module = self.selected.pop(name)
        self.skipped.append(SkippedLayer(name, type(module).__name__, reason))

    def sorted_skipped(self) -> tuple[SkippedLayer, ...]:
        """``skipped`` in module order."""
        rank = {n: i for i, n in enumerate(self.order)}
        return tuple(sorted(self.skipped, key=lambda s: rank.get(s.name, -1)))


def select_layers(
    fn: str,
    model: nn.Module,
    pat: Pattern,
    crit: ImportanceCriterion,
    filter_fn: Callable[[str, nn.Module], bool] | None,
    sparsity,
    *,
    conv1d: bool = False,
    keep_head_dense: bool = False,
) -> LayerSelection:
    """The eligible Linear / Conv2d layers of ``model`` for this pattern, criterion, filter and budget, and the
    candidates left dense with the reason (other weight layers such as ``nn.Conv1d`` are listed too).

    Args:
        conv1d: Hugging Face ``Conv1D`` layers are candidates too (for a caller that reads and writes every weight
            through :func:`pruning.patterns.weight_matrix` / ``matrix_to_weight`` with the module); else they are
            listed as not supported.
        keep_head_dense: leave the model's output head (:func:`output_head`) dense, with the reason.

    Raises:
        ValueError: a per-layer ``sparsity`` mapping names a layer that is not a candidate of the model.
    """
    sel = LayerSelection()
    head = output_head(model) if keep_head_dense else None
    owners: dict[int, str] = {}
    candidates = []  # the Linear / Conv2d layers
    # Parameters held by other modules (e.g. a token embedding tied to an LM head): pruning a layer that
    # shares one would silently zero entries of that module too.
    foreign: dict[int, str] = {}
    def candidate(module: nn.Module) -> bool:
        return isinstance(module, (nn.Linear, nn.Conv2d)) or (conv1d and is_conv1d(module))

    for name, module in model.named_modules():
        if not candidate(module):
            for p in module._parameters.values():
                if p is not None:
                    foreign.setdefault(id(p), f"{name!r} ({type(module).__name__})")
    for name, module in model.named_modules():
        kind = type(module).__name__
        if not candidate(module):
            why = _unsupported_reason(module, conv1d)
            if why is not None and (filter_fn is None or filter_fn(name, module)):
                # Listed so that a model made of such layers (GPT-2's Conv1D) is not pruned silently.
                sel.order.append(name)
                sel.skipped.append(SkippedLayer(name, kind, why))
            continue
        sel.order.append(name)
        candidates.append(name)
        if filter_fn is not None and not filter_fn(name, module):
            sel.skipped.append(SkippedLayer(name, kind, "excluded by filter_fn"))
            continue
        reason = HEAD_REASON if module is head else _eligibility(module, pat, crit)
        if reason is None and id(module.weight) in foreign:
            reason = (
                f"shares its weight with {foreign[id(module.weight)]}, which is not pruned; pruning it would zero "
                "entries there too (untie the weights to prune it)"
            )
        if reason is None and id(module.weight) in owners:
            reason = f"shares its weight with {owners[id(module.weight)]!r} (pruned there)"
        if reason is None and isinstance(sparsity, Mapping) and name not in sparsity:
            reason = "no entry in the per-layer sparsity mapping"
        if reason is not None:
            sel.skipped.append(SkippedLayer(name, kind, reason))
            continue
        owners[id(module.weight)] = name
        sel.selected[name] = module
    if isinstance(sparsity, Mapping):
        unknown = sorted(set(sparsity) - set(candidates))
        if unknown:
            what = "Linear/Conv2d/Conv1D" if conv1d else "Linear/Conv2d"
            raise ValueError(f"{fn}: sparsity mapping names layers that are not {what} in the model: {unknown}")
    return sel
