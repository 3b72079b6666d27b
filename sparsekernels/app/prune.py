"""``sparsekernels prune`` -- prune a model from the command line and save it as safetensors.

MODEL is one of:

* a torchvision classification model name (``resnet50``; built with random weights, ``weights=None``: no
  download);
* ``package.module:function`` -- a factory returning an ``nn.Module`` (imported, then called with no
  arguments);
* ``FILE.safetensors`` together with ``--factory package.module:function``: the factory builds the
  architecture and the file's state dict is loaded into it (strictly). Only safetensors files are read,
  so no pickled code ever runs.

The saved file is the pruned model's state dict (safetensors), with the pruning settings and the per-layer
shapes in the file's metadata (key ``sparsekernels.prune``). A filter-pruned model is physically smaller,
so its tensors no longer fit the original architecture: rebuild it with ``pruning.prune_channels`` on the
same model and settings, then ``load_state_dict``.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from . import MAX_INPUT_BYTES, UsageError, check_output_file, load_factory, parse_shape

__all__ = ["PruneConfig", "PruneResult", "build_model", "run_prune"]

_CHANNEL_IMPORTANCE = ("l1", "l2", "bn_scale")
_WEIGHT_IMPORTANCE = ("magnitude", "wanda", "sparsegpt")


@dataclass(frozen=True)
class PruneConfig:
    """What to prune and how (see the module docstring for ``model`` and ``factory``).

    Attributes:
        model: torchvision name, ``module:factory`` or ``FILE.safetensors``.
        pattern: ``"channels"``, ``"unstructured"`` or ``"N:M"`` (e.g. ``"2:4"``).
        ratio: fraction removed (channels or weights); ``None`` -> 0.5; N:M fixes it to ``1 - N/M``.
        importance: criterion (channels: l1, l2, bn_scale; weights: magnitude, wanda, sparsegpt).
        input_shape: example input shape, e.g. ``"1,3,224,224"``.
        factory: ``module:function`` building the architecture of a safetensors ``model``.
        round_to: channels: keep channel counts multiples of this.
        calib_batches: random calibration batches for wanda / sparsegpt.
        seed: seed of the example and calibration inputs.
    """

    model: str
    pattern: str
    ratio: float | None = None
    importance: str | None = None
    input_shape: str = "1,3,224,224"
    factory: str | None = None
    round_to: int | None = None
    calib_batches: int = 4
    seed: int = 0


@dataclass(frozen=True)
class PruneResult:
    """What :func:`run_prune` returns."""

    model: nn.Module
    rows: list
    before: dict
    after: dict
    path: Path


def build_model(spec: str, factory: str | None = None) -> nn.Module:
    """Build the model named by ``spec`` (see the module docstring).

    Raises:
        UsageError: unknown torchvision name, bad factory, missing file, a factory that does not return an
            ``nn.Module``, ``--factory`` without a safetensors file (or the reverse), or a state dict that
            does not fit the factory's model.
    """
    if spec.endswith(".safetensors"):
        if factory is None:
            raise UsageError(f"MODEL {spec!r} is a safetensors state dict: also give --factory module:function "
                             "that builds its architecture")
        path = Path(spec)
        if not path.is_file():
            raise UsageError(f"MODEL file {spec!r} does not exist")
        model = _call_factory(factory)
        from safetensors.torch import load_file

        try:
            state = load_file(str(path))
        except Exception as e:  # safetensors raises its own error types for a corrupt file
            raise UsageError(f"cannot read {spec!r} as safetensors: {e}") from e
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as e:
            first = str(e).strip().splitlines()
            raise UsageError(f"the state dict in {spec!r} does not fit the model of {factory!r}: "
                             f"{' '.join(first[:3])}") from e
        return model
    if factory is not None:
        raise UsageError(f"--factory is only used with a .safetensors MODEL, got MODEL {spec!r}")
    if ":" in spec:
        return _call_factory(spec)
    if spec.endswith((".pt", ".pth", ".bin", ".ckpt")):
        raise UsageError(f"MODEL {spec!r}: only .safetensors checkpoints are read (no pickled files); "
                         "convert it with safetensors.torch.save_file(model.state_dict(), ...)")
    try:
        import torchvision
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise UsageError('torchvision model names need torchvision: pip install -e ".[bench]"') from e
    names = torchvision.models.list_models(module=torchvision.models)
    if spec not in names:
        close = [n for n in names if spec.lower() in n][:5]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise UsageError(f"unknown torchvision classification model {spec!r}{hint}; "
                         "or give module:function, or FILE.safetensors with --factory")
    return torchvision.models.get_model(spec, weights=None)


def _call_factory(spec: str) -> nn.Module:
    fn = load_factory(spec)
    try:
        model = fn()
    except Exception as e:  # the user's code: say which factory failed and how, in one line
        raise UsageError(f"factory {spec!r} failed when called with no arguments: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from e
    if not isinstance(model, nn.Module):
        raise UsageError(f"factory {spec!r} returned {type(model).__name__}, expected an nn.Module")
    return model


def _layer_shapes(model: nn.Module) -> dict:
    return {n: tuple(m.weight.shape) for n, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and n}


def _summary(model: nn.Module, example: torch.Tensor) -> dict:
    from ..benchmarks.measure import count_macs, nonzero_params

    macs = count_macs(model, example)
    return {
        "params": int(sum(p.numel() for p in model.parameters())),
        "nonzero_params": nonzero_params(model),
        "macs": macs.total,
        "effective_macs": macs.effective,
        "per_layer": macs.per_layer,
        "shapes": _layer_shapes(model),
    }


def _check(config: PruneConfig) -> tuple[str, float, str]:
    """Resolve the defaults and check pattern / ratio / importance together; returns them."""
    pattern = config.pattern
    if pattern == "channels":
        importance = config.importance or "l1"
        if importance not in _CHANNEL_IMPORTANCE:
            raise UsageError(f"expected --importance for channels to be one of {', '.join(_CHANNEL_IMPORTANCE)}, "
                             f"got {importance!r}")
        return pattern, config.ratio if config.ratio is not None else 0.5, importance
    importance = config.importance or "magnitude"
    if importance not in _WEIGHT_IMPORTANCE:
        raise UsageError(f"expected --importance for {pattern} to be one of {', '.join(_WEIGHT_IMPORTANCE)}, "
                         f"got {importance!r} (gradient criteria need a loss: use pruning.prune_weights in Python)")
    if config.round_to is not None:
        raise UsageError(f"--round-to only applies to --pattern channels, got --pattern {pattern}")
    if pattern == "unstructured":
        return pattern, config.ratio if config.ratio is not None else 0.5, importance
    n, m = (int(v) for v in pattern.split(":"))
    implied = 1.0 - n / m
    if config.ratio is not None and abs(config.ratio - implied) > 1e-9:
        raise UsageError(f"--pattern {pattern} removes {implied:g} of the weights; --ratio {config.ratio:g} "
                         "contradicts it (leave --ratio out)")
    return pattern, implied, importance


def run_prune(config: PruneConfig, *, out: str | os.PathLike, progress: bool = True, stream=None) -> PruneResult:
    """Build, prune and save a model; print the report.

    Args:
        config: a :class:`PruneConfig`.
        out: the output ``.safetensors`` path (its folder is created); checked for writability before any work,
            written to a temporary beside it and renamed into place.
        progress: progress bars of the calibration.
        stream: where the report is printed (default ``sys.stdout``).

    Returns:
        A :class:`PruneResult` with the pruned model, the per-layer rows and the path written.

    Raises:
        UsageError: any bad setting (see :func:`build_model` and the pattern / ratio / importance rules), an
            ``out`` that cannot be written, inputs over :data:`~sparsekernels.app.MAX_INPUT_BYTES`, or a model
            the pruner cannot handle (the pruner's message is passed on).
    """
    import pruning
    from safetensors.torch import save

    from ..benchmarks.report import markdown_table, publishing

    stream = stream or sys.stdout
    # Everything that can be checked is checked before the model is built and pruned.
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"expected --out to end in .safetensors, got {str(out)!r}")
    check_output_file(out)
    pattern, ratio, importance = _check(config)
    shape = parse_shape(config.input_shape)
    batches = 1 + (config.calib_batches if importance in ("wanda", "sparsegpt") else 0)
    if math.prod(shape) * 4 * batches > MAX_INPUT_BYTES:
        raise UsageError(f"--input-shape {config.input_shape} with {batches - 1} calibration batches needs "
                         f"{math.prod(shape) * 4 * batches:,} bytes of inputs; the limit is {MAX_INPUT_BYTES:,}")
    model = build_model(config.model, config.factory).eval()
    gen = torch.Generator().manual_seed(config.seed)
    example = torch.randn(shape, generator=gen)
    try:
        before = _summary(model, example)
    except Exception as e:
        raise UsageError(f"the model does not run on an input of shape {shape}: {type(e).__name__}: {e} "
                         "(set --input-shape)") from e

    try:
        if pattern == "channels":
            pruned = pruning.prune_channels(model, example, ratio=ratio, importance=importance,
                                            round_to=config.round_to, progress=progress)
            report = None
        else:
            calib = None
            if importance in ("wanda", "sparsegpt"):
                calib = [torch.randn(shape, generator=gen) for _ in range(config.calib_batches)]
            kwargs = {"sparsity": ratio} if pattern == "unstructured" else {}
            pruned = model
            report = pruning.prune_weights(pruned, pattern=pattern, importance=importance, calib=calib,
                                           progress=progress, **kwargs)
            pruning.remove_masks(pruned)
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UsageError(f"cannot prune {config.model!r} with --pattern {pattern}: {e}") from e
    pruned.eval()
    after = _summary(pruned, example)

    rows = []
    for name, shape_before in before["shapes"].items():
        shape_after = after["shapes"].get(name)
        macs_b, _ = before["per_layer"].get(name, (0, 0))
        macs_a, eff_a = after["per_layer"].get(name, (0, 0))
        module = pruned.get_submodule(name) if shape_after is not None else None
        density = float((module.weight != 0).float().mean()) if module is not None else 0.0
        rows.append({
            "layer": name,
            "shape_before": "x".join(map(str, shape_before)),
            "shape_after": "x".join(map(str, shape_after)) if shape_after else "removed",
            "sparsity": 1.0 - density,
            "macs_before": macs_b,
            "macs_after": eff_a if pattern != "channels" else macs_a,
        })

    state = {k: v.detach().cpu().contiguous().clone() for k, v in pruned.state_dict().items()}
    meta = {
        "config": asdict(config), "pattern": pattern, "ratio": ratio, "importance": importance,
        "shapes": {k: list(v) for k, v in after["shapes"].items()},
    }
    with publishing() as results:  # a temporary beside --out, renamed into place: never half a file
        results.write_bytes(out, save(state, metadata={"sparsekernels.prune": json.dumps(meta)}))

    cols = (("layer", "layer"), ("shape_before", "weight before"), ("shape_after", "weight after"),
            ("sparsity", "sparsity", ".1%"), ("macs_before", "MACs before", ",d"), ("macs_after", "MACs after", ",d"))
    total = (("what", ""), ("before", "before", ",d"), ("after", "after", ",d"), ("ratio", "after / before", ".3f"))
    totals = [
        {"what": "parameters", "before": before["params"], "after": after["params"]},
        {"what": "non-zero parameters", "before": before["nonzero_params"], "after": after["nonzero_params"]},
        {"what": "MACs (dense ops)", "before": before["macs"], "after": after["macs"]},
        {"what": "MACs (non-zero weights)", "before": before["effective_macs"], "after": after["effective_macs"]},
    ]
    for t in totals:
        t["ratio"] = t["after"] / t["before"] if t["before"] else None
    print(f"{config.model}: --pattern {pattern}, ratio {ratio:g}, importance {importance}, input {shape}\n", file=stream)
    print(markdown_table(totals, total), file=stream)
    print("", file=stream)
    print(markdown_table(rows, cols), file=stream)
    if report is not None:
        skipped = getattr(report, "skipped", None) or {}
        items = skipped.items() if isinstance(skipped, dict) else [(getattr(s, "name", s), getattr(s, "reason", ""))
                                                                     for s in skipped]
        for name, reason in items:
            print(f"  left dense: {name}: {reason}", file=stream)
    print(f"\nwrote {out} ({out.stat().st_size:,} bytes)", file=stream)
    return PruneResult(pruned, rows, before, after, out)
