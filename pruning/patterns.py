"""Sparsity patterns: N:M, unstructured (layer-wise or global budget) and block masks.

Every function here takes *scores* (higher = more important, any real dtype) and returns a boolean
mask of the same shape, ``True`` where the weight is kept. Ties are broken deterministically by
``torch.topk`` so budgets are met exactly, whatever the scores.

Weights are pruned in their GEMM view (:func:`weight_matrix`, ``[out, cols]``): a Linear's weight as it is,
an ``nn.Conv2d``'s as ``[out, kh * kw * in]`` in channels-last order, so that N:M groups run along the input
channels at each kernel position (exactly the layout ``sparsekernels.compress_24`` expects for convolutions),
and a Hugging Face ``Conv1D``'s (GPT-2: ``y = x @ W + b``, weight stored ``[in, out]``) as ``weight.T``.
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
    "scores_to_mask",
    "INPUT_PERM",
    "input_perm_problem",
    "input_column_order",
    "in_column_order",
    "is_conv1d",
    "gemm_shape",
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


def scores_to_mask(scores: torch.Tensor, pat: Pattern, sparsity: float | None, row_budget: bool) -> torch.Tensor:
    """The keep mask of one layer's GEMM-view ``scores`` ``[out, cols]`` under ``pat``.

    Args:
        scores: real ``[out, cols]`` scores (higher = more important).
        pat: an ``"nm"``, ``"unstructured"`` or ``"block"`` :class:`Pattern` (``"global"`` spans layers: use
            :func:`global_unstructured_masks`).
        sparsity: the layer's budget (``None`` for N:M).
        row_budget: an unstructured budget applies to each output row (Wanda's comparison group).
    """
    if pat.kind == "nm":
        return nm_mask(scores, pat.n, pat.m)
    if pat.kind == "block":
        return block_mask(scores, pat.block, sparsity)
    return unstructured_mask(scores, sparsity, dim=-1 if row_budget else None)


def in_column_order(solve, matrix: torch.Tensor, order: torch.Tensor | None, *columns_of):
    """``solve(matrix, *columns_of)`` with the GEMM columns taken in ``order`` (:func:`input_column_order`; ``None``:
    call it as it is), its results put back in the natural order.

    ``columns_of`` are per-column statistics permuted along with the columns: ``[cols]`` vectors and
    ``[cols, cols]`` matrices (permuted on both axes), or None. ``solve`` returns a tensor or a tuple of tensors (or
    None) shaped like ``matrix``, whose columns are moved back.
    """
    if order is None:
        return solve(matrix, *columns_of)
    order = order.to(matrix.device)
    moved = [None if t is None else (t.index_select(0, order.to(t.device)) if t.dim() == 1
                                     else t.index_select(0, order.to(t.device)).index_select(1, order.to(t.device)))
             for t in columns_of]
    out = solve(matrix.index_select(1, order), *moved)
    back = torch.argsort(order)

    def restore(t):
        return None if t is None else t.index_select(1, back.to(t.device))

    return tuple(restore(t) for t in out) if isinstance(out, tuple) else restore(out)


INPUT_PERM = "input_perm"


def input_perm_problem(module: nn.Module) -> str | None:
    """Why the ``input_perm`` buffer ``module`` carries is unusable, or None (also when it carries none).

    A layer carries ``input_perm`` when its producers could not be reordered for it
    (:func:`pruning.channels.permute_for_nm`): an ``int64`` permutation of its input features (Linear, ``Conv1D``)
    or channels (Conv2d, the same at every kernel position) that the sparse runtime gathers its input by.
    """
    perm = module._buffers.get(INPUT_PERM)
    if perm is None:
        return None
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.dim() != 1:
        return f"its input_perm is not a 1-D int64 tensor (got {getattr(perm, 'dtype', type(perm).__name__)})"
    size, want = perm.shape[0], input_width(module)
    if size != want:
        unit = "channel" if isinstance(module, nn.Conv2d) else "feature"
        return f"its input_perm has {size} entries, expected {want} (one per input {unit})"
    if perm.device.type == "meta":
        return "its input_perm is on the meta device (no values)"
    if not torch.equal(perm.detach().cpu().sort().values, torch.arange(size)):
        return f"its input_perm is not a permutation of 0..{size - 1}"
    return None


def input_width(module: nn.Module) -> int:
    """The length of a layer's ``input_perm``: its input channels (Conv2d) or input features (Linear, ``Conv1D``)."""
    return module.weight.shape[1] if isinstance(module, nn.Conv2d) else gemm_shape(module)[1]


def input_column_order(module: nn.Module, pat: Pattern) -> torch.Tensor | None:
    """The GEMM-view column order an N:M mask of ``module`` is chosen in: ``None`` (the natural one) unless ``pat``
    is N:M and the layer carries an ``input_perm`` (see :func:`input_perm_problem`). Then column ``j * L + i`` of
    the stored order is column ``j * L + input_perm[i]`` of :func:`weight_matrix` (``L`` its length), the order
    the sparse runtime compresses the weight in, so every group of ``m`` consecutive *stored* columns keeps at most
    ``n``. Returns an ``int64`` index on the CPU.

    Raises:
        ValueError: the buffer is not a usable permutation (the message says why).
    """
    if pat.kind != "nm" or INPUT_PERM not in module._buffers:
        return None
    problem = input_perm_problem(module)
    if problem is not None:
        raise ValueError(f"layer {type(module).__name__}: {problem}")
    perm = module._buffers[INPUT_PERM].detach().cpu()
    cols, size = gemm_shape(module)[1], perm.shape[0]
    return (torch.arange(0, cols, size)[:, None] + perm[None, :]).reshape(-1)


def is_conv1d(module) -> bool:
    """Whether ``module`` is a Hugging Face ``transformers.pytorch_utils.Conv1D`` (GPT-2's projections: weight
    ``[in, out]``, ``y = x @ W + b``), recognised by class name and module prefix without importing transformers."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (cls.__name__ == "Conv1D" and cls.__module__.startswith("transformers.")
            and isinstance(weight, torch.Tensor) and weight.dim() == 2)


def gemm_shape(module: nn.Module) -> tuple[int, int]:
    """``(out, cols)``: the shape of the layer's GEMM view (:func:`weight_matrix`), read from the weight's shape
    only (so it works on the meta device)."""
    shape = tuple(module.weight.shape)
    if is_conv1d(module):
        return shape[1], shape[0]
    return shape[0], math.prod(shape[1:])


def weight_matrix(module_or_weight, *, transposed: bool | None = None) -> torch.Tensor:
    """The GEMM view ``[out, cols]`` of a Linear / Conv2d / Hugging Face ``Conv1D`` weight (or of any tensor shaped
    like one, e.g. its scores or mask).

    A Linear weight is returned as it is; a convolution's columns are ordered (kernel row, kernel column, input
    channel), i.e. ``weight.permute(0, 2, 3, 1).reshape(out, -1)`` (a copy), so groups of consecutive columns run
    along the input channels at one kernel position; a ``Conv1D`` weight (``[in, out]``) is viewed as ``weight.T``.

    Args:
        module_or_weight: a layer (its ``weight`` is taken, and a ``Conv1D`` is recognised) or a 2-D / 4-D tensor.
        transposed: for a tensor: whether it is laid out ``[in, out]`` like a ``Conv1D`` weight. ``None`` (the
            default) means: as the module says, or ``False`` for a tensor.

    Raises:
        ValueError: not a 2-D or 4-D weight, or ``transposed`` on a 4-D one.
    """
    if isinstance(module_or_weight, nn.Module):
        w = module_or_weight.weight
        if transposed is None:
            transposed = is_conv1d(module_or_weight)
    else:
        w = module_or_weight
    if w.dim() == 2:
        return w.T if transposed else w
    if w.dim() == 4 and not transposed:
        return w.permute(0, 2, 3, 1).reshape(w.shape[0], -1)
    raise ValueError(f"weight_matrix(): expected a 2-D or 4-D weight (a 4-D one not transposed), got shape "
                     f"{tuple(w.shape)}{' transposed' if transposed else ''}")


def matrix_to_weight(matrix: torch.Tensor, shape, *, transposed: bool = False) -> torch.Tensor:
    """Inverse of :func:`weight_matrix`: a GEMM-view ``[out, cols]`` tensor back in the layer's weight layout.

    Args:
        matrix: ``[out, cols]``.
        shape: the weight's shape (2-D or 4-D), or the layer itself (its weight's shape, and ``Conv1D``'s
            ``[in, out]`` layout, are then taken from it).
        transposed: with a shape: the weight is laid out ``[in, out]`` (a ``Conv1D``).

    Raises:
        ValueError: a shape that is neither 2-D nor 4-D.
    """
    if isinstance(shape, nn.Module):
        transposed = is_conv1d(shape)
        shape = shape.weight.shape
    shape = tuple(shape)
    if len(shape) == 2:
        return matrix.T.reshape(shape) if transposed else matrix.reshape(shape)
    if len(shape) == 4 and not transposed:
        out, cin, kh, kw = shape
        return matrix.reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()
    raise ValueError(f"matrix_to_weight(): expected a 2-D or 4-D shape, got {shape}")
