"""Block-sparse weight format: square blocks, CSR over block rows.

A dense weight ``W`` of shape ``[out, in]`` is cut into square ``bs x bs`` blocks (``bs`` one of
:data:`BLOCK_SIZES`). A block is kept iff any of its elements is non-zero. We store:

* ``values``: ``[nnz_blocks, bs, bs]`` in the weight's dtype -- the kept blocks, each in the weight's
  own orientation (``values[j, r, c] = W[row0 + r, col0 + c]``), ordered by block row, then by block
  column;
* ``row_ptr``: ``int32`` ``[ceil(out / bs) + 1]`` -- block row ``i`` owns ``values[row_ptr[i]:row_ptr[i + 1]]``;
* ``col_idx``: ``int32`` ``[nnz_blocks]`` -- the block column of every kept block.

Shapes that are not multiples of ``bs`` are padded with zeros *internally*: the edge blocks are stored
full size, their elements outside ``[out, in]`` are zeros, and :attr:`BlockSparseWeight.shape` keeps the
logical dense shape. Kernels mask the padded rows and columns.

A valid structure is what :func:`compress_blocks` writes: ``row_ptr`` starts at 0, never decreases and ends at
``nnz_blocks``; ``col_idx`` holds block columns in ``[0, ceil(in / bs))``, strictly increasing within a block
row; the padding of edge blocks is zero. :meth:`BlockSparseWeight.validate` checks exactly that (one pass over the
index arrays and the edge blocks); loaders call it, the per-call op checks do not. The Triton kernel never reads
outside its tensors whatever the indices hold, and every backend adds blocks stored at one position.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import SUPPORTED_DTYPES, CompressedWeight

__all__ = [
    "BlockSparseWeight", "compress_blocks", "block_sparsity", "cdiv", "check_block_structure", "BLOCK_SIZES",
    "INDEX_DTYPE", "SUPPORTED_DTYPES",
]

BLOCK_SIZES = (16, 32, 64)
INDEX_DTYPE = torch.int32


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for positive ints."""
    return -(-a // b)


def _check_block_size(fn: str, block_size) -> int:
    if isinstance(block_size, bool) or not isinstance(block_size, int):
        raise TypeError(f"{fn}: expected block_size to be an int in {BLOCK_SIZES}, got {type(block_size).__name__}")
    if block_size not in BLOCK_SIZES:
        raise ValueError(f"{fn}: expected block_size in {BLOCK_SIZES}, got {block_size}")
    return block_size


def _check_weight(fn: str, weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D weight [out, in], got {weight.dim()}-D with shape {tuple(weight.shape)}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: expected dtype float16, bfloat16 or float32, got {weight.dtype}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"{fn}: expected a non-empty weight, got shape {tuple(weight.shape)}")
    if weight.device.type == "meta":
        raise ValueError(f"{fn}: expected a weight with data, got a tensor on the meta device")


def _first(mask: torch.Tensor) -> int:
    """Index of the first True of a 1-D bool tensor, or -1."""
    hit = torch.nonzero(mask)
    return int(hit[0, 0]) if hit.numel() else -1


def check_block_structure(fn: str, row_ptr: torch.Tensor, col_idx: torch.Tensor, n_block_cols: int) -> None:
    """Raise ``ValueError`` naming ``fn`` unless ``row_ptr`` / ``col_idx`` are a structure :func:`compress_blocks`
    could have written: ``row_ptr`` starts at 0, never decreases and ends at ``col_idx.numel()``; every ``col_idx``
    is in ``[0, n_block_cols)`` and strictly increasing within its block row.

    Args:
        row_ptr, col_idx: 1-D integer tensors (shapes and dtypes are the caller's to check), not on the meta device.
        n_block_cols: ``ceil(in / bs)``.
    """
    rp = row_ptr.detach().to(torch.int64)
    ci = col_idx.detach().to(torch.int64)
    nnz = ci.numel()
    if int(rp[0]) != 0:
        raise ValueError(f"{fn}: expected block_row_ptr[0] == 0, got {int(rp[0])}")
    i = _first(rp[1:] < rp[:-1])
    if i >= 0:
        raise ValueError(
            f"{fn}: expected a non-decreasing block_row_ptr; block_row_ptr[{i + 1}] = {int(rp[i + 1])} is less than "
            f"block_row_ptr[{i}] = {int(rp[i])}"
        )
    if int(rp[-1]) != nnz:
        raise ValueError(
            f"{fn}: expected block_row_ptr[-1] == nnz_blocks = {nnz} (the number of stored blocks), got {int(rp[-1])}"
        )
    j = _first((ci < 0) | (ci >= n_block_cols))
    if j >= 0:
        raise ValueError(f"{fn}: expected block_col_idx in [0, {n_block_cols}), got block_col_idx[{j}] = {int(ci[j])}")
    if nnz > 1:
        starts = torch.zeros(nnz, dtype=torch.bool, device=ci.device)
        starts[rp[:-1][rp[:-1] < nnz]] = True
        j = _first((ci[1:] <= ci[:-1]) & ~starts[1:])
        if j >= 0:
            raise ValueError(
                f"{fn}: expected block columns strictly increasing within a block row; block_col_idx[{j + 1}] = "
                f"{int(ci[j + 1])} follows {int(ci[j])} in the same block row"
            )


def _blocks(weight: torch.Tensor, block_size: int) -> torch.Tensor:
    """Zero-pad ``weight`` to whole blocks and view it as ``[n_block_rows, n_block_cols, bs, bs]``."""
    out, k = weight.shape
    nbr, nbc = cdiv(out, block_size), cdiv(k, block_size)
    padded = torch.nn.functional.pad(weight, (0, nbc * block_size - k, 0, nbr * block_size - out))
    return padded.reshape(nbr, block_size, nbc, block_size).permute(0, 2, 1, 3)


def block_sparsity(weight: torch.Tensor, block_size: int) -> float:
    """Fraction of ``block_size`` blocks of ``weight`` (zero-padded to whole blocks) that are all zero.

    Args:
        weight: ``[out, in]`` float16 / bfloat16 / float32 tensor.
        block_size: one of :data:`BLOCK_SIZES`.

    Raises:
        TypeError / ValueError: as :func:`compress_blocks`.
    """
    fn = "block_sparsity()"
    _check_weight(fn, weight)
    _check_block_size(fn, block_size)
    kept = (_blocks(weight.detach(), block_size) != 0).any(dim=-1).any(dim=-1)
    return 1.0 - float(kept.sum()) / kept.numel()


@dataclass(frozen=True)
class BlockSparseWeight(CompressedWeight):
    """A block-sparse weight. Build it with :func:`compress_blocks`.

    Attributes:
        values: ``[nnz_blocks, bs, bs]``, the kept blocks (same dtype and device as the dense weight).
        row_ptr: ``int32`` ``[ceil(out / bs) + 1]``, CSR row pointer over block rows.
        col_idx: ``int32`` ``[nnz_blocks]``, block column of each kept block.
        shape: the logical dense shape ``(out, in)`` (not padded).
        block_size: ``bs``, one of 16, 32, 64.
    """

    values: torch.Tensor
    row_ptr: torch.Tensor
    col_idx: torch.Tensor
    shape: tuple[int, int]
    block_size: int

    def __post_init__(self):
        fn = "BlockSparseWeight"
        _check_block_size(fn, self.block_size)
        shape = self.shape
        if (not isinstance(shape, tuple) or len(shape) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in shape)):
            raise ValueError(f"{fn}: expected shape (out, in) of two positive ints, got {shape!r}")
        for name in ("values", "row_ptr", "col_idx"):
            if not isinstance(getattr(self, name), torch.Tensor):
                raise TypeError(f"{fn}: expected {name} to be a tensor, got {type(getattr(self, name)).__name__}")
        if not self.values.dtype.is_floating_point:
            raise TypeError(f"{fn}: expected floating-point values, got {self.values.dtype}")
        out, k = shape
        bs = self.block_size
        if self.values.dim() != 3 or tuple(self.values.shape[1:]) != (bs, bs):
            raise ValueError(f"{fn}: expected values of shape [nnz_blocks, {bs}, {bs}], got {tuple(self.values.shape)}")
        nnz = self.values.shape[0]
        if self.row_ptr.dtype != INDEX_DTYPE or tuple(self.row_ptr.shape) != (cdiv(out, bs) + 1,):
            raise ValueError(
                f"{fn}: expected int32 row_ptr of shape ({cdiv(out, bs) + 1},), "
                f"got {self.row_ptr.dtype} {tuple(self.row_ptr.shape)}"
            )
        if self.col_idx.dtype != INDEX_DTYPE or tuple(self.col_idx.shape) != (nnz,):
            raise ValueError(
                f"{fn}: expected int32 col_idx of shape ({nnz},), got {self.col_idx.dtype} {tuple(self.col_idx.shape)}"
            )
        if not (self.values.device == self.row_ptr.device == self.col_idx.device):
            raise ValueError(
                f"{fn}: values on {self.values.device}, row_ptr on {self.row_ptr.device}, "
                f"col_idx on {self.col_idx.device}; expected one device"
            )

    def validate(self) -> "BlockSparseWeight":
        """Check the structure (:func:`check_block_structure`) and that the padding of edge blocks is zero: one pass
        over the index arrays and the edge blocks, for loaders. Returns ``self``.

        Raises:
            ValueError: naming the first offending entry.
        """
        if self.values.device.type == "meta":
            return self
        fn = "BlockSparseWeight.validate()"
        nbr, nbc = self.grid
        check_block_structure(fn, self.row_ptr, self.col_idx, nbc)
        out, k = self.shape
        bs = self.block_size
        values = self.values.detach()
        if out % bs:
            last_row = values[int(self.row_ptr[nbr - 1]):int(self.row_ptr[nbr]), out % bs:]
            j = _first(last_row.flatten(1).ne(0).any(1))
            if j >= 0:
                raise ValueError(
                    f"{fn}: expected zeros in the padding rows {out % bs}..{bs - 1} of the edge blocks of block row "
                    f"{nbr - 1} (out = {out}); block {int(self.row_ptr[nbr - 1]) + j} has a non-zero there"
                )
        if k % bs:
            edge = torch.nonzero(self.col_idx == nbc - 1).reshape(-1)
            j = _first(values[edge, :, k % bs:].flatten(1).ne(0).any(1))
            if j >= 0:
                raise ValueError(
                    f"{fn}: expected zeros in the padding columns {k % bs}..{bs - 1} of the edge blocks of block "
                    f"column {nbc - 1} (in = {k}); block {int(edge[j])} has a non-zero there"
                )
        return self

    @property
    def nnz_blocks(self) -> int:
        return self.values.shape[0]

    @property
    def grid(self) -> tuple[int, int]:
        """Number of block rows and block columns ``(ceil(out / bs), ceil(in / bs))``."""
        return cdiv(self.shape[0], self.block_size), cdiv(self.shape[1], self.block_size)

    @property
    def density(self) -> float:
        """Fraction of blocks kept: ``nnz_blocks / (block rows * block columns)``."""
        nbr, nbc = self.grid
        return self.nnz_blocks / (nbr * nbc)

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: kept blocks plus the two index arrays."""
        return self.values.nbytes + self.row_ptr.nbytes + self.col_idx.nbytes

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()

    def block_rows(self) -> torch.Tensor:
        """Block row of every kept block: ``int64`` ``[nnz_blocks]``."""
        counts = (self.row_ptr[1:] - self.row_ptr[:-1]).to(torch.int64)
        return torch.repeat_interleave(torch.arange(counts.numel(), device=counts.device), counts)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight (exact round trip of :func:`compress_blocks`; blocks stored at one position
        add, as in every kernel)."""
        out, k = self.shape
        bs = self.block_size
        nbr, nbc = self.grid
        grid = torch.zeros(nbr, nbc, bs, bs, dtype=self.values.dtype, device=self.values.device)
        grid.index_put_((self.block_rows(), self.col_idx.to(torch.int64)), self.values, accumulate=True)
        return grid.permute(0, 2, 1, 3).reshape(nbr * bs, nbc * bs)[:out, :k].contiguous()

    def to(self, *args, **kwargs) -> "BlockSparseWeight":
        """Move to another device or cast the values (the index arrays stay ``int32``)."""
        values = self.values.to(*args, **kwargs)
        return BlockSparseWeight(
            values,
            self.row_ptr.to(device=values.device),
            self.col_idx.to(device=values.device),
            self.shape,
            self.block_size,
        )

    def __repr__(self) -> str:
        return (
            f"BlockSparseWeight(shape={self.shape}, block_size={self.block_size}, nnz_blocks={self.nnz_blocks}, "
            f"density={self.density:.3f}, dtype={self.dtype}, device={self.device}, "
            f"nbytes={self.nbytes} ({self.nbytes / max(self.dense_nbytes, 1):.4f} of dense))"
        )


