"""The channel dependency graph of a model, found by tracing one forward pass.

How it works: the model runs once under the channel tracer (:mod:`pruning.channels.tracer`), which sees every
torch function it calls with its real tensors, so Python control flow, torchvision's and Hugging Face's
models trace as they run. The op handlers (:mod:`pruning.channels.handlers`,
:mod:`pruning.channels.shape_handlers`, and any registered with :func:`register_op_handler`) give every
output channel of a layer a *slot*, follow the slots through the model, unite slots that must be removed
together and attach the parameters that touch them. Attention modules are traced as one op whose units are
whole heads (:mod:`pruning.channels.attention`; Hugging Face decoders and GPT-2 in
:mod:`pruning.channels.hf_modules`, whole KV groups with grouped-query attention). The united slots are then grouped
(:mod:`pruning.channels.grouping`).

Anything the trace does not understand makes the slots it touches *frozen* (never pruned), with the reason
recorded; so an unknown op costs pruning opportunity, never correctness. Slots reaching the model's outputs
are frozen, so output shapes never change.
"""
from __future__ import annotations

from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

# The built-in op handlers register themselves when imported.
from . import handlers, shape_handlers  # noqa: F401
from ..batches import input_args, iter_tensors, restoring_modes
from .attention import attention_kind, record_attention
from .grouping import group_channels
from .hf_modules import decoder_attention_layout, record_decoder_attention
from .tracer import Attachment, ChannelTrace, ModuleCapture, TraceError, Tracer

__all__ = ["DependencyGraph", "module_names"]


def module_names(model: nn.Module, items: Iterable, fn: str, what: str = "ignore") -> list[str]:
    """Qualified names of ``items`` (submodules of ``model`` or their names), in order.

    Raises:
        ValueError: an item that is not a submodule of ``model``.
        TypeError: an item that is neither an ``nn.Module`` nor a string.
    """
    modules = dict(model.named_modules())
    ids = {id(m): n for n, m in modules.items()}
    names = []
    for item in items:
        if isinstance(item, nn.Module):
            if id(item) not in ids:
                raise ValueError(f"{fn}: {what} contains a {type(item).__name__} that is not a submodule of the model")
            names.append(ids[id(item)])
        elif isinstance(item, str):
            if item not in modules:
                raise ValueError(f"{fn}: {what} names {item!r}, which is not a submodule of the model")
            names.append(item)
        else:
            raise TypeError(f"{fn}: expected {what} items as nn.Module or str, got {type(item).__name__}")
    return names


