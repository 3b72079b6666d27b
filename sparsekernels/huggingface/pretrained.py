"""What a user calls on a Hugging Face model: declare it sparse for ``save_pretrained``, import checkpoints written by
other tools, export a dense checkpoint, resize the vocabulary of a model whose output layer is sparse."""
from __future__ import annotations

import copy
import os
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from ..nn import SparseModule
from ..nn.sparse24_module import Sparse24Module
from ..swap import densify
from .bitmask import BITMASK_FORMAT
from .quantizer import QUANT_METHOD, SparseKernelsConfig, SparseKernelsHfQuantizer, sparse_module_records

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["mark_sparse", "load_pretrained", "save_dense", "dense_state_dict", "resize_token_embeddings"]

# from_pretrained keyword arguments that say where config.json is (hub / cache), passed to AutoConfig too
_LOCATION_KWARGS = ("revision", "subfolder", "cache_dir", "token", "local_files_only", "trust_remote_code",
                    "force_download", "proxies")


def _check_model(fn: str, model) -> None:
    from transformers import PreTrainedModel  # its module is most of the cost of importing transformers

    if not isinstance(model, PreTrainedModel):
        raise TypeError(f"{fn}: expected a transformers PreTrainedModel, got {type(model).__name__} (for any other "
                        "nn.Module use sparsekernels.save_sparse / load_sparse)")


def mark_sparse(model: PreTrainedModel) -> SparseKernelsConfig:
    """Declare ``model``'s sparse layers in ``model.config``, so that ``model.save_pretrained(dir)`` writes a
    checkpoint that ``from_pretrained(dir)`` loads into sparse layers.

    Call it after :func:`sparsekernels.sparsify` (a model loaded with ``from_pretrained`` through the
    ``"sparsekernels"`` quantizer is declared already). It sets ``model.config.quantization_config`` to a
    :class:`SparseKernelsConfig` and ``model.hf_quantizer`` to its quantizer, as ``from_pretrained`` does; each
    ``save_pretrained`` then records the sparse layers the model has at that moment.

    Args:
        model: a transformers ``PreTrainedModel`` (any device; sparse or not yet).

    Returns:
        The model's :class:`SparseKernelsConfig` (``sparse_modules`` filled in).

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``.
        ValueError: the model is quantized by another method.
    """
    fn = "mark_sparse()"
    _check_model(fn, model)
    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None and not isinstance(quantizer, SparseKernelsHfQuantizer):
        method = getattr(quantizer.quantization_config, "quant_method", "?")
        raise ValueError(f"{fn}: the model is quantized with {getattr(method, 'value', method)}; sparsekernels "
                         "layers cannot be declared on top of it")
    if quantizer is None:
        existing = getattr(model.config, "quantization_config", None)
        if isinstance(existing, dict) and existing.get("quant_method") == QUANT_METHOD:
            config = SparseKernelsConfig.from_dict(existing)
        elif existing is not None and not isinstance(existing, SparseKernelsConfig):
            raise ValueError(f"{fn}: model.config already has a quantization_config ({existing!r})")
        else:
            backends = {m.backend for m in model.modules() if isinstance(m, SparseModule)}
            config = existing or SparseKernelsConfig(backend=backends.pop() if len(backends) == 1 else "auto")
        quantizer = SparseKernelsHfQuantizer(config, pre_quantized=True)
        model.hf_quantizer = quantizer
        model.config.quantization_config = config
        model.is_quantized = True
        model.quantization_method = QUANT_METHOD
    config = quantizer.quantization_config
    config.sparse_modules = sparse_module_records(model)
    config.sparsify_dense = False
    return config


