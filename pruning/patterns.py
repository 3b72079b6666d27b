"""Sparsity patterns: N:M, unstructured (layer-wise or global budget) and block masks.

Every function here takes *scores* (higher = more important, any real dtype) and returns a boolean
mask of the same shape, ``True`` where the weight is kept. Ties are broken deterministically by
``torch.topk`` so budgets are met exactly, whatever the scores.

Weights of ``nn.Conv2d`` are pruned in their GEMM view (:func:`weight_matrix`): ``[out, kh * kw * in]``
in channels-last order, so that N:M groups run along the input channels at each kernel position —
exactly the layout ``sparsekernels.compress_24`` expects for convolutions.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

__all__ = [
    "nm_mask",
    "unstructured_mask",
    "global_unstructured_masks",
    "block_mask",
    "Pattern",
    "parse_pattern",
    "weight_matrix",
    "matrix_to_weight",
    "pruned_count",
]


def _check_scores(fn: str, scores) -> None:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"{fn}: expected scores as a torch.Tensor, got {type(scores).__name__}")
    if scores.dtype == torch.bool or scores.is_complex():
        raise TypeError(f"{fn}: expected real-valued scores, got {scores.dtype}")
    if scores.dim() == 0:
        raise ValueError(f"{fn}: expected scores with at least one dimension, got a 0-d tensor")


def _check_sparsity(fn: str, sparsity) -> float:
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
        raise TypeError(f"{fn}: expected sparsity as a float in [0, 1], got {type(sparsity).__name__}")
    if not 0.0 <= float(sparsity) <= 1.0 or math.isnan(sparsity):
        raise ValueError(f"{fn}: expected 0 <= sparsity <= 1, got {sparsity}")
    return float(sparsity)


def pruned_count(numel: int, sparsity: float) -> int:
    """Number of elements a budget of ``sparsity`` prunes out of ``numel``: ``round(sparsity * numel)``.

    Rounding is half-to-even (Python's ``round``); this is the exact count every unstructured and block
    mask in this package achieves.
    """
    return int(round(sparsity * numel))


def _keep_topk(flat: torch.Tensor, keep: int) -> torch.Tensor:
    """Boolean mask over a 1-D tensor keeping the ``keep`` largest entries (exactly)."""
    mask = torch.zeros(flat.shape, dtype=torch.bool, device=flat.device)
    if keep > 0:
        # NaN scores would make the ranking meaningless; rank them lowest.
        clean = torch.nan_to_num(flat.to(torch.float64), nan=-math.inf)
        mask[clean.topk(keep, sorted=False).indices] = True
    return mask


def nm_mask(scores: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """Keep the ``n`` highest scores in every group of ``m`` consecutive elements of the last dimension.

    Args:
        scores: ``[..., k]`` real tensor, ``k`` a multiple of ``m``; any device.
        n: elements kept per group, ``0 <= n <= m``.
        m: group size, ``m >= 1``.

    Returns:
        ``torch.bool`` mask of the same shape with exactly ``n`` ``True`` per group (ties broken by
        ``torch.topk``). ``nm_mask(w.abs(), 2, 4)`` on a ``[out, in]`` weight gives a mask that
        ``sparsekernels.compress_24`` accepts.

    Raises:
        TypeError: ``scores`` is not a real tensor, or ``n`` / ``m`` are not integers.
        ValueError: bad ``n`` / ``m``, or the last dimension is not a multiple of ``m``.
    """
    fn = "nm_mask()"
    _check_scores(fn, scores)
    for label, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn}: expected an integer {label}, got {type(v).__name__}")
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"{fn}: expected 0 <= n <= m and m >= 1, got n={n}, m={m}")
    k = scores.shape[-1]
    if k % m != 0:
        raise ValueError(
            f"{fn}: expected the last dimension to be a multiple of m={m}, got {k} (shape {tuple(scores.shape)})"
        )
    groups = torch.nan_to_num(scores.detach().to(torch.float64), nan=-math.inf).reshape(-1, m)
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    if n > 0:
        mask.scatter_(1, groups.topk(n, dim=1, sorted=False).indices, True)
    return mask.reshape(scores.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float, *, dim: int | None = None) -> torch.Tensor:
    """Keep the highest scores so that exactly ``round(sparsity * count)`` elements are pruned.

    Args:
        scores: real tensor of any shape; any device.
        sparsity: fraction of elements to prune, in ``[0, 1]``.
        dim: ``None`` for one budget over the whole tensor (layer-wise); an integer to apply the budget
            separately along that dimension's slices (e.g. ``dim=-1`` on an ``[out, in]`` score matrix:
            every output row loses exactly ``round(sparsity * in)``, the Wanda comparison group).

    Returns:
        ``torch.bool`` mask of the same shape.

    Raises:
        TypeError / ValueError: bad scores, sparsity outside ``[0, 1]``, or ``dim`` out of range.
    """
    fn = "unstructured_mask()"
    _check_scores(fn, scores)
    sparsity = _check_sparsity(fn, sparsity)
    if dim is None:
        flat = scores.detach().reshape(-1)
        keep = flat.numel() - pruned_count(flat.numel(), sparsity)
        return _keep_topk(flat, keep).reshape(scores.shape)
    if not -scores.dim() <= dim < scores.dim():
        raise ValueError(f"{fn}: expected dim in [{-scores.dim()}, {scores.dim() - 1}], got {dim}")
    moved = scores.detach().movedim(dim, -1)
    rows = torch.nan_to_num(moved.reshape(-1, moved.shape[-1]).to(torch.float64), nan=-math.inf)
    length = rows.shape[1]
    keep = length - pruned_count(length, sparsity)
    mask = torch.zeros(rows.shape, dtype=torch.bool, device=scores.device)
    if keep > 0:
        mask.scatter_(1, rows.topk(keep, dim=1, sorted=False).indices, True)
    return mask.reshape(moved.shape).movedim(-1, dim)


def global_unstructured_masks(scores: Mapping[str, torch.Tensor], sparsity: float) -> dict[str, torch.Tensor]:
    """One budget across several tensors: prune exactly ``round(sparsity * total)`` of all their elements.

    Args:
        scores: name -> real score tensor (any shapes, one device). Scores are compared across tensors
            as they are, so they must be on a common scale (e.g. weight magnitudes).
        sparsity: fraction of all elements to prune, in ``[0, 1]``.

    Returns:
        name -> ``torch.bool`` mask, same shapes, same order as ``scores``.

    Raises:
        TypeError / ValueError: ``scores`` empty or not a mapping of tensors, tensors on different
            devices, sparsity outside ``[0, 1]``.
    """
    fn = "global_unstructured_masks()"
    if not isinstance(scores, Mapping):
        raise TypeError(f"{fn}: expected a mapping name -> score tensor, got {type(scores).__name__}")
    if len(scores) == 0:
        raise ValueError(f"{fn}: expected at least one score tensor, got an empty mapping")
    for name, s in scores.items():
        _check_scores(f"{fn} [{name!r}]", s)
    devices = {s.device for s in scores.values()}
    if len(devices) > 1:
        raise ValueError(f"{fn}: expected every score tensor on one device, got {sorted(map(str, devices))}")
    sparsity = _check_sparsity(fn, sparsity)
    flat = torch.cat([s.detach().reshape(-1).to(torch.float64) for s in scores.values()])
    keep = flat.numel() - pruned_count(flat.numel(), sparsity)
    mask = _keep_topk(flat, keep)
    out, start = {}, 0
    for name, s in scores.items():
        out[name] = mask[start : start + s.numel()].reshape(s.shape)
        start += s.numel()
    return out


def block_mask(scores: torch.Tensor, block: tuple[int, int] | int = (16, 16), sparsity: float = 0.5) -> torch.Tensor:
    """Keep or prune whole ``block[0] x block[1]`` tiles of a 2-D score matrix.

    A tile's score is the sum of its elements' scores (pass non-negative importances such as ``|w|``).
    Exactly ``round(sparsity * tiles)`` tiles are pruned.

    Args:
        scores: ``[rows, cols]`` real tensor; ``rows`` a multiple of ``block[0]``, ``cols`` of ``block[1]``.
        block: tile shape ``(block_rows, block_cols)``, or one int for square tiles.
        sparsity: fraction of tiles to prune, in ``[0, 1]``.

    Returns:
        ``torch.bool`` ``[rows, cols]`` mask, constant over every tile.

    Raises:
        TypeError / ValueError: bad scores, not 2-D, bad block shape, shape not a multiple of the
            block, sparsity outside ``[0, 1]``.
    """
    fn = "block_mask()"
    _check_scores(fn, scores)
    if isinstance(block, int) and not isinstance(block, bool):
        block = (block, block)
    if (
        not isinstance(block, (tuple, list))
        or len(block) != 2
        or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block)
    ):
        raise ValueError(f"{fn}: expected block as (rows, cols) of positive ints, got {block!r}")
    if scores.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D score matrix, got shape {tuple(scores.shape)}")
    sparsity = _check_sparsity(fn, sparsity)
    br, bc = block
    rows, cols = scores.shape
    if rows % br or cols % bc:
        raise ValueError(f"{fn}: expected a shape divisible by the block {br}x{bc}, got {rows}x{cols}")
    tiles = scores.detach().to(torch.float64).reshape(rows // br, br, cols // bc, bc).sum(dim=(1, 3))
    keep = tiles.numel() - pruned_count(tiles.numel(), sparsity)
    tile_mask = _keep_topk(tiles.reshape(-1), keep).reshape(tiles.shape)
    return tile_mask.repeat_interleave(br, 0).repeat_interleave(bc, 1)


# ---------------------------------------------------------------------------------------------------
# Pattern strings and the GEMM view of a weight
# ---------------------------------------------------------------------------------------------------

_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
_BLOCK_RE = re.compile(r"^\s*block\s*:?\s*(\d+)\s*x\s*(\d+)\s*$", re.IGNORECASE)


@dataclass(frozen=True)
class Pattern:
    """A parsed sparsity pattern.

    Attributes:
        kind: ``"nm"``, ``"unstructured"`` (layer-wise budget), ``"global"`` (one budget over every
            selected layer) or ``"block"``.
        n, m: for ``"nm"``: keep ``n`` of every ``m``.
        block: for ``"block"``: the tile shape.
    """

    kind: str
    n: int = 0
    m: int = 0
    block: tuple[int, int] = (0, 0)

    def __str__(self) -> str:
        if self.kind == "nm":
            return f"{self.n}:{self.m}"
        if self.kind == "block":
            return f"block{self.block[0]}x{self.block[1]}"
        return self.kind

    @property
    def fixed_sparsity(self) -> float | None:
        """The sparsity the pattern implies by itself (``1 - n/m`` for N:M), else ``None``."""
        return 1.0 - self.n / self.m if self.kind == "nm" else None


def parse_pattern(pattern) -> Pattern:
    """Parse ``"2:4"`` / ``"n:m"``, ``"unstructured"``, ``"global"``, ``"block16x16"`` (or ``"block:32x32"``).

    Raises:
        TypeError: not a string or :class:`Pattern`.
        ValueError: anything else, or N:M with ``n >= m`` / ``n < 1``, or a zero block.
    """
    if isinstance(pattern, Pattern):
        return pattern
    if not isinstance(pattern, str):
        raise TypeError(f"pattern: expected a string such as '2:4', got {type(pattern).__name__}")
    p = pattern.strip().lower()
    if p in ("unstructured", "global"):
        return Pattern(p)
    match = _NM_RE.match(p)
    if match:
        n, m = int(match.group(1)), int(match.group(2))
        if not 1 <= n < m:
            raise ValueError(f"pattern: expected 'n:m' with 1 <= n < m, got {pattern!r}")
        return Pattern("nm", n=n, m=m)
    match = _BLOCK_RE.match(p)
    if match:
        br, bc = int(match.group(1)), int(match.group(2))
        if br < 1 or bc < 1:
            raise ValueError(f"pattern: expected a positive block shape, got {pattern!r}")
        return Pattern("block", block=(br, bc))
    raise ValueError(
        f"pattern: expected 'n:m' (e.g. '2:4'), 'unstructured', 'global' or 'block<R>x<C>' (e.g. 'block16x16'), "
        f"got {pattern!r}"
    )


def weight_matrix(module_or_weight) -> torch.Tensor:
    """The GEMM view of a Linear / Conv2d weight: ``[out, in]``, or ``[out, kh * kw * in]`` channels-last.

    For a convolution the columns are ordered (kernel row, kernel column, input channel), i.e.
    ``weight.permute(0, 2, 3, 1).reshape(out, -1)``, so groups of consecutive columns run along the
    input channels at one kernel position. Returns a new tensor (a copy for convolutions).
    """
    w = module_or_weight.weight if isinstance(module_or_weight, nn.Module) else module_or_weight
    if w.dim() == 2:
        return w
    if w.dim() == 4:
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    raise ValueError(f"weight_matrix(): expected a 2-D or 4-D weight, got shape {tuple(w.shape)}")


def matrix_to_weight(matrix: torch.Tensor, shape: torch.Size | tuple[int, ...]) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: back to the module's weight ``shape`` (2-D or 4-D)."""
    shape = tuple(shape)
    if len(shape) == 2:
        return matrix.reshape(shape)
    if len(shape) == 4:
        out, cin, kh, kw = shape
        return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"matrix_to_weight(): expected a 2-D or 4-D shape, got {shape}")
