"""The sparsekernels plug-in of transformers' quantizer mechanism: ``SparseKernelsConfig`` and its ``HfQuantizer``.

transformers loads a checkpoint whose ``config.json`` has a ``quantization_config`` through the ``HfQuantizer``
registered under its ``quant_method`` (``transformers.quantizers.register_quantizer``; torchao, bitsandbytes and
compressed-tensors plug in the same way). Ours, ``"sparsekernels"``:

* before the weights are read (the model is still on the meta device), replaces every sparse layer of the checkpoint
  by its sparse module built on the meta device: the layers ``config.json`` lists (``sparse_modules``), plus any
  layer whose tensors in the checkpoint are 2:4-compressed (``<layer>.weight_values`` + ``<layer>.weight_meta``, and
  ``<layer>.input_perm`` for a layer stored in a permuted input order, or compressed-tensors' ``sparse-24-bitmask``
  triple). transformers then reads the compressed tensors straight into those modules: no dense weight of a sparse
  layer is ever built;
* after loading, freezes them, checks the 2:4 metadata and the input permutations and lets each layer take its
  resident form (dense on the CPU with ``backend="auto"``, compressed elsewhere, see
  :mod:`sparsekernels.nn.sparse24_module`); with
  ``sparsify_dense`` it also swaps in every dense layer whose weight is 2:4 (dense checkpoints such as
  llm-compressor's);
* at ``save_pretrained``, records the model's present sparse layers in ``config.json``.

``SparseKernelsConfig`` is mutable, unlike this project's other configs: transformers updates quantization configs
in place (``from_dict(**kwargs)``, ``update()``), and the record of sparse layers is refreshed at every save.
"""
from __future__ import annotations

import fnmatch
import json
import logging
import os
from typing import Optional

import torch
from torch import nn
from transformers.core_model_loading import ConversionOps, WeightConverter
from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
from transformers.quantizers.auto import AUTO_QUANTIZATION_CONFIG_MAPPING, AUTO_QUANTIZER_MAPPING
from transformers.utils.quantization_config import QuantizationConfigMixin

from ..formats.sparse24 import compress_24
from ..nn import SparseLinear, SparseModule, sparse_module_class, sparse_module_types
from ..nn.sparse24_module import Sparse24Module
from ..nn.walk import module_occurrences, move_hooks, replace_modules
from ..ops.routing import check_backend_name
from ..swap import HF_FORMAT_VERSION, HF_QUANT_METHOD, densify, sparsify
from .bitmask import find_bitmask_layers, sparse24_from_bitmask

__all__ = ["QUANT_METHOD", "FORMAT_VERSION", "SparseKernelsConfig", "SparseKernelsHfQuantizer", "register",
           "sparse_module_records"]

QUANT_METHOD = HF_QUANT_METHOD
FORMAT_VERSION = HF_FORMAT_VERSION
logger = logging.getLogger(__name__)


