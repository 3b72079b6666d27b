"""A weak per-tensor cache for values derived from a compressed weight (a dense copy, a cuSPARSELt tensor).

Used by the routing module's candidates: the dense and cuSPARSELt candidates the dispatcher measures on a
GPU, and the CPU paths of the functional ops, which receive compressed tensors (the sparse modules keep
their CPU weight dense instead, see :mod:`sparsekernels.nn.base`).
"""
from __future__ import annotations

import threading
import weakref
from typing import Callable, Hashable

import torch

__all__ = ["cached", "cached_entries"]

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


def cached(owner: torch.Tensor, kind: Hashable, depends: tuple, build: Callable[..., object], *args) -> object:
    """A value derived from ``owner`` (and ``depends``), built once by ``build(*args)`` and kept while ``owner`` lives.

    The entry is rebuilt when ``owner`` or a tensor in ``depends`` is modified in place (its version
    counter changes, e.g. ``load_state_dict`` without ``assign``) or gets other data without a version
    bump (``module.to(dtype / device)``, ``param.data = ...``: a new data pointer, dtype or shape). The
    tensors the value was built from are kept with it, so their memory cannot be reused by a later tensor
    that would carry the same stamp. The entry dies with ``owner``. ``build`` must not return an object
    that keeps a reference to ``owner`` itself, or the entry would never be freed.

    It runs on every call of a cached backend (~0.5 us on a hit), so it checks nothing: the callers are
    the routing module's candidates, which pass tensors they have already validated.

    Args:
        owner: the tensor the value is derived from (e.g. the 2:4 values).
        kind: any hashable naming the representation, e.g. ``"sparse24_dense"``.
        depends: other tensors the value is derived from (e.g. the packed metadata).
        build: called as ``build(*args)`` on a miss.
    """
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


def cached_entries(owner: torch.Tensor) -> dict:
    """kind -> value of everything currently cached for ``owner`` (what tests and memory reports inspect)."""
    with _lock:
        return {kind: entry[1] for (oid, kind), entry in list(_entries.items()) if oid == id(owner)}
