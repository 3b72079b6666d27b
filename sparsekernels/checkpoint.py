"""Compressed checkpoints of swapped models: safetensors tensors + JSON metadata, never pickle.

``save_sparse(model, path)`` writes the swapped model's state dict (2:4 layers as their compressed
values and metadata: 0.5625x of the dense bytes in fp16 / bf16) to one ``.safetensors`` file whose
header metadata records which modules are sparse and how to construct them. ``load_sparse`` builds
the model on the meta device (from a factory) or takes a model instance, replaces the recorded layers
by sparse modules constructed on the meta device, and loads the tensors with
``load_state_dict(assign=True)``: no dense weight is ever materialised, and nothing is unpickled.

A file is untrusted input. Before anything is built from it, the loader checks the header record against
:data:`RECORD_SCHEMA` (types, ranges, counts, a size limit), every recorded layer against the model's layer it
replaces (sizes and geometry; a conv's ``padding="same"`` / ``"valid"`` by the numbers it stands for), the name,
shape and dtype of every tensor against what the model expects, and the contents of the compressed weights (2:4
metadata, block structure) with their formats' checks. A bad file raises one :class:`CheckpointError` naming the
file, the entry and what is wrong, before any kernel runs and before the given model is touched. Loading into a
model instance is all or nothing; saving writes a temporary file beside the target and renames it into place.
"""
from __future__ import annotations

import contextlib
import inspect
import json
import os
import secrets
from typing import Callable

import torch
from torch import nn

from ._version import __version__
from .formats.sparse24 import SUPPORTED_DTYPES
from .nn import sparse_module_class, sparse_module_types
from .nn.walk import module_occurrences, move_hooks, replace_modules, snapshot
from .ops.routing import BACKENDS, check_backend_name
from .schema import (
    SchemaError,
    any_of,
    boolean,
    constant,
    integer,
    list_of,
    mapping,
    number,
    parse_json,
    record,
    string,
)

__all__ = [
    "save_sparse", "load_sparse", "read_metadata", "CheckpointError", "METADATA_KEY", "RECORD_SCHEMA",
    "MAX_RECORD_BYTES", "MAX_MODULES", "MAX_TENSORS",
]

METADATA_KEY = "sparsekernels"
_FORMAT = 1
_NONPERSISTENT = "__nonpersistent__."

# Limits of a record: far above any real model (a 70B LLM has ~600 sparse layers and ~1000 tensors).
MAX_RECORD_BYTES = 16 << 20
MAX_MODULES = 1 << 16
MAX_TENSORS = 1 << 20
_MAX_NAME = 1024
_MAX_INT = 2**31 - 1
_DTYPE_NAMES = tuple(str(d).replace("torch.", "") for d in SUPPORTED_DTYPES)
_RESERVED_ARGS = ("self", "backend", "device", "dtype")

_NAME = string(_MAX_NAME)
_ARG = any_of(
    boolean(), integer(-_MAX_INT, _MAX_INT), number(-1e300, 1e300, integers=False), string(256),
    list_of(integer(-_MAX_INT, _MAX_INT), 8),
    expected="a boolean, an integer in 32 bits, a number with a fraction, a string of at most 256 characters or an "
             "array of at most 8 integers in 32 bits",
)
_MODULE_SCHEMA = record({
    "name": _NAME,
    "class": string(128),
    "args": mapping(string(64), _ARG, 32),
    "backend": string(16, BACKENDS),
    "dtype": string(16, _DTYPE_NAMES),
})
RECORD_SCHEMA = record({
    "format": constant(_FORMAT),
    "sparsekernels_version": string(64),
    "sparse_modules": list_of(_MODULE_SCHEMA, MAX_MODULES),
    "aliases": mapping(_NAME, _NAME, MAX_TENSORS),
    "nonpersistent_buffers": list_of(_NAME, MAX_TENSORS),
})


