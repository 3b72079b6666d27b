"""``sparsekernels prune`` -- prune a model from the command line and save it as safetensors.

MODEL is one of:

* a torchvision classification model name (``resnet50``; built with random weights, ``weights=None``: no
  download);
* ``package.module:function`` -- a factory returning an ``nn.Module`` (imported, then called with no
  arguments);
* ``FILE.safetensors`` together with ``--factory package.module:function``: the factory builds the
  architecture and the file's state dict is loaded into it (strictly). Only safetensors files are read,
  so no pickled code ever runs;
* a Hugging Face model directory (``config.json``, a tokenizer, safetensors weights or none): a causal language
  model, calibrated on token ids from ``--calib-text``, written back as a Hugging Face directory with
  ``save_pretrained`` and its perplexity on ``--eval-text`` reported before and after
  (:mod:`sparsekernels.app.language_model`).

For the first three, the saved file is the pruned model's state dict (safetensors), with the pruning settings and
the per-layer shapes in the file's metadata (key ``sparsekernels.prune``). A filter-pruned model is physically
smaller, so its tensors no longer fit the original architecture: rebuild it with ``pruning.prune_channels`` on the
same model and settings, then ``load_state_dict``.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from . import MAX_INPUT_BYTES, UsageError, check_output_file, load_factory, parse_shape
from . import language_model as lm

__all__ = ["PruneConfig", "PruneResult", "build_model", "run_prune"]

_CHANNEL_IMPORTANCE = ("l1", "l2", "bn_scale")
_WEIGHT_IMPORTANCE = ("magnitude", "wanda", "sparsegpt")
_CALIBRATED = ("wanda", "sparsegpt")
_DEFAULT_SHAPE = "1,3,224,224"
_LM_OPTIONS = {"calib_text": "--calib-text", "eval_text": "--eval-text", "tokenizer": "--tokenizer"}


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
        calib_batches: random calibration batches for wanda / sparsegpt (``None`` -> 4).
        seed: seed of the example and calibration inputs (and of a language model built from its config).
        calib_text: language models: UTF-8 text whose token ids calibrate (and are the channel tracer's example).
        calib_samples: language models: calibration windows cut from ``calib_text``.
        seq_len: language models: tokens per calibration and evaluation window.
        eval_text: language models: held-out text whose perplexity is reported before and after pruning.
        tokenizer: language models: the folder of the tokenizer, when it is not MODEL's.
    """

    model: str
    pattern: str
    ratio: float | None = None
    importance: str | None = None
    input_shape: str | None = None
    factory: str | None = None
    round_to: int | None = None
    calib_batches: int | None = None
    seed: int = 0
    calib_text: str | None = None
    calib_samples: int = 8
    seq_len: int = 128
    eval_text: str | None = None
    tokenizer: str | None = None


@dataclass(frozen=True)
class PruneResult:
    """What :func:`run_prune` returns. ``perplexity``: a language model's ``{"before": ..., "after": ...}`` on
    ``--eval-text`` (empty otherwise)."""

    model: nn.Module
    rows: list
    before: dict
    after: dict
    path: Path
    perplexity: dict = field(default_factory=dict)


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


def _input_error(model: nn.Module, shape, error: Exception) -> UsageError:
    """The usage error for a model that fails on the float example input: an embedding first means token ids."""
    text = " ".join(str(error).split())[:300]
    if isinstance(error, RuntimeError) and any(isinstance(m, nn.Embedding) for m in model.modules()) and (
            "indices" in text or "Long, Int" in text):
        return UsageError(f"the model takes token ids (integers) and was given a float input of shape {shape}: "
                          f"{type(error).__name__}: {text}. Give a Hugging Face model directory as MODEL (config.json "
                          "and a tokenizer) with --calib-text FILE to prune on token ids, or call "
                          "pruning.prune_channels(model, {'input_ids': ids}) from Python")
    return UsageError(f"the model does not run on an input of shape {shape}: {type(error).__name__}: {text} "
                      "(set --input-shape)")


