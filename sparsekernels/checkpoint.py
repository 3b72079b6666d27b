"""Compressed checkpoints of swapped models: safetensors tensors + JSON metadata, never pickle.

``save_sparse(model, path)`` writes the swapped model's state dict (2:4 layers as their compressed
values and metadata: 0.5625x of the dense bytes in fp16 / bf16) to one ``.safetensors`` file whose
header metadata records which modules are sparse and how to construct them. ``load_sparse`` builds
the model on the meta device (from a factory) or takes a model instance, replaces the recorded layers
by sparse modules constructed on the meta device, and loads the tensors with
``load_state_dict(assign=True)``: no dense weight is ever materialised, and nothing is unpickled.
"""
from __future__ import annotations

import json
import os
from typing import Callable

import torch
from torch import nn

from ._version import __version__
from .nn import sparse_module_class, sparse_module_types
from .nn.walk import module_occurrences, move_hooks, replace_modules

__all__ = ["save_sparse", "load_sparse", "read_metadata", "METADATA_KEY"]

METADATA_KEY = "sparsekernels"
_FORMAT = 1
_NONPERSISTENT = "__nonpersistent__."


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def _dtype_from_name(name: str) -> torch.dtype:
    dtype = getattr(torch, name, None)
    if not isinstance(dtype, torch.dtype):
        raise ValueError(f"load_sparse(): expected a torch dtype name in the checkpoint metadata, got {name!r}")
    return dtype


