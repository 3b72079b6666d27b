"""``SparseConv1D``: transformers' ``Conv1D`` (GPT-2's projections) with its weight stored 2:4-compressed.

``transformers.pytorch_utils.Conv1D`` is a Linear layer whose weight is stored transposed: ``weight`` is ``[in,
out]`` and ``y = x @ weight + bias`` (``torch.addmm``). Its GEMM view, the ``[out, in]`` matrix the 2:4 groups run
along (groups of 4 along ``in``), is therefore the transpose of the weight. This package never imports transformers
when it is imported: a Conv1D is recognised by its class name and module (:meth:`SparseConv1D.matches_dense`), and
transformers is imported only when a dense ``Conv1D`` is built again (:meth:`SparseConv1D.to_dense`).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..ops.functional import sparse24_linear
from .base import check_dtype, check_size, dtype_reason, register_sparse_module
from .sparse24_module import Sparse24Module

__all__ = ["SparseConv1D", "is_hf_conv1d"]


def is_hf_conv1d(module: nn.Module) -> bool:
    """Whether ``module`` is a ``transformers.pytorch_utils.Conv1D`` (found by class name and module, without
    importing transformers) holding a 2-D ``weight`` ``[in, out]``."""
    cls = type(module)
    weight = getattr(module, "weight", None)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers.")
        and isinstance(weight, torch.Tensor)
        and weight.dim() == 2
    )


@register_sparse_module
class SparseConv1D(Sparse24Module):
    """``y = x @ W + bias`` with ``W`` ``[in, out]`` 2:4 sparse along ``in`` (inference only): transformers'
    ``Conv1D`` as GPT-2 uses it, swapped by ``sparsify`` like an ``nn.Linear``.

    State dict (on every device): ``weight_values`` ``[out, in/2]`` and ``weight_meta`` ``uint8 [out, ceil(in/8)]``
    of the GEMM view ``W.T`` (:mod:`sparsekernels.formats.sparse24`), and ``bias`` ``[out]`` or None; a permuted
    layer also ``input_perm`` ``int64 [in]``, with the GEMM view stored as ``W[input_perm, :].T``. In memory:
    the compressed tensors on a GPU, the dense ``weight`` ``[in, out]`` on the CPU (one copy, in the original input
    order, see :mod:`sparsekernels.nn.sparse24_module`). ``.weight`` answers ``[in, out]`` in either form, as
    ``Conv1D`` does.

    The constructor takes ``Conv1D``'s own size names and builds correctly shaped zero state on any device, the
    meta device included.

    ``backend="auto"``: on the CPU, ``torch.addmm`` on the resident dense weight (``Conv1D``'s own op, so the
    output is exactly the dense layer's); on CUDA, the 2:4 linear op's measured choice per shape.

    Args:
        nf: output size.
        nx: input size, a multiple of 4.
        bias: whether the layer has a bias (a ``Conv1D`` always has one).
        input_perm: whether the layer carries an input permutation (see :class:`~sparsekernels.SparseLinear`).
        backend: ``"auto"``, ``"triton"``, ``"reference"``, ``"dense"`` or ``"cusparselt"`` (see
            :func:`sparsekernels.sparse24_linear`); ``SPARSEKERNELS_BACKEND`` overrides it.
        device, dtype: where and in which dtype (float16 / bfloat16 / float32) to build the state.

    Raises:
        ValueError: ``nx`` not a positive multiple of 4, ``nf`` < 1, unknown backend.
        TypeError: unsupported dtype.
    """

    op_name = "sparse24_linear"

    def __init__(
        self,
        nf: int,
        nx: int,
        bias: bool = True,
        *, input_perm: bool = False, backend: str = "auto", device=None, dtype=None,
    ) -> None:
        super().__init__(backend)
        fn = "SparseConv1D()"
        self.nx = check_size(fn, "nx", nx, 4, multiple=4)
        self.nf = check_size(fn, "nf", nf)
        self.in_features, self.out_features = nx, nf  # the names every other Linear-like layer answers to
        perm_length = nx if self.check_input_perm_flag(fn, input_perm) else 0
        self.init_24_state(nf, nx, bias, device, check_dtype(fn, dtype), perm_length)

    def weight_to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.t()

    def weight_from_2d(self, weight2d: torch.Tensor) -> torch.Tensor:
        return weight2d.t().contiguous()

    # -- recognition and conversion -----------------------------------------------------------------

    @classmethod
    def matches_dense(cls, module: nn.Module) -> bool:
        return is_hf_conv1d(module)

    @classmethod
    def dense_label(cls) -> str:
        return "transformers Conv1D"

    @classmethod
    def check_convertible(cls, conv: nn.Module) -> Optional[str]:
        """``None`` if :meth:`from_dense` can convert ``conv``, else the reason in words."""
        if not is_hf_conv1d(conv):
            return f"not a transformers Conv1D (got {type(conv).__name__})"
        reason = dtype_reason(conv, bias_too=False)  # the bias is cast to the weight's dtype
        if reason is not None:
            return reason
        nx, nf = getattr(conv, "nx", None), getattr(conv, "nf", None)
        if tuple(conv.weight.shape) != (nx, nf):
            return f"weight shape {tuple(conv.weight.shape)} is not [nx, nf] = [{nx}, {nf}]"
        return cls.sparse24_reason(
            conv, f"{conv.nx}x{conv.nf}", (f"nx={conv.nx} (the input size) is not a multiple of 4", conv.nx),
            lambda: conv.weight.t(),
            lambda out, group, count: (f"weight is not 2:4 sparse along its input dim: output {out}, inputs "
                                       f"{4 * group}..{4 * group + 3} (weight rows) hold {count} non-zeros"))

    @classmethod
    def from_dense(cls, conv: nn.Module, *, backend: str = "auto") -> "SparseConv1D":
        """Compress a transformers ``Conv1D`` whose weight is already 2:4 sparse along its input dim (same device
        and dtype); if it carries an ``input_perm`` buffer, 2:4 in that order (``weight[input_perm, :]``).

        Raises:
            ValueError: the layer cannot be converted (the message says why), or unknown backend.
        """
        return cls.convert(conv, backend, nf=conv.nf, nx=conv.nx)

    def to_dense(self) -> nn.Module:
        """A ``transformers.pytorch_utils.Conv1D`` with exactly this layer's weights (original input order), on the
        same device and dtype; a permuted layer's copy carries its ``input_perm`` buffer.

        Raises:
            ImportError: transformers is not installed.
        """
        from transformers.pytorch_utils import Conv1D

        weight = self.dense_weight()
        with torch.device("meta"):  # no random initialisation: both tensors are replaced
            conv = Conv1D(self.nf, self.nx)
        conv.weight = nn.Parameter(weight)
        if self.bias is None:
            conv.register_parameter("bias", None)
        else:
            conv.bias = nn.Parameter(self.bias.detach().clone())
        return self.attach_input_perm(conv)

    def constructor_args(self) -> dict:
        args = {"nf": self.nf, "nx": self.nx, "bias": self.bias is not None}
        return {**args, "input_perm": True} if self.permuted else args

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(x, torch.Tensor) and x.dim() >= 1 and x.shape[-1] == self.nx:
            y = self.forward_resident_dense(x, self._dense_addmm)
            if y is not None:
                return y
        return sparse24_linear(x, self.op_weight24(), self._parameters["bias"], backend=self.backend)

    def _dense_addmm(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        # Conv1D's own op on the [in, out] weight, so a swapped GPT-2 gives exactly the dense model's numbers
        flat = x.reshape(-1, self.nx)
        y = flat @ weight if bias is None else torch.addmm(bias, flat, weight)
        return y.view(*x.shape[:-1], self.nf)

    def extra_repr(self) -> str:
        return (f"nf={self.nf}, nx={self.nx}, bias={self.bias is not None}, sparsity=2:4{self.perm_repr()}, "
                f"backend={self.backend!r}")
