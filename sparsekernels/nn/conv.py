"""``SparseConv2d``: an inference ``nn.Conv2d`` whose weight is stored 2:4-compressed along input channels."""
from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from ..formats.sparse24 import Sparse24Weight, compress_24, first_non24_group
from ..ops._backend import check_backend, cpu_fast_path_applies
from ..ops.sparse24_conv2d import (
    IntPair,
    _cpu_auto,
    _pair,
    _sparse24_conv2d_op,
    conv_weight_from_2d,
    conv_weight_to_2d,
)
from ._common import check_dtype, converted, dense_twin, dtype_reason, register_24_state

__all__ = ["SparseConv2d"]


def _numeric_padding(conv: nn.Conv2d) -> Union[tuple[int, int], str]:
    """``conv``'s padding as a pair of ints, or the reason it has none (asymmetric ``"same"``)."""
    padding = conv.padding
    if padding == "valid":
        return (0, 0)
    if padding == "same":
        totals = [d * (k - 1) for d, k in zip(conv.dilation, conv.kernel_size)]
        if any(t % 2 for t in totals):
            return (
                f"padding='same' with kernel_size={tuple(conv.kernel_size)}, dilation={tuple(conv.dilation)} "
                "pads asymmetrically, which the kernel does not support"
            )
        return (totals[0] // 2, totals[1] // 2)
    return tuple(int(p) for p in padding)


class SparseConv2d(nn.Module):
    """2-D convolution (groups = 1, zero padding) with a 2:4-compressed weight (inference only).

    The weight ``[out, in, kh, kw]`` is stored as :func:`~sparsekernels.compress_24` of its channels-last
    view ``[out, kh * kw * in]``: at every kernel position, every group of 4 consecutive input channels
    keeps at most 2 values.

    State (all that ``state_dict`` holds):

    * ``weight_values``: ``nn.Parameter`` ``[out, kh * kw * in / 2]`` (``requires_grad=False``);
    * ``weight_meta``: ``uint8`` buffer ``[out, ceil(kh * kw * in / 8)]``, packed positions;
    * ``bias``: ``nn.Parameter`` ``[out]`` (``requires_grad=False``) or ``None``.

    The constructor builds correctly shaped state (zeros) on any device, the meta device included, so a
    compressed checkpoint can be loaded with ``load_state_dict(state, assign=True)``.

    ``backend="auto"``: on the CPU, ``F.conv2d`` on a dense copy of the weight expanded once and cached
    beside the compressed tensors (not in the state_dict); on CUDA, the dispatcher's measured choice of
    the Triton implicit-GEMM kernel or cuDNN. The output is channels-last when the input is.

    Args:
        in_channels: input channels, a positive multiple of 4.
        out_channels: output channels (>= 1).
        kernel_size, stride, padding, dilation: ints or pairs, as ``nn.Conv2d`` (numeric padding only;
            use :meth:`from_dense` to convert a symmetric ``padding="same"``).
        bias: whether the layer has a bias.
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``"dense"`` (see
            :func:`sparsekernels.sparse24_conv2d`); ``SPARSEKERNELS_BACKEND`` overrides it.
        device, dtype: where and in which dtype (float16 / bfloat16 / float32) to build the state.

    Raises:
        ValueError: ``in_channels`` not a positive multiple of 4, ``out_channels`` < 1, kernel size /
            stride / dilation < 1, padding < 0, unknown backend.
        TypeError: non-integer sizes, unsupported dtype.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        *,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        fn = "SparseConv2d()"
        if isinstance(in_channels, bool) or not isinstance(in_channels, int) or in_channels < 4 or in_channels % 4:
            raise ValueError(f"{fn}: expected in_channels to be a positive multiple of 4, got {in_channels!r}")
        if isinstance(out_channels, bool) or not isinstance(out_channels, int) or out_channels < 1:
            raise ValueError(f"{fn}: expected out_channels >= 1, got {out_channels!r}")
        self.kernel_size = _pair(fn, "kernel_size", kernel_size, 1)
        self.stride = _pair(fn, "stride", stride, 1)
        self.padding = _pair(fn, "padding", padding, 0)
        self.dilation = _pair(fn, "dilation", dilation, 1)
        dtype = check_dtype(fn, dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = 1
        self.padding_mode = "zeros"
        self.backend = check_backend(fn, backend)
        k = self.kernel_size[0] * self.kernel_size[1] * in_channels
        register_24_state(self, out_channels, k, bias, device, dtype)

    # -- conversion ---------------------------------------------------------------------------------

    @staticmethod
    def check_convertible(conv: nn.Module) -> Optional[str]:
        """``None`` if :meth:`from_dense` can convert ``conv``, else the reason in words."""
        if not isinstance(conv, nn.Conv2d):
            return f"not an nn.Conv2d (got {type(conv).__name__})"
        if conv.groups != 1:
            return f"groups={conv.groups} (only groups=1 is supported)"
        if conv.padding_mode != "zeros":
            return f"padding_mode={conv.padding_mode!r} (only 'zeros' is supported)"
        padding = _numeric_padding(conv)
        if isinstance(padding, str):
            return padding
        reason = dtype_reason(conv, bias_too=True)
        if reason is not None:
            return reason
        if conv.in_channels % 4:
            return f"in_channels={conv.in_channels} is not a multiple of 4 (2:4 groups run along input channels)"
        if conv.weight.device.type == "meta":
            return "weight is on the meta device (its sparsity pattern is unknown)"
        bad = first_non24_group(conv_weight_to_2d(conv.weight))
        if bad is not None:
            out, group, count = bad
            position, cgroup = divmod(group, conv.in_channels // 4)
            r, s = divmod(position, conv.kernel_size[1])
            return (
                f"weight is not 2:4 sparse along input channels: output channel {out}, kernel position "
                f"({r}, {s}), input channels {4 * cgroup}..{4 * cgroup + 3} hold {count} non-zeros"
            )
        return None

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, backend: str = "auto") -> "SparseConv2d":
        """Compress an ``nn.Conv2d`` whose weight is already 2:4 sparse along input channels.

        Same device and dtype as ``conv``; ``padding="valid"`` and symmetric ``padding="same"`` become
        numeric padding.

        Raises:
            ValueError: the layer cannot be converted (the message says why, see
                :meth:`check_convertible`), or unknown backend.
        """
        reason = cls.check_convertible(conv)
        if reason is not None:
            raise ValueError(f"SparseConv2d.from_dense(): cannot convert {conv!r}: {reason}")
        w24 = compress_24(conv_weight_to_2d(conv.weight.detach()))
        return converted(
            cls, conv, {"weight_values": w24.values, "weight_meta": w24.meta},
            conv.in_channels, conv.out_channels, tuple(conv.kernel_size),
            stride=tuple(conv.stride), padding=_numeric_padding(conv), dilation=tuple(conv.dilation), backend=backend,
        )

    @property
    def weight24(self) -> Sparse24Weight:
        """The compressed ``[out, kh * kw * in]`` weight (shares storage with the module)."""
        k = self.kernel_size[0] * self.kernel_size[1] * self.in_channels
        return Sparse24Weight(self.weight_values.detach(), self.weight_meta, (self.out_channels, k))

    def dense_weight(self) -> torch.Tensor:
        """The dense ``[out, in, kh, kw]`` weight (contiguous, a new tensor)."""
        return conv_weight_from_2d(self.weight24.to_dense(), self.in_channels, self.kernel_size)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with exactly this layer's weights and geometry, on the same device and dtype."""
        values = self.weight_values
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            bias=self.bias is not None,
            device=values.device,
            dtype=values.dtype,
        )
        return dense_twin(self, conv, self.dense_weight())

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() == 3 and x.shape[0] == self.in_channels:
            # unbatched [C, H, W], as nn.Conv2d accepts it: run as a batch of one, return [out, OH, OW]
            return self.forward(x.unsqueeze(0)).squeeze(0)
        # Eager CPU "auto": F.conv2d on the cached dense copy, without the custom op (~20 us per call) or
        # nn.Module.__getattr__ (~1.4 us per name): 0.99x of nn.Conv2d on ResNet-50's 56x56 shapes (was
        # 0.92x on 64->64 1x1 through the op); measurements in ops.sparse24_conv2d._cpu_auto.
        if cpu_fast_path_applies(x, self.backend) and x.dim() == 4 and x.shape[1] == self.in_channels:
            params = self._parameters
            try:
                return _cpu_auto(
                    x, params["weight_values"], self._buffers["weight_meta"], params["bias"],
                    self.stride, self.padding, self.dilation, self.kernel_size,
                )
            except (RuntimeError, TypeError, ValueError):
                pass  # F.conv2d refused the input: the checks below raise the clear error
        fn = "SparseConv2d.forward()"
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"{fn}: expected input of shape [B, {self.in_channels}, H, W], got {tuple(x.shape)}")
        if x.dtype != self.weight_values.dtype:
            raise TypeError(f"{fn}: expected input of dtype {self.weight_values.dtype}, got {x.dtype}")
        return _sparse24_conv2d_op(
            x,
            self.weight_values,
            self.weight_meta,
            self.bias,
            self.stride,
            self.padding,
            self.dilation,
            self.kernel_size,
            self.backend,
        )

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )
        if self.bias is None:
            s += ", bias=False"
        return s + f", sparsity=2:4, backend={self.backend!r}"
