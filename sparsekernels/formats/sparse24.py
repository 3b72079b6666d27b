"""2:4 semi-structured weight format.

A 2:4 weight keeps at most 2 non-zeros in every group of 4 consecutive elements along the input
(last) dimension. We store, for a dense weight ``W`` of shape ``[out, in]``:

* ``values``: ``[out, in // 2]`` in the weight's dtype -- the two kept values of each group, in
  increasing column order (a group with fewer than two non-zeros stores explicit zeros);
* ``meta``: ``[out, ceil(in / 8)]`` ``uint8`` -- the 2-bit in-group position of every kept value.
  Byte ``b`` of a row describes groups ``2b`` (low nibble) and ``2b + 1`` (high nibble); inside a
  nibble, bits 0-1 hold the position of the first kept value and bits 2-3 the second.

Valid metadata is what :func:`compress_24` writes: two distinct positions per group in increasing order (six
nibble values), and a zero high nibble in the last byte of a row when the group count is odd.
:func:`check_metadata` (and :meth:`Sparse24Weight.validate`) checks exactly that, in one pass over the metadata;
loaders call it, the per-call op checks do not. Whatever the metadata holds, every backend expands it the same
way: a stored value lands at its position, and two values stored at one position add.

For fp16/bf16 that is ``2 * in/2 + in/8 = 1.125 * in`` bytes per row against ``2 * in`` dense bytes:
0.5625 of the dense size, the bound that makes memory-bound (few-token) layers up to 1.78x faster.

For ``nn.Conv2d`` weights, callers view the weight as ``[out, kh * kw * in]`` in channels-last order
(``weight.permute(0, 2, 3, 1)``) so that groups run along input channels at each kernel position.

A weight may carry an input permutation (``input_perm``, :mod:`sparsekernels.formats.permutation`): an ``int64``
vector of length ``L`` dividing ``in`` (``in`` itself for a Linear, ``in_channels`` for a conv's channels-last view,
the same permutation at every kernel position). ``values`` / ``meta`` then describe the *stored* matrix, the dense
weight with its columns permuted inside every block of ``L``: stored column ``j * L + i`` is dense column
``j * L + input_perm[i]``, and it is in that order that every group of 4 keeps at most 2 values. The op gathers its
input the same way, so ``y = x @ W.T`` with ``W = w24.to_dense()`` in the original order.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from .common import SUPPORTED_DTYPES, CompressedWeight
from .permutation import PERM_DTYPE, check_permutation, first_permutation_error

__all__ = [
    "Sparse24Weight", "compress_24", "is_24_sparse", "first_non24_group", "SUPPORTED_DTYPES", "pack_indices",
    "unpack_indices", "conv_weight_to_2d", "conv_weight_from_2d", "require_24_sparse", "first_bad_metadata",
    "check_metadata", "zero_weight_metadata", "permute_columns", "unpermute_columns",
]



def _check_weight(fn: str, weight) -> None:
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"{fn}: expected a torch.Tensor weight, got {type(weight).__name__}")
    if weight.dim() != 2:
        raise ValueError(
            f"{fn}: expected a 2-D weight [out, in], got {weight.dim()}-D with shape {tuple(weight.shape)}"
            " (view a Conv2d weight as weight.permute(0, 2, 3, 1).reshape(out, -1) first)"
        )
    if not weight.dtype.is_floating_point:
        raise TypeError(f"{fn}: expected a floating-point weight (float16, bfloat16, float32), got {weight.dtype}")
    if weight.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: expected dtype float16, bfloat16 or float32, got {weight.dtype}")
    if weight.shape[1] % 4 != 0:
        raise ValueError(
            f"{fn}: expected the input dimension to be a multiple of 4 (groups of 4), got in={weight.shape[1]}"
        )
    if weight.numel() == 0:
        raise ValueError(f"{fn}: expected a non-empty weight, got shape {tuple(weight.shape)}")


def _group_nonzeros(weight: torch.Tensor) -> torch.Tensor:
    out, k = weight.shape
    return (weight != 0).reshape(out, k // 4, 4)


# Rows checked per step by first_non24_group: its temporaries (a bool and a count per element) stay a few MB
# instead of 1.6x the weight, so checking a large layer does not leave the allocator holding freed memory.
_CHECK_ELEMENTS = 1 << 20


def first_non24_group(weight: torch.Tensor) -> Optional[tuple[int, int, int]]:
    """The first group of 4 (row-major) of a 2-D ``weight`` (``in`` a multiple of 4) holding more than 2
    non-zeros, as ``(row, group, count)``; None when ``weight`` is 2:4 sparse."""
    weight = weight.detach()
    step = max(1, _CHECK_ELEMENTS // max(weight.shape[1], 1))
    for start in range(0, weight.shape[0], step):
        counts = _group_nonzeros(weight[start:start + step]).sum(-1, dtype=torch.int8)  # [rows, G]
        bad = torch.nonzero((counts > 2).reshape(-1))
        if bad.numel():
            row, group = divmod(int(bad[0]), counts.shape[1])
            return start + row, group, int(counts[row, group])
    return None


def is_24_sparse(weight: torch.Tensor) -> bool:
    """True if ``weight`` (2-D, last dim a multiple of 4) has at most 2 non-zeros in every group of 4."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[1] % 4 != 0:
        return False
    return first_non24_group(weight) is None


