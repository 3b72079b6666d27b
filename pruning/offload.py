"""Where a layer's weight really is, and how to put back the weights an operation overwrote.

A model dispatched by Hugging Face Accelerate (``dispatch_model``, ``cpu_offload``, ``disk_offload``,
``from_pretrained(device_map=...)``) keeps an offloaded layer's weight outside the module between forward passes:
``module.weight`` is on the meta device, and the values live in the weights map of the layer's
``AlignDevicesHook`` (a CPU state dict, or the ``.dat`` files of an offload folder), which the hook puts in place
for the duration of one forward. :func:`read_weight` and :func:`write_weight` read and write the values where
they are, so that a dispatched model is pruned without being moved. Accelerate is imported only when a layer
carries its hook (the model was dispatched by it, so it is installed).

:class:`UndoLog` keeps the values an operation overwrites, so that it can put them back if it fails: in memory,
or in a temporary folder on disk, so that the memory it holds does not grow with the model.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import MutableMapping
from pathlib import Path

import torch
from torch import nn

__all__ = ["offload_hook", "read_weight", "write_weight", "check_writable", "UndoLog", "UNDO_PLACES"]

UNDO_PLACES = ("disk", "memory")


def offload_hook(module: nn.Module):
    """The Accelerate ``AlignDevicesHook`` that offloads ``module``'s own weights, or ``None``."""
    if getattr(module, "_hf_hook", None) is None:
        return None
    from accelerate.utils import has_offloaded_params

    return module._hf_hook if has_offloaded_params(module) else None


def _storage(hook) -> tuple[object, str]:
    """The mapping that holds an offloaded weight, and its key there."""
    from accelerate.utils import PrefixedDataset

    weights = hook.weights_map
    if isinstance(weights, PrefixedDataset):
        return weights.dataset, f"{weights.prefix}weight"
    return weights, "weight"


def read_weight(module: nn.Module) -> torch.Tensor:
    """The values of ``module.weight`` (detached): the parameter itself, or for a layer offloaded by Accelerate
    its value in the hook's weights map (on the CPU, read from disk for a disk offload).

    Raises:
        ValueError: a weight on the meta device that no Accelerate hook holds values for.
    """
    hook = offload_hook(module)
    if hook is not None:
        return hook.weights_map["weight"].detach()
    weight = module.weight.detach()
    if weight.device.type == "meta":
        raise ValueError(f"expected a {type(module).__name__} weight with values, got one on the meta device and no "
                         "Accelerate offload hook holding its values (load the weights first)")
    return weight


def check_writable(module: nn.Module) -> None:
    """Raise ``ValueError`` when :func:`write_weight` could not store a new weight of ``module`` (an offloaded weight
    read straight from a checkpoint file with no offload folder to write to): checked before anything changes."""
    hook = offload_hook(module)
    if hook is None:
        read_weight(module)
        return
    from accelerate.utils import OffloadedWeightsLoader

    store, key = _storage(hook)
    if isinstance(store, OffloadedWeightsLoader):
        if key not in store.state_dict and store.save_folder is None:
            raise ValueError(f"expected an offloaded weight that can be rewritten, got {key!r} read from a checkpoint "
                             "file with no offload folder (dispatch the model with offload_dir= / offload_folder=)")
    elif not isinstance(store, MutableMapping):
        raise ValueError(f"expected the weights map of an Accelerate hook to be a dict or an offload folder, got "
                         f"{type(store).__name__} for {key!r}")


