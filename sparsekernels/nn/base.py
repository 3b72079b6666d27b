"""What every sparse module is, and the registry of them.

A sparse module replaces one dense layer type (``nn.Linear``, ``nn.Conv2d``, transformers' ``Conv1D``, ...) by a
layer whose weight is stored in a sparse format. It declares how it is recognised
(:meth:`SparseModule.matches_dense`, by default the exact type :attr:`SparseModule.dense_type`, and
:meth:`~SparseModule.check_convertible`), converted (:meth:`~SparseModule.from_dense`,
:meth:`~SparseModule.to_dense`) and rebuilt from a checkpoint record (:meth:`~SparseModule.constructor_args`).
``sparsify``, ``densify`` and ``load_sparse`` iterate over the registry, so a new format is one new module file::

    @register_sparse_module
    class MyFormatLinear(SparseModule):
        pattern = "myformat"
        dense_type = nn.Linear
        ...

See ``docs/architecture.md`` for a complete example.
"""
from __future__ import annotations

import inspect
from typing import ClassVar, Optional

import torch
from torch import nn

from ..formats.sparse24 import SUPPORTED_DTYPES
from ..ops.functional import custom_op
from ..ops.routing import check_backend_name

__all__ = [
    "SparseModule",
    "register_sparse_module",
    "unregister_sparse_module",
    "sparse_module_types",
    "sparse_module_class",
    "sparse_patterns",
    "check_dtype",
    "check_size",
    "dtype_reason",
    "register_bias",
    "copy_into",
    "check_loaded_values",
]


def check_dtype(fn: str, dtype: Optional[torch.dtype]) -> torch.dtype:
    """``dtype`` (the default dtype when None) if it is float16 / bfloat16 / float32, else TypeError."""
    dtype = torch.get_default_dtype() if dtype is None else dtype
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"{fn}: expected dtype float16, bfloat16 or float32, got {dtype}")
    return dtype


def check_size(fn: str, name: str, value, minimum: int = 1, multiple: int = 1) -> int:
    """``value`` if it is an int ``>= minimum`` and a multiple of ``multiple``, else ``ValueError`` naming ``fn``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum or value % multiple:
        what = f">= {minimum}" if multiple == 1 else f"to be a positive multiple of {multiple}"
        raise ValueError(f"{fn}: expected {name} {what}, got {value!r}")
    return value


def copy_into(layer: nn.Module, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> nn.Module:
    """``layer`` (a new dense layer) with ``weight`` and ``bias`` copied in; returns it."""
    with torch.no_grad():
        layer.weight.copy_(weight)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def dtype_reason(layer: nn.Module, *, bias_too: bool) -> Optional[str]:
    """Why ``layer``'s weight (and, with ``bias_too``, its bias) dtype cannot be stored, or None."""
    w = layer.weight
    if w.dtype not in SUPPORTED_DTYPES:
        return f"weight dtype {w.dtype} is not float16, bfloat16 or float32"
    if bias_too and layer.bias is not None and layer.bias.dtype != w.dtype:
        return f"bias dtype {layer.bias.dtype} differs from the weight dtype {w.dtype}"
    return None


def check_loaded_values(state_dict, prefix: str, name: str) -> None:
    """The weight values ``state_dict[prefix + name]`` a sparse module is given must have a supported dtype, and
    the bias beside them (if any) their dtype and device, as every op requires.

    Raises:
        TypeError / ValueError: naming the entry.
    """
    values = state_dict[prefix + name]
    if values.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"expected {prefix}{name} of dtype float16, bfloat16 or float32, got {values.dtype}")
    bias = state_dict.get(prefix + "bias")
    if isinstance(bias, torch.Tensor) and (bias.dtype != values.dtype or bias.device != values.device):
        raise ValueError(f"expected {prefix}bias of {name}'s dtype {values.dtype} on {values.device}, got "
                         f"{bias.dtype} on {bias.device}")


def register_bias(module: nn.Module, bias: bool, out: int, device, dtype: torch.dtype) -> None:
    """A zero ``bias`` Parameter ``[out]`` (``requires_grad=False``), or a registered ``None``."""
    if bias:
        module.bias = nn.Parameter(torch.zeros(out, device=device, dtype=dtype), requires_grad=False)
    else:
        module.register_parameter("bias", None)


