"""The trust boundary of pruning plans: what :func:`pruning.load_plan` accepts from the two files of a plan.

A plan file may come from anywhere, so nothing in it is trusted. Before a tensor is read:

* the JSON file is at most :attr:`PlanLimits.max_json_bytes`, valid UTF-8 and JSON without ``NaN`` /
  ``Infinity`` or repeated keys, and matches the schema exactly: ``{"format": "pruning-plan", "version": 1,
  "has_weights": bool, "layers": {name: {"kind": "Linear" | "Conv2d" | "Conv1D", "weight_shape": [int, ...] (2
  or 4 sizes), "pattern": str, "importance": str, "sparsity": number in [0, 1], and optionally "input_perm": int,
  the length of the layer's input permutation}}}``, no other key anywhere, at most :attr:`PlanLimits.max_layers`
  layers, names and strings printable and short;
* the safetensors header names exactly the tensors the JSON describes (``<layer>.weight_mask``, ``bool``; with
  ``has_weights`` ``<layer>.weight``, floating point; with ``input_perm`` ``<layer>.input_perm``, ``int64``),
  each of the recorded shape; metadata, when the file has any, names the plan's format and version.

Then each mask must have the recorded sparsity, each saved weight must be finite and each input permutation must
be a permutation. Every violation is one
``ValueError``: ``load_plan(): <file>: <entry>: <what is wrong>``.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

__all__ = ["PLAN_FORMAT", "PLAN_VERSION", "PlanLimits", "PLAN_LIMITS", "read_plan_json", "read_plan_tensors"]

PLAN_FORMAT = "pruning-plan"
PLAN_VERSION = 1

_KINDS = {"Linear": 2, "Conv2d": 4, "Conv1D": 2}  # kind -> number of weight dimensions
_LAYER_KEYS = ("kind", "weight_shape", "pattern", "importance", "sparsity")
_OPTIONAL_LAYER_KEYS = ("input_perm",)
_TOP_KEYS = ("format", "version", "has_weights", "layers")
_FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")


@dataclass(frozen=True)
class PlanLimits:
    """Sizes a plan may not exceed (far above any real model's, far below what would exhaust a machine).

    Attributes:
        max_json_bytes: size of the JSON file.
        max_layers: number of layers.
        max_name_chars: length of a layer name.
        max_text_chars: length of a ``pattern`` / ``importance`` string.
        max_dim: one weight dimension.
        max_layer_elements: elements of one layer's weight.
        max_total_elements: elements of all the plan's masks together.
    """

    max_json_bytes: int = 64 << 20
    max_layers: int = 100_000
    max_name_chars: int = 1_000
    max_text_chars: int = 200
    max_dim: int = 1 << 31
    max_layer_elements: int = 1 << 34
    max_total_elements: int = 1 << 36


PLAN_LIMITS = PlanLimits()


class _Bad(ValueError):
    """One problem at one entry of one file."""

    def __init__(self, path: Path | str, entry: str, problem: str):
        super().__init__(f"load_plan(): {path}: {entry}: {problem}")


def _kind_of(value) -> str:
    return "null" if value is None else type(value).__name__


def _no_duplicates(pairs):
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} appears twice in one object")
        out[key] = value
    return out


def _no_constant(name):
    raise ValueError(f"{name} is not a JSON number")


def _exact_keys(path, entry: str, obj, keys: tuple, optional: tuple = ()) -> None:
    if not isinstance(obj, dict):
        raise _Bad(path, entry, f"expected an object, got {_kind_of(obj)}")
    missing = [k for k in keys if k not in obj]
    if missing:
        raise _Bad(path, entry, f"missing key(s) {missing}")
    extra = sorted(k for k in obj if k not in keys and k not in optional)
    if extra:
        also = f" (and optionally {list(optional)})" if optional else ""
        raise _Bad(path, entry, f"unexpected key(s) {extra[:5]}; expected exactly {list(keys)}{also}")


def _text(path, entry: str, value, limit: int, *, empty: bool = False) -> str:
    if not isinstance(value, str):
        raise _Bad(path, entry, f"expected a string, got {_kind_of(value)}")
    if len(value) > limit or (not value and not empty) or not value.isprintable():
        raise _Bad(path, entry, f"expected a printable string of {0 if empty else 1} to {limit} characters, "
                   f"got {value[:40]!r}" + ("..." if len(value) > 40 else ""))
    return value


def _layer(path, name: str, info, limits: PlanLimits) -> tuple[dict, int]:
    """The checked metadata of one layer, and its weight's number of elements."""
    entry = f"layers[{name!r}]"
    _exact_keys(path, entry, info, _LAYER_KEYS, _OPTIONAL_LAYER_KEYS)
    kind = info["kind"]
    if not isinstance(kind, str) or kind not in _KINDS:
        raise _Bad(path, f"{entry}.kind", f"expected one of {list(_KINDS)}, got {json.dumps(kind)[:60]}")
    shape = info["weight_shape"]
    if (not isinstance(shape, list) or len(shape) != _KINDS[kind]
            or not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= limits.max_dim for v in shape)):
        raise _Bad(path, f"{entry}.weight_shape", f"expected a list of {_KINDS[kind]} sizes in 1..{limits.max_dim} "
                   f"for a {kind}, got {json.dumps(shape)[:80]}")
    numel = math.prod(shape)
    if numel > limits.max_layer_elements:
        raise _Bad(path, f"{entry}.weight_shape", f"{numel:,} elements, more than the limit of "
                   f"{limits.max_layer_elements:,}")
    sparsity = info["sparsity"]
    if (isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity)
            or not 0.0 <= sparsity <= 1.0):
        raise _Bad(path, f"{entry}.sparsity", f"expected a number in [0, 1], got {json.dumps(sparsity)[:40]}")
    pattern = _text(path, f"{entry}.pattern", info["pattern"], limits.max_text_chars)
    importance = _text(path, f"{entry}.importance", info["importance"], limits.max_text_chars)
    checked = {"kind": kind, "weight_shape": list(shape), "pattern": pattern, "importance": importance,
               "sparsity": float(sparsity)}
    if "input_perm" in info:
        # one entry per input feature (Linear, Conv1D: the GEMM view's columns) or input channel (Conv2d)
        inputs = shape[1] if kind != "Conv1D" else shape[0]
        if info["input_perm"] != inputs or isinstance(info["input_perm"], bool):
            raise _Bad(path, f"{entry}.input_perm", f"expected the layer's {inputs} inputs, got "
                       f"{json.dumps(info['input_perm'])[:40]}")
        checked["input_perm"] = inputs
    return checked, numel