def write_weight(module: nn.Module, value: torch.Tensor) -> None:
    """Store ``value`` as ``module``'s weight, in place and in the weight's own dtype: in the parameter, or in the
    Accelerate weights map of an offloaded layer (a CPU tensor is overwritten in place; a weight on disk gets a new
    ``.dat`` file in the offload folder, so a checkpoint the folder points at is never written)."""
    hook = offload_hook(module)
    if hook is None:
        with torch.no_grad():
            module.weight.copy_(value)
        return
    from accelerate.utils import OffloadedWeightsLoader, offload_weight

    check_writable(module)
    store, key = _storage(hook)
    if isinstance(store, OffloadedWeightsLoader) and key not in store.state_dict:
        dtype = getattr(torch, store.index[key]["dtype"]) if "dtype" in store.index.get(key, {}) else value.dtype
        offload_weight(value.detach().to("cpu", dtype).contiguous(), key, store.save_folder, index=store.index)
        return
    held = store.state_dict[key] if isinstance(store, OffloadedWeightsLoader) else store[key]
    with torch.no_grad():
        held.copy_(value)


class UndoLog:
    """The weights an operation overwrote, to put them back if it fails.

    Args:
        where: ``"disk"`` (a fresh folder in the system's temporary directory, ``TMPDIR``), ``"memory"`` (CPU
            copies), or a folder to make that fresh folder in.

    Attributes:
        held_bytes: bytes of saved weights held in memory (0 on disk).

    Raises:
        ValueError: ``where`` is neither ``"disk"``, ``"memory"`` nor an existing folder.
    """

    def __init__(self, where: str | os.PathLike = "disk"):
        if isinstance(where, str) and where in UNDO_PLACES:
            parent = None if where == "disk" else False
        elif isinstance(where, (str, os.PathLike)) and Path(where).is_dir():
            parent = Path(where)
        else:
            raise ValueError(f"undo: expected 'disk', 'memory' or an existing folder, got {where!r}")
        self._folder = Path(tempfile.mkdtemp(prefix="pruning-undo-", dir=parent)) if parent is not False else None
        self._entries: list[tuple[str, nn.Module, object, dict | None, bool]] = []
        self._saved: set[int] = set()
        self.held_bytes = 0

    @property
    def names(self) -> list[str]:
        """The names of the saved layers, in the order they were saved."""
        return [entry[0] for entry in self._entries]

    def save(self, name: str, module: nn.Module) -> None:
        """Keep ``module``'s current weight (once per module; later calls do nothing)."""
        if id(module) in self._saved:
            return
        value = read_weight(module).to("cpu", copy=True).contiguous()
        entry, dat_existed = None, True
        hook = offload_hook(module)
        if hook is not None:
            from accelerate.utils import OffloadedWeightsLoader

            store, key = _storage(hook)
            if isinstance(store, OffloadedWeightsLoader) and key not in store.state_dict:
                entry = dict(store.index[key])
                dat_existed = (Path(store.save_folder) / f"{key}.dat").exists()
        if self._folder is None:
            held = value
            self.held_bytes += value.numel() * value.element_size()
        else:
            from safetensors.torch import save_file

            held = self._folder / f"{len(self._entries)}.safetensors"
            save_file({"weight": value}, str(held))
        self._entries.append((name, module, held, entry, dat_existed))
        self._saved.add(id(module))

    def restore(self) -> tuple[list[str], list[str]]:
        """Put every saved weight back (latest first), going on past a weight that cannot be written back.

        Returns:
            ``(restored, failed)``: the names put back, and ``"name: error"`` for each one that could not be.
        """
        restored, failed = [], []
        for name, module, held, entry, dat_existed in reversed(self._entries):
            try:
                if isinstance(held, Path):
                    from safetensors.torch import load_file

                    held = load_file(str(held))["weight"]
                if entry is not None and "safetensors_file" in entry:
                    store, key = _storage(offload_hook(module))
                    store.index[key] = entry  # read from the checkpoint again, which was never written
                    if not dat_existed:
                        (Path(store.save_folder) / f"{key}.dat").unlink(missing_ok=True)
                else:
                    write_weight(module, held)
                restored.append(name)
            except Exception as e:  # the others must still be put back
                failed.append(f"{name}: {type(e).__name__}: {e}")
        return restored, failed

    def close(self) -> None:
        """Drop what was saved (the folder on disk too). Idempotent."""
        self._entries = []
        self._saved = set()
        self.held_bytes = 0
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None

    def __enter__(self) -> "UndoLog":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