def load_pretrained(pretrained: str | os.PathLike, *, model_class=None, backend: str = "auto",
                    ignore: tuple[str, ...] = (), **kwargs) -> PreTrainedModel:
    """Load a Hugging Face checkpoint into sparse layers, whichever tool wrote it.

    * a sparsekernels checkpoint (``quant_method: "sparsekernels"``): ``model_class.from_pretrained`` as it is;
    * a dense checkpoint whose layers hold 2:4 zeros (llm-compressor 0.14 saves 2:4 models so, with no
      ``quantization_config``; older releases wrote a compressed-tensors config whose ``sparsity_config`` has
      ``format: "dense"``): loaded dense, then every 2:4 layer is swapped in (``model.hf_quantizer.swap_report``
      says which stayed dense and why);
    * a compressed-tensors ``sparse-24-bitmask`` checkpoint: its compressed layers are read straight into 2:4
      layers built on the meta device (:mod:`sparsekernels.huggingface.bitmask`).

    The model afterwards saves in the sparsekernels format with ``save_pretrained``.

    Args:
        pretrained: a directory (or hub id) as ``from_pretrained`` takes it.
        model_class: the transformers class to load with (default ``AutoModelForCausalLM``).
        backend: the ``backend`` of the sparse layers (``"auto"``, ``"triton"``, ``"reference"``, ...).
        ignore: ``fnmatch`` patterns of layer names to leave dense when sparsifying a dense checkpoint.
        kwargs: passed to ``from_pretrained`` (``dtype``, ``device_map``, ...), except ``config`` and
            ``quantization_config``, which this function sets.

    Returns:
        The model, in eval mode, with its sparse layers swapped in.

    Raises:
        TypeError: ``config`` or ``quantization_config`` among ``kwargs``.
        ValueError: a checkpoint quantized by another method, or a compressed-tensors checkpoint with quantized
            weights or another sparsity format than ``dense`` / ``sparse-24-bitmask``; a bad ``backend``.
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    fn = "load_pretrained()"
    for key in ("config", "quantization_config"):
        if key in kwargs:
            raise TypeError(f"{fn}: {key} is set by load_pretrained; leave it out")
    model_class = model_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(pretrained, **{k: kwargs[k] for k in _LOCATION_KWARGS if k in kwargs})
    stored = getattr(config, "quantization_config", None)
    stored = stored.to_dict() if hasattr(stored, "to_dict") else stored
    sparse = SparseKernelsConfig(backend=backend, ignore=list(ignore))
    if stored is None:
        return model_class.from_pretrained(pretrained, quantization_config=sparse, **kwargs)
    method = stored.get("quant_method")
    if method == QUANT_METHOD:
        config.quantization_config = {**stored, "backend": backend}
    elif method == "compressed-tensors":
        sparse.sparsify_dense = _compressed_tensors_format(fn, stored) == "dense"
        config.quantization_config = sparse.to_dict()
    else:
        raise ValueError(f"{fn}: {pretrained} is quantized with {method!r}; sparsekernels imports dense, sparsekernels "
                         "and compressed-tensors sparse-24-bitmask checkpoints")
    return model_class.from_pretrained(pretrained, config=config, **kwargs)


def _compressed_tensors_format(fn: str, stored: dict) -> str:
    """The sparsity format of a compressed-tensors config: ``"dense"`` or ``"sparse-24-bitmask"``, else ValueError."""
    quantized = stored.get("config_groups") or stored.get("format") not in (None, "dense")
    sparsity = stored.get("sparsity_config") or {}
    fmt = sparsity.get("format", "dense")
    if quantized:
        raise ValueError(f"{fn}: expected a compressed-tensors checkpoint with sparsity only, got quantized weights "
                         f"(format {stored.get('format')!r}); sparsekernels stores float weights")
    if fmt not in ("dense", BITMASK_FORMAT):
        raise ValueError(f"{fn}: expected compressed-tensors sparsity format 'dense' or {BITMASK_FORMAT!r}, "
                         f"got {fmt!r}")
    return fmt


def dense_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every sparse layer's tensors replaced by its dense layer's (``weight``, ``bias``).

    On the CPU with ``backend="auto"`` a 2:4 layer's resident dense weight is handed out as it is (no copy); a
    compressed one is expanded layer by layer into host memory (the dense file needs those bytes anyway; a GPU holds
    one dense layer at a time). A layer carrying an ``input_perm`` gives its weight in the original input order and
    no ``input_perm``: a plain dense checkpoint, which plain transformers reads without unexpected keys.
    """
    state = model.state_dict()
    for name, module in model.named_modules(remove_duplicate=False):
        if not isinstance(module, SparseModule):
            continue
        prefix = f"{name}." if name else ""
        for key in [k for k in state if k.startswith(prefix) and "." not in k[len(prefix):]]:
            del state[key]
        resident = module.resident_dense_weight() if isinstance(module, Sparse24Module) else None
        if resident is not None:
            state[prefix + "weight"] = resident.detach()
            if module.bias is not None:
                state[prefix + "bias"] = module.bias.detach()
        else:
            state.update({prefix + k: v.cpu() for k, v in module.to_dense().state_dict().items()
                          if k in ("weight", "bias")})
    return state


def save_dense(model: PreTrainedModel, save_directory: str | os.PathLike, **kwargs) -> None:
    """Write ``model`` as an ordinary dense checkpoint (``config.json`` without ``quantization_config``) that any
    tool reads with plain transformers; the 2:4 zeros are kept. ``model`` itself is not changed.

    Args:
        model: a transformers ``PreTrainedModel`` with sparse layers (or none).
        save_directory: where to write.
        kwargs: passed to ``save_pretrained`` (``max_shard_size``, ``safe_serialization``, ...) except ``state_dict``.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``, or ``state_dict`` among ``kwargs``.
    """
    fn = "save_dense()"
    _check_model(fn, model)
    if "state_dict" in kwargs:
        raise TypeError(f"{fn}: the state dict is the model's, densified; leave state_dict out")
    # A shallow copy shares every module and tensor: only its config and quantizer differ, so save_pretrained writes
    # the plain config and takes the dense state dict (a model with an hf_quantizer would ask the quantizer instead).
    view = copy.copy(model)
    view.config = copy.deepcopy(model.config)
    for config in {id(c): c for c in (view.config, view.config.get_text_config())}.values():
        if getattr(config, "quantization_config", None) is not None:
            del config.quantization_config
    view.hf_quantizer = None
    view.is_quantized = False
    view.save_pretrained(save_directory, state_dict=dense_state_dict(model), **kwargs)


def resize_token_embeddings(model: PreTrainedModel, new_num_tokens: Optional[int] = None, **kwargs) -> nn.Embedding:
    """``model.resize_token_embeddings`` for a model whose output layer is sparse.

    transformers builds the resized output layer only from an ``nn.Linear`` (it refuses a ``SparseLinear``), and the
    new rows it adds are not 2:4: the output layer is made dense first (``sparsekernels.densify`` on that layer) and
    stays dense. Prune and ``sparsify`` it again to make it sparse. Tied embeddings are never sparse; with them this
    is ``model.resize_token_embeddings``.

    Args:
        model: a transformers ``PreTrainedModel``.
        new_num_tokens, kwargs: as ``PreTrainedModel.resize_token_embeddings`` takes them.

    Returns:
        The input embeddings, as ``resize_token_embeddings`` returns them.

    Raises:
        TypeError: ``model`` is not a ``PreTrainedModel``.
    """
    _check_model("resize_token_embeddings()", model)
    output = model.get_output_embeddings()
    if isinstance(output, SparseModule):
        densify(model, filter_fn=lambda name, module: module is output)
    return model.resize_token_embeddings(new_num_tokens, **kwargs)