class CheckpointError(ValueError):
    """A checkpoint file that cannot be loaded: not a safetensors file, not written by :func:`save_sparse`, or
    holding something the schema, the model or a format's invariants refuse.

    Attributes:
        path: the file.
        entry: what in it is wrong (``header record: sparse_modules[0].args.stride``, ``tensor '0.weight_meta'``,
            ...), or ``""`` for the file as a whole.
        problem: what is wrong, with what was expected and what was found.
    """

    def __init__(self, path: str, entry: str, problem: str, fn: str = "load_sparse()") -> None:
        self.path, self.entry, self.problem = path, entry, problem
        super().__init__(f"{fn}: {path}: {entry}: {problem}" if entry else f"{fn}: {path}: {problem}")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


# ----------------------------------------------------------------------------------------------------
# Saving


def _write_atomically(path: str, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to a temporary file in ``path``'s folder, flushed to disk, then renamed to ``path``: an
    interruption leaves the old file (or none), never a half-written one."""
    folder, base = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f".{base}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def save_sparse(model: nn.Module, path: str | os.PathLike, *, metadata: dict[str, str] | None = None) -> dict:
    """Save a swapped model's state dict and the record of its sparse layers to ``path`` (safetensors).

    The file is written to a temporary file in the same folder and renamed into place, so ``path`` holds
    either its old content or the whole new checkpoint.

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
        ValueError: a tensor is on the meta device, ``metadata`` uses the reserved key ``"sparsekernels"``, or
            the model cannot be recorded within :data:`RECORD_SCHEMA` (e.g. a sparse module whose constructor
            arguments are not plain numbers).
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

    record_ = {
        "format": _FORMAT,
        "sparsekernels_version": __version__,
        "sparse_modules": records,
        "aliases": aliases,
        "nonpersistent_buffers": nonpersistent,
    }
    text = json.dumps(record_)
    try:  # write only what load_sparse accepts
        RECORD_SCHEMA(parse_json(text, max_bytes=MAX_RECORD_BYTES, what="the record"), "")
    except SchemaError as exc:
        raise ValueError(f"{fn}: the model cannot be recorded in a checkpoint: {exc}") from None
    _write_atomically(os.fspath(path), lambda tmp: save_file(tensors, tmp, metadata={**extra, METADATA_KEY: text}))
    return record_


# ----------------------------------------------------------------------------------------------------
# Reading the header


def read_metadata(path: str | os.PathLike) -> dict:
    """The sparsekernels record in a checkpoint written by :func:`save_sparse` (no tensor is read), checked
    against :data:`RECORD_SCHEMA`.

    Raises:
        FileNotFoundError: no such file.
        CheckpointError: not a safetensors file, no sparsekernels record, or a record that is not valid JSON,
            too large, or does not follow the schema (the error names the field).
    """
    from safetensors import safe_open

    fn = "read_metadata()"
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{fn}: no checkpoint at {path}")
    try:
        with safe_open(path, framework="pt") as f:
            header = f.metadata() or {}
    except Exception as exc:  # the safetensors parser's own error types
        raise CheckpointError(path, "", f"expected a safetensors file: {exc}", fn) from None
    raw = header.get(METADATA_KEY)
    if raw is None:
        raise CheckpointError(path, "", f"expected a checkpoint written by sparsekernels.save_sparse (header key "
                                        f"{METADATA_KEY!r}), got a safetensors file without it", fn)
    try:
        doc = parse_json(raw, max_bytes=MAX_RECORD_BYTES, what="the record")
        if isinstance(doc, dict) and "format" in doc:  # another version's record: say so before anything else
            constant(_FORMAT)(doc["format"], "format")
        doc = RECORD_SCHEMA(doc, "")
    except SchemaError as exc:
        raise CheckpointError(path, f"header record{': ' + exc.where if exc.where else ''}", exc.problem, fn) \
            from None
    names = [m["name"] for m in doc["sparse_modules"]]
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise CheckpointError(path, "header record: sparse_modules", f"the layer {dup!r} is recorded twice", fn)
    if "" in names and len(names) > 1:
        raise CheckpointError(path, "header record: sparse_modules",
                              "the model itself is recorded as a sparse layer, so it can hold no other", fn)
    return doc


# ----------------------------------------------------------------------------------------------------
# Loading


def _find_module(model: nn.Module, name: str):
    """The submodule at the dotted ``name`` (``""``: the model), looked up in the module tree only, or None."""
    module = model
    for part in name.split(".") if name else ():
        module = module._modules.get(part) if isinstance(module, nn.Module) else None
        if module is None:
            return None
    return module


def _same(a, b) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def _build_sparse(fail, i: int, rec: dict, model: nn.Module, backend: str | None):
    """The recorded layer ``rec`` checked against the model's layer at its name, and its sparse module built on the
    meta device: ``(old module, new module)``."""
    where = f"header record: sparse_modules[{i}]"
    cls = sparse_module_class(rec["class"])
    if cls is None:
        fail(f"{where}.class", f"the checkpoint uses {rec['class']!r}, which this installation does not provide")
    old = _find_module(model, rec["name"])
    if old is None:
        fail(f"{where}.name", f"the checkpoint has a sparse layer {rec['name']!r} but the model has no such module")
    accepted = isinstance(old, cls) or cls.matches_dense(old) or (
        cls.dense_type is not nn.Module and isinstance(old, cls.dense_type))
    if not accepted:
        label = cls.dense_label()
        article = "an" if label.lower().startswith(("nn.", "a", "e", "i", "o", "u")) else "a"
        fail(f"{where}.name", f"the checkpoint has a {rec['class']} at {rec['name']!r}, expected the model to have "
                              f"{article} {label} there, got {type(old).__name__}")
    args = rec["args"]
    params = inspect.signature(cls.__init__).parameters
    for key in args:
        if key in _RESERVED_ARGS or key not in params:
            fail(f"{where}.args.{key}", f"{cls.__name__} takes no argument {key!r}")
    try:
        fixed = cls.dense_args(old)
    except ValueError as exc:
        fail(f"{where}.name", f"the model's layer {rec['name']!r} cannot be a {cls.__name__}: {exc}")
    for key, have in fixed.items():
        if key not in args:
            fail(f"{where}.args", f"missing {key!r} (the model's layer {rec['name']!r} has {key}={have})")
        if not _same(args[key], have):
            fail(f"{where}.args.{key}", f"layer {rec['name']!r} has {key}={have!r} in the model but {args[key]!r} "
                                        "in the checkpoint")
    kwargs = {k: tuple(v) if isinstance(v, list) else v for k, v in args.items()}
    try:
        new = cls(**kwargs, backend=backend or rec["backend"], device="meta", dtype=getattr(torch, rec["dtype"]))
    except Exception as exc:  # a constructor refusing its arguments, whatever its error type
        fail(f"{where}.args", f"does not build a {cls.__name__}: {type(exc).__name__}: {exc}")
    return old, new


def _check_tensor(fail, name: str, got: torch.Tensor, want, exact_dtype: bool) -> None:
    if not isinstance(want, torch.Tensor):
        raise TypeError(f"load_sparse(): the model holds {type(want).__name__} at {name!r}, which a checkpoint "
                        "cannot carry")
    if tuple(got.shape) != tuple(want.shape):
        fail(f"tensor {name!r}", f"expected shape {tuple(want.shape)}, got {tuple(got.shape)}")
    if got.dtype != want.dtype and (exact_dtype or not (got.is_floating_point() and want.is_floating_point())):
        fail(f"tensor {name!r}", f"expected dtype {want.dtype}, got {got.dtype}")


def load_sparse(
    model_or_factory: nn.Module | Callable[[], nn.Module],
    path: str | os.PathLike,
    *,
    device: torch.device | str | None = None,
    backend: str | None = None,
    strict: bool = True,
) -> nn.Module:
    """Load a checkpoint written by :func:`save_sparse`, without materialising dense weights.

    Everything in the file is checked before anything is built from it (see the module docstring); loading
    into a model instance is all or nothing: on any error the instance is exactly as it was (modules,
    parameters, buffers, ``requires_grad``, ``.grad``, training flags, hooks).

    Args:
        model_or_factory: a zero-argument callable building the (dense) model -- it is called under
            ``torch.device("meta")``, so no memory is allocated for its weights -- or a model instance
            (its recorded layers are replaced in place; its other tensors are replaced by the file's).
        path: the ``.safetensors`` file.
        device: where the loaded tensors go; default: the device of the given model's first
            non-meta parameter, else the CPU.
        backend: override the recorded ``backend`` of every sparse layer (None keeps it).
        strict: whether every tensor of the model must be in the file and every tensor of the file in the
            model. Either way no tensor may be left on the meta device. A floating-point tensor may come in
            another floating dtype than the model's (the file's dtype is kept); any other dtype must match, and
            a sparse layer's tensors must have the recorded dtype.

    Returns:
        The model with its sparse layers swapped in and every tensor loaded (for a checkpoint whose root module
        is itself sparse, the new sparse module).

    Raises:
        TypeError: ``model_or_factory`` neither an ``nn.Module`` nor a callable returning one.
        FileNotFoundError: no such file.
        CheckpointError: (a ``ValueError``) anything wrong with the file, or a file that does not fit the model:
            the message names the file, the entry and the problem.
        ValueError: an unknown ``backend``, or a checkpoint of a root sparse module given a model instance.
    """
    fn = "load_sparse()"
    from safetensors.torch import load_file

    path_str = os.fspath(path)
    if backend is not None:
        check_backend_name(fn, backend)
    if not isinstance(model_or_factory, nn.Module) and not callable(model_or_factory):
        raise TypeError(
            f"{fn}: expected an nn.Module or a callable returning one, got {type(model_or_factory).__name__}")

    def fail(entry: str, problem: str):
        raise CheckpointError(path_str, entry, problem)

    record_ = read_metadata(path_str)
    instance = isinstance(model_or_factory, nn.Module)
    if instance:
        model = model_or_factory
    else:
        with torch.device("meta"):
            model = model_or_factory()
        if not isinstance(model, nn.Module):
            raise TypeError(f"{fn}: expected the factory to return an nn.Module, got {type(model).__name__}")
    if device is None:
        real = [p.device for p in model.parameters() if p.device.type != "meta"]
        device = real[0] if real else torch.device("cpu")
    device = torch.device(device)

    # 1. the recorded layers, checked against the model and built on the meta device
    occ = module_occurrences(model)
    built = [_build_sparse(fail, i, rec, model, backend) for i, rec in enumerate(record_["sparse_modules"])]
    if instance and any(m["name"] == "" for m in record_["sparse_modules"]):
        raise ValueError(f"{fn}: {path_str} holds a sparse module as the model itself, which cannot be replaced "
                         "in place: pass a factory instead of a model instance")
    prefixes = {}  # new module -> the qualified names it will have
    for (old, new), rec in zip(built, record_["sparse_modules"]):
        prefixes[new] = [n for _, _, n in occ.get(id(old), [])] or [rec["name"]]
    root = any(names == [""] for names in prefixes.values())  # the model itself is the sparse layer

    # 2. the tensors the model will expect once they are in, and the file's
    under = tuple(f"{n}." for names in prefixes.values() for n in names if n)
    expected = {} if root else {k: v for k, v in model.state_dict(keep_vars=True).items() if not k.startswith(under)}
    sparse_keys = set()
    for new, names in prefixes.items():
        for n in names:
            for k, v in new.state_dict(keep_vars=True).items():
                expected[f"{n}.{k}" if n else k] = v
                sparse_keys.add(f"{n}.{k}" if n else k)
    try:
        state = load_file(path_str, device=str(device))
    except Exception as exc:  # the safetensors parser's own error types
        fail("tensors", f"cannot be read: {exc}")
    if len(state) > MAX_TENSORS:
        fail("tensors", f"expected at most {MAX_TENSORS} tensors, got {len(state)}")
    replaced = {id(old) for old, _ in built}
    nonpersistent = {}
    for name in record_["nonpersistent_buffers"]:
        t = state.pop(_NONPERSISTENT + name, None)
        if t is None:
            fail("header record: nonpersistent_buffers", f"lists {name!r}, whose tensor the file does not hold")
        mod_name, _, bname = name.rpartition(".")
        module = _find_module(model, mod_name)
        if module is None or id(module) in replaced or bname not in module._buffers \
                or bname not in module._non_persistent_buffers_set:
            fail("header record: nonpersistent_buffers", f"{name!r} is not a non-persistent buffer of the model")
        if module._buffers[bname] is not None:
            _check_tensor(fail, _NONPERSISTENT + name, t, module._buffers[bname], exact_dtype=False)
        nonpersistent[(module, bname)] = t
    for mod_name, module in model.named_modules():
        for bname in sorted(module._non_persistent_buffers_set) if id(module) not in replaced else ():
            t = module._buffers.get(bname)
            if t is not None and t.device.type == "meta" and (module, bname) not in nonpersistent:
                fail("header record: nonpersistent_buffers",
                     f"lacks {f'{mod_name}.{bname}' if mod_name else bname!r}, a non-persistent buffer the model "
                     "built on the meta device needs")
    for alias, kept in record_["aliases"].items():
        if alias in state:
            fail(f"header record: aliases.{alias}", "names a tensor the file stores itself")
        if kept not in state:
            fail(f"header record: aliases.{alias}", f"refers to {kept!r}, which the file does not hold")
    provided = {**state, **{alias: state[kept] for alias, kept in record_["aliases"].items()}}
    for name, t in provided.items():
        if name not in expected:
            if strict or name.startswith(_NONPERSISTENT):
                fail(f"tensor {name!r}", "the model has no such tensor (unexpected key)")
            continue
        _check_tensor(fail, name, t, expected[name], exact_dtype=name in sparse_keys)
    for name, want in expected.items():
        on_meta = isinstance(want, torch.Tensor) and want.device.type == "meta"
        if name not in provided and (strict or name in sparse_keys or on_meta):
            fail(f"tensor {name!r}", "the model needs this tensor and the file does not hold it (missing key)")

    # 3. the sparse layers loaded on their own: each checks its compressed weight's contents
    for new, names in prefixes.items():
        first = names[0]
        own = {k: provided[f"{first}.{k}" if first else k] for k in new.state_dict(keep_vars=True)}
        for n in names[1:]:
            for k, t in own.items():
                if provided[f"{n}.{k}"] is not t and not torch.equal(provided[f"{n}.{k}"], t):
                    fail(f"tensor '{n}.{k}'", f"differs from '{first}.{k}' of the same (shared) layer")
        try:
            new.load_state_dict(own, strict=True, assign=True)
        except RuntimeError as exc:
            if not str(exc).startswith("Error(s) in loading state_dict"):  # a fault, not a refusal of the tensors
                raise
            fail(f"tensors of {first or 'the model'!r}", str(exc).replace("\n\t", " "))
    for old, new in built:
        move_hooks(old, new)

    # 4. commit; on any error, put the model back as it was
    if root:
        return built[0][1]
    rest = {k: v for k, v in provided.items() if k in expected and k not in sparse_keys}
    param_names = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    for alias, kept in record_["aliases"].items():  # a tied Parameter comes back as ONE Parameter object
        if alias in rest and kept in rest and alias in param_names and kept in param_names:
            if not isinstance(rest[kept], nn.Parameter):
                rest[kept] = nn.Parameter(rest[kept])  # requires_grad is then set from the model's own parameter
            rest[alias] = rest[kept]
    restore = snapshot(model)
    try:
        replace_modules(model, {id(old): new for old, new in built}, occ)
        result = model.load_state_dict(rest, strict=False, assign=True)
        if result.unexpected_keys or set(result.missing_keys) - sparse_keys - (set(expected) - set(rest)):
            raise RuntimeError(f"{fn}: the model's keys changed while loading: {result}")
        for (module, bname), t in nonpersistent.items():
            module._buffers[bname] = t
        left = [n for n, t in list(model.named_parameters()) + list(model.named_buffers()) if t.device.type == "meta"]
        if left:
            raise RuntimeError(f"{fn}: tensors left on the meta device after loading (not in the checkpoint): {left}")
    except BaseException:
        restore()
        raise
    return model