def read_plan_json(path: Path, limits: PlanLimits | None = None) -> tuple[dict[str, dict], bool]:
    """Read and check a plan's JSON file against ``limits`` (default :data:`PLAN_LIMITS`).

    Returns:
        ``(layers, has_weights)``: layer name -> its checked metadata, in the file's order.

    Raises:
        ValueError: the file is too large, not UTF-8 JSON, or does not match the schema (one message naming
            the file and the entry).
    """
    limits = limits if limits is not None else PLAN_LIMITS
    size = path.stat().st_size
    if size > limits.max_json_bytes:
        raise _Bad(path, "file", f"{size:,} bytes, more than the limit of {limits.max_json_bytes:,}")
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"), object_pairs_hook=_no_duplicates,
                          parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise _Bad(path, "file", f"not valid JSON ({type(e).__name__}: {' '.join(str(e).split())[:200]})") from None
    if not isinstance(meta, dict):
        raise _Bad(path, "file", f"expected a JSON object, got {_kind_of(meta)}")
    if meta.get("format") != PLAN_FORMAT:
        raise _Bad(path, "format", f"expected {PLAN_FORMAT!r}, got {json.dumps(meta.get('format'))[:60]}")
    version = meta.get("version")
    if isinstance(version, bool) or version != PLAN_VERSION:
        raise _Bad(path, "version", f"expected plan version {PLAN_VERSION}, got {json.dumps(version)[:40]}")
    _exact_keys(path, "file", meta, _TOP_KEYS)
    if not isinstance(meta["has_weights"], bool):
        raise _Bad(path, "has_weights", f"expected true or false, got {_kind_of(meta['has_weights'])}")
    raw = meta["layers"]
    if not isinstance(raw, dict) or not raw:
        raise _Bad(path, "layers", f"expected a non-empty 'layers' object, got {_kind_of(raw)}"
                   + (" (empty)" if isinstance(raw, dict) else ""))
    if len(raw) > limits.max_layers:
        raise _Bad(path, "layers", f"{len(raw):,} layers, more than the limit of {limits.max_layers:,}")
    layers, total = {}, 0
    for name, info in raw.items():
        _text(path, f"layer name {name[:40]!r}", name, limits.max_name_chars, empty=True)
        layers[name], numel = _layer(path, name, info, limits)
        total += numel
    if total > limits.max_total_elements:
        raise _Bad(path, "layers", f"{total:,} weight elements in all, more than the limit of "
                   f"{limits.max_total_elements:,}")
    return layers, meta["has_weights"]