@contextlib.contextmanager
def _usage_errors(config: "PruneConfig", pattern: str):
    """Turn the pruning functions' refusals of the user's model or options into a one-line :class:`UsageError`."""
    try:
        yield
    except (ValueError, TypeError, NotImplementedError) as e:
        raise UsageError(f"cannot prune {config.model!r} with --pattern {pattern}: {e}") from e


def _prune_weights(model: nn.Module, method: tuple, calib, progress: bool):
    """``prune_weights`` with the CLI's ``(pattern, ratio, importance)``, then the masks removed (plain weights with
    zeros, what is saved); returns the report."""
    import pruning

    pattern, ratio, importance = method
    report = pruning.prune_weights(model, pattern=pattern, importance=importance, progress=progress,
                                   calib=calib if importance in _CALIBRATED else None,
                                   sparsity=ratio if pattern == "unstructured" else None)
    pruning.remove_masks(model)
    return report


def _measure_pruned(pruned: nn.Module, example, before: dict, pattern: str) -> tuple[dict, list]:
    """The pruned model (in eval mode) summarised on ``example``, and its report rows against ``before``."""
    pruned.eval()
    after = _summary(pruned, example)
    return after, _rows(before, after, pruned, pattern)


def _rows(before: dict, after: dict, pruned: nn.Module, pattern: str) -> list:
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
    return rows


def _print_report(stream, header: str, before: dict, after: dict, rows: list, report, extra: list,
                  reasons: dict | None = None) -> None:
    from ..benchmarks.report import markdown_table

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
    print(header + "\n", file=stream)
    print(markdown_table(totals, total), file=stream)
    for line in extra:
        print(line, file=stream)
    print("", file=stream)
    print(markdown_table(rows, cols), file=stream)
    if report is not None:
        skipped = getattr(report, "skipped", None) or {}
        items = skipped.items() if isinstance(skipped, dict) else [(getattr(s, "name", s), getattr(s, "reason", ""))
                                                                     for s in skipped]
        for name, reason in items:
            print(f"  left dense: {name}: {(reasons or {}).get(name, reason)}", file=stream)


