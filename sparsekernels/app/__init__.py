"""The application layer: the commands behind ``sparsekernels demo | prune``, and the CLI's helpers.

Why this package exists: the library layers keep one direction of data flow -- ``pruning`` (pure PyTorch)
never imports ``sparsekernels`` and ``sparsekernels`` never imports ``pruning``; what passes between them is
plain tensors, masks and state dicts. An end-to-end *job* (train, prune, fine-tune, swap, time) needs both,
so it lives at the top: here and in :mod:`sparsekernels.benchmarks` (every benchmark, ``sparsekernels bench``)
are the only places in ``sparsekernels`` allowed to import ``pruning``. Even there ``pruning`` (and
torchvision, transformers, matplotlib, triton) is imported lazily inside the functions that use it, so
``import sparsekernels`` and ``sparsekernels --help`` stay cheap. ``tests/test_layering.py`` checks both rules
by parsing every module's imports.

Modules:
    (this file)  the CLI helpers: UsageError, resolve_device, parse_dtype, parse_shape, load_factory
    demo         the main job on the built-in digits dataset (``sparsekernels demo``)
    prune        prune a torchvision / user model and save it (``sparsekernels prune``)
"""
from __future__ import annotations

import importlib
import re

import torch

__all__ = ["UsageError", "resolve_device", "parse_dtype", "parse_shape", "load_factory"]


class UsageError(ValueError):
    """A bad command-line value found after parsing (unknown model, bad factory, missing GPU...).

    The CLI prints it as one line ``sparsekernels <command>: error: <message>`` and exits with code 2,
    exactly like an argparse error.
    """


def resolve_device(spec: str | None) -> torch.device:
    """``None``/``"auto"`` -> ``cuda`` if available else ``cpu``; otherwise a checked ``torch.device``.

    Raises:
        UsageError: an unparsable name, or ``cuda`` asked for on a machine without a usable GPU.
    """
    if spec is None or spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, ValueError) as e:
        raise UsageError(f"expected --device to be auto, cpu or cuda[:N], got {spec!r}") from e
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"expected --device to be auto, cpu or cuda[:N], got {spec!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {spec}: no CUDA GPU is available on this machine (use --device cpu)")
    return device


_DTYPES = {
    "fp32": torch.float32, "float32": torch.float32,
    "fp16": torch.float16, "float16": torch.float16, "half": torch.float16,
    "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
}


def parse_dtype(spec: str | None, device: torch.device) -> torch.dtype:
    """``None``/``"auto"`` -> float16 on a GPU, float32 on the CPU; else one of fp32/fp16/bf16.

    Raises:
        UsageError: an unknown name.
    """
    if spec is None or spec == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    if spec not in _DTYPES:
        raise UsageError(f"expected --dtype to be one of auto, fp32, fp16, bf16, got {spec!r}")
    return _DTYPES[spec]


def parse_shape(spec: str) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; every size a positive integer.

    Raises:
        UsageError: anything else.
    """
    text = str(spec).strip()
    # sizes separated by exactly one ',' / 'x' / '×' (spaces around it allowed) or by spaces; a stray
    # separator or a non-digit ("1,3,x", "1,,3") is an error, not silently dropped
    if re.fullmatch(r"\d+(?:\s*[,x×]\s*\d+|\s+\d+)*", text):
        shape = tuple(int(p) for p in re.split(r"\s*[,x×]\s*|\s+", text))
    else:
        shape = ()
    if not shape or any(s < 1 for s in shape):
        raise UsageError(f"expected a shape of positive integers like 1,3,224,224, got {spec!r}")
    return shape


def load_factory(spec: str):
    """Import ``"package.module:function"`` and return the callable.

    Raises:
        UsageError: not of the form ``module:attr``, the module cannot be imported, or the attribute is
            missing or not callable.
    """
    if not isinstance(spec, str) or spec.count(":") != 1 or not all(spec.split(":")):
        raise UsageError(f"expected a factory of the form package.module:function, got {spec!r}")
    module_name, attr = spec.split(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise UsageError(f"cannot import module {module_name!r} of factory {spec!r}: {e}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r} (factory {spec!r})")
    if not callable(fn):
        raise UsageError(f"factory {spec!r} is not callable (got {type(fn).__name__})")
    return fn