class SparseModule(nn.Module):
    """Base class of the sparse modules (inference layers whose weight is stored in a sparse format).

    Class attributes a subclass sets:
        pattern: the name ``sparsify(pattern=...)`` selects it by, e.g. ``"2:4"`` or ``"block"``.
        dense_type: the exact dense layer type it replaces (subclasses of it are never swapped). A class replacing a
            layer of a library this package does not import (transformers' ``Conv1D``) leaves it ``nn.Module`` and
            overrides :meth:`matches_dense` and :meth:`dense_label` instead.
        options: names of the ``sparsify`` keyword options its conversion takes (e.g. ``block_size``).
        cpu_note: what ``backend="auto"`` runs on the CPU, in words (``sparsekernels.explain`` prints it).
        op_name: the ``sparsekernels::`` op its forward calls (a key of ``sparsekernels.ops.routing.ROUTES``), or
            ``""``. Its kernel module is imported when the layer's state lands on a real device
            (:meth:`prepare_op`), because ``torch.compile`` cannot import modules while it traces.

    Instance attribute: ``backend`` (``"auto"``, ``"triton"``, ``"reference"``, ``"dense"`` or ``"cusparselt"``).

    A subclass implements :meth:`check_convertible`, :meth:`from_dense`, :meth:`to_dense`,
    :meth:`constructor_args` and :meth:`stored_bytes`; its constructor takes ``**constructor_args()`` plus
    ``backend``, ``device`` and ``dtype`` and builds correctly shaped state on any device (the meta device
    included), so a checkpoint can be loaded with ``load_state_dict(state, assign=True)``.
    """

    pattern: ClassVar[str] = ""
    dense_type: ClassVar[type] = nn.Module
    options: ClassVar[tuple[str, ...]] = ()
    cpu_note: ClassVar[str] = ""
    op_name: ClassVar[str] = ""

    def __init__(self, backend: str = "auto") -> None:
        super().__init__()
        self.backend = backend

    @property
    def backend(self) -> str:
        """The backend this layer asks for (``SPARSEKERNELS_BACKEND`` still overrides it per call)."""
        return self._backend

    @backend.setter
    def backend(self, backend: str) -> None:
        self._backend = check_backend_name(f"{type(self).__name__}()", backend)
        self.backend_changed()

    def backend_changed(self) -> None:
        """Called after :attr:`backend` is set; a module whose resident state depends on it adapts here."""
        self.prepare_op()

    def state_changed(self) -> None:
        """Called after the state moved, was cast or was loaded (``.to()``, ``to_empty``, ``load_state_dict``)."""
        self.prepare_op()

    def needs_op(self) -> bool:
        """Whether :meth:`forward` calls the custom op :attr:`op_name` in the layer's present state."""
        return bool(self.op_name)

    def prepare_op(self) -> None:
        """Import the kernel module of :attr:`op_name` if the layer, on a real device, calls it: then a model can be
        traced by ``torch.compile`` right after it is built, moved or loaded (importing while tracing breaks the
        graph). Subclasses call it at the end of ``__init__``; moves, loads and backend changes call it again."""
        if not self.needs_op():
            return
        tensor = next(iter(self.parameters()), None)
        if tensor is not None and tensor.device.type != "meta":
            custom_op(self.op_name)

    def _apply(self, fn, recurse=True):
        module = super()._apply(fn, recurse)
        self.state_changed()
        return module

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self.state_changed()

    @classmethod
    def matches_dense(cls, module: nn.Module) -> bool:
        """Whether ``module`` is the kind of dense layer this class replaces: ``sparsify`` converts it (if
        :meth:`check_convertible` agrees), ``load_sparse`` and ``from_pretrained`` put this class in its place.
        The default is the exact type :attr:`dense_type` (a subclass may change ``forward``, so it never matches)."""
        return type(module) is cls.dense_type

    @classmethod
    def dense_label(cls) -> str:
        """The dense layer this class replaces, in words for messages (``"nn.Linear"``)."""
        t = cls.dense_type
        return f"nn.{t.__name__}" if t.__module__.startswith("torch.nn") else t.__qualname__

    @classmethod
    def check_convertible(cls, module: nn.Module, **options) -> Optional[str]:
        """``None`` if :meth:`from_dense` can convert ``module`` with these options, else the reason in words."""
        raise NotImplementedError

    @classmethod
    def from_dense(cls, module: nn.Module, *, backend: str = "auto", **options) -> "SparseModule":
        """A new sparse module computing exactly what ``module`` computes (same device and dtype)."""
        raise NotImplementedError

    def to_dense(self) -> nn.Module:
        """A new dense layer (of :attr:`dense_type`) with exactly this layer's weights."""
        raise NotImplementedError

    def constructor_args(self) -> dict:
        """The JSON-serialisable keyword arguments that rebuild this module's (uninitialised) state."""
        raise NotImplementedError

    @classmethod
    def dense_args(cls, module: nn.Module) -> dict:
        """The constructor arguments that ``module`` fixes: the sizes and geometry of the layer it replaces (a
        :attr:`dense_type` layer, or an instance of this class), not what only the sparse weight knows (e.g. the
        number of kept blocks). ``load_sparse`` refuses a checkpoint record that disagrees with them.

        The default takes every constructor parameter that ``module`` has as an attribute, and ``bias`` as whether
        ``module`` has one. A subclass whose constructor arguments are not plain attributes of the dense layer
        overrides it.

        Raises:
            ValueError: ``module`` has a geometry this class cannot compute (e.g. a grouped convolution).
        """
        args = {}
        for name, param in inspect.signature(cls.__init__).parameters.items():
            if name in ("self", "backend", "device", "dtype") or param.kind in (param.VAR_POSITIONAL,
                                                                                  param.VAR_KEYWORD):
                continue
            if name == "bias":
                args["bias"] = getattr(module, "bias", None) is not None
            elif isinstance(getattr(module, name, None), (int, tuple, list)):
                args[name] = getattr(module, name)
        return args

    def stored_bytes(self) -> int:
        """Bytes of the weight as stored in the state dict (values and metadata; the bias not counted)."""
        return sum(t.numel() * t.element_size() for n, t in self.state_dict().items() if n != "bias")

    @property
    def weight_dtype(self) -> torch.dtype:
        """The dtype the weight is stored in."""
        raise NotImplementedError


