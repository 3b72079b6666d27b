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
    (this file)  the CLI helpers: UsageError, resolve_device, parse_dtype, parse_shape, load_factory,
                 check_output_folder, check_output_file, and the size limits every command checks first
    demo         the main job on the built-in digits dataset (``sparsekernels demo``)
    language_model  Hugging Face model directories, tokenizers, calibration text, save_pretrained (for prune)
    prune        prune a torchvision / user model or a Hugging Face language model and save it
                 (``sparsekernels prune``)
"""
from __future__ import annotations

import importlib
import math
import os
import re
import tempfile
from pathlib import Path

import torch

__all__ = [
    "UsageError",
    "resolve_device",
    "parse_dtype",
    "parse_shape",
    "load_factory",
    "check_output_folder",
    "check_output_file",
    "MAX_INPUT_ELEMENTS",
    "MAX_INPUT_BYTES",
    "SIZE_LIMITS",
]

# One example input may hold at most this many elements (512 MiB of float32), and the example plus the
# calibration batches at most MAX_INPUT_BYTES: far above any model a CLI run prunes on a CPU, far below what
# would make the machine swap before the first error could be printed.
MAX_INPUT_ELEMENTS = 1 << 27
MAX_INPUT_BYTES = 2 << 30

# The largest value of every size setting of the commands (the CLI's options and DemoConfig): a demo at width
# 512 has 256x the default's parameters, batch 16384 makes a 64x longer timed call; a larger value is refused
# before any work starts.
SIZE_LIMITS = {
    "epochs": 1000,
    "finetune_epochs": 1000,
    "width": 512,
    "batch": 16384,
    "threads": 1024,
    "rounds": 100,
    "calib_batches": 1024,
    "round_to": 4096,
    "calib_samples": 4096,
    "seq_len": 32768,
}


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


def parse_shape(spec: str, *, max_elements: int = MAX_INPUT_ELEMENTS) -> tuple[int, ...]:
    """``"1,3,224,224"`` (or ``1x3x224x224``) -> ``(1, 3, 224, 224)``; every size a positive integer, at most 8
    sizes, at most ``max_elements`` elements in all.

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
    if not shape or any(s < 1 for s in shape) or len(shape) > 8:
        raise UsageError(f"expected a shape of positive integers like 1,3,224,224 (at most 8 sizes), "
                         f"got {spec!r}"[:300])
    elements = math.prod(shape)
    if elements > max_elements:
        raise UsageError(f"shape {spec!r} has {elements:,} elements; the limit is {max_elements:,}"[:300])
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
    except (Exception, SystemExit) as e:  # the user's module: whatever it raises at import is a usage error
        raise UsageError(f"cannot import module {module_name!r} of factory {spec!r}: {type(e).__name__}: "
                         f"{' '.join(str(e).split())[:300]}") from e
    fn = module
    for part in attr.split("."):
        fn = getattr(fn, part, None)
        if fn is None:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r} (factory {spec!r})")
    if not callable(fn):
        raise UsageError(f"factory {spec!r} is not callable (got {type(fn).__name__})")
    return fn


def check_output_folder(path: str | os.PathLike, option: str = "--out") -> Path:
    """Check, before any long work, that files can be created in the folder ``path``: it is a folder (or does not
    exist yet and its nearest existing parent is a folder), and a probe file can be created and removed there.
    Nothing is left behind; a missing folder is created only when results are written.

    Raises:
        UsageError: ``path`` is a file, lies under a file, or is not writable.
    """
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UsageError(f"{option} {str(path)!r}: exists and is not a folder")
    existing = path
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"{option} {str(path)!r}: {str(existing)!r} is not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".sparsekernels-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as e:
        raise UsageError(f"{option} {str(path)!r}: cannot create files in {str(existing)!r} "
                         f"({e.strerror or type(e).__name__})") from e
    return path


def check_output_file(path: str | os.PathLike, option: str = "--out") -> Path:
    """:func:`check_output_folder` for the folder of the file ``path``, which must not be a folder itself.

    Raises:
        UsageError: ``path`` is a folder, or its folder is not writable.
    """
    path = Path(path)
    if path.is_dir():
        raise UsageError(f"{option} {str(path)!r}: is a folder, expected a file path")
    check_output_folder(path.parent if str(path.parent) else Path("."), option)
    return path
