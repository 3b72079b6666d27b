"""All or nothing: take a snapshot of a model before an operation, put it back if the operation fails.

Every public operation that changes a model in place (``prune_weights``, ``apply_plan``, ``remove_masks``,
``GradualPruner.step``, and ``finetune`` until its first optimizer step) runs inside :func:`all_or_nothing`;
``prune_channels``, which only reads its input model, runs inside :func:`read_only`. What a snapshot
covers, for every submodule of every model given:

* the module's attributes (``__dict__``, shallow): its train / eval flag, its class, plain attributes such as
  ``out_features``, and the *contents* of the dicts and sets it holds -- ``_parameters``, ``_buffers``,
  ``_modules``, every forward / pre / backward hook dict, the non-persistent buffer set -- put back into the
  same container objects, so hook handles created before the snapshot keep working;
* every parameter and buffer tensor: its values, its ``requires_grad`` flag and its ``.grad`` (the tensor
  object, and its values).

Values are copied only for the tensors the operation may write (``tensors=``; ``None`` copies every
parameter, buffer and gradient). The others are watched through their version counters: an in-place change
to one of them (made, say, by a model's own ``forward`` while it is calibrated) cannot be undone, and
:meth:`ModelSnapshot.restore` names it; :func:`all_or_nothing` adds those names to the error as a note.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
from torch import nn

__all__ = ["ModelSnapshot", "all_or_nothing", "read_only"]


def _version(t: torch.Tensor) -> int | None:
    """The tensor's in-place version counter (``None`` for an inference tensor, which has none)."""
    try:
        return t._version
    except RuntimeError:
        return None


class _TensorRecord:
    """One tensor's restorable state."""

    __slots__ = ("tensor", "name", "version", "requires_grad", "grad", "grad_version", "values", "grad_values")

    def __init__(self, tensor: torch.Tensor, name: str, copy: bool):
        self.tensor = tensor
        self.name = name
        self.version = _version(tensor)
        self.requires_grad = tensor.requires_grad
        self.grad = tensor.grad if tensor.is_leaf else None
        self.grad_version = _version(self.grad) if self.grad is not None else None
        self.values = tensor.detach().clone() if copy else None
        self.grad_values = self.grad.detach().clone() if copy and self.grad is not None else None

    def restore(self) -> list[str]:
        """Put the tensor back; returns what could not be (changed in place without a copy)."""
        lost = []
        t = self.tensor
        with torch.no_grad():
            if self.values is not None:
                if t.shape != self.values.shape or t.dtype != self.values.dtype or t.device != self.values.device:
                    t.data = self.values
                else:  # always: a write through ``.data`` does not move the version counter
                    t.copy_(self.values)
            elif _version(t) != self.version:
                lost.append(self.name)
            if t.is_leaf:
                if t.requires_grad != self.requires_grad:
                    t.requires_grad_(self.requires_grad)
                t.grad = self.grad
            if self.grad is not None:
                if self.grad_values is not None:
                    self.grad.copy_(self.grad_values)
                elif _version(self.grad) != self.grad_version:
                    lost.append(f"{self.name}.grad")
        return lost


class ModelSnapshot:
    """The restorable state of one or more models (see the module docstring for what it covers).

    Args:
        models: ``nn.Module`` s (``None`` entries are skipped); shared submodules and tensors are recorded once.
        tensors: the parameters / buffers whose values are copied (the ones the operation may write); ``None``
            copies every parameter, buffer and gradient. The others are watched by version only.

    Raises:
        TypeError: a model that is not an ``nn.Module``.
    """

    def __init__(self, *models: nn.Module | None, tensors: Iterable[torch.Tensor] | None = None):
        copy_ids = None if tensors is None else {id(t) for t in tensors}
        self._modules: list[tuple[nn.Module, type, dict]] = []
        self._tensors: list[_TensorRecord] = []
        seen_modules: set[int] = set()
        seen_tensors: set[int] = set()
        for model in models:
            if model is None:
                continue
            if not isinstance(model, nn.Module):
                raise TypeError(f"ModelSnapshot: expected nn.Module models, got {type(model).__name__}")
            for prefix, module in model.named_modules(remove_duplicate=False):
                if id(module) in seen_modules:
                    continue
                seen_modules.add(id(module))
                attrs = {}
                for key, value in module.__dict__.items():
                    if isinstance(value, dict):
                        attrs[key] = (value, dict(value))
                    else:
                        attrs[key] = (value, set(value) if isinstance(value, set) else None)
                self._modules.append((module, type(module), attrs))
                for store in (module._parameters, module._buffers):
                    for attr, t in store.items():
                        if t is None or id(t) in seen_tensors:
                            continue
                        seen_tensors.add(id(t))
                        name = f"{prefix}.{attr}" if prefix else attr
                        copy = copy_ids is None or id(t) in copy_ids
                        self._tensors.append(_TensorRecord(t, name, copy))

    @property
    def restorable(self) -> bool:
        """False once :meth:`release` has dropped the snapshot."""
        return self._tensors is not None

    def release(self) -> None:
        """Drop the recorded state (and its copies, freeing their memory); the operation is past the point of
        no return. Idempotent."""
        self._modules = None
        self._tensors = None

    def restore(self) -> list[str]:
        """Put every recorded module and tensor back as it was.

        Returns:
            The names of watched tensors (or their ``.grad``) that were changed in place and could not be put
            back, because the snapshot held no copy of them; empty when the restore is complete.

        Raises:
            RuntimeError: the snapshot was released.
        """
        if not self.restorable:
            raise RuntimeError("ModelSnapshot.restore(): the snapshot was released")
        for module, cls, attrs in self._modules:
            if type(module) is not cls:
                module.__class__ = cls
            current = module.__dict__
            for key in [k for k in current if k not in attrs]:
                del current[key]
            for key, (value, contents) in attrs.items():
                if contents is not None:
                    value.clear()
                    value.update(contents)
                current[key] = value
        lost = []
        for record in self._tensors:
            lost += record.restore()
        return lost


@contextlib.contextmanager
def all_or_nothing(*models: nn.Module | None, tensors: Iterable[torch.Tensor] | None = None):
    """Run the body; if it raises (``KeyboardInterrupt`` included), put ``models`` back as they were and re-raise.

    Args:
        models, tensors: as :class:`ModelSnapshot`.

    Yields:
        The :class:`ModelSnapshot`.
    """
    snapshot = ModelSnapshot(*models, tensors=tensors)
    try:
        yield snapshot
    except BaseException as e:
        lost = snapshot.restore()
        if lost and hasattr(e, "add_note"):  # Python >= 3.11: what could not be restored is said on the error
            e.add_note("changed in place while the operation ran, not restored (only the tensors an operation "
                       f"writes are copied): {', '.join(lost[:10])}" + (" ..." if len(lost) > 10 else ""))
        raise


@contextlib.contextmanager
def read_only(*models: nn.Module | None, tensors: Iterable[torch.Tensor] = ()):
    """For a body that leaves ``models`` as it found them (runs them, copies them, changes ``tensors`` for a
    while): on every exit, error or not, each model's modes, hooks and attributes, and the values of ``tensors``,
    are put back. An in-place change to another tensor (by the models' own code) cannot be undone, and is named
    in a note on the body's error, if any.
    """
    with all_or_nothing(*models, tensors=tensors) as snapshot:
        yield snapshot
    snapshot.restore()