# class name -> class, in registration order (which is the order sparsify tries them for pattern="any")
_REGISTRY: dict[str, type[SparseModule]] = {}


def register_sparse_module(cls: type[SparseModule]) -> type[SparseModule]:
    """Class decorator: make ``cls`` known to ``sparsify``, ``densify``, ``save_sparse`` and ``load_sparse``.

    Raises:
        TypeError: ``cls`` is not a :class:`SparseModule` subclass, sets no ``pattern``, or neither sets
            ``dense_type`` nor overrides ``matches_dense``.
        ValueError: another class of the same name is registered already.
    """
    if not (isinstance(cls, type) and issubclass(cls, SparseModule)):
        raise TypeError(f"register_sparse_module(): expected a SparseModule subclass, got {cls!r}")
    if not isinstance(cls.pattern, str) or not cls.pattern or cls.pattern == "any":
        raise TypeError(f"register_sparse_module(): {cls.__name__}.pattern must be a non-empty name other than 'any'")
    if not (isinstance(cls.dense_type, type) and issubclass(cls.dense_type, nn.Module)):
        raise TypeError(f"register_sparse_module(): {cls.__name__}.dense_type must be the nn.Module type it replaces")
    if cls.dense_type is nn.Module and cls.matches_dense.__func__ is SparseModule.matches_dense.__func__:
        raise TypeError(f"register_sparse_module(): {cls.__name__} must set dense_type to the nn.Module type it "
                        "replaces, or override matches_dense(module)")
    known = _REGISTRY.get(cls.__name__)
    if known is not None and known is not cls:
        raise ValueError(f"register_sparse_module(): a sparse module named {cls.__name__!r} is registered already")
    _REGISTRY[cls.__name__] = cls
    return cls


def unregister_sparse_module(cls: type[SparseModule]) -> None:
    """Forget a class registered with :func:`register_sparse_module` (a plugin's teardown, a test's cleanup).

    Raises:
        ValueError: ``cls`` is not registered.
    """
    if _REGISTRY.get(getattr(cls, "__name__", None)) is not cls:
        raise ValueError(f"unregister_sparse_module(): {cls!r} is not registered")
    del _REGISTRY[cls.__name__]


def sparse_module_types() -> tuple[type[SparseModule], ...]:
    """Every registered sparse module class, in registration order."""
    return tuple(_REGISTRY.values())


def sparse_module_class(name: str) -> Optional[type[SparseModule]]:
    """The registered sparse module class called ``name``, or None."""
    return _REGISTRY.get(name)


def sparse_patterns() -> tuple[str, ...]:
    """The patterns of the registered classes, without repetition, in registration order."""
    return tuple(dict.fromkeys(cls.pattern for cls in _REGISTRY.values()))