def require_24_sparse(fn: str, weight: torch.Tensor) -> None:
    """Raise ``ValueError`` naming the first group of 4 of the 2-D ``weight`` with more than 2 non-zeros."""
    bad = first_non24_group(weight)
    if bad is not None:
        row, group, count = bad
        raise ValueError(
            f"{fn}: expected a 2-D weight whose every group of 4 along the input dimension has at most 2 "
            f"non-zeros; row {row}, group {group} (columns {4 * group}..{4 * group + 3}) has "
            f"{count}. Prune it first, e.g. with pruning.nm_mask(scores, 2, 4)."
        )


def pack_indices(idx: torch.Tensor) -> torch.Tensor:
    """Pack in-group positions ``idx`` (``[out, G, 2]``, values 0..3) into ``uint8`` ``[out, ceil(G / 2)]``."""
    out, groups, _ = idx.shape
    nibble = (idx[..., 0] | (idx[..., 1] << 2)).to(torch.uint8)  # [out, G]
    if groups % 2:
        nibble = torch.cat([nibble, nibble.new_zeros(out, 1)], dim=1)
    nibble = nibble.reshape(out, -1, 2)
    return (nibble[..., 0] | (nibble[..., 1] << 4)).contiguous()


def unpack_indices(meta: torch.Tensor, groups: int) -> torch.Tensor:
    """Inverse of :func:`pack_indices`: ``uint8`` ``[out, ceil(G / 2)]`` -> ``int64`` ``[out, G, 2]``."""
    m = meta.to(torch.int64)
    nibble = torch.stack([m & 0xF, (m >> 4) & 0xF], dim=-1).reshape(meta.shape[0], -1)[:, :groups]
    return torch.stack([nibble & 0x3, (nibble >> 2) & 0x3], dim=-1)


