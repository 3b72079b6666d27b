"""``SparseLinear``: an inference ``nn.Linear`` whose weight is stored 2:4-compressed."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.functional import sparse24_linear
from .base import check_dtype, check_size, copy_into, dtype_reason, register_sparse_module
from .sparse24_module import Sparse24Module

__all__ = ["SparseLinear"]


@register_sparse_module
class SparseLinear(Sparse24Module):
    """``y = x @ W.T + bias`` with ``W`` ``[out, in]`` 2:4 sparse (inference only).

    State dict (on every device): ``weight_values`` ``[out, in/2]``, ``weight_meta`` ``uint8 [out, ceil(in/8)]``
    (:mod:`sparsekernels.formats.sparse24`) and ``bias`` ``[out]`` or None; a permuted layer also ``input_perm``
    ``int64 [in]``, with the compressed weight stored as ``W[:, input_perm]``. In memory: the compressed tensors
    on a GPU, the dense ``weight`` on the CPU (one copy, in the original input order, see
    :mod:`sparsekernels.nn.sparse24_module`).

    The constructor builds correctly shaped zero state on any device, the meta device included, so a
    compressed checkpoint can be loaded with ``load_state_dict(state, assign=True)``.

    ``backend="auto"``: on the CPU, ``F.linear`` on the resident dense weight; on CUDA, the dispatcher's measured
    choice of the Triton kernel, dense cuBLAS or cuSPARSELt per shape.

    Args:
        in_features: input size, a multiple of 4.
        out_features: output size.
        bias: whether the layer has a bias.
        input_perm: whether the layer carries an input permutation (an identity one until loaded; ``from_dense``
            sets it from a dense layer's ``input_perm`` buffer).
        backend: ``"auto"``, ``"triton"``, ``"reference"``, ``"dense"`` or ``"cusparselt"`` (see
            :func:`sparsekernels.sparse24_linear`); ``SPARSEKERNELS_BACKEND`` overrides it.
        device, dtype: where and in which dtype (float16 / bfloat16 / float32) to build the state.

    Raises:
        ValueError: ``in_features`` not a positive multiple of 4, ``out_features`` < 1, unknown backend.
        TypeError: unsupported dtype.
    """

    dense_type = nn.Linear
    op_name = "sparse24_linear"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *, input_perm: bool = False, backend: str = "auto", device=None, dtype=None,
    ) -> None:
        super().__init__(backend)
        fn = "SparseLinear()"
        self.in_features = check_size(fn, "in_features", in_features, 4, multiple=4)
        self.out_features = check_size(fn, "out_features", out_features)
        perm_length = in_features if self.check_input_perm_flag(fn, input_perm) else 0
        self.init_24_state(out_features, in_features, bias, device, check_dtype(fn, dtype), perm_length)

    def weight_to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def weight_from_2d(self, weight2d: torch.Tensor) -> torch.Tensor:
        return weight2d.contiguous()

    # -- conversion ---------------------------------------------------------------------------------

    @classmethod
    def check_convertible(cls, linear: nn.Module) -> Optional[str]:
        """``None`` if :meth:`from_dense` can convert ``linear``, else the reason in words."""
        if not isinstance(linear, nn.Linear):
            return f"not an nn.Linear (got {type(linear).__name__})"
        reason = dtype_reason(linear, bias_too=False)  # the bias is cast to the weight's dtype
        if reason is not None:
            return reason
        return cls.sparse24_reason(
            linear, f"{linear.out_features}x{linear.in_features}",
            (f"in_features={linear.in_features} is not a multiple of 4", linear.in_features), lambda: linear.weight,
            lambda row, group, count: (f"weight is not 2:4 sparse: row {row}, group {group} (columns "
                                       f"{4 * group}..{4 * group + 3}) has {count} non-zeros"))

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, backend: str = "auto") -> "SparseLinear":
        """Compress an ``nn.Linear`` whose weight is already 2:4 sparse (same device and dtype): 2:4 along its
        input features, or, if it carries an ``input_perm`` buffer, in that order (``weight[:, input_perm]``), which
        the new layer then carries.

        Raises:
            ValueError: the layer cannot be converted (the message says why), or unknown backend.
        """
        return cls.convert(linear, backend, in_features=linear.in_features, out_features=linear.out_features)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with exactly this layer's weights (original input order), on the same device and dtype;
        a permuted layer's copy carries its ``input_perm`` buffer, so ``from_dense`` converts it back."""
        weight = self.dense_weight()
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device=weight.device,
                           dtype=weight.dtype)
        return self.attach_input_perm(copy_into(linear, weight, self.bias))

    def constructor_args(self) -> dict:
        args = {"in_features": self.in_features, "out_features": self.out_features, "bias": self.bias is not None}
        return {**args, "input_perm": True} if self.permuted else args

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.forward_resident_dense(x, F.linear)
        if y is not None:
            return y
        return sparse24_linear(x, self.op_weight24(), self._parameters["bias"], backend=self.backend)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity=2:4{self.perm_repr()}, backend={self.backend!r}"
        )
