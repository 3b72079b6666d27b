"""Input-channel permutations carried by 2:4 layers.

Channel permutation reorders a layer's input features (or a convolution's input channels) before its 2:4 mask is
chosen, so that large weights stop competing inside the same group of 4. Where the producers of those inputs can be
reordered the permutation costs nothing at run time; where they cannot (a layer reading the model's input or a
residual stream), the layer carries it: an ``int64`` vector ``input_perm`` of length ``L``, a permutation of
``0 .. L-1``, and a weight stored 2:4 in the permuted order, ``W[:, input_perm]``. The layer computes
``x[..., input_perm] @ W[:, input_perm].T``, which is exactly ``x @ W.T``.

A permutation is untrusted input wherever it arrives (a state dict, a checkpoint, a Hugging Face file, an op call):
:func:`check_permutation` is the one check, :func:`first_permutation_error` the same answer without raising.
"""
from __future__ import annotations

from typing import Optional

import torch

__all__ = ["PERM_DTYPE", "first_permutation_error", "check_permutation", "check_permutation_tensor"]

# The dtype a carried permutation must have (what argsort returns; never narrowed, so no value can wrap).
PERM_DTYPE = torch.int64


def check_permutation_tensor(fn: str, perm, length: int, name: str = "input_perm") -> None:
    """The O(1) part of :func:`check_permutation`: a 1-D ``int64`` tensor of ``length`` elements.

    Raises:
        TypeError: not a tensor, or not ``int64``.
        ValueError: not 1-D of ``length`` elements.
    """
    if not isinstance(perm, torch.Tensor):
        raise TypeError(f"{fn}: expected {name} to be an int64 tensor, got {type(perm).__name__}")
    if perm.dtype != PERM_DTYPE:
        raise TypeError(f"{fn}: expected {name} of dtype {PERM_DTYPE}, got {perm.dtype}")
    if perm.dim() != 1 or perm.shape[0] != length:
        raise ValueError(f"{fn}: expected {name} of shape ({length},) (a permutation of the {length} inputs), got "
                         f"{tuple(perm.shape)}")


def first_permutation_error(perm: torch.Tensor) -> Optional[str]:
    """Why the 1-D integer tensor ``perm`` (not on the meta device) is not a permutation of ``0 .. len-1``: the first
    value out of range, or the smallest value that appears twice; None when it is one. One sort, O(n log n)."""
    n = perm.shape[0]
    perm = perm.detach()
    outside = torch.nonzero((perm < 0) | (perm >= n))
    if outside.numel():
        i = int(outside[0])
        return f"position {i} holds {int(perm[i])}, outside [0, {n})"
    ordered = perm.sort().values
    repeated = torch.nonzero(ordered[1:] == ordered[:-1])
    if repeated.numel():
        value = int(ordered[int(repeated[0])])
        where = torch.nonzero(perm == value).flatten()[:2].tolist()
        return f"{value} appears more than once (positions {where[0]} and {where[1]})"
    return None


def check_permutation(fn: str, perm, length: int, name: str = "input_perm") -> None:
    """Raise unless ``perm`` is a 1-D ``int64`` tensor holding every value of ``0 .. length-1`` exactly once.

    A tensor on the meta device has no values: only its dtype and shape are checked.

    Raises:
        TypeError: not a tensor, or not ``int64``.
        ValueError: another shape, or not a permutation (the message names the first bad position or value).
    """
    check_permutation_tensor(fn, perm, length, name)
    if perm.device.type == "meta":
        return
    problem = first_permutation_error(perm)
    if problem is not None:
        raise ValueError(f"{fn}: expected {name} to be a permutation of 0..{length - 1}; {problem}")
