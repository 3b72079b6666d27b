"""Ahead-of-time tuning and an explanation of every sparse layer's backend choice.

``tune(model, example_inputs)`` runs the model once so that every sparse layer whose backend is
``"auto"`` on a GPU asks the dispatcher (:mod:`sparsekernels.ops.dispatch`) for its shape: the first
time a shape bucket is seen its candidates are measured and the decision is written to the tuning
cache; the first real request then pays nothing. ``explain(model)`` tells, per sparse layer, which
backend runs and what was measured.
"""
from __future__ import annotations

import sys
import weakref
from dataclasses import dataclass
from typing import Mapping

import torch
from torch import nn

from .nn import sparse_module_types
from .ops import dispatch
from .tables import format_table

__all__ = ["tune", "explain", "Explanation", "LayerExplanation"]

# module -> [(op, key, device)] that the module passed to the dispatcher while tune() ran it
_seen: "weakref.WeakKeyDictionary[nn.Module, list[tuple]]" = weakref.WeakKeyDictionary()


@dataclass(frozen=True)
class LayerExplanation:
    """One sparse layer.

    Attributes:
        name: qualified name in the model.
        module_type: e.g. ``"SparseLinear"``.
        shape: a readable description of the layer's shape.
        device: where its weights live.
        dtype: its weight dtype.
        backend: the module's ``backend`` setting (``"auto"`` lets the dispatcher decide).
        decisions: the dispatcher decisions for the shapes the layer has run with under :func:`tune`
            (empty on the CPU, where ``"auto"`` does not measure, and before tuning).
        note: what runs, in words.
    """

    name: str
    module_type: str
    shape: str
    device: str
    dtype: str
    backend: str
    decisions: tuple[dispatch.Decision, ...]
    note: str


@dataclass(frozen=True)
class Explanation:
    """The report :func:`explain` returns; ``str()`` gives one table row per (layer, shape bucket)."""

    layers: tuple[LayerExplanation, ...]

    def __str__(self) -> str:
        if not self.layers:
            return "no sparse layers (run sparsekernels.sparsify(model) first)"
        candidates = sorted({c for l in self.layers for d in l.decisions for c in (*d.timings, *d.errors)})
        header = ("layer", "type", "shape", "device", "backend", "bucket", "choice", *[f"{c} ms" for c in candidates],
                  "vs dense")
        rows = []
        for layer in self.layers:
            base = (layer.name, layer.module_type, layer.shape, layer.device, layer.backend)
            if not layer.decisions:
                rows.append((*base, "-", "-", *["-"] * len(candidates), "-"))
                continue
            for d in layer.decisions:
                times = []
                for c in candidates:
                    if c in d.timings:
                        times.append(f"{d.timings[c].median_ms:.4f}")
                    elif c in d.errors:
                        times.append("error")
                    else:
                        times.append("-")
                speedup = d.speedup_over_dense()
                rows.append((*base, d.key, d.choice, *times, "-" if speedup is None else f"{speedup:.2f}x"))
        lines = ["sparse layers and their backends:"] + format_table(header, rows)
        notes: dict[str, list[str]] = {}
        for layer in self.layers:
            notes.setdefault(layer.note, []).append(layer.name)
        for note, names in notes.items():
            shown = ", ".join(names[:6]) + (f" (+{len(names) - 6} more)" if len(names) > 6 else "")
            lines.append(f"{shown}: {note}")
        return "\n".join(lines)


def _run(model: nn.Module, example_inputs, fn: str):
    if isinstance(example_inputs, torch.Tensor):
        return model(example_inputs)
    if isinstance(example_inputs, tuple):
        return model(*example_inputs)
    if isinstance(example_inputs, Mapping):
        return model(**example_inputs)
    raise TypeError(
        f"{fn}: expected example_inputs to be a Tensor (model(x)), a tuple (model(*args)) or a dict "
        f"(model(**kwargs)), got {type(example_inputs).__name__}"
    )


def _sparse_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    types = sparse_module_types()
    return [(n, m) for n, m in model.named_modules() if types and isinstance(m, types)]