def save_sparse(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> dict:
    """Save a swapped model's state dict and the record of its sparse layers to ``path`` (safetensors).

    Args:
        model: an ``nn.Module`` (typically after :func:`sparsekernels.sparsify`); tensors on any
            device except ``meta``.
        path: the file to write (conventionally ``*.safetensors``).
        metadata: extra ``str -> str`` entries for the file header (e.g. the model's name).

    Returns:
        The sparsekernels metadata written (a JSON-serialisable dict).

    Raises:
        TypeError: ``model`` not an ``nn.Module``; ``metadata`` not a str -> str mapping; a non-tensor
            entry in the state dict (``get_extra_state``).
        ValueError: a tensor is on the meta device, or ``metadata`` uses the reserved key
            ``"sparsekernels"``.
    """
    fn = "save_sparse()"
    from safetensors.torch import save_file

    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    extra = dict(metadata or {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in extra.items()):
        raise TypeError(f"{fn}: expected metadata to map str -> str, got {metadata!r}")
    if METADATA_KEY in extra:
        raise ValueError(f"{fn}: the metadata key {METADATA_KEY!r} is reserved")

    sparse_types = sparse_module_types()
    records = []
    for name, module in model.named_modules():
        if sparse_types and isinstance(module, sparse_types):
            records.append({
                "name": name,
                "class": type(module).__name__,
                "args": module.constructor_args(),
                "backend": str(module.backend),
                "dtype": _dtype_name(module.weight_dtype),
            })

    state = dict(model.state_dict())
    # Non-persistent buffers of ordinary modules (e.g. position ids) are not in the state dict, yet a
    # model built on the meta device needs their values. The sparse modules' own caches are rebuilt.
    nonpersistent = []
    for mod_name, module in model.named_modules():
        if sparse_types and isinstance(module, sparse_types):
            continue
        for bname in sorted(getattr(module, "_non_persistent_buffers_set", ())):
            t = module._buffers.get(bname)
            if t is not None:
                full = f"{mod_name}.{bname}" if mod_name else bname
                nonpersistent.append(full)
                state[_NONPERSISTENT + full] = t

    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    by_identity: dict[tuple, str] = {}
    storages: set[int] = set()
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{fn}: expected only tensors in the state dict (safetensors stores nothing else), got "
                            f"{type(t).__name__} at {name!r}")
        if t.device.type == "meta":
            raise ValueError(f"{fn}: expected materialised tensors, got {name!r} on the meta device")
        t = t.detach()
        ident = (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype,
                 str(t.device)) if t.numel() else None
        if ident is not None and ident in by_identity:
            aliases[name] = by_identity[ident]  # tied tensors are stored once
            continue
        storage = t.untyped_storage().data_ptr() if t.numel() else None
        if storage is not None and storage in storages:
            t = t.clone()  # a view into another tensor's memory: safetensors stores no shared memory
        if ident is not None:
            by_identity[ident] = name
        if storage is not None:
            storages.add(storage)
        tensors[name] = t.to("cpu").contiguous()

    record = {
        "format": _FORMAT,
        "sparsekernels_version": __version__,
        "sparse_modules": records,
        "aliases": aliases,
        "nonpersistent_buffers": nonpersistent,
    }
    save_file(tensors, os.fspath(path), metadata={**extra, METADATA_KEY: json.dumps(record)})
    return record


def read_metadata(path: str | os.PathLike) -> dict:
    """The sparsekernels record in a checkpoint written by :func:`save_sparse` (no tensor is read).

    Raises:
        FileNotFoundError: no such file.
        ValueError: not a safetensors file, or written by something other than :func:`save_sparse`.
    """
    from safetensors import safe_open

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"read_metadata(): no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:
        raise ValueError(f"read_metadata(): expected a safetensors file at {path}: {exc}") from exc
    raw = header.get(METADATA_KEY)
    if raw is None:
        raise ValueError(
            f"read_metadata(): expected a checkpoint written by sparsekernels.save_sparse (header key "
            f"{METADATA_KEY!r}), got a safetensors file without it: {path}"
        )
    record = json.loads(raw)
    if record.get("format") != _FORMAT:
        raise ValueError(f"read_metadata(): expected checkpoint format {_FORMAT}, got {record.get('format')!r}")
    return record


def _same(a, b) -> bool:
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def _check_target(fn: str, rec: dict, old: nn.Module, cls: type, args: dict) -> None:
    """The model's module at a recorded name must be the dense layer the sparse module replaces (or that sparse
    module), with the recorded sizes and geometry."""
    if not isinstance(old, (cls.dense_type, cls)):
        raise ValueError(
            f"{fn}: the checkpoint has a {rec['class']} at {rec['name']!r}, expected the model to have an "
            f"nn.{cls.dense_type.__name__} there, got {type(old).__name__}"
        )
    for attr, recorded in args.items():
        have = getattr(old, attr, None)
        if attr == "bias" or have is None or isinstance(have, (str, torch.Tensor)):
            continue
        if not _same(have, recorded):
            raise ValueError(
                f"{fn}: layer {rec['name']!r} has {attr}={have} in the model but {recorded} in the checkpoint"
            )


def load_sparse(
    model_or_factory: nn.Module | Callable[[], nn.Module],
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    backend: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_sparse`, without materialising dense weights.

    Args:
        model_or_factory: a zero-argument callable building the (dense) model -- it is called under
            ``torch.device("meta")``, so no memory is allocated for its weights -- or a model instance
            (its recorded layers are replaced in place; its other tensors are replaced by the file's).
        path: the ``.safetensors`` file.
        device: where the loaded tensors go; default: the device of the given model's first
            non-meta parameter, else the CPU.
        backend: override the recorded ``backend`` of every sparse layer (None keeps it).
        strict: passed to ``load_state_dict``; after loading, no tensor may be left on the meta device.

    Returns:
        The model with its sparse layers swapped in and every tensor loaded.

    Raises:
        TypeError: ``model_or_factory`` neither an ``nn.Module`` nor a callable returning one.
        FileNotFoundError / ValueError: a missing or foreign file (see :func:`read_metadata`), a recorded
            layer the model does not have, or an unknown sparse module class.
        RuntimeError: ``load_state_dict`` mismatch, or tensors left on the meta device.
    """
    fn = "load_sparse()"
    from safetensors.torch import load_file

    record = read_metadata(path)
    if isinstance(model_or_factory, nn.Module):
        model = model_or_factory
    elif callable(model_or_factory):
        with torch.device("meta"):
            model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected the factory to return an nn.Module, got {type(model).__name__}")
    else:
        raise TypeError(f"{fn}: expected an nn.Module or a callable returning one, got {type(model_or_factory).__name__}")
    if device is None:
        real = [p.device for p in model.parameters() if p.device.type != "meta"]
        device = real[0] if real else torch.device("cpu")
    device = torch.device(device)

    occ = module_occurrences(model)
    replacements: dict[int, nn.Module] = {}
    for rec in record["sparse_modules"]:
        cls = sparse_module_class(rec["class"])
        if cls is None:
            raise ValueError(f"{fn}: the checkpoint uses {rec['class']!r}, which this installation does not provide")
        try:
            old = model.get_submodule(rec["name"])
        except AttributeError:
            raise ValueError(
                f"{fn}: the checkpoint has a sparse layer {rec['name']!r} but the model has no such module"
            ) from None
        args = {k: tuple(v) if isinstance(v, list) else v for k, v in rec["args"].items()}
        _check_target(fn, rec, old, cls, args)
        new = cls(**args, backend=backend or rec["backend"], device="meta", dtype=_dtype_from_name(rec["dtype"]))
        move_hooks(old, new)
        replacements[id(old)] = new
    replace_modules(model, replacements, occ)

    state = load_file(os.fspath(path), device=str(device))
    # Re-tie: a tied Parameter must come back as ONE Parameter object held by every owner. Handing
    # load_state_dict(assign=True) the same plain tensor twice gives each owner its own Parameter wrapper
    # (shared memory, but `a.weight is b.weight` False, counted twice by parameters(), two optimizer states).
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for alias, kept in record.get("aliases", {}).items():
        t = state[kept]
        if alias in param_names and kept in param_names and not isinstance(t, nn.Parameter):
            t = state[kept] = nn.Parameter(t)  # requires_grad is then set from the model's own parameter
        state[alias] = t
    nonpersistent = {name: state.pop(_NONPERSISTENT + name) for name in record.get("nonpersistent_buffers", [])
                     if _NONPERSISTENT + name in state}
    model.load_state_dict(state, strict=strict, assign=True)
    for name, t in nonpersistent.items():
        mod_name, _, bname = name.rpartition(".")
        module = model.get_submodule(mod_name) if mod_name else model
        if bname in module._buffers:
            module._buffers[bname] = t

    left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
    if left:
        raise RuntimeError(f"{fn}: tensors left on the meta device after loading (not in the checkpoint): {left}")
    return model