def run_prune(config: PruneConfig, *, out: str | os.PathLike, progress: bool = True, stream=None) -> PruneResult:
    """Build, prune and save a model; print the report.

    Args:
        config: a :class:`PruneConfig`.
        out: the output ``.safetensors`` path, or for a Hugging Face model directory MODEL a new or empty folder
            (its folder is created); checked for writability before any work, written to a temporary beside it and
            renamed into place.
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

    from ..benchmarks.report import publishing

    stream = stream or sys.stdout
    if lm.is_model_directory(config.model):
        return _run_prune_language_model(config, out=out, progress=progress, stream=stream)
    # Everything that can be checked is checked before the model is built and pruned.
    for key, option in _LM_OPTIONS.items():
        if getattr(config, key) is not None:
            raise UsageError(f"{option} applies to a Hugging Face model directory MODEL (config.json and a tokenizer), "
                             f"got MODEL {config.model!r}")
    out = Path(out)
    if out.suffix != ".safetensors":
        raise UsageError(f"expected --out to end in .safetensors, got {str(out)!r}")
    check_output_file(out)
    pattern, ratio, importance = _check(config)
    shape = parse_shape(config.input_shape or _DEFAULT_SHAPE)
    calib_batches = config.calib_batches if config.calib_batches is not None else 4
    batches = 1 + (calib_batches if importance in _CALIBRATED else 0)
    if math.prod(shape) * 4 * batches > MAX_INPUT_BYTES:
        raise UsageError(f"--input-shape {config.input_shape} with {batches - 1} calibration batches needs "
                         f"{math.prod(shape) * 4 * batches:,} bytes of inputs; the limit is {MAX_INPUT_BYTES:,}")
    model = build_model(config.model, config.factory).eval()
    gen = torch.Generator().manual_seed(config.seed)
    example = torch.randn(shape, generator=gen)
    try:
        before = _summary(model, example)
    except Exception as e:
        raise _input_error(model, shape, e) from e

    with _usage_errors(config, pattern):
        if pattern == "channels":
            pruned = pruning.prune_channels(model, example, ratio=ratio, importance=importance,
                                            round_to=config.round_to, progress=progress)
            report = None
        else:
            calib = None
            if importance in _CALIBRATED:
                calib = [torch.randn(shape, generator=gen) for _ in range(calib_batches)]
            pruned, report = model, _prune_weights(model, (pattern, ratio, importance), calib, progress)
    after, rows = _measure_pruned(pruned, example, before, pattern)

    state = {k: v.detach().cpu().contiguous().clone() for k, v in pruned.state_dict().items()}
    meta = {
        "config": asdict(config), "pattern": pattern, "ratio": ratio, "importance": importance,
        "shapes": {k: list(v) for k, v in after["shapes"].items()},
    }
    with publishing() as results:  # a temporary beside --out, renamed into place: never half a file
        results.write_bytes(out, save(state, metadata={"sparsekernels.prune": json.dumps(meta)}))
    _print_report(stream, f"{config.model}: --pattern {pattern}, ratio {ratio:g}, importance {importance}, "
                          f"input {shape}", before, after, rows, report, [])
    print(f"\nwrote {out} ({out.stat().st_size:,} bytes)", file=stream)
    return PruneResult(pruned, rows, before, after, out)


def _run_prune_language_model(config: PruneConfig, *, out, progress: bool, stream) -> PruneResult:
    """:func:`run_prune` for a Hugging Face model directory MODEL (:mod:`sparsekernels.app.language_model`): every
    check first, then the model is built and :func:`_prune_language_model` prunes and saves it."""
    for value, option, instead in ((config.input_shape, "--input-shape", "--seq-len"),
                                   (config.calib_batches, "--calib-batches", "--calib-samples"),
                                   (config.factory, "--factory", "nothing: the model is built from config.json")):
        if value is not None:
            raise UsageError(f"{option} does not apply to a Hugging Face model directory MODEL (use {instead})")
    out = lm.check_output_directory(out)
    pattern, ratio, importance = _check(config)
    if importance in _CALIBRATED and config.calib_text is None:
        raise UsageError(f"--importance {importance} calibrates on text: give --calib-text FILE")
    if config.calib_samples * config.seq_len * 8 > MAX_INPUT_BYTES:
        raise UsageError(f"--calib-samples {config.calib_samples} x --seq-len {config.seq_len} token ids exceed "
                         f"{MAX_INPUT_BYTES:,} bytes")
    calib_text = lm.read_text_file(config.calib_text, "--calib-text") if config.calib_text else None
    eval_text = lm.read_text_file(config.eval_text, "--eval-text") if config.eval_text else None
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()  # from_pretrained's and save_pretrained's own bars
    try:
        return _load_and_prune_language_model(config, (pattern, ratio, importance), calib_text, eval_text,
                                              out=out, progress=progress, stream=stream)
    finally:
        if bars:
            hf_logging.enable_progress_bar()


def _load_and_prune_language_model(config: PruneConfig, method: tuple, calib_text: str | None,
                                   eval_text: str | None, *, out: Path, progress: bool, stream) -> PruneResult:
    """Open MODEL's directory, check what needs its config and tokenizer, build the model, then
    :func:`_prune_language_model`."""
    source = lm.open_model_directory(config.model, config.tokenizer)
    if source.max_positions is not None and config.seq_len > source.max_positions:
        raise UsageError(f"--seq-len {config.seq_len} exceeds the model's {source.max_positions} positions")
    tokenizer = source.tokenizer
    lines = []
    if calib_text is not None:
        calib, line = lm.calibration_batches(tokenizer, calib_text, config.calib_samples, config.seq_len,
                                             "--calib-text")
        lines.append(f"calibration: {line}")
    else:
        calib = [lm.random_batch(len(tokenizer), config.seq_len, config.seed)]
        lines.append(f"example: {config.seq_len} random token ids (no --calib-text)")
    if eval_text is not None and len(tokenizer(eval_text)["input_ids"]) < 2:
        raise UsageError("--eval-text holds fewer than 2 tokens: there is nothing to predict")
    model = lm.build_language_model(source, config.seed)
    if not source.has_weights:
        lines.insert(0, f"model: built from {config.model}/config.json with random weights (seed {config.seed}; "
                        "the folder holds no weights)")
    return _prune_language_model(config, method, source, model, calib, eval_text, out=out, progress=progress,
                                 stream=stream, lines=lines)


def _prune_language_model(config: PruneConfig, method: tuple, source, model: nn.Module, calib: list,
                          eval_text: str | None, *, out: Path, progress: bool, stream, lines: list) -> PruneResult:
    """Prune the built language model ``model`` (``method``: pattern, ratio, importance), measure its perplexity
    before and after, save it into ``out`` and print the report."""
    import pruning

    from ..huggingface import mark_sparse, perplexity

    pattern, ratio, importance = method
    tokenizer = source.tokenizer
    ppl = {}
    if eval_text is not None:
        ppl["before"] = perplexity(model, tokenizer, eval_text, seq_len=config.seq_len)
    example = calib[0]["input_ids"]
    before = _summary(model, example)
    output = model.get_output_embeddings()
    output_name = next((n for n, m in model.named_modules() if m is output), None)
    report = None
    with _usage_errors(config, pattern):
        if pattern == "channels":
            pruned, channel_report = pruning.prune_channels(
                model, calib[0], ratio=ratio, importance=importance, round_to=config.round_to, progress=progress,
                return_report=True)
            if channel_report.config_updates:
                lines.append("model.config: " + ", ".join(f"{k} {b} -> {a}" for k, (b, a)
                                                           in channel_report.config_updates.items()))
            lines += [f"kept: {k}" for k in channel_report.kept if not k.startswith("model output")][:8]
        else:  # prune_weights leaves the output layer dense, as SparseGPT and Wanda do
            pruned, report = model, _prune_weights(model, method, calib, progress)
    after, rows = _measure_pruned(pruned, example, before, pattern)
    if pattern == "2:4":
        from ..swap import sparsify

        swap = sparsify(pruned)
        mark_sparse(pruned)
        lines.append(f"2:4 layers stored compressed: {len(swap.swapped)} (sparsekernels.huggingface)")
    if eval_text is not None:
        ppl["after"] = perplexity(pruned, tokenizer, eval_text, seq_len=config.seq_len)
        lines.append(f"perplexity on --eval-text ({config.seq_len}-token windows): {ppl['before']:.3f} -> "
                     f"{ppl['after']:.3f}")
    record = {"config": asdict(config), "pattern": pattern, "ratio": ratio, "importance": importance,
              "perplexity": ppl, "params": {"before": before["params"], "after": after["params"]}}
    files = lm.save_model_directory(out, pruned, tokenizer, record)
    _print_report(stream, f"{config.model}: --pattern {pattern}, ratio {ratio:g}, importance {importance}, "
                          f"{type(pruned).__name__}", before, after, rows, report, lines,
                  {output_name: "the output layer (lm_head) stays dense, as SparseGPT and Wanda leave it"})
    size = sum(f.stat().st_size for f in files)
    print(f"\nwrote {out}/ ({len(files)} files, {size:,} bytes: save_pretrained, tokenizer, {lm.REPORT_NAME})",
          file=stream)
    return PruneResult(pruned, rows, before, after, out, ppl)