def read_plan_tensors(path: Path, json_name: str, layers: dict[str, dict], has_weights: bool
                      ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Read a plan's safetensors file against its checked JSON (``layers`` from :func:`read_plan_json`).

    The header (names, dtypes, shapes, metadata) is checked before any tensor is read.

    Returns:
        ``(masks, weights, input_perms)``: layer name -> ``torch.bool`` mask, layer name -> saved weight (empty
        unless ``has_weights``), layer name -> ``int64`` input permutation (the layers that carry one).

    Raises:
        ValueError: an unreadable file, or one that disagrees with the JSON (one message naming the entry).
    """
    from safetensors import safe_open

    expected = {f"{name}.weight_mask": (name, "mask") for name in layers}
    if has_weights:
        expected.update({f"{name}.weight": (name, "weight") for name in layers})
    expected.update({f"{name}.input_perm": (name, "input_perm") for name, info in layers.items() if "input_perm" in info})
    masks, weights, perms = {}, {}, {}
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta and (meta.get("format") != PLAN_FORMAT or meta.get("version") != str(PLAN_VERSION)):
                raise _Bad(path, "metadata", f"expected format {PLAN_FORMAT!r} version {PLAN_VERSION}, got "
                           f"{json.dumps(meta)[:120]}")
            keys = set(f.keys())
            extra = sorted(keys - set(expected))
            if extra:
                raise _Bad(path, "tensors", f"{len(extra)} tensor(s) not described in {json_name}: {extra[:5]}")
            missing = [k for k in expected if k not in keys]
            if missing:
                name, what = expected[missing[0]]
                raise _Bad(path, missing[0], f"layer {name!r} is in {json_name} but has no {what} here"
                           + ("" if what == "mask" else " (the JSON says has_weights: true)"))
            for key, (name, what) in expected.items():
                shape, dtype = list(f.get_slice(key).get_shape()), f.get_slice(key).get_dtype()
                want, ok, label = layers[name]["weight_shape"], dtype in _FLOAT_DTYPES, "a floating-point tensor"
                if what == "mask":
                    ok, label = dtype == "BOOL", "BOOL"
                elif what == "input_perm":
                    want, ok, label = [layers[name]["input_perm"]], dtype == "I64", "I64"
                if not ok or shape != want:
                    raise _Bad(path, key, f"is {dtype} {shape}, expected {label} {want} (from {json_name})")
            for key, (name, what) in expected.items():
                tensor = f.get_tensor(key)
                if what == "mask":
                    sparsity = float((~tensor).sum()) / tensor.numel()
                    if abs(sparsity - layers[name]["sparsity"]) > 1e-6:
                        raise _Bad(path, key, f"has sparsity {sparsity:.6g}, but {json_name} records "
                                   f"{layers[name]['sparsity']:.6g} for layer {name!r}")
                    masks[name] = tensor
                elif what == "input_perm":
                    if not torch.equal(tensor.sort().values, torch.arange(tensor.shape[0])):
                        raise _Bad(path, key, f"is not a permutation of 0..{tensor.shape[0] - 1}")
                    perms[name] = tensor
                else:
                    if not bool(torch.isfinite(tensor).all()):
                        raise _Bad(path, key, "the saved weight holds NaN or inf")
                    weights[name] = tensor
    except _Bad:
        raise
    except Exception as e:  # safetensors' own errors for a corrupt or truncated file
        raise _Bad(path, "file", f"not a readable safetensors file ({type(e).__name__}: "
                   f"{' '.join(str(e).split())[:200]})") from None
    return masks, weights, perms
