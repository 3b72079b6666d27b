"""How a weight mask lives on a layer: a boolean ``weight_mask`` buffer, and nothing else.

A pruned layer gets a boolean buffer ``weight_mask`` (same shape as ``weight``, ``True`` = kept) and its
weight is multiplied by the mask in place. Nothing else is patched: no forward hooks, no
parametrizations, so the layer stays a plain ``nn.Linear`` / ``nn.Conv2d`` and ``model(x)`` costs what
it did. The buffer is persistent, so a masked model's ``state_dict`` holds ``<layer>.weight_mask`` and
loads back into a masked model (e.g. to resume fine-tuning). To keep zeros at zero while training use
:func:`pruning.finetune` (it does this for you) or :func:`pruning.training.attach_mask_hooks` with your
own optimizer, or call :func:`pruning.enforce_masks` after each step. :func:`pruning.remove_masks`
drops the buffers and leaves plain weights with zeros.
"""
from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

__all__ = ["MASK_NAME", "attach_mask", "detach_mask", "get_mask", "mask_info", "masked_modules"]

MASK_NAME = "weight_mask"
# The pattern and criterion a mask was made with, for reports and plans; a plain attribute, so it never
# reaches the state dict.
_INFO_ATTR = "_pruning_info"


def attach_mask(module: nn.Module, mask: torch.Tensor, *, pattern: str = "custom", importance: str = "custom") -> None:
    """Attach a boolean ``weight_mask`` buffer to ``module`` and zero its pruned weights in place.

    Args:
        module: ``nn.Linear`` / ``nn.Conv2d`` / Hugging Face ``Conv1D`` (anything with a ``weight`` parameter). For a
            layer offloaded by Accelerate (weight on the meta device) the caller writes the pruned values into the
            offloaded weight itself (:func:`pruning.offload.write_weight`); the mask is attached where it is.
        mask: ``torch.bool`` tensor of the weight's shape, ``True`` = kept.
        pattern, importance: recorded for reports and plans.

    Raises:
        TypeError: no ``weight`` parameter, or a non-boolean mask.
        ValueError: mask shape differs from the weight's.
    """
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise TypeError(f"attach_mask(): expected a module with a weight tensor, got {type(module).__name__}")
    if not isinstance(mask, torch.Tensor) or mask.dtype != torch.bool:
        raise TypeError(f"attach_mask(): expected a torch.bool mask, got {getattr(mask, 'dtype', type(mask).__name__)}")
    if mask.shape != weight.shape:
        raise ValueError(f"attach_mask(): expected a mask of shape {tuple(weight.shape)}, got {tuple(mask.shape)}")
    if weight.device.type == "meta":
        # An Accelerate-offloaded layer: its values live in the hook's weights map (already pruned by the caller),
        # and the mask stays where it was made.
        mask = mask.detach()
    else:
        mask = mask.to(weight.device)
        with torch.no_grad():
            weight.mul_(mask)
    if MASK_NAME in module._buffers:
        module._buffers[MASK_NAME] = mask
    else:
        module.register_buffer(MASK_NAME, mask)
    setattr(module, _INFO_ATTR, {"pattern": str(pattern), "importance": str(importance)})


def detach_mask(module: nn.Module) -> None:
    """Multiply the weight by its mask one last time and drop the ``weight_mask`` buffer (no-op if unmasked)."""
    mask = get_mask(module)
    if mask is None:
        return
    with torch.no_grad():
        module.weight.mul_(mask)
    del module._buffers[MASK_NAME]
    if hasattr(module, _INFO_ATTR):
        delattr(module, _INFO_ATTR)


def get_mask(module: nn.Module) -> torch.Tensor | None:
    """The module's ``weight_mask`` buffer, or ``None`` if it is not masked."""
    return module._buffers.get(MASK_NAME)


def mask_info(module: nn.Module) -> dict:
    """``{"pattern": ..., "importance": ...}`` recorded by :func:`attach_mask` (``"custom"`` when unknown)."""
    return dict(getattr(module, _INFO_ATTR, {"pattern": "custom", "importance": "custom"}))


def masked_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, module)`` for every module of ``model`` that carries a ``weight_mask``."""
    for name, module in model.named_modules():
        if get_mask(module) is not None:
            yield name, module
