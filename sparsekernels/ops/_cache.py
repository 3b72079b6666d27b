"""A weak per-tensor cache for values derived from a weight (a dense copy, a cuSPARSELt tensor).

The one cache every op uses: the CPU ``"auto"`` paths (a dense copy beside the compressed weight) and
the CUDA dispatcher's candidates. Public as :func:`sparsekernels.ops.dispatch.cached`.
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Sequence

import torch

# (id(owner), kind) -> (stamp, value, the tensors the value was built from). Keyed by id, not by a
# WeakIdKeyDictionary: a dict lookup is the cheapest thing the CPU fast paths can do per call; a
# weakref.finalize drops the entry when the owner dies (before its id can be reused).
_entries: dict[tuple[int, str], tuple] = {}
_lock = threading.Lock()


def _version(t: torch.Tensor):
    try:
        return t._version
    except RuntimeError:  # inference tensors carry no version counter (and cannot change outside inference mode)
        return None


def cached(
    owner: torch.Tensor, kind: str, build: Callable[[], object], *, depends: Sequence[torch.Tensor] = ()
) -> object:
    """A value derived from ``owner`` (and ``depends``), built once by ``build()`` and kept while ``owner`` lives.

    The entry is rebuilt when ``owner`` or a tensor in ``depends`` is modified in place (its version
    counter changes, e.g. ``load_state_dict`` without ``assign``) or gets other data without a version
    bump (``module.to(dtype / device)``, ``module.half()``, ``param.data = ...``: a new data pointer,
    dtype or shape). The tensors the value was built from are kept with it, so their memory
    cannot be reused by a later tensor that would carry the same stamp. The entry dies with ``owner``.
    ``build()`` must not return an object that keeps a reference to ``owner`` itself, or the entry
    would never be freed.

    Args:
        owner: the tensor the value is derived from (e.g. ``weight_values``).
        kind: a name for the representation, e.g. ``"dense"`` or ``"cusparselt"``.
        build: zero-argument callable that builds the value.
        depends: other tensors the value is derived from (e.g. the packed metadata).

    Raises:
        TypeError: ``owner`` or an element of ``depends`` not a tensor, ``kind`` not a str, or
            ``build`` not callable.
    """
    if not isinstance(owner, torch.Tensor):
        raise TypeError(f"cached(): expected owner to be a torch.Tensor, got {type(owner).__name__}")
    if not isinstance(kind, str):
        raise TypeError(f"cached(): expected kind to be a str, got {type(kind).__name__}")
    if not callable(build):
        raise TypeError(f"cached(): expected build to be callable, got {type(build).__name__}")
    for t in depends:
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"cached(): expected depends to hold torch.Tensors, got {type(t).__name__}")
    return _cached(owner, kind, tuple(depends), build)


def _cached(owner: torch.Tensor, kind, depends: tuple, build: Callable[..., object], *args) -> object:
    """:func:`cached` for the ops' per-call path (~0.5 us on a hit): no argument checks, ``kind`` any
    hashable, ``build(*args)`` (no closure to create per call). Written out, without helpers or
    generators, because it runs on every CPU forward call."""
    # The device is not in the stamp: the entry keeps the data it was built from alive, so an equal
    # data pointer is the same live allocation (on the same device).
    try:
        stamp = (owner.data_ptr(), owner._version, owner.dtype, owner.shape)
        for t in depends:
            stamp += (t.data_ptr(), t._version)
    except RuntimeError:  # inference tensors carry no version counter (and cannot change outside inference mode)
        stamp = (owner.data_ptr(), _version(owner), owner.dtype, owner.shape)
        for t in depends:
            stamp += (t.data_ptr(), _version(t))
    key = (id(owner), kind)
    hit = _entries.get(key)  # lock-free read (dict lookups are atomic); writes take the lock
    if hit is not None and hit[0] == stamp:
        return hit[1]
    with _lock:
        with torch.no_grad():  # the value must not hold a reference to owner through autograd
            value = build(*args)
        if key not in _entries:
            weakref.finalize(owner, _entries.pop, key, None)
        _entries[key] = (stamp, value, (owner.detach(), *(t.detach() for t in depends)))
        return value


def _cached_entries(owner: torch.Tensor) -> dict:
    """Internal, for tests: kind -> value of what is currently cached for ``owner``."""
    with _lock:
        return {kind: entry[1] for (oid, kind), entry in list(_entries.items()) if oid == id(owner)}
