"""``BlockSparseLinear``: an inference ``nn.Linear`` whose weight is stored as square non-zero blocks."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

from ..formats.blocksparse import BLOCK_SIZES, INDEX_DTYPE, BlockSparseWeight, block_sparsity, cdiv, compress_blocks
from ..ops.functional import block_sparse_linear
from .base import (
    SparseModule,
    check_dtype,
    check_loaded_values,
    check_size,
    copy_into,
    dtype_reason,
    register_bias,
    register_sparse_module,
)

__all__ = ["BlockSparseLinear"]


def _check_min_block_sparsity(fn: str, v) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not (0.0 <= float(v) <= 1.0) or math.isnan(v):
        raise ValueError(f"{fn}: expected min_block_sparsity in [0, 1], got {v!r}")
    return float(v)


@register_sparse_module
class BlockSparseLinear(SparseModule):
    """``y = x @ W.T + bias`` with ``W`` ``[out, in]`` stored as its non-zero ``bs x bs`` blocks (inference only).

    State (all that ``state_dict`` holds; layout in :mod:`sparsekernels.formats.blocksparse`):

    * ``block_values``: ``nn.Parameter`` ``[nnz_blocks, bs, bs]`` (``requires_grad=False``);
    * ``block_row_ptr``: ``int32`` buffer ``[ceil(out / bs) + 1]``, CSR pointer over block rows;
    * ``block_col_idx``: ``int32`` buffer ``[nnz_blocks]``, block column of each kept block;
    * ``bias``: ``nn.Parameter`` ``[out]`` (``requires_grad=False``) or ``None``.

    The constructor builds correctly shaped state on any device, the meta device included (the first
    ``nnz_blocks`` blocks in row-major order, all zeros), so a checkpoint can be loaded with
    ``load_state_dict(state, assign=True)`` after building with the checkpoint's ``nnz_blocks``.

    ``backend="auto"``: on CUDA, the dispatcher's measured choice of the Triton kernel or cuBLAS on a
    cached dense copy; on the CPU, the batched-block reference at high block sparsity, else ``F.linear``
    on a cached dense copy (see :func:`sparsekernels.block_sparse_linear`).

    Args:
        in_features, out_features: the dense sizes (>= 1; need not be multiples of ``block_size``).
        nnz_blocks: number of stored blocks, ``0 <= nnz_blocks <= ceil(out / bs) * ceil(in / bs)``.
        block_size: 16, 32 or 64.
        bias: whether the layer has a bias.
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``"dense"``; ``SPARSEKERNELS_BACKEND``
            overrides it.
        device, dtype: where and in which dtype (float16 / bfloat16 / float32) to build the state.

    Raises:
        ValueError: sizes out of range, block size not 16/32/64, unknown backend.
        TypeError: unsupported dtype.
    """

    pattern = "block"
    dense_type = nn.Linear
    options = ("block_size", "min_block_sparsity")
    op_name = "block_sparse_linear"
    cpu_note = ("the block-sparse reference when >= 16 rows and <= 12.5 % of blocks are kept, else F.linear on "
                "a dense copy cached per weight (see docs/conv-and-block.md)")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        nnz_blocks: int,
        block_size: int,
        bias: bool = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(backend)
        fn = "BlockSparseLinear()"
        check_size(fn, "in_features", in_features)
        check_size(fn, "out_features", out_features)
        if isinstance(block_size, bool) or block_size not in BLOCK_SIZES:
            raise ValueError(f"{fn}: expected block_size in {BLOCK_SIZES}, got {block_size!r}")
        nbr, nbc = cdiv(out_features, block_size), cdiv(in_features, block_size)
        if isinstance(nnz_blocks, bool) or not isinstance(nnz_blocks, int) or not 0 <= nnz_blocks <= nbr * nbc:
            raise ValueError(f"{fn}: expected nnz_blocks in [0, {nbr * nbc}] for this shape and block size, got {nnz_blocks!r}")
        dtype = check_dtype(fn, dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.block_size = block_size
        self.block_values = nn.Parameter(
            torch.zeros(nnz_blocks, block_size, block_size, device=device, dtype=dtype), requires_grad=False
        )
        # A valid placeholder structure: the first nnz_blocks blocks in row-major order (computed where the state
        # lives: nothing at all on the meta device).
        row_ptr = (torch.arange(nbr + 1, dtype=torch.int64, device=device) * nbc).clamp_(max=nnz_blocks)
        col_idx = torch.arange(nnz_blocks, dtype=torch.int64, device=device) % nbc
        self.register_buffer("block_row_ptr", row_ptr.to(INDEX_DTYPE))
        self.register_buffer("block_col_idx", col_idx.to(INDEX_DTYPE))
        register_bias(self, bias, out_features, device, dtype)
        self.prepare_op()

    @property
    def nnz_blocks(self) -> int:
        return self.block_values.shape[0]

    # -- conversion ---------------------------------------------------------------------------------

    @staticmethod
    def _choose_block_size(linear: nn.Linear, block_size: Optional[int], min_block_sparsity: float):
        """(block_size, None) for the chosen size, or (None, reason)."""
        sizes = BLOCK_SIZES[::-1] if block_size is None else (block_size,)
        measured = []
        for bs in sizes:
            sparsity = block_sparsity(linear.weight, bs)
            if sparsity >= min_block_sparsity and sparsity > 0.0:
                return bs, None
            measured.append(f"{sparsity:.3f} at {bs}x{bs}")
        return None, (
            f"block sparsity below min_block_sparsity={min_block_sparsity}: {', '.join(measured)} "
            "(fraction of all-zero blocks)"
        )

    @classmethod
    def check_convertible(
        cls, linear: nn.Module, block_size: Optional[int] = None, min_block_sparsity: float = 0.5
    ) -> Optional[str]:
        """``None`` if :meth:`from_dense` can convert ``linear`` with these arguments, else the reason.

        Args:
            linear: the layer to test.
            block_size: 16, 32, 64, or ``None`` to try 64, then 32, then 16.
            min_block_sparsity: the least fraction of all-zero blocks worth converting for, in [0, 1]
                (a layer with no zero block at all is never converted).

        Raises:
            ValueError: ``block_size`` or ``min_block_sparsity`` out of range (argument errors, not
                properties of the layer).
        """
        fn = "BlockSparseLinear.check_convertible()"
        if block_size is not None and (isinstance(block_size, bool) or block_size not in BLOCK_SIZES):
            raise ValueError(f"{fn}: expected block_size None or one of {BLOCK_SIZES}, got {block_size!r}")
        min_block_sparsity = _check_min_block_sparsity(fn, min_block_sparsity)
        if not isinstance(linear, nn.Linear):
            return f"not an nn.Linear (got {type(linear).__name__})"
        reason = dtype_reason(linear, bias_too=True)
        if reason is not None:
            return reason
        if linear.weight.numel() == 0:
            return f"the weight is empty ({linear.out_features}x{linear.in_features})"
        if linear.weight.device.type == "meta":
            return "weight is on the meta device (its sparsity pattern is unknown)"
        return cls._choose_block_size(linear, block_size, min_block_sparsity)[1]

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        *,
        block_size: Optional[int] = None,
        min_block_sparsity: float = 0.5,
        backend: str = "auto",
    ) -> "BlockSparseLinear":
        """Compress an ``nn.Linear`` whose weight has all-zero square blocks (same device and dtype).

        Args:
            linear: the layer.
            block_size: 16, 32 or 64; ``None`` picks the largest of 64, 32, 16 whose fraction of
                all-zero blocks reaches ``min_block_sparsity``.
            min_block_sparsity: see :meth:`check_convertible`.
            backend: the new layer's backend.

        Raises:
            ValueError: the layer cannot be converted (the message says why), bad arguments.
        """
        reason = cls.check_convertible(linear, block_size, min_block_sparsity)
        if reason is not None:
            raise ValueError(f"BlockSparseLinear.from_dense(): cannot convert {linear!r}: {reason}")
        bs, _ = cls._choose_block_size(linear, block_size, min_block_sparsity)
        wb = compress_blocks(linear.weight.detach(), bs)
        w = linear.weight
        layer = cls(linear.in_features, linear.out_features, wb.nnz_blocks, bs, bias=linear.bias is not None,
                    backend=backend, device=w.device, dtype=w.dtype)
        with torch.no_grad():
            layer.block_values.copy_(wb.values)
            layer.block_row_ptr.copy_(wb.row_ptr)
            layer.block_col_idx.copy_(wb.col_idx)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias.detach())
        return layer

    @property
    def weight_blocks(self) -> BlockSparseWeight:
        """The weight as a :class:`BlockSparseWeight` (shares storage with the module)."""
        return BlockSparseWeight(
            self.block_values.detach(),
            self.block_row_ptr,
            self.block_col_idx,
            (self.out_features, self.in_features),
            self.block_size,
        )

    @property
    def weight_dtype(self) -> torch.dtype:
        return self.block_values.dtype

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with exactly this layer's weights, on the same device and dtype."""
        weight = self.weight_blocks.to_dense()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                           dtype=weight.dtype)
        return copy_into(linear, weight, self.bias)

    @classmethod
    def dense_args(cls, linear: nn.Module) -> dict:
        """The sizes ``linear`` fixes (the number of kept blocks and the block size are the weight's own)."""
        return {"in_features": linear.in_features, "out_features": linear.out_features,
                "bias": linear.bias is not None}

    def loaded_weight_blocks(self, state_dict, prefix: str):
        """The block-sparse weight ``state_dict`` holds for this layer, checked (shapes, dtypes, devices, the
        structure and the padding of edge blocks), or None when it lacks one of the three tensors.

        Raises:
            TypeError / ValueError: what is wrong, naming the entry.
        """
        names = [prefix + n for n in ("block_values", "block_row_ptr", "block_col_idx")]
        if not all(n in state_dict for n in names):
            return None
        wb = BlockSparseWeight(state_dict[names[0]], state_dict[names[1]], state_dict[names[2]],
                               (self.out_features, self.in_features), self.block_size)
        check_loaded_values(state_dict, prefix, "block_values")
        return wb.validate()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        try:
            self.loaded_weight_blocks(state_dict, prefix)
        except (TypeError, ValueError) as exc:  # nothing of this layer is loaded
            error_msgs.append(f"While loading {prefix or 'the block-sparse layer'}: {exc}")
            return
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def constructor_args(self) -> dict:
        return {
            "in_features": self.in_features,
            "out_features": self.out_features,
            "nnz_blocks": self.nnz_blocks,
            "block_size": self.block_size,
            "bias": self.bias is not None,
        }

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return block_sparse_linear(x, self.weight_blocks, self._parameters["bias"], backend=self.backend)

    def extra_repr(self) -> str:
        nbr, nbc = cdiv(self.out_features, self.block_size), cdiv(self.in_features, self.block_size)
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"block_size={self.block_size}, nnz_blocks={self.nnz_blocks}/{nbr * nbc}, backend={self.backend!r}"
        )
