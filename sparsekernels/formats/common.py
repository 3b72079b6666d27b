"""What every compressed weight layout shares: the dtypes it stores and where its values live."""
from __future__ import annotations

import torch

__all__ = ["SUPPORTED_DTYPES", "CompressedWeight"]

# The value dtypes every format, kernel and sparse module accepts.
SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class CompressedWeight:
    """Mixin of the format dataclasses: their kept values (``self.values``) decide the dtype and the device."""

    values: torch.Tensor

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def device(self) -> torch.device:
        return self.values.device