def zero_weight_metadata(out: int, in_features: int, *, device=None) -> torch.Tensor:
    """The metadata :func:`compress_24` writes for an all-zero ``[out, in_features]`` weight: positions 0 and 1
    in every group (nibble ``0x4``), and a zero padding nibble when the group count is odd."""
    groups = in_features // 4
    meta = torch.full((out, (groups + 1) // 2), 0x44, dtype=torch.uint8, device=device)
    if groups % 2:
        meta[:, -1] = 0x04
    return meta


def first_bad_metadata(meta: torch.Tensor, groups: int) -> Optional[tuple[int, int, int]]:
    """The first group (row-major) of packed 2:4 metadata that :func:`compress_24` would not have written.

    Args:
        meta: ``uint8`` ``[out, ceil(groups / 2)]`` (shapes are the caller's to check), not on the meta device.
        groups: the number of groups of 4 per row, ``in / 4``.

    Returns:
        ``(row, group, nibble)`` of the first group whose two positions are not distinct and increasing, or, when
        ``groups`` is odd, whose unused high nibble in the last byte (``group == groups``) is not zero; None
        when every group is valid.
    """
    meta = meta.detach()
    step = max(1, _CHECK_ELEMENTS // max(meta.shape[1], 1))
    for start in range(0, meta.shape[0], step):
        chunk = meta[start:start + step]
        nibbles = torch.stack([chunk & 0xF, chunk >> 4], dim=-1).reshape(chunk.shape[0], -1)  # [rows, 2B]
        bad = (nibbles & 0x3) >= (nibbles >> 2)
        if nibbles.shape[1] > groups:  # the padding nibble of an odd group count
            bad[:, groups:] = nibbles[:, groups:] != 0
        hit = torch.nonzero(bad.reshape(-1))
        if hit.numel():
            row, group = divmod(int(hit[0]), nibbles.shape[1])
            return start + row, group, int(nibbles[row, group])
    return None


def check_metadata(fn: str, meta: torch.Tensor, groups: int) -> None:
    """Raise ``ValueError`` naming ``fn`` and the first group of ``meta`` that :func:`first_bad_metadata` finds."""
    bad = first_bad_metadata(meta, groups)
    if bad is None:
        return
    row, group, nibble = bad
    if group == groups:
        raise ValueError(
            f"{fn}: expected the unused high nibble of the last metadata byte of each row to be 0 ({groups} groups "
            f"per row); row {row} has {nibble:#x}"
        )
    raise ValueError(
        f"{fn}: expected 2:4 metadata with two distinct positions in increasing order per group of 4; row {row}, "
        f"group {group} (columns {4 * group}..{4 * group + 3}) holds positions {nibble & 0x3} and {nibble >> 2}"
    )


def permute_columns(weight2d: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The stored order of a dense ``[out, k]`` weight: column ``j * L + i`` of the result is column
    ``j * L + perm[i]`` of ``weight2d`` (``L = len(perm)`` divides ``k``; ``perm`` a permutation)."""
    out, k = weight2d.shape
    size = perm.shape[0]
    return weight2d.reshape(out, k // size, size).index_select(2, perm).reshape(out, k)


def unpermute_columns(stored: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`permute_columns`: the dense weight in its original column order (a new tensor).

    Any ``perm`` contents are accepted and give the weight every kernel computes with: a column stored at an
    out-of-range index is dropped (the kernels read a zero input for it), columns stored at one index add.
    """
    out, k = stored.shape
    size = perm.shape[0]
    blocks = stored.reshape(out, k // size, size)
    if perm.device.type == "meta" or first_permutation_error(perm) is None:
        return torch.empty_like(blocks).index_copy_(2, perm, blocks).reshape(out, k)
    inside = (perm >= 0) & (perm < size)
    dense = torch.zeros(out, k // size, size + 1, dtype=stored.dtype, device=stored.device)
    dense.index_add_(2, torch.where(inside, perm, size), blocks)  # the extra column collects out-of-range ones
    return dense[..., :size].reshape(out, k)


@dataclass(frozen=True)
class Sparse24Weight(CompressedWeight):
    """A 2:4-compressed weight. Build it with :func:`compress_24`.

    Attributes:
        values: ``[out, in // 2]``, the kept values, same dtype and device as the dense weight.
        meta: ``uint8`` ``[out, ceil(in / 8)]``, packed 2-bit positions (see the module docstring).
        shape: the dense shape ``(out, in)``.
        input_perm: None, or ``int64`` ``[L]`` (``L`` dividing ``in``) on the values' device: the input permutation
            the stored order follows (see the module docstring). ``values`` and ``meta`` then hold the weight in
            that order; :meth:`to_dense` gives it back in the original one, and the ops gather their input by it.
    """

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]
    input_perm: Optional[torch.Tensor] = None

    def __post_init__(self):
        shape = self.shape
        if (not isinstance(shape, tuple) or len(shape) != 2
                or not all(isinstance(d, int) and not isinstance(d, bool) for d in shape)
                or shape[0] < 1 or shape[1] < 4 or shape[1] % 4):
            raise ValueError(
                f"Sparse24Weight: expected shape (out, in) with out >= 1 and in a positive multiple of 4, got {shape!r}"
            )
        out, k = shape
        if not isinstance(self.values, torch.Tensor) or not isinstance(self.meta, torch.Tensor):
            raise TypeError(
                f"Sparse24Weight: expected values and meta to be tensors, got {type(self.values).__name__} and "
                f"{type(self.meta).__name__}"
            )
        if not self.values.dtype.is_floating_point:
            raise TypeError(f"Sparse24Weight: expected floating-point values, got {self.values.dtype}")
        if self.values.shape != (out, k // 2):
            raise ValueError(f"Sparse24Weight: expected values of shape {(out, k // 2)}, got {tuple(self.values.shape)}")
        if self.meta.dtype != torch.uint8 or self.meta.shape != (out, (k + 7) // 8):
            raise ValueError(
                f"Sparse24Weight: expected uint8 meta of shape {(out, (k + 7) // 8)}, "
                f"got {self.meta.dtype} {tuple(self.meta.shape)}"
            )
        if self.values.device != self.meta.device:
            raise ValueError(f"Sparse24Weight: values on {self.values.device} but meta on {self.meta.device}")
        perm = self.input_perm
        if perm is not None:
            if not isinstance(perm, torch.Tensor) or perm.dtype != PERM_DTYPE or perm.dim() != 1:
                got = f"{perm.dtype} {tuple(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__
                raise TypeError(f"Sparse24Weight: expected input_perm to be None or a 1-D {PERM_DTYPE} tensor, got {got}")
            if perm.shape[0] < 1 or k % perm.shape[0]:
                raise ValueError(f"Sparse24Weight: expected input_perm of a length dividing in={k}, got {perm.shape[0]}")
            if perm.device != self.values.device:
                raise ValueError(f"Sparse24Weight: values on {self.values.device} but input_perm on {perm.device}")

    def validate(self) -> "Sparse24Weight":
        """Check the metadata (see :func:`first_bad_metadata`; one pass over it) and that ``input_perm``, if any, is
        a permutation: the loaders' check. Returns ``self``.

        Raises:
            ValueError: a group whose positions are not two distinct increasing ones, or a non-zero padding
                nibble (the message names the row and group; columns in the stored order); an ``input_perm`` that
                is not a permutation (the message names the first bad position or value).
        """
        if self.meta.device.type != "meta":
            check_metadata("Sparse24Weight.validate()", self.meta, self.shape[1] // 4)
        if self.input_perm is not None:
            check_permutation("Sparse24Weight.validate()", self.input_perm, self.input_perm.shape[0])
        return self

    @property
    def nbytes(self) -> int:
        """Bytes of everything stored: the kept values plus the packed metadata (and the input permutation)."""
        extra = self.input_perm.nbytes if self.input_perm is not None else 0
        return self.values.nbytes + self.meta.nbytes + extra

    @property
    def dense_nbytes(self) -> int:
        return self.shape[0] * self.shape[1] * self.values.element_size()

    def indices(self) -> torch.Tensor:
        """Column index in the dense weight (original order) of every stored value: ``int64`` ``[out, in // 2]``."""
        out, k = self.shape
        pos = unpack_indices(self.meta, k // 4)  # [out, G, 2]
        base = torch.arange(0, k, 4, device=self.meta.device).view(1, -1, 1)
        cols = (base + pos).reshape(out, k // 2)
        if self.input_perm is not None:
            size = self.input_perm.shape[0]
            cols = cols - cols % size + self.input_perm[cols % size]
        return cols

    def stored_dense(self) -> torch.Tensor:
        """The dense ``[out, in]`` matrix in the stored order (``to_dense()`` with its columns permuted by
        ``input_perm``; the same as :meth:`to_dense` without one). Values stored at one position add."""
        out, k = self.shape
        groups = k // 4
        # Scatter inside each group of 4 (positions 0..3) rather than with full column indices: no int64
        # [out, in/2] index tensor to build; 3x faster on the CPU (4096x4096 fp32: 136 -> 44 ms).
        pos = unpack_indices(self.meta, groups)  # [out, G, 2]
        dense = torch.zeros(out, groups, 4, dtype=self.values.dtype, device=self.values.device)
        dense.scatter_add_(2, pos, self.values.reshape(out, groups, 2))
        return dense.reshape(out, k)

    def to_dense(self) -> torch.Tensor:
        """The dense ``[out, in]`` weight in the original input order, the one the ops multiply by (exact round trip
        of :func:`compress_24`; values stored at one position add, as in every kernel)."""
        stored = self.stored_dense()
        return stored if self.input_perm is None else unpermute_columns(stored, self.input_perm)

    def to(self, *args, **kwargs) -> "Sparse24Weight":
        """Move to another device or cast the values (the metadata stays ``uint8``, the permutation ``int64``)."""
        values = self.values.to(*args, **kwargs)
        meta = self.meta.to(device=values.device)
        perm = None if self.input_perm is None else self.input_perm.to(device=values.device)
        return Sparse24Weight(values, meta, self.shape, perm)

    def __repr__(self) -> str:
        perm = "" if self.input_perm is None else f", input_perm=[{self.input_perm.shape[0]}]"
        return (
            f"Sparse24Weight(shape={self.shape}, dtype={self.dtype}, device={self.device}{perm}, "
            f"nbytes={self.nbytes} ({self.nbytes / max(self.dense_nbytes, 1):.4f} of dense))"
        )


def compress_24(weight: torch.Tensor, *, input_perm: Optional[torch.Tensor] = None) -> Sparse24Weight:
    """Compress a 2:4-sparse dense weight.

    Args:
        weight: ``[out, in]`` float16 / bfloat16 / float32 tensor, ``in`` a multiple of 4, with at most
            2 non-zeros in every group of 4 consecutive elements of a row (of the permuted order, with
            ``input_perm``). Any device.
        input_perm: optional ``int64`` ``[L]``, ``L`` dividing ``in``, a permutation of ``0..L-1`` (moved to the
            weight's device): the weight is stored in the order ``permute_columns(weight, input_perm)`` (for a
            Linear, ``L = in`` and that is ``weight[:, input_perm]``), which must be 2:4.

    Returns:
        A :class:`Sparse24Weight` on the same device; ``compress_24(w, input_perm=p).to_dense()`` equals ``w``
        exactly.

    Raises:
        TypeError: not a tensor, or not float16 / bfloat16 / float32; an ``input_perm`` that is not an ``int64``
            tensor.
        ValueError: not 2-D, ``in`` not a multiple of 4, on the meta device (no values to read), some group has
            more than 2 non-zeros (the message names the first such row and group, in the stored order), or an
            ``input_perm`` that is not 1-D, whose length does not divide ``in``, or that is not a permutation.
    """
    fn = "compress_24()"
    _check_weight(fn, weight)
    if weight.device.type == "meta":
        raise ValueError(
            f"{fn}: expected a weight with values, got one on the meta device (its sparsity pattern is unknown); "
            "load or materialize the weight first"
        )
    weight = weight.detach()
    out, k = weight.shape
    if input_perm is not None:
        if not isinstance(input_perm, torch.Tensor):
            raise TypeError(f"{fn}: expected input_perm to be None or an int64 tensor, got {type(input_perm).__name__}")
        size = input_perm.shape[0] if input_perm.dim() == 1 else -1
        if size < 1 or k % size:
            raise ValueError(f"{fn}: expected input_perm of shape (L,) with L dividing in={k}, got "
                             f"{tuple(input_perm.shape)}")
        check_permutation(fn, input_perm, size)
        input_perm = input_perm.detach().to(weight.device)
        weight = permute_columns(weight, input_perm)
        fn = "compress_24() (columns in the input_perm order)"
    require_24_sparse(fn, weight)
    nz = _group_nonzeros(weight)  # [out, G, 4]
    # Choose two positions per group: every non-zero first, then the lowest free positions.
    pos = torch.arange(4, device=weight.device)
    key = nz.to(torch.int64) * 8 + (3 - pos)  # non-zeros first, ties broken by lower position
    idx = key.topk(2, dim=-1).indices.sort(dim=-1).values  # [out, G, 2], ascending
    values = weight.reshape(out, k // 4, 4).gather(-1, idx).reshape(out, k // 2).contiguous()
    meta = pack_indices(idx)
    return Sparse24Weight(values, meta, (out, k), input_perm)


def conv_weight_to_2d(weight: torch.Tensor) -> torch.Tensor:
    """``[out, in, kh, kw]`` -> ``[out, kh * kw * in]`` (channels-last order: 2:4 groups run along ``in``)."""
    return weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1)


def conv_weight_from_2d(weight2d: torch.Tensor, in_channels: int, kernel_size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`conv_weight_to_2d`: ``[out, kh * kw * in]`` -> contiguous ``[out, in, kh, kw]``."""
    kh, kw = kernel_size
    # clone(contiguous_format), not .contiguous(): a permuted 1x1 weight already counts as contiguous but
    # keeps channels-last strides, which would make F.conv2d pick (and return) channels-last.
    return weight2d.reshape(weight2d.shape[0], kh, kw, in_channels).permute(0, 3, 1, 2).clone(
        memory_format=torch.contiguous_format
    )