class SparseKernelsConfig(QuantizationConfigMixin):
    """The ``quantization_config`` of a sparsekernels checkpoint (``config.json``), or of a load that sparsifies.

    Args:
        sparse_modules: the sparse layers, as groups ``{"class": "SparseLinear", "args": {constructor args},
            "names": [qualified names]}``; written by ``save_pretrained``. Layers stored 2:4-compressed in the
            checkpoint are found from its tensor names even when not listed.
        sparsify_dense: after loading, swap in every dense layer whose weight is 2:4 sparse
            (``sparsekernels.sparsify``). True by default, for ``from_pretrained(dense_dir,
            quantization_config=SparseKernelsConfig())``; saved checkpoints record False (their sparse layers are
            listed).
        backend: the ``backend`` of every sparse layer (``"auto"``, ``"triton"``, ``"reference"``, ``"dense"``,
            ``"cusparselt"``).
        ignore: ``fnmatch`` patterns of qualified layer names that ``sparsify_dense`` leaves dense.
        format_version: the version of this record (a newer one than this installation knows is refused).
        quant_method: always ``"sparsekernels"``.

    Raises:
        ValueError: another ``quant_method``, a newer ``format_version``, an unknown backend, or a malformed
            ``sparse_modules`` / ``ignore``.
    """

    def __init__(self, sparse_modules: Optional[list] = None, sparsify_dense: bool = True, backend: str = "auto",
                 ignore: Optional[list] = None, format_version: int = FORMAT_VERSION,
                 quant_method: str = QUANT_METHOD, **unknown) -> None:
        fn = "SparseKernelsConfig()"
        if quant_method != QUANT_METHOD:
            raise ValueError(f"{fn}: expected quant_method {QUANT_METHOD!r}, got {quant_method!r}")
        if isinstance(format_version, bool) or not isinstance(format_version, int) or format_version < 1:
            raise ValueError(f"{fn}: expected a positive integer format_version, got {format_version!r}")
        if format_version > FORMAT_VERSION:
            raise ValueError(f"{fn}: this checkpoint was written in format {format_version} by a newer sparsekernels; "
                             f"this installation reads format {FORMAT_VERSION}: upgrade sparsekernels")
        if not isinstance(sparsify_dense, bool):
            raise ValueError(f"{fn}: expected sparsify_dense to be a bool, got {sparsify_dense!r}")
        ignore = list(ignore or [])
        if not all(isinstance(p, str) for p in ignore):
            raise ValueError(f"{fn}: expected ignore to be a list of name patterns, got {ignore!r}")
        self.quant_method = QUANT_METHOD
        self.format_version = format_version
        self.sparse_modules = _check_records(fn, sparse_modules or [])
        self.sparsify_dense = sparsify_dense
        self.backend = check_backend_name(fn, backend)
        self.ignore = ignore
        if unknown:  # written by a newer release of the same format: kept, so a save writes it back
            logger.warning("%s: ignoring unknown keys %s", fn, sorted(unknown))
            self.__dict__.update(unknown)

    def ignores(self, name: str) -> bool:
        """Whether ``sparsify_dense`` must leave the layer called ``name`` dense."""
        return any(fnmatch.fnmatchcase(name, p) for p in self.ignore)


def _check_records(fn: str, records) -> list:
    if not isinstance(records, list):
        raise ValueError(f"{fn}: expected sparse_modules to be a list, got {type(records).__name__}")
    for group in records:
        if (not isinstance(group, dict) or not isinstance(group.get("class"), str)
                or not isinstance(group.get("args"), dict) or not isinstance(group.get("names"), list)
                or not all(isinstance(n, str) for n in group["names"])):
            raise ValueError(f"{fn}: expected every sparse_modules entry to be "
                             f"{{'class': str, 'args': dict, 'names': [str]}}, got {group!r}")
    return records


def sparse_module_records(model: nn.Module) -> list:
    """The sparse layers of ``model`` as ``sparse_modules`` groups (one per class and constructor arguments)."""
    groups: dict[tuple[str, str], dict] = {}
    for name, module in model.named_modules():
        if isinstance(module, SparseModule):
            args = module.constructor_args()
            key = (type(module).__name__, json.dumps(args, sort_keys=True))
            groups.setdefault(key, {"class": type(module).__name__, "args": args, "names": []})["names"].append(name)
    return list(groups.values())


# ------------------------------------------------------------------------------------------------------------
# finding and building the sparse layers of a checkpoint on the meta device


def _args_from_dense(cls: type, module: nn.Module) -> Optional[dict]:
    """The constructor arguments of a ``cls`` layer replacing the dense ``module`` (its geometry only: no values
    are read, so it works on the meta device), or None when ``cls`` cannot say."""
    if not issubclass(cls, SparseModule):
        return None
    return dict(cls.dense_args(module))


