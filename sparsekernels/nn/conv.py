"""``SparseConv2d``: an inference ``nn.Conv2d`` whose weight is stored 2:4-compressed along input channels."""
from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn

from ..formats.sparse24 import conv_weight_from_2d, conv_weight_to_2d
from ..ops import routing
from ..ops.checks import IntPair, pair
from ..ops.functional import sparse24_conv2d
from .base import check_dtype, check_size, copy_into, dtype_reason, register_sparse_module
from .sparse24_module import Sparse24Module

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


@register_sparse_module
class SparseConv2d(Sparse24Module):
    """2-D convolution (groups = 1, zero padding) with a 2:4 sparse weight (inference only).

    The weight ``[out, in, kh, kw]`` is stored as :func:`~sparsekernels.compress_24` of its channels-last
    view ``[out, kh * kw * in]``: at every kernel position, every group of 4 consecutive input channels
    keeps at most 2 values.

    State dict (on every device): ``weight_values`` ``[out, kh * kw * in / 2]``, ``weight_meta``
    ``uint8 [out, ceil(kh * kw * in / 8)]`` and ``bias`` ``[out]`` or None; a permuted layer also ``input_perm``
    ``int64 [in]`` (a permutation of the input channels, the same at every kernel position), with the compressed
    weight the channels-last view of ``W[:, input_perm]``. In memory: the compressed tensors on a GPU, the dense
    ``weight`` ``[out, in, kh, kw]`` on the CPU (one copy, in the original channel order, see
    :mod:`sparsekernels.nn.sparse24_module`).

    The constructor builds correctly shaped zero state on any device, the meta device included, so a
    compressed checkpoint can be loaded with ``load_state_dict(state, assign=True)``.

    ``backend="auto"``: on the CPU, ``F.conv2d`` on the resident dense weight; on CUDA, the dispatcher's
    measured choice of the Triton implicit-GEMM kernel or cuDNN. The output is channels-last when the input is.

    Args:
        in_channels: input channels, a positive multiple of 4.
        out_channels: output channels (>= 1).
        kernel_size, stride, padding, dilation: ints or pairs, as ``nn.Conv2d`` (numeric padding only;
            use :meth:`from_dense` to convert a symmetric ``padding="same"``).
        bias: whether the layer has a bias.
        input_perm: whether the layer carries an input-channel permutation (an identity one until loaded;
            ``from_dense`` sets it from a dense layer's ``input_perm`` buffer).
        backend: ``"auto"``, ``"triton"``, ``"reference"`` or ``"dense"`` (see
            :func:`sparsekernels.sparse24_conv2d`); ``SPARSEKERNELS_BACKEND`` overrides it.
        device, dtype: where and in which dtype (float16 / bfloat16 / float32) to build the state.

    Raises:
        ValueError: ``in_channels`` not a positive multiple of 4, ``out_channels`` < 1, kernel size /
            stride / dilation < 1, padding < 0, unknown backend.
        TypeError: non-integer sizes, unsupported dtype.
    """

    dense_type = nn.Conv2d
    op_name = "sparse24_conv2d"

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: IntPair,
        stride: IntPair = 1,
        padding: IntPair = 0,
        dilation: IntPair = 1,
        bias: bool = True,
        *, input_perm: bool = False, backend: str = "auto", device=None, dtype=None,
    ) -> None:
        super().__init__(backend)
        fn = "SparseConv2d()"
        permuted = self.check_input_perm_flag(fn, input_perm)
        check_size(fn, "in_channels", in_channels, 4, multiple=4)
        check_size(fn, "out_channels", out_channels)
        self.kernel_size = pair(fn, "kernel_size", kernel_size, 1)
        self.stride = pair(fn, "stride", stride, 1)
        self.padding = pair(fn, "padding", padding, 0)
        self.dilation = pair(fn, "dilation", dilation, 1)
        dtype = check_dtype(fn, dtype)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.groups = 1
        self.padding_mode = "zeros"
        k = self.kernel_size[0] * self.kernel_size[1] * in_channels
        self.init_24_state(out_channels, k, bias, device, dtype, in_channels if permuted else 0)

    def weight_to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        return conv_weight_to_2d(weight)

    def weight_from_2d(self, weight2d: torch.Tensor) -> torch.Tensor:
        return conv_weight_from_2d(weight2d, self.in_channels, self.kernel_size)

    # -- conversion ---------------------------------------------------------------------------------

    @classmethod
    def check_convertible(cls, conv: nn.Module) -> Optional[str]:
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

        def describe(out: int, group: int, count: int) -> str:
            position, cgroup = divmod(group, conv.in_channels // 4)
            r, s = divmod(position, conv.kernel_size[1])
            return (f"weight is not 2:4 sparse along input channels: output channel {out}, kernel position "
                    f"({r}, {s}), input channels {4 * cgroup}..{4 * cgroup + 3} hold {count} non-zeros")

        c = conv.in_channels
        return cls.sparse24_reason(
            conv, f"shape {tuple(conv.weight.shape)}",
            (f"in_channels={c} is not a multiple of 4 (2:4 groups run along input channels)", c),
            lambda: conv_weight_to_2d(conv.weight), describe)

    @classmethod
    def from_dense(cls, conv: nn.Conv2d, *, backend: str = "auto") -> "SparseConv2d":
        """Compress an ``nn.Conv2d`` whose weight is already 2:4 sparse along input channels (if it carries an
        ``input_perm`` buffer, a permutation of its input channels: in that order, ``weight[:, input_perm]``, at
        every kernel position; the new layer then carries it).

        Same device and dtype as ``conv``; ``padding="valid"`` and symmetric ``padding="same"`` become
        numeric padding.

        Raises:
            ValueError: the layer cannot be converted (the message says why, see
                :meth:`check_convertible`), or unknown backend.
        """
        return cls.convert(conv, backend, in_channels=conv.in_channels, out_channels=conv.out_channels,
                           kernel_size=tuple(conv.kernel_size), stride=tuple(conv.stride),
                           padding=_numeric_padding(conv), dilation=tuple(conv.dilation))

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` with exactly this layer's weights (original channel order) and geometry, on the same
        device and dtype; a permuted layer's copy carries its ``input_perm`` buffer."""
        weight = self.dense_weight()
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                         padding=self.padding, dilation=self.dilation, bias=self.bias is not None,
                         device=weight.device, dtype=weight.dtype)
        return self.attach_input_perm(copy_into(conv, weight, self.bias))

    @classmethod
    def dense_args(cls, conv: nn.Module) -> dict:
        """The geometry of ``conv`` (an ``nn.Conv2d`` or a ``SparseConv2d``) as constructor arguments, with
        ``padding="same"`` / ``"valid"`` as the numbers they stand for.

        Raises:
            ValueError: ``groups != 1``, ``padding_mode != "zeros"`` or an asymmetric ``"same"`` padding.
        """
        if conv.groups != 1 or conv.padding_mode != "zeros":
            raise ValueError(f"groups={conv.groups}, padding_mode={conv.padding_mode!r} (SparseConv2d computes "
                             "groups=1 with zero padding only)")
        padding = _numeric_padding(conv)
        if isinstance(padding, str):
            raise ValueError(padding)
        return {
            "in_channels": conv.in_channels,
            "out_channels": conv.out_channels,
            "kernel_size": tuple(conv.kernel_size),
            "stride": tuple(conv.stride),
            "padding": padding,
            "dilation": tuple(conv.dilation),
            "bias": conv.bias is not None,
        }

    def constructor_args(self) -> dict:
        return {
            "in_channels": self.in_channels,
            "out_channels": self.out_channels,
            "kernel_size": list(self.kernel_size),
            "stride": list(self.stride),
            "padding": list(self.padding),
            "dilation": list(self.dilation),
            "bias": self.bias is not None,
            **({"input_perm": True} if self.permuted else {}),
        }

    # -- forward ------------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"SparseConv2d.forward(): expected a torch.Tensor input, got {type(x).__name__}")
        if x.dim() == 3 and x.shape[0] == self.in_channels:
            # unbatched [C, H, W], as nn.Conv2d accepts it: run as a batch of one, return [out, OH, OW]
            return self.forward(x.unsqueeze(0)).squeeze(0)
        bias = self._parameters["bias"]
        if x.dim() == 4 and x.shape[1] == self.in_channels:
            y = self.forward_resident_dense(x, self._dense_conv)
            if y is not None:
                return y
        if x.dim() != 4 or x.shape[1] != self.in_channels:  # the op would refuse it too, without the layer's name
            raise ValueError(f"SparseConv2d.forward(): expected input of shape [B, {self.in_channels}, H, W] "
                             f"(or unbatched [{self.in_channels}, H, W]), got {tuple(x.shape)}")
        return sparse24_conv2d(x, self.op_weight24(), bias, self.stride, self.padding, self.dilation,
                               backend=self.backend, kernel_size=self.kernel_size)

    def _dense_conv(self, x: torch.Tensor, weight: torch.Tensor, bias) -> torch.Tensor:
        y = F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation)
        return y.contiguous(memory_format=routing.conv_output_format(x))

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, dilation={self.dilation}"
        )
        if self.bias is None:
            s += ", bias=False"
        return s + f", sparsity=2:4{self.perm_repr()}, backend={self.backend!r}"