class DependencyGraph:
    """The channel dependency graph of ``model``, found by running it once on ``example_inputs``.

    Args:
        model: the ``nn.Module`` to analyse. It is run once in eval mode under ``torch.no_grad()``;
            hooks are added for the run and removed afterwards; nothing else changes.
        example_inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
        ignore: modules (or their qualified names) whose output channels must not be pruned.
        strict: raise :class:`TraceError` on the first op that touches channels and is not understood,
            instead of freezing its channels.
        opaque: module names whose channels are all kept (a dict gives the reason for each).

    Attributes:
        groups: the :class:`pruning.channels.grouping.ChannelGroup` list.
        attachments: parameter / buffer name -> list of :class:`pruning.channels.tracer.Attachment`.
        frozen: human-readable reasons why some channels were kept (``module: op: why``).
        roots: ``roots[s]`` is the unit (root slot) of slot ``s``; ``root_group``: unit -> group index;
            ``frozen_roots``: frozen unit -> reason.
        layer_norms, attention: what model surgery needs about LayerNorms without parameters and about
            attention modules (see :class:`pruning.channels.tracer.ChannelTrace`).

    Raises:
        TypeError: ``model`` is not an ``nn.Module`` or ``example_inputs`` has an unsupported type.
        TraceError: the forward pass failed (the message names the module), or an unsupported op in strict mode.
        ValueError: a name in ``ignore`` is not a submodule of ``model``.
    """

    def __init__(self, model: nn.Module, example_inputs, *, ignore=(), strict: bool = False, opaque=()):
        if not isinstance(model, nn.Module):
            raise TypeError(f"DependencyGraph: expected an nn.Module, got {type(model).__name__}")
        args, kwargs = input_args(example_inputs, "DependencyGraph: example_inputs")
        self.model = model
        self.strict = strict
        self.ignore = frozenset(module_names(model, ignore, "DependencyGraph"))
        self.opaque = dict(opaque) if isinstance(opaque, dict) else {n: "kept on request" for n in opaque}
        trace = ChannelTrace(model, strict)
        self._layouts: dict = {}
        self._run(trace, args, kwargs)
        grouping = group_channels(trace)
        self.attachments: dict[str, list[Attachment]] = trace.attachments
        self.frozen: list[str] = trace.frozen
        self.spaces: list[str] = trace.spaces
        self.layer_norms = trace.layer_norms
        self.attention = trace.attention
        self.groups = grouping.groups
        self.roots = grouping.roots
        self.root_group = grouping.root_group
        self.frozen_roots = grouping.frozen_roots

    def _run(self, trace: ChannelTrace, args: tuple, kwargs: dict) -> None:
        handles = []
        opaque_starts: dict[str, list[int]] = {}
        for name, m in self.model.named_modules():
            handles.append(m.register_forward_pre_hook(self._pre_hook(trace, name, m, opaque_starts), with_kwargs=True))
            handles.append(m.register_forward_hook(self._post_hook(trace, name, opaque_starts), with_kwargs=True))
        try:
            with restoring_modes(self.model), torch.no_grad(), Tracer(trace):
                self.model.eval()
                out = self.model(*args, **kwargs)
        except TraceError:
            raise
        except Exception as e:
            raise TraceError(
                f"prune_channels(): the model's forward pass failed in {trace.where()!r} ({type(e).__name__}: {e})"
            ) from e
        finally:
            for h in handles:
                h.remove()
            trace.module_stack.clear()
            trace.captures.clear()
        trace.freeze_channels_in(out, "model output: output shapes are kept", False)

    def _pre_hook(self, trace: ChannelTrace, name: str, module: nn.Module, opaque_starts: dict):
        kind = attention_kind(module)
        layout = decoder_attention_layout(module) if kind is None else None
        if layout is not None:
            kind = layout.kind

        def hook(mod, args, kwargs):
            trace.module_stack.append(name)
            if name in self.opaque:
                opaque_starts.setdefault(name, []).append(trace.num_slots)
                trace.freeze_channels_in((args, kwargs), f"{name}: {self.opaque[name]}", False)
            if kind is not None and not trace.captures:
                trace.captures.append(ModuleCapture(name, module, kind, args, kwargs))
            elif trace.captures:
                capture = next((c for c in reversed(trace.captures) if c is not None), None)
                if capture is not None:
                    first = next(iter_tensors((args, kwargs)), None)
                    capture.module_calls.append((mod, id(first) if first is not None else None))
                trace.captures.append(None)
            return None

        self._layouts[name] = layout
        return hook

    def _post_hook(self, trace: ChannelTrace, name: str, opaque_starts: dict):
        def hook(mod, args, kwargs, output):
            if trace.module_stack:
                trace.module_stack.pop()
            if trace.captures:
                capture = trace.captures.pop()
                if capture is not None and self._layouts.get(capture.name) is not None:
                    record_decoder_attention(trace, capture, self._layouts[capture.name], output)
                elif capture is not None:
                    record_attention(trace, capture, output)
            if name in self.opaque:
                start = opaque_starts[name].pop()
                trace.freeze(np.arange(start, trace.num_slots), f"{name}: {self.opaque[name]}", False)
                trace.freeze_channels_in(output, f"{name}: {self.opaque[name]}", False)
            if name in self.ignore:
                trace.freeze_channels_in(output, f"{name}: listed in ignore", False)
            return None

        return hook

    def keep_units(self, labels, reason: str) -> None:
        """Keep (never prune) the units of the slots ``labels``, after the graph is built; ``reason`` is reported
        unless they were kept already. A group all of whose units are kept becomes unprunable with that reason."""
        roots = set(self.root_of(np.asarray(labels, dtype=np.int64).reshape(-1)).tolist()) - set(self.frozen_roots)
        if not roots:
            return
        for root in roots:
            self.frozen_roots.setdefault(root, reason)
        for gi in sorted({self.root_group[r] for r in roots}):
            g = self.groups[gi]
            g.frozen_units |= roots & set(g.units)
            if g.frozen_reason is None and len(g.frozen_units) == len(g.units):
                g.frozen_reason = reason
        if reason not in self.frozen:
            self.frozen.append(reason)

    def limit_keep_counts(self, labels, counts) -> None:
        """Allow the group holding the slots ``labels`` to keep only ``counts`` units (e.g. head counts that divide
        a model's width); the selection rounds up to the nearest allowed count."""
        roots = self.root_of(np.asarray(labels, dtype=np.int64).reshape(-1))
        for gi in sorted({self.root_group[int(r)] for r in roots}):
            g = self.groups[gi]
            allowed = set(counts) if g.keep_counts is None else set(counts) & set(g.keep_counts)
            g.keep_counts = tuple(sorted(c for c in allowed if 1 <= c <= len(g.units))) or (len(g.units),)

    @property
    def num_slots(self) -> int:
        """Number of traced channel slots."""
        return len(self.roots)

    def root_of(self, labels: np.ndarray) -> np.ndarray:
        """Unit (root slot) of each slot in ``labels``."""
        return self.roots[np.asarray(labels, dtype=np.int64)]

    def summary(self) -> str:
        """One line per group: channels, units, prunable or why not, and a few of its layers."""
        lines = []
        for g in self.groups:
            state = "prunable" if g.prunable else f"kept ({g.frozen_reason or 'a single unit'})"
            lines.append(f"group {g.index}: {g.channels} channels in {len(g.units)} units, {state}; "
                         f"{', '.join(g.spaces[:3])}{' ...' if len(g.spaces) > 3 else ''}")
        return "\n".join(lines)