def _resolve(model: nn.Module, name: str) -> Optional[str]:
    """The model's name for a checkpoint's layer ``name``: as is, or with the base model prefix removed or added
    (a ``...ForCausalLM`` checkpoint loaded as the base model, or the reverse), or None when the model has none."""
    prefix = getattr(model, "base_model_prefix", "")
    candidates = [name]
    if prefix:
        candidates += [name[len(prefix) + 1:]] if name.startswith(prefix + ".") else [f"{prefix}.{name}"]
    for candidate in candidates:
        try:
            model.get_submodule(candidate)
        except AttributeError:
            continue
        return candidate
    return None


def _checkpoint_keys(files) -> Optional[set]:
    """Tensor names of the safetensors ``files`` (headers only), or None when they are not all safetensors."""
    if not files or not all(str(f).endswith(".safetensors") for f in files):
        return None
    from safetensors import safe_open

    keys: set = set()
    for path in files:
        with safe_open(os.fspath(path), framework="pt") as f:
            keys.update(f.keys())
    return keys


def _same(a, b) -> bool:
    norm = lambda v: tuple(v) if isinstance(v, (list, tuple)) else v  # noqa: E731
    return norm(a) == norm(b)


def _check_target(cls: type, old: nn.Module, args: dict, name: str) -> None:
    if not cls.matches_dense(old):
        raise ValueError(f"from_pretrained(): the checkpoint stores a {cls.__name__} at {name!r}, expected the model "
                         f"to have a {cls.dense_label()} there, got {type(old).__name__}")
    for attr, recorded in args.items():
        have = (old.bias is not None) if attr == "bias" else getattr(old, attr, None)
        if have is None or isinstance(have, (str, torch.Tensor)):
            continue
        if not _same(have, recorded):
            raise ValueError(f"from_pretrained(): layer {name!r} has {attr}={have} in the model but {recorded} in "
                             "the checkpoint")


def _check_permuted(name: str, args: dict, stored_as: str, keys: set, bitmask: bool) -> None:
    """A layer stored in a permuted input order (``<layer>.input_perm`` in the checkpoint) must be built as one, or its
    weight would be read in the wrong order; a bitmask layer has no such order."""
    stored = f"{stored_as}.input_perm" in keys
    if stored and not args.get("input_perm"):
        raise ValueError(f"from_pretrained(): the checkpoint stores {stored_as}.input_perm but config.json lists "
                         f"{name!r} without input_perm: its compressed weight would be read in the wrong input order")
    if bitmask and args.get("input_perm"):
        raise ValueError(f"from_pretrained(): {name!r} is stored as a compressed-tensors bitmask, which has no input "
                         "permutation, but config.json lists it with input_perm")


def _tied_names(model: nn.Module) -> set:
    tied = getattr(model, "all_tied_weights_keys", None) or {}
    return {k.rpartition(".")[0] for pair in tied.items() for k in pair}


# ------------------------------------------------------------------------------------------------------------
# reading compressed-tensors' bitmask triple into weight_values / weight_meta


class Bitmask24Deserialize(ConversionOps):
    """A transformers conversion op: ``<layer>.compressed / .bitmask / .shape`` -> ``<layer>.weight_values /
    .weight_meta`` of the 2:4 module at ``<layer>`` (:mod:`sparsekernels.huggingface.bitmask`)."""

    supports_many_to_many = True
    SOURCES = (r"\.compressed", r"\.bitmask", r"\.shape")
    TARGETS = (r"\.weight_values", r"\.weight_meta")

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, model=None,
                **kwargs):
        layer = full_layer_name[: -len(".weight_values")]
        parts = {}
        for pattern, suffix in zip(self.SOURCES, ("compressed", "bitmask", "shape")):
            tensors = input_dict.get(pattern) or []
            if len(tensors) != 1:
                raise ValueError(f"from_pretrained(): expected one {layer}.{suffix} in the checkpoint, "
                                 f"got {len(tensors)}")
            parts[suffix] = tensors[0]
        w24 = sparse24_from_bitmask(parts["compressed"], parts["bitmask"], parts["shape"])
        module = model.get_submodule(layer)
        if not isinstance(module, SparseLinear):
            # another layout than [out, in] (SparseConv1D: weight [in, out]): through the dense weight
            w24 = compress_24(module.weight_to_2d(w24.to_dense()))
        return {f"{layer}.weight_values": w24.values, f"{layer}.weight_meta": w24.meta}

    @property
    def reverse_op(self) -> ConversionOps:
        return KeepSparse24()


