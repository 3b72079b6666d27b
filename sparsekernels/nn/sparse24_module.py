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
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from ..formats.sparse24 import Sparse24Weight, compress_24, require_24_sparse, zero_weight_metadata
from ..ops import routing
from .base import SparseModule, check_loaded_values, register_bias

__all__ = ["Sparse24Module"]

_COMPRESSED = ("weight_values", "weight_meta")


class Sparse24Module(SparseModule):
    """Base of :class:`~sparsekernels.SparseLinear` and :class:`~sparsekernels.SparseConv2d`.

    A subclass sets :attr:`out_features_2d` / :attr:`in_features_2d` (the ``[out, k]`` GEMM view of its
    weight) and implements :meth:`weight_to_2d` / :meth:`weight_from_2d` between that view and its dense
    weight's own shape.
    """

    pattern = "2:4"
    cpu_note = ("the dense op on the resident dense weight, the one copy the CPU keeps (see "
                "sparsekernels.nn.sparse24_module); the state_dict stays compressed")

    def init_24_state(self, out: int, k: int, bias: bool, device, dtype: torch.dtype) -> None:
        """Zero state for an ``[out, k]`` GEMM-view weight, in the form ``device`` keeps."""
        self.out_features_2d, self.in_features_2d = out, k
        device = torch.device(device) if device is not None else torch.get_default_device()
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

    def load_weight(self, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> None:
        """Set the weight from a 2:4-sparse dense ``weight`` (in its own shape) and the bias (cast to the dtype).

        Raises:
            ValueError: ``weight`` is not 2:4 sparse (the message names the first offending group).
        """
        with torch.no_grad():
            resident = self._parameters.get("weight")
            if resident is not None:
                require_24_sparse(f"{type(self).__name__}.load_weight()", self.weight_to_2d(weight.detach()))
                resident.copy_(weight)
            else:
                w24 = compress_24(self.weight_to_2d(weight.detach()))
                self.weight_values.copy_(w24.values)
                self.weight_meta.copy_(w24.meta)
            if bias is not None:
                self.bias.copy_(bias.detach())

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
            return compress_24(self.weight_to_2d(dense.detach()))
        values = self._parameters["weight_values"]
        return Sparse24Weight(values.detach(), self._buffers["weight_meta"], (self.out_features_2d, self.in_features_2d))

    def op_weight24(self) -> Sparse24Weight:
        """The compressed weight a forward call hands to the op: the resident tensors themselves (no detach, so
        ``torch.export`` lifts them as they are), or, in the dense form under a forced backend, a compression
        made for this call."""
        values = self._parameters.get("weight_values")
        if values is None:
            return self.weight24
        return Sparse24Weight(values, self._buffers["weight_meta"], (self.out_features_2d, self.in_features_2d))

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
                w24 = compress_24(self.weight_to_2d(dense.detach()))
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
            del destination[prefix + "weight"]
            destination[prefix + "weight_values"] = w24.values
            destination[prefix + "weight_meta"] = w24.meta
            if bias is not None:
                destination[prefix + "bias"] = bias

    def loaded_weight24(self, state_dict, prefix: str) -> Optional[Sparse24Weight]:
        """The compressed weight ``state_dict`` holds for this layer, checked (shapes, dtypes, devices, and the
        metadata: one pass over it), or None when it lacks one of the two tensors.

        Raises:
            TypeError / ValueError: what is wrong, naming the entry.
        """
        names = [prefix + n for n in _COMPRESSED]
        if not all(n in state_dict for n in names):
            return None
        w24 = Sparse24Weight(state_dict[names[0]], state_dict[names[1]], (self.out_features_2d, self.in_features_2d))
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
