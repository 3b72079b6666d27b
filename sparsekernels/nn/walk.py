"""Finding and replacing modules inside a model: what the whole-model swap and the checkpoint loader share.

A module may be registered under several names (a shared block); :func:`module_occurrences` finds every place,
:func:`replace_modules` assigns the replacement at all of them, and :func:`move_hooks` hands the old module's
hook dictionaries to the new one (the same dictionaries, so the user's hook handles keep working).
:func:`snapshot` records a model's structure so that an all-or-nothing operation can put it back if its commit
fails.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

__all__ = ["module_occurrences", "move_hooks", "replace_modules", "snapshot"]

# Every per-module hook container of nn.Module across torch >= 2.6 (missing ones are skipped).
_HOOK_ATTRS = (
    "_forward_hooks",
    "_forward_hooks_with_kwargs",
    "_forward_hooks_always_called",
    "_forward_pre_hooks",
    "_forward_pre_hooks_with_kwargs",
    "_backward_hooks",
    "_backward_pre_hooks",
)


def module_occurrences(model: nn.Module) -> dict[int, list[tuple[nn.Module, str, str]]]:
    """id(module) -> every (parent, attribute, qualified name) under which it is registered."""
    occ: dict[int, list[tuple[nn.Module, str, str]]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for attr, child in parent._modules.items():
            if child is None:
                continue
            name = f"{parent_name}.{attr}" if parent_name else attr
            entries = occ.setdefault(id(child), [])
            if all(p is not parent or a != attr for p, a, _ in entries):
                entries.append((parent, attr, name))
    return occ


def move_hooks(old: nn.Module, new: nn.Module) -> None:
    """Give ``new`` the hook dictionaries of ``old`` (shared, so existing hook handles stay valid)."""
    for attr in _HOOK_ATTRS:
        if attr in old.__dict__ and attr in new.__dict__:
            setattr(new, attr, getattr(old, attr))
    if "_is_full_backward_hook" in old.__dict__:
        new._is_full_backward_hook = old._is_full_backward_hook
    new.train(old.training)


def replace_modules(model: nn.Module, replacements: dict[int, nn.Module], occ=None) -> None:
    """Assign ``replacements`` (id(old) -> new) at every place the old modules are registered."""
    occ = module_occurrences(model) if occ is None else occ
    for old_id, new in replacements.items():
        for parent, attr, _ in occ[old_id]:
            setattr(parent, attr, new)


def snapshot(model: nn.Module) -> Callable[[], None]:
    """Record the structure of ``model`` and return a function that puts it back, in place.

    The record is every module's attributes: its submodules, parameters and buffers (the objects themselves,
    with their ``requires_grad`` and ``.grad``), hook dictionaries (restored in place, so hook handles stay
    valid), the training flag and any other attribute. Tensor data is not copied: the operations that use this
    (``sparsify``, ``densify``, ``load_sparse``) replace tensors and modules, they never write into a tensor.
    """
    saved = []
    for module in model.modules():
        attrs = dict(module.__dict__)
        contents = {k: v.copy() for k, v in attrs.items() if isinstance(v, (dict, set))}
        saved.append((module, attrs, contents))

    def restore() -> None:
        for module, attrs, contents in saved:
            current = module.__dict__
            for k in [k for k in current if k not in attrs]:
                del current[k]
            for k, v in attrs.items():
                if k in contents:
                    v.clear()
                    v.update(contents[k])
                current[k] = v

    return restore