class KeepSparse24(ConversionOps):
    """The reverse of :class:`Bitmask24Deserialize` at ``save_pretrained``: a layer imported from a bitmask
    checkpoint is saved in the sparsekernels format, under its own names."""

    supports_many_to_many = True

    def convert(self, input_dict, source_patterns=None, target_patterns=None, full_layer_name=None, **kwargs):
        layer = full_layer_name.rpartition(".")[0]
        return {f"{layer}.weight_values": input_dict[Bitmask24Deserialize.TARGETS[0]][0],
                f"{layer}.weight_meta": input_dict[Bitmask24Deserialize.TARGETS[1]][0]}

    @property
    def reverse_op(self) -> ConversionOps:
        return Bitmask24Deserialize()


# ------------------------------------------------------------------------------------------------------------


class SparseKernelsHfQuantizer(HfQuantizer):
    """Loads and saves Hugging Face models whose layers are sparsekernels sparse modules (see the module docstring).

    Attributes:
        swap_report: the :class:`~sparsekernels.SwapReport` of ``sparsify_dense`` after a load, else None.
        loaded_names: qualified names of the layers built sparse from the checkpoint's compressed tensors.
    """

    requires_calibration = False

    def __init__(self, quantization_config: SparseKernelsConfig, **kwargs) -> None:
        super().__init__(quantization_config, **kwargs)
        self.swap_report = None
        self.loaded_names: list[str] = []
        self.bitmask_layers: dict[str, str] = {}

    def validate_environment(self, device_map=None, **kwargs) -> None:
        if isinstance(device_map, dict) and "disk" in device_map.values():
            raise ValueError("from_pretrained(): sparsekernels layers cannot be offloaded to disk (device_map has "
                             "'disk'); load them on the CPU or a GPU")

    def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
        cfg = self.quantization_config
        keys = _checkpoint_keys(checkpoint_files)
        plan: dict[str, tuple[type, dict, str]] = {}  # model name -> (class, args, checkpoint name)
        absent = []
        for group in cfg.sparse_modules:
            cls = sparse_module_class(group["class"])
            if cls is None:
                raise ValueError(f"from_pretrained(): the checkpoint uses the sparse module {group['class']!r}, "
                                 "which this installation does not provide")
            for name in group["names"]:
                target = _resolve(model, name)
                if target is None:
                    absent.append(name)
                else:
                    plan[target] = (cls, {k: tuple(v) if isinstance(v, list) else v for k, v in group["args"].items()},
                                    name)
        if keys is not None:
            native = {k.rpartition(".")[0] for k in keys if k.endswith(".weight_values")}
            native = {p for p in native if f"{p}.weight_meta" in keys}
            bitmask = find_bitmask_layers(keys)
            for prefix in sorted(native | set(bitmask)):
                target = _resolve(model, prefix)
                if target is None:
                    absent.append(prefix)
                    continue
                if prefix in bitmask:
                    self.bitmask_layers[target] = prefix
                if target not in plan:
                    cls, args = self._infer_24(model, target)
                    if f"{prefix}.input_perm" in keys:  # stored in a permuted input order
                        args["input_perm"] = True
                    plan[target] = (cls, args, prefix)
            for target, (cls, args, stored_as) in plan.items():
                _check_permuted(target, args, stored_as, keys, target in self.bitmask_layers)
        if absent:
            logger.warning("from_pretrained(): sparse layers of the checkpoint that %s does not have (left out): %s",
                           type(model).__name__, ", ".join(sorted(set(absent))))
        tied = _tied_names(model)
        occ = module_occurrences(model)
        replacements: dict[int, nn.Module] = {}
        for target, (cls, args, stored_as) in plan.items():
            old = model.get_submodule(target)
            _check_target(cls, old, args, target)
            if target in tied:
                raise ValueError(f"from_pretrained(): {target!r} is stored sparse but its weight is tied to another "
                                 "in this model (tie_word_embeddings?): a sparse layer has no weight to tie")
            new = cls(**args, backend=cfg.backend, device="meta", dtype=old.weight.dtype)
            if keys is not None and target not in self.bitmask_layers:
                lacking = [k for k in new.state_dict() if f"{stored_as}.{k}" not in keys]
                if lacking:
                    raise ValueError(f"from_pretrained(): config.json lists the sparse layer {stored_as!r} but the "
                                     f"checkpoint has no {', '.join(f'{stored_as}.{k}' for k in lacking)}")
            move_hooks(old, new)
            replacements[id(old)] = new
        replace_modules(model, replacements, occ)
        self.loaded_names = sorted(plan)
        return model

    @staticmethod
    def _infer_24(model: nn.Module, name: str) -> tuple[type, dict]:
        old = model.get_submodule(name)
        for cls in sparse_module_types():
            if cls.pattern == "2:4" and cls.matches_dense(old):
                args = _args_from_dense(cls, old)
                if args is not None:
                    return cls, args
        raise ValueError(f"from_pretrained(): the checkpoint stores {name!r} 2:4-compressed, but no registered 2:4 "
                         f"module replaces a {type(old).__name__} (or says how to build one from it)")

    def get_weight_conversions(self):
        if not self.bitmask_layers:
            return []
        return [WeightConverter(list(Bitmask24Deserialize.SOURCES), list(Bitmask24Deserialize.TARGETS),
                                [Bitmask24Deserialize()])]

    def _process_model_after_weight_loading(self, model, **kwargs):
        for name, module in model.named_modules():
            if not isinstance(module, SparseModule):
                continue
            for p in module.parameters(recurse=False):
                p.requires_grad_(False)
            if isinstance(module, Sparse24Module) and "weight_values" in dict(module.named_parameters(recurse=False)):
                try:
                    module.weight24.validate()
                except ValueError as exc:
                    raise ValueError(f"from_pretrained(): layer {name!r}: {exc}") from None
            module.state_changed()  # take the resident form for this device and backend
        cfg = self.quantization_config
        if cfg.sparsify_dense:
            self.swap_report = sparsify(model, filter_fn=lambda n, m: not cfg.ignores(n), backend=cfg.backend)
            logger.info("%s", self.swap_report)
        return model

    def get_state_dict_and_metadata(self, model):
        """Called by ``save_pretrained`` before it writes ``config.json``: record the present sparse layers."""
        self.quantization_config.sparse_modules = sparse_module_records(model)
        self.quantization_config.sparsify_dense = False
        return None, {}

    def _dequantize(self, model, dtype=None):
        densify(model)
        return model

    def is_serializable(self) -> bool:
        return True

    @property
    def is_trainable(self) -> bool:
        return False  # inference layers: their compressed weights are frozen

    @property
    def is_compileable(self) -> bool:
        return True


def register() -> None:
    """Register ``"sparsekernels"`` with transformers (idempotent; importing :mod:`sparsekernels.huggingface` does it).

    Raises:
        RuntimeError: another config or quantizer class already holds the name ``"sparsekernels"``.
    """
    for mapping, cls, add in ((AUTO_QUANTIZATION_CONFIG_MAPPING, SparseKernelsConfig, register_quantization_config),
                              (AUTO_QUANTIZER_MAPPING, SparseKernelsHfQuantizer, register_quantizer)):
        held = mapping.get(QUANT_METHOD)
        if held is None:
            add(QUANT_METHOD)(cls)
        elif held is not cls and f"{held.__module__}.{held.__qualname__}" != f"{cls.__module__}.{cls.__qualname__}":
            raise RuntimeError(f"register(): transformers already has {held.__module__}.{held.__qualname__} registered "
                               f"as quant_method {QUANT_METHOD!r}")
