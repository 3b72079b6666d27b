"""``SparseLinear``: an inference ``nn.Linear`` whose weight is stored 2:4-compressed."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats.sparse24 import Sparse24Weight, compress_24, first_non24_group
from ..ops._backend import check_backend
from ..ops.sparse24_linear import cpu_fast_path, sparse24_linear_checked
from ._common import check_dtype, converted, dense_linear, dtype_reason, register_24_state

__all__ = ["SparseLinear"]


class SparseLinear(nn.Module):
    """``y = x @ W.T + bias`` with ``W`` ``[out, in]`` stored 2:4-compressed (inference only).

    State (all that ``state_dict`` holds):

    * ``weight_values``: ``nn.Parameter`` ``[out, in/2]`` (``requires_grad=False``), the kept values;
    * ``weight_meta``: ``uint8`` buffer ``[out, ceil(in/8)]``, the packed positions
      (see :mod:`sparsekernels.formats.sparse24`);
    * ``bias``: ``nn.Parameter`` ``[out]`` (``requires_grad=False``) or ``None``.

    The constructor builds correctly shaped state (zeros) on any device, the meta device included, so a
    compressed checkpoint can be loaded with ``load_state_dict(state, assign=True)``.

    On the CPU, ``backend="auto"`` multiplies by a dense copy of the weight expanded once and cached
    beside the compressed tensors (not in the state_dict); measurements in ``docs/sparse24.md``.
    On CUDA it runs the dispatcher's measured choice of Triton kernel / dense cuBLAS / cuSPARSELt.

    Args:
        in_features: input size, a multiple of 4.
        out_features: output size.
        bias: whether the layer has a bias.
        backend: ``"auto"``, ``"triton"``, ``"reference"``, ``"dense"`` or ``"cusparselt"`` (see
            :func:`sparsekernels.sparse24_linear`); ``SPARSEKERNELS_BACKEND`` overrides it.
        device, dtype: where and in which dtype (float16 / bfloat16 / float32) to build the state.

    Raises:
        ValueError: ``in_features`` not a positive multiple of 4, ``out_features`` < 1, unknown backend.
        TypeError: unsupported dtype.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fn = "SparseLinear()"
        if not isinstance(in_features, int) or in_features < 4 or in_features % 4:
            raise ValueError(f"{fn}: expected in_features to be a positive multiple of 4, got {in_features!r}")
        if not isinstance(out_features, int) or out_features < 1:
            raise ValueError(f"{fn}: expected out_features >= 1, got {out_features!r}")
        dtype = check_dtype(fn, dtype)
        self.in_features = in_features
        self.out_features = out_features
        self.backend = check_backend(fn, backend)
        register_24_state(self, out_features, in_features, bias, device, dtype)

    # -- conversion ---------------------------------------------------------------------------------

    @staticmethod
    def check_convertible(linear: nn.Module) -> Optional[str]:
        """``None`` if :meth:`from_dense` can convert ``linear``, else the reason in words."""
        if not isinstance(linear, nn.Linear):
            return f"not an nn.Linear (got {type(linear).__name__})"
        reason = dtype_reason(linear, bias_too=False)  # the bias is cast to the weight's dtype
        if reason is not None:
            return reason
        if linear.in_features % 4:
            return f"in_features={linear.in_features} is not a multiple of 4"
        if linear.weight.device.type == "meta":
            return "weight is on the meta device (its sparsity pattern is unknown)"
        bad = first_non24_group(linear.weight)
        if bad is not None:
            row, group, count = bad
            return (
                f"weight is not 2:4 sparse: row {row}, group {group} (columns {4 * group}..{4 * group + 3}) "
                f"has {count} non-zeros"
            )
        return None

    @classmethod
    def from_dense(cls, linear: nn.Linear, *, backend: str = "auto") -> "SparseLinear":
        """Compress an ``nn.Linear`` whose weight is already 2:4 sparse (same device and dtype).

        Raises:
            ValueError: the layer cannot be converted (the message says why), or unknown backend.
        """
        reason = cls.check_convertible(linear)
        if reason is not None:
            raise ValueError(f"SparseLinear.from_dense(): cannot convert {linear!r}: {reason}")
        w24 = compress_24(linear.weight)
        state = {"weight_values": w24.values, "weight_meta": w24.meta}
        return converted(cls, linear, state, linear.in_features, linear.out_features, backend=backend)

    @property
    def weight24(self) -> Sparse24Weight:
        """The compressed weight as a :class:`Sparse24Weight` (shares storage with the module)."""
        return Sparse24Weight(self.weight_values.detach(), self.weight_meta, (self.out_features, self.in_features))

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` with exactly this layer's weights, on the same device and dtype."""
        return dense_linear(self, self.weight24.to_dense())

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Hot path on the CPU: read the state straight from the module's dicts (nn.Module.__getattr__
        # costs ~1.4 us per name, a tenth of a 256x256 layer at M=1).
        params = self._parameters
        y = cpu_fast_path(
            x, params["weight_values"], self._buffers["weight_meta"], self.in_features, params["bias"], self.backend
        )
        if y is not None:
            return y
        return sparse24_linear_checked(
            x,
            self.weight_values,
            self.weight_meta,
            self.in_features,
            self.bias,
            backend=self.backend,
            fn="SparseLinear.forward()",
        )

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
            f"sparsity=2:4, backend={self.backend!r}"
        )