def tune(model: nn.Module, example_inputs, *, progress: bool = True) -> "Explanation":
    """Run ``model`` once on ``example_inputs`` so every dispatch decision is measured and cached now.

    Call it once per input shape you serve (token counts are bucketed by powers of two). On the CPU
    the ``"auto"`` backend does not measure (see :func:`explain`), so this is a plain forward pass.

    Args:
        model: a model with sparse layers (after :func:`sparsekernels.sparsify`).
        example_inputs: a Tensor (``model(x)``), a tuple (``model(*args)``) or a dict (``model(**kwargs)``)
            of the shapes, dtype and device the model will serve.
        progress: show a progress bar over the sparse layers.

    Returns:
        The :class:`Explanation` of the model after tuning (same as :func:`explain`).

    Raises:
        TypeError: ``model`` not an ``nn.Module``, or ``example_inputs`` of another type.
    """
    fn = "tune()"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if not isinstance(example_inputs, (torch.Tensor, tuple, Mapping)):
        _run(model, example_inputs, fn)  # raises the TypeError
    layers = _sparse_layers(model)
    from tqdm.auto import tqdm

    bar = tqdm(total=len(layers), desc="tuning sparse layers", unit="layer", disable=not progress)
    handles = []
    done: set[int] = set()
    with dispatch.record() as log:
        for _, module in layers:
            start: list[int] = []

            def pre_hook(mod, args, _start=start):
                _start.append(len(log))

            def post_hook(mod, args, output, _start=start):
                calls = log[_start.pop():] if _start else []
                seen = _seen.setdefault(mod, [])
                for c in calls:
                    if c not in seen:
                        seen.append(c)
                if id(mod) not in done:
                    done.add(id(mod))
                    bar.update(1)

            handles.append(module.register_forward_pre_hook(pre_hook))
            handles.append(module.register_forward_hook(post_hook))
        try:
            with torch.no_grad():
                _run(model, example_inputs, fn)
            if any(p.is_cuda for p in model.parameters()):
                torch.cuda.synchronize()
        finally:
            for h in handles:
                h.remove()
            bar.close()
    return explain(model, print_report=False)


def _shape(module: nn.Module) -> str:
    g = lambda a: getattr(module, a, None)  # noqa: E731
    if g("in_channels") is not None:
        k = g("kernel_size")
        k = "x".join(map(str, k)) if isinstance(k, tuple) else k
        perm = " input_perm" if getattr(module, "permuted", False) else ""
        return (f"{g('in_channels')}->{g('out_channels')} k{k} s{_pair(g('stride'))} "
                f"p{_pair(g('padding'))} d{_pair(g('dilation'))}{perm}")
    text = f"{g('in_features')}->{g('out_features')}"
    if getattr(module, "permuted", False):
        text += " input_perm"
    if g("block_size") is not None:
        text += f" block {g('block_size')}"
        density = getattr(module, "density", None)
        if isinstance(density, float):
            text += f" density {density:.2f}"
    return text


def _pair(v) -> str:
    if isinstance(v, (tuple, list)):
        return ",".join(map(str, v)) if len(set(v)) > 1 else str(v[0])
    return str(v)


def _note(module: nn.Module, device: torch.device, backend: str, tuned: bool) -> str:
    note = _backend_note(module, device, backend, tuned)
    if getattr(module, "permuted", False) and device.type != "meta":
        folded = device.type == "cpu" and backend == "auto"
        note += ("; input_perm folded into the resident dense weight (no gather)" if folded else
                 "; input_perm: the Triton kernels gather the input in their activation load, the other backends in "
                 "PyTorch, the cached dense copy holds the original order")
    return note


def _backend_note(module: nn.Module, device: torch.device, backend: str, tuned: bool) -> str:
    if backend != "auto":
        return f"fixed backend {backend!r} (no dispatch)"
    if tuned:
        return "auto: the measured fastest candidate per bucket; dense kept unless beaten by more than noise"
    if device.type == "cuda":
        return "auto on CUDA: not measured yet; decided on first call, or run sparsekernels.tune(model, inputs)"
    if device.type == "meta":
        return "on the meta device: load weights first"
    return f"auto on CPU: no measuring; {module.cpu_note}"


def explain(model: nn.Module, example_inputs=None, *, print_report: bool = True, file=None) -> Explanation:
    """Each sparse layer's name, shape, backend choice and the measured time of every candidate.

    Args:
        model: a model with sparse layers.
        example_inputs: optional; if given, :func:`tune` runs first (without a progress bar).
        print_report: print the table.
        file: where to print it (default ``sys.stdout``).

    Returns:
        An :class:`Explanation` (``str()`` is the printed table).

    Raises:
        TypeError: ``model`` not an ``nn.Module`` (or ``example_inputs`` of an unsupported type).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"explain(): expected an nn.Module, got {type(model).__name__}")
    if example_inputs is not None:
        tune(model, example_inputs, progress=False)
    layers = []
    for name, module in _sparse_layers(model):
        w = next(iter(module.parameters()), None)
        device = w.device if w is not None else torch.device("cpu")
        backend = str(getattr(module, "backend", "auto"))
        found = []
        for op, key, dev in _seen.get(module, []):
            decision = dispatch.lookup(op, key, device=dev)
            if decision is not None and decision not in found:
                found.append(decision)
        layers.append(
            LayerExplanation(
                name=name,
                module_type=type(module).__name__,
                shape=_shape(module),
                device=str(device),
                dtype=str(module.weight_dtype).replace("torch.", ""),
                backend=backend,
                decisions=tuple(found),
                note=_note(module, device, backend, bool(found)),
            )
        )
    report = Explanation(tuple(layers))
    if print_report:
        print(report, file=sys.stdout if file is None else file)
    return report
