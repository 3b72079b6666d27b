"""State and conversion helpers shared by SparseLinear, SparseConv2d and BlockSparseLinear."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats.sparse24 import SUPPORTED_DTYPES

# A freshly built 2:4 layer (before loading a state_dict) stores zeros at positions 0 and 1 of every
# group: nibble 0b0100 (first kept value at 0, second at 1), two groups per byte.
_DEFAULT_META_BYTE = 0x44


def check_dtype(fn: str, dtype: Optional[torch.dtype]) -> torch.dtype:
    """``dtype`` (the default dtype when None) if it is float16 / bfloat16 / float32, else TypeError."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: expected dtype float16, bfloat16 or float32, got {dtype}")
    return dtype


def register_bias(module: nn.Module, bias: bool, out: int, device, dtype: torch.dtype) -> None:
    """A zero ``bias`` Parameter ``[out]`` (``requires_grad=False``), or a registered ``None``."""
    if bias:
        module.bias = nn.Parameter(torch.zeros(out, device=device, dtype=dtype), requires_grad=False)
    else:
        module.register_parameter("bias", None)


def register_24_state(module: nn.Module, out: int, k: int, bias: bool, device, dtype: torch.dtype) -> None:
    """Zero 2:4 state for a dense ``[out, k]`` weight: ``weight_values``, ``weight_meta``, ``bias``."""
    module.weight_values = nn.Parameter(torch.zeros(out, k // 2, device=device, dtype=dtype), requires_grad=False)
    module.register_buffer(
        "weight_meta", torch.full((out, (k + 7) // 8), _DEFAULT_META_BYTE, dtype=torch.uint8, device=device)
    )
    register_bias(module, bias, out, device, dtype)


def dtype_reason(layer: nn.Module, *, bias_too: bool) -> Optional[str]:
    """Why ``layer``'s weight (and, with ``bias_too``, its bias) dtype cannot be stored, or None."""
    w = layer.weight
    if w.dtype not in SUPPORTED_DTYPES:
        return f"weight dtype {w.dtype} is not float16, bfloat16 or float32"
    if bias_too and layer.bias is not None and layer.bias.dtype != w.dtype:
        return f"bias dtype {layer.bias.dtype} differs from the weight dtype {w.dtype}"
    return None


def converted(cls, src: nn.Module, state: dict[str, torch.Tensor], *args, backend: str, **kwargs) -> nn.Module:
    """``cls(*args, **kwargs)`` built like ``src`` (bias or not, device, dtype) and given ``state``
    (attribute name -> tensor) and ``src``'s bias: the common tail of every ``from_dense``."""
    w = src.weight
    layer = cls(*args, bias=src.bias is not None, backend=backend, device=w.device, dtype=w.dtype, **kwargs)
    with torch.no_grad():
        for name, t in state.items():
            getattr(layer, name).copy_(t)
        if src.bias is not None:
            layer.bias.copy_(src.bias.detach())  # cast to the weight's dtype
    return layer


def dense_twin(module: nn.Module, dense: nn.Module, weight: torch.Tensor) -> nn.Module:
    """``dense`` (a new nn.Linear / nn.Conv2d) given ``weight`` and ``module``'s bias; returns it."""
    with torch.no_grad():
        dense.weight.copy_(weight)
        if module.bias is not None:
            dense.bias.copy_(module.bias)
    return dense


def dense_linear(module: nn.Module, weight: torch.Tensor) -> nn.Linear:
    """An ``nn.Linear`` with ``weight`` (``[out, in]``) and ``module``'s bias, on ``weight``'s device and dtype."""
    linear = nn.Linear(
        module.in_features, module.out_features, bias=module.bias is not None, device=weight.device, dtype=weight.dtype
    )
    return dense_twin(module, linear, weight)
