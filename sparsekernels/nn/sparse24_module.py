"""The state of a 2:4 module, kept in one copy on every device.

A 2:4 layer's state dict always holds the compressed weight (``weight_values`` ``[out, k/2]`` and the packed
positions ``weight_meta`` ``uint8 [out, ceil(k/8)]``, see :mod:`sparsekernels.formats.sparse24`) and the
``bias``. What lives in memory depends on the device:

* on the CPU with ``backend="auto"``: the dense weight ``weight`` and nothing else. No CPU backend beats a
  dense GEMM on an expanded weight (``docs/sparse24.md``: expanding per call is 0.02-0.77x of dense, torch's
  CSR 0.17-0.36x), so the CPU keeps the one copy that computes fastest: resident memory is that of the dense
  layer (1.0x), not the compressed tensors plus a cached dense copy (1.5x). ``torch.compile`` and
  ``torch.export`` then trace the dense op.
* everywhere else (a GPU, the meta device, or an explicit backend such as ``"reference"`` or ``"triton"``):
  the compressed tensors themselves, which the kernels stream and the custom op takes.

Moving the module (``.to()``, ``.cuda()``, ``.cpu()``, ``to_empty``) or setting ``backend`` converts the
resident form; ``state_dict()`` and ``load_state_dict()`` speak the compressed form in both. Both forms answer
``weight`` (the dense ``[out, in, ...]`` weight, computed from the compressed form) and
:attr:`~Sparse24Module.weight24`.

**Input permutation.** A layer built from a dense layer carrying a buffer ``input_perm`` (an ``int64`` permutation of
its input features, or of a conv's input channels, with the weight 2:4 in that order: what channel-permutation
pruning produces, see ``docs/sparse24.md``) carries the same buffer. Its compressed tensors hold the weight in the
permuted order and the kernels gather their input by ``input_perm``; its resident dense weight on the CPU is in the
original order, the permutation folded in, so the CPU forward is the plain dense op with no gather. The state dict
holds ``weight_values`` / ``weight_meta`` (permuted order) and ``input_perm`` in both forms; they load together and
``input_perm`` is checked to be a permutation. A layer without one has no such buffer and costs nothing more.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
from torch import nn

from ..formats.permutation import PERM_DTYPE, check_permutation, check_permutation_tensor
from ..formats.sparse24 import (
    Sparse24Weight,
    compress_24,
    first_non24_group,
    permute_columns,
    require_24_sparse,
    zero_weight_metadata,
)
from ..ops import routing
from .base import SparseModule, check_loaded_values, register_bias

__all__ = ["Sparse24Module", "dense_input_perm"]

_COMPRESSED = ("weight_values", "weight_meta")
_PERM = "input_perm"


def dense_input_perm(module: nn.Module) -> Optional[torch.Tensor]:
    """The ``input_perm`` a dense layer carries (pruning's channel permutation, see the module docstring), or None."""
    perm = getattr(module, _PERM, None)
    return perm if isinstance(perm, torch.Tensor) else None


class Sparse24Module(SparseModule):
    """Base of :class:`~sparsekernels.SparseLinear` and :class:`~sparsekernels.SparseConv2d`.

    A subclass sets :attr:`out_features_2d` / :attr:`in_features_2d` (the ``[out, k]`` GEMM view of its
    weight) and implements :meth:`weight_to_2d` / :meth:`weight_from_2d` between that view and its dense
    weight's own shape.
    """

    pattern = "2:4"
    cpu_note = ("the dense op on the resident dense weight, the one copy the CPU keeps (see "
                "sparsekernels.nn.sparse24_module); the state_dict stays compressed")

    def init_24_state(self, out: int, k: int, bias: bool, device, dtype: torch.dtype, perm_length: int = 0) -> None:
        """Zero state for an ``[out, k]`` GEMM-view weight, in the form ``device`` keeps; with ``perm_length`` (the
        layer's input features or channels, dividing ``k``) also an identity ``input_perm`` buffer."""
        self.out_features_2d, self.in_features_2d = out, k
        device = torch.device(device) if device is not None else torch.get_default_device()
        if perm_length:
            self.register_buffer(_PERM, torch.arange(perm_length, dtype=PERM_DTYPE, device=device))
        if self.keeps_dense(device):
            dense = torch.zeros(out, k, device=device, dtype=dtype)
            self.weight = nn.Parameter(self.weight_from_2d(dense), requires_grad=False)
        else:
            self.weight_values = nn.Parameter(torch.zeros(out, k // 2, device=device, dtype=dtype), requires_grad=False)
            self.register_buffer("weight_meta", zero_weight_metadata(out, k, device=device))
        register_bias(self, bias, out, device, dtype)
        self.prepare_op()

    def weight_to_2d(self, weight: torch.Tensor) -> torch.Tensor:
        """The dense weight in its own shape -> the ``[out, k]`` view the 2:4 groups run along."""
        raise NotImplementedError

    def weight_from_2d(self, weight2d: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`weight_to_2d` (a new, contiguous tensor)."""
        raise NotImplementedError

    @classmethod
    def convert(cls, dense: nn.Module, backend: str, **args) -> "Sparse24Module":
        """``cls(**args)`` built like ``dense`` (bias or not, device, dtype, its ``input_perm`` if it carries one) and
        given its weights: the body of every ``from_dense``.

        Raises:
            ValueError: :meth:`check_convertible` refuses ``dense`` (the message says why), or unknown backend.
        """
        reason = cls.check_convertible(dense)
        if reason is not None:
            raise ValueError(f"{cls.__name__}.from_dense(): cannot convert {dense!r}: {reason}")
        w = dense.weight
        perm = dense_input_perm(dense)
        if perm is not None:
            args["input_perm"] = True
        layer = cls(**args, bias=dense.bias is not None, backend=backend, device=w.device, dtype=w.dtype)
        layer.load_weight(w.detach(), dense.bias, input_perm=perm)
        return layer

    @staticmethod
    def input_perm_reason(dense: nn.Module, length: int) -> Optional[str]:
        """Why the ``input_perm`` that ``dense`` carries is not a permutation of its ``length`` inputs (not an int64
        1-D tensor of that length, or not a permutation), else None (also when it carries none)."""
        perm = getattr(dense, _PERM, None)
        if perm is None:
            return None
        try:
            check_permutation("input_perm", perm, length)
        except (TypeError, ValueError) as exc:
            return str(exc).replace("input_perm: expected", "it carries an input_perm, expected", 1)
        return None

    @classmethod
    def sparse24_reason(cls, dense: nn.Module, empty: str, inputs: tuple[str, int], weight2d: Callable[[], torch.Tensor],
                        describe: Callable[[int, int, int], str]) -> Optional[str]:
        """The checks every 2:4 layer makes after its own (type, dtype, shape), in order: an empty weight (``empty``
        names its size), ``inputs = (message, count)`` -- the inputs its groups of 4 run along, and the message when
        ``count`` is not a multiple of 4 --, the ``input_perm`` it may carry (a permutation of ``count``), then the
        2:4 pattern of ``weight2d()`` (:meth:`pattern_reason`). None if it can be stored."""
        if dense.weight.numel() == 0:
            return f"the weight is empty ({empty})"
        message, count = inputs
        if count % 4:
            return message
        return cls.input_perm_reason(dense, count) or cls.pattern_reason(weight2d(), describe, dense_input_perm(dense))

    @staticmethod
    def pattern_reason(weight2d: torch.Tensor, describe: Callable[[int, int, int], str],
                       input_perm: Optional[torch.Tensor] = None) -> Optional[str]:
        """Why the ``[out, k]`` view of a dense weight cannot be stored 2:4 -- its values are unknown (meta device),
        or ``describe(row, group, count)`` of its first group of 4 with more than 2 non-zeros, in the order of
        ``input_perm`` when given (:func:`~sparsekernels.formats.sparse24.permute_columns`) -- else None."""
        if weight2d.device.type == "meta":
            return "weight is on the meta device (its sparsity pattern is unknown)"
        if input_perm is not None:
            weight2d = permute_columns(weight2d, input_perm.to(weight2d.device))
        bad = first_non24_group(weight2d)
        if bad is None:
            return None
        return describe(*bad) + (" (in the order of its input_perm)" if input_perm is not None else "")

    def forward_resident_dense(self, x, dense_op: Callable) -> Optional[torch.Tensor]:
        """``dense_op(x, weight, bias)`` on the resident dense weight when that is the form in use (CPU,
        ``backend="auto"``) and torch accepts ``x``; None otherwise, and the caller runs the sparse op, whose checks
        raise the clear error for an input torch refused (or that torch would take but the contract does not: a meta
        input beside a CPU weight)."""
        if not self.uses_resident_dense():
            return None
        weight, bias = self._parameters["weight"], self._parameters["bias"]
        if routing.is_compiling():
            return dense_op(x, weight, bias)
        try:
            y = dense_op(x, weight, bias)
        except (RuntimeError, TypeError, ValueError):
            return None
        return None if y.is_meta else y

    def load_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor],
                    input_perm: Optional[torch.Tensor] = None) -> None:
        """Set the weight from a 2:4-sparse dense ``weight`` (in its own shape, original input order) and the bias
        (cast to the dtype); a layer carrying ``input_perm`` takes ``input_perm`` too (the weight must be 2:4 in its
        order).

        Raises:
            ValueError: ``weight`` is not 2:4 sparse (the message names the first offending group), or
                ``input_perm`` given to a layer without one (or missing for one with one), or not a permutation.
        """
        fn = f"{type(self).__name__}.load_weight()"
        if (input_perm is None) != (not self.permuted):
            raise ValueError(f"{fn}: expected input_perm {'with' if self.permuted else 'only with'} a layer built "
                             "with input_perm=True")
        if input_perm is not None:
            check_permutation(fn, input_perm, self._buffers[_PERM].shape[0])
            input_perm = input_perm.detach().to(self._buffers[_PERM].device)
        with torch.no_grad():
            resident = self._parameters.get("weight")
            if resident is not None:
                weight2d = self.weight_to_2d(weight.detach())
                if input_perm is not None:
                    weight2d = permute_columns(weight2d, input_perm.to(weight2d.device))
                require_24_sparse(fn, weight2d)
                resident.copy_(weight)
            else:
                w24 = compress_24(self.weight_to_2d(weight.detach()), input_perm=input_perm)
                self.weight_values.copy_(w24.values)
                self.weight_meta.copy_(w24.meta)
            if input_perm is not None:
                self._buffers[_PERM].copy_(input_perm)
            if bias is not None:
                self.bias.copy_(bias.detach())

    @property
    def permuted(self) -> bool:
        """Whether the layer carries an ``input_perm`` (its compressed weight is stored in that input order)."""
        return _PERM in self._buffers

    def _perm(self) -> Optional[torch.Tensor]:
        return self._buffers.get(_PERM)

    def attach_input_perm(self, dense: nn.Module) -> nn.Module:
        """Give the dense layer :meth:`to_dense` built this layer's ``input_perm`` (a copy, as a buffer), if it has
        one: the dense layer is then exactly what pruning hands to ``sparsify``, which converts it back."""
        perm = self._perm()
        if perm is not None:
            dense.register_buffer(_PERM, perm.detach().clone())
        return dense

    @staticmethod
    def check_input_perm_flag(fn: str, input_perm) -> bool:
        """The constructor's ``input_perm`` argument: a bool (whether the layer carries a permutation)."""
        if not isinstance(input_perm, bool):
            raise TypeError(f"{fn}: expected input_perm to be a bool (whether the layer carries an input permutation; "
                            f"its values come from from_dense or load_state_dict), got {type(input_perm).__name__}")
        return input_perm

    def perm_repr(self) -> str:
        return ", input_perm=True" if self.permuted else ""

    # -- the two forms ------------------------------------------------------------------------------

    def keeps_dense(self, device: torch.device) -> bool:
        """Is the dense weight the resident form on ``device``? On the CPU with ``backend="auto"``."""
        return device.type == "cpu" and self.backend == "auto"

    def backend_changed(self) -> None:
        if "weight" in self._parameters or "weight_values" in self._parameters:
            self.state_changed()

    def state_changed(self) -> None:
        self._to_resident_form()
        self.prepare_op()

    def needs_op(self) -> bool:
        return "weight_values" in self._parameters or routing.backend_forced()

    def resident_dense_weight(self) -> Optional[torch.Tensor]:
        """The dense weight when it is the resident form (on the CPU), else None."""
        return self._parameters.get("weight")

    @property
    def weight24(self) -> Sparse24Weight:
        """The compressed ``[out, k]`` weight (sharing storage with the module on a GPU; built on the CPU)."""
        dense = self._parameters.get("weight")
        if dense is not None:
            return compress_24(self.weight_to_2d(dense.detach()), input_perm=self._perm())
        values = self._parameters["weight_values"]
        return Sparse24Weight(values.detach(), self._buffers["weight_meta"], (self.out_features_2d, self.in_features_2d),
                              self._perm())

    def op_weight24(self) -> Sparse24Weight:
        """The compressed weight a forward call hands to the op: the resident tensors themselves (no detach, so
        ``torch.export`` lifts them as they are), or, in the dense form under a forced backend, a compression
        made for this call. It carries the layer's ``input_perm``, which the op applies to the input."""
        values = self._parameters.get("weight_values")
        if values is None:
            return self.weight24
        return Sparse24Weight(values, self._buffers["weight_meta"], (self.out_features_2d, self.in_features_2d),
                              self._perm())

    @property
    def weight_dtype(self) -> torch.dtype:
        dense = self._parameters.get("weight")
        return (dense if dense is not None else self._parameters["weight_values"]).dtype

    def dense_weight(self) -> torch.Tensor:
        """The dense weight in its own shape (a new tensor)."""
        dense = self._parameters.get("weight")
        if dense is not None:
            return dense.detach().clone()
        return self.weight_from_2d(self.weight24.to_dense())

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Library code reads ``layer.weight`` (e.g. Hugging Face's get_output_embeddings), and older code
            # ``weight_values``: answer both in either form, computed from the resident one.
            if name == "weight" and "weight_values" in self._parameters:
                return self.dense_weight()
            if name in _COMPRESSED and "weight" in self._parameters:
                w24 = self.weight24
                return w24.values if name == "weight_values" else w24.meta
            raise

    def _to_resident_form(self) -> None:
        """Make the resident form the one :meth:`keeps_dense` asks for."""
        dense = self._parameters.get("weight")
        if dense is not None and not self.keeps_dense(dense.device):
            if dense.device.type == "meta":
                values = torch.zeros(self.out_features_2d, self.in_features_2d // 2, dtype=dense.dtype, device="meta")
                meta = torch.empty(self.out_features_2d, (self.in_features_2d + 7) // 8, dtype=torch.uint8,
                                   device="meta")
            else:
                w24 = compress_24(self.weight_to_2d(dense.detach()), input_perm=self._perm())
                values, meta = w24.values, w24.meta
            del self._parameters["weight"]
            self.weight_values = nn.Parameter(values, requires_grad=False)
            self.register_buffer("weight_meta", meta)
        elif dense is None and self.keeps_dense(self._parameters["weight_values"].device):
            dense = self.weight_from_2d(self.weight24.to_dense())
            del self._parameters["weight_values"]
            del self._buffers["weight_meta"]
            self.weight = nn.Parameter(dense, requires_grad=False)

    # -- the state dict speaks the compressed form ------------------------------------------------------

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if "weight" in self._parameters:
            w24 = self.weight24
            bias = destination.pop(prefix + "bias", None)
            perm = destination.pop(prefix + _PERM, None)
            del destination[prefix + "weight"]
            destination[prefix + "weight_values"] = w24.values
            destination[prefix + "weight_meta"] = w24.meta
            if bias is not None:
                destination[prefix + "bias"] = bias
            if perm is not None:
                destination[prefix + _PERM] = perm

    def loaded_weight24(self, state_dict, prefix: str) -> Optional[Sparse24Weight]:
        """The compressed weight ``state_dict`` holds for this layer, checked (shapes, dtypes, devices, the metadata:
        one pass over it, and the ``input_perm`` of a permuted layer: a permutation of the right length), or None
        when it holds none of it.

        A permuted layer's ``weight_values``, ``weight_meta`` and ``input_perm`` load together (the values are in
        the order the permutation gives). An ``input_perm`` for a layer without one is refused: its values would be
        read in the wrong order.

        Raises:
            TypeError / ValueError: what is wrong, naming the entry.
        """
        names = [prefix + n for n in _COMPRESSED]
        perm_name = prefix + _PERM
        if not self.permuted:
            if perm_name in state_dict:
                raise ValueError(f"got {perm_name}, an input permutation, for a layer built without one (its "
                                 "weight would be read in the wrong input order); build it with input_perm=True")
            if not all(n in state_dict for n in names):
                return None
            perm = None
        else:
            given = [n for n in (*names, perm_name) if n in state_dict]
            if not given:
                return None
            if len(given) < 3:
                lacking = [n for n in (*names, perm_name) if n not in state_dict]
                raise ValueError(f"expected {', '.join(names)} and {perm_name} together (the compressed weight is "
                                 f"stored in the order of its permutation), got no {', '.join(lacking)}")
            perm = state_dict[perm_name]
            check_permutation_tensor("load_state_dict()", perm, self._buffers[_PERM].shape[0], perm_name)
        w24 = Sparse24Weight(state_dict[names[0]], state_dict[names[1]], (self.out_features_2d, self.in_features_2d),
                             perm)
        check_loaded_values(state_dict, prefix, _COMPRESSED[0])
        return w24.validate()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        names = [prefix + n for n in _COMPRESSED]
        try:
            w24 = self.loaded_weight24(state_dict, prefix)
        except (TypeError, ValueError) as exc:  # nothing of this layer is loaded
            error_msgs.append(f"While loading {prefix or 'the 2:4 layer'}: {exc}")
            return
        if "weight" in self._parameters:
            # The dense form: expand the compressed tensors into the resident dense weight.
            if w24 is not None:
                state_dict[prefix + "weight"] = self.weight_from_2d(w24.to_dense())
                for n in names:
                    del state_dict[n]
            before = len(missing_keys)
            super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                          error_msgs)
            if prefix + "weight" in missing_keys[before:]:  # name what the file lacks, not the resident form
                missing_keys.remove(prefix + "weight")
                missing_keys.extend(n for n in names if n not in state_dict)
                for n in names:
                    if n in unexpected_keys:
                        unexpected_keys.remove(n)
            return
        # (then state_changed: a compressed state assigned onto the CPU becomes the dense form)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def uses_resident_dense(self) -> bool:
        """True when a forward call may run ``F.linear`` / ``F.conv2d`` on the resident dense weight: the dense
        form (CPU, ``backend="auto"``) and no ``SPARSEKERNELS_BACKEND`` override."""
        return "weight" in self._parameters and not routing.backend_forced()