def compress_blocks(weight: torch.Tensor, block_size: int) -> BlockSparseWeight:
    """Compress a weight into square blocks, keeping a block iff any of its elements is non-zero.

    Args:
        weight: ``[out, in]`` float16 / bfloat16 / float32 tensor on any device (not meta). ``out`` and
            ``in`` need not be multiples of ``block_size``: the edge blocks are zero-padded internally.
        block_size: 16, 32 or 64.

    Returns:
        A :class:`BlockSparseWeight` on the weight's device; ``compress_blocks(w, bs).to_dense()`` equals
        ``w`` exactly.

    Raises:
        TypeError: ``weight`` not a tensor or of an unsupported dtype; ``block_size`` not an int.
        ValueError: ``weight`` not 2-D, empty or on the meta device; ``block_size`` not 16, 32 or 64.
    """
    fn = "compress_blocks()"
    _check_weight(fn, weight)
    _check_block_size(fn, block_size)
    weight = weight.detach()
    out, k = weight.shape
    blocks = _blocks(weight, block_size)  # [nbr, nbc, bs, bs]
    kept = (blocks != 0).any(dim=-1).any(dim=-1)  # [nbr, nbc]
    rows, cols = torch.nonzero(kept, as_tuple=True)  # row-major: sorted by row, then column
    values = blocks[rows, cols].contiguous()
    counts = kept.sum(dim=1)
    row_ptr = torch.zeros(kept.shape[0] + 1, dtype=torch.int64, device=weight.device)
    row_ptr[1:] = torch.cumsum(counts, 0)
    return BlockSparseWeight(values, row_ptr.to(INDEX_DTYPE), cols.to(INDEX_DTYPE), (out, k), block_size)
