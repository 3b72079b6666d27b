"""Whole-model swap: replace, in place, every ``nn.Linear`` / ``nn.Conv2d`` / transformers ``Conv1D`` whose
weight is 2:4 (or block) sparse by the matching sparse module, and undo it. Which dense layers a sparse module
replaces is its own ``matches_dense``: the registry is the one extension point.

Per instance, never by patching classes: each eligible layer is converted with its sparse module's
``from_dense`` and assigned to its parent under the same name. Forward / backward hooks and pre-hooks
move with the layer (the very same hook dictionaries, so the user's hook handles keep working), and so
do the training flag, device and dtype. All or nothing: every replacement is built before the model is
touched, and if anything fails while they are put in, the model's structure is restored
(:func:`sparsekernels.nn.walk.snapshot`), so on any error the model is exactly as it was.

Layers that stay dense are reported with the reason, e.g. the ``out_proj`` of an
``nn.MultiheadAttention`` (its parent reads ``out_proj.weight`` directly instead of calling it) or a
weight that does not have the 2:4 pattern.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from torch import nn
from torch.nn.utils import parametrize
from torch.nn.utils.prune import BasePruningMethod

from .nn import SparseModule, sparse_module_types, sparse_patterns
from .nn.walk import module_occurrences, move_hooks, replace_modules, snapshot
from .ops.routing import check_backend_name
from .tables import format_table

__all__ = ["sparsify", "densify", "SwapReport", "SwappedLayer", "SkippedLayer", "HF_QUANT_METHOD", "HF_FORMAT_VERSION"]

# How a Hugging Face config declares sparsekernels layers (``config.quantization_config``); the loader that reads
# it is sparsekernels.huggingface, which transformers finds once that module is imported.
HF_QUANT_METHOD = "sparsekernels"
HF_FORMAT_VERSION = 1


@dataclass(frozen=True)
class SwappedLayer:
    """A layer that was replaced.

    Attributes:
        name: its qualified name in the model (the first one, if the module is registered twice).
        pattern: ``"2:4"``, ``"block"`` (sparsify) or ``"dense"`` (densify).
        source: the type that was there before, e.g. ``"Linear"``.
        target: the type that is there now, e.g. ``"SparseLinear"``.
        shape: the dense weight's shape.
        dense_bytes: bytes of the dense weight.
        stored_bytes: bytes of the weight as stored by the new module (values + metadata).
    """

    name: str
    pattern: str
    source: str
    target: str
    shape: tuple[int, ...]
    dense_bytes: int
    stored_bytes: int


@dataclass(frozen=True)
class SkippedLayer:
    """A layer left as it was, and why."""

    name: str
    module_type: str
    reason: str


@dataclass(frozen=True)
class SwapReport:
    """What :func:`sparsify` / :func:`densify` did. ``str(report)`` is a readable table."""

    swapped: tuple[SwappedLayer, ...]
    skipped: tuple[SkippedLayer, ...]
    action: str = "sparsify"
    notes: tuple[str, ...] = ()

    @property
    def swapped_names(self) -> list[str]:
        return [s.name for s in self.swapped]

    @property
    def skipped_reasons(self) -> dict[str, str]:
        """name -> reason for every layer left unchanged."""
        return {s.name: s.reason for s in self.skipped}

    @property
    def dense_bytes(self) -> int:
        return sum(s.dense_bytes for s in self.swapped)

    @property
    def stored_bytes(self) -> int:
        return sum(s.stored_bytes for s in self.swapped)

    def __str__(self) -> str:
        verb = "swapped to sparse" if self.action == "sparsify" else "restored to dense"
        lines = [f"{self.action}: {len(self.swapped)} layer(s) {verb}, {len(self.skipped)} left unchanged"]
        if self.swapped:
            rows = [
                (s.name, s.pattern, f"{s.source} -> {s.target}", "x".join(map(str, s.shape)),
                 f"{s.stored_bytes / max(s.dense_bytes, 1):.4f}")
                for s in self.swapped
            ]
            lines += format_table(("layer", "pattern", "module", "weight", "bytes vs dense"), rows)
            if self.action == "sparsify":
                lines.append(
                    f"weights: {self.dense_bytes} dense bytes -> {self.stored_bytes} stored bytes "
                    f"({self.stored_bytes / max(self.dense_bytes, 1):.4f})"
                )
        if self.skipped:
            lines.append("left unchanged:")
            lines += format_table(("layer", "module", "reason"), [(s.name, s.module_type, s.reason) for s in self.skipped])
        lines += [f"note: {n}" for n in self.notes]
        return "\n".join(lines)


def _torch_prune_hook(module: nn.Module) -> bool:
    return any(isinstance(h, BasePruningMethod) for h in module._forward_pre_hooks.values())


def _shared_parameters(model: nn.Module) -> dict[int, set[str]]:
    """id(parameter or buffer) -> names of the modules holding it (more than one: tied weights)."""
    holders: dict[int, set[str]] = {}
    for mod_name, mod in model.named_modules(remove_duplicate=False):
        for t in list(mod._parameters.values()) + list(mod._buffers.values()):
            if t is not None:
                holders.setdefault(id(t), set()).add(mod_name)
    return holders


def _mha_skips(model: nn.Module) -> tuple[set[int], list[SkippedLayer]]:
    """The out_proj of every nn.MultiheadAttention, and its bare projection Parameters, with reasons."""
    out_proj_ids: set[int] = set()
    skipped: list[SkippedLayer] = []
    for name, mha in model.named_modules():
        if not isinstance(mha, nn.MultiheadAttention):
            continue
        out_proj_ids.add(id(mha.out_proj))
        for pname in ("in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight"):
            if getattr(mha, pname, None) is not None:
                skipped.append(
                    SkippedLayer(
                        f"{name}.{pname}" if name else pname,
                        "Parameter",
                        "a bare Parameter of nn.MultiheadAttention (read by F.multi_head_attention_forward), "
                        "not an nn.Linear: there is no layer to swap",
                    )
                )
    return out_proj_ids, skipped


def _fast_path_guard(module: nn.Module, args) -> None:
    """A no-op forward pre-hook. nn.TransformerEncoderLayer's fused inference fast path reads
    ``linear1.weight`` / ``linear2.weight`` directly (a sparse layer has none); PyTorch skips that path
    for a layer with hooks on any submodule, so this hook keeps the layer on its module-calling path."""
    return None


def _guard_transformer_fast_paths(model: nn.Module, replacements: dict[int, nn.Module], occ) -> list[str]:
    notes = []
    guarded = []
    for old_id, new in replacements.items():
        for parent, attr, name in occ[old_id]:
            if isinstance(parent, nn.TransformerEncoderLayer) and attr in ("linear1", "linear2"):
                if not any(h is _fast_path_guard for h in new._forward_pre_hooks.values()):
                    new.register_forward_pre_hook(_fast_path_guard)
                guarded.append(name)
    if guarded:
        notes.append(
            "nn.TransformerEncoderLayer's fused inference fast path reads linear1.weight / linear2.weight directly; "
            f"a no-op forward pre-hook on {', '.join(guarded)} makes those layers run their modules instead "
            "(densify() removes it)"
        )
    swapped_ids = set(replacements)  # ids of the layers about to be replaced
    for name, enc in model.named_modules():
        if isinstance(enc, nn.TransformerEncoder) and getattr(enc, "use_nested_tensor", False) and len(enc.layers):
            first = enc.layers[0]
            if any(id(getattr(first, a, None)) in swapped_ids for a in ("linear1", "linear2")):
                # its nested-tensor fast path reads layers[0].linear1.weight directly
                enc.use_nested_tensor = False
                notes.append(f"{name or '(root)'}.use_nested_tensor set to False: its nested-tensor fast path reads "
                             "layers[0].linear1.weight directly")
    return notes


# ----------------------------------------------------------------------------------------------------


def sparsify(
    model: nn.Module,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    backend: str = "auto",
    *,
    pattern: str = "2:4",
    block_size: int | None = None,
    min_block_sparsity: float = 0.5,
) -> SwapReport:
    """Replace, in place, every eligible ``nn.Linear`` / ``nn.Conv2d`` / transformers ``Conv1D`` of ``model`` by a
    sparse module (every layer some registered class's ``matches_dense`` accepts).

    Args:
        model: any ``nn.Module`` (on any device; weights float16 / bfloat16 / float32).
        filter_fn: ``filter_fn(qualified_name, module) -> bool``; layers for which it returns False are
            left dense (and reported). Default: consider every layer.
        backend: the ``backend`` given to every new module (``"auto"``, ``"triton"``, ``"reference"``,
            ``"dense"``, ``"cusparselt"``).
        pattern: ``"2:4"`` (2:4 weights -> ``SparseLinear`` / ``SparseConv2d`` / ``SparseConv1D``), ``"block"`` (Linears
            whose weight is block sparse -> ``BlockSparseLinear``) or ``"any"`` (2:4 first, then block).
        block_size: block size for ``"block"`` / ``"any"`` (16, 32 or 64); None detects it.
        min_block_sparsity: fraction of zero blocks a Linear needs to become block sparse.

    Returns:
        A :class:`SwapReport` listing the swapped layers and every Linear / Conv2d / Conv1D left dense, with
        the reason (from the sparse module's ``check_convertible`` or from the model's structure).

    Raises:
        TypeError: ``model`` not an ``nn.Module`` or ``filter_fn`` not callable.
        ValueError: unknown ``backend`` or ``pattern``. If converting a layer fails, the error names the
            layer and the model is left unchanged.
    """
    fn = "sparsify()"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: expected filter_fn to be callable (name, module) -> bool or None, got {type(filter_fn).__name__}")
    check_backend_name(fn, backend)
    patterns = (*sparse_patterns(), "any")
    if pattern not in patterns:
        raise ValueError(f"{fn}: expected pattern to be one of {patterns}, got {pattern!r}")
    options = {"block_size": block_size, "min_block_sparsity": min_block_sparsity}
    registered = sparse_module_types()
    classes = [c for c in registered if pattern in ("any", c.pattern)]
    # exact types a class names (their subclasses are reported, never swapped)
    dense_types = tuple(dict.fromkeys(c.dense_type for c in registered if c.dense_type is not nn.Module))
    wanted = ", ".join(dict.fromkeys(c.dense_label() for c in classes))

    occ = module_occurrences(model)
    holders = _shared_parameters(model)
    out_proj_ids, skipped = _mha_skips(model)
    plans: list[tuple[str, nn.Module, type[SparseModule]]] = []  # (name, old module, new class)
    seen: set[int] = set()

    for name, module in [("", model)] + [(n, m) for n, m in model.named_modules() if n]:
        if id(module) in seen or isinstance(module, SparseModule):
            continue
        matched = [c for c in registered if c.matches_dense(module)]
        if not matched and not isinstance(module, dense_types):
            continue
        seen.add(id(module))
        tname = type(module).__name__

        def skip(reason: str) -> None:
            skipped.append(SkippedLayer(name or "(root)", tname, reason))

        if not name:
            skip("the model itself is the layer: there is no parent to replace it in; use the sparse module's from_dense()")
            continue
        if id(module) in out_proj_ids:
            skip(
                "out_proj of nn.MultiheadAttention: its parent passes out_proj.weight to "
                "F.multi_head_attention_forward instead of calling the layer, so a swapped layer would never run"
            )
            continue
        if parametrize.is_parametrized(module):
            skip("has torch.nn.utils.parametrize parametrizations; remove them first (parametrize.remove_parametrizations)")
            continue
        if _torch_prune_hook(module):
            skip("holds a torch.nn.utils.prune mask (weight_orig * weight_mask); make it permanent first with "
                 "torch.nn.utils.prune.remove(module, 'weight')")
            continue
        if not matched:
            base = next(t for t in dense_types if isinstance(module, t))
            skip(f"a subclass of nn.{base.__name__}: only exact {', '.join(f'nn.{t.__name__}' for t in dense_types)} "
                 "are swapped (a subclass may change forward or be read directly)")
            continue
        if filter_fn is not None and not filter_fn(name, module):
            skip("excluded by filter_fn")
            continue
        tied = holders.get(id(module.weight), set()) - {n for _, _, n in occ[id(module)]}
        if tied:
            skip(f"weight is shared with {', '.join(sorted(tied))} (tied weights); swapping would untie it")
            continue

        matching = [c for c in classes if c in matched]
        if not matching:
            skip(f"pattern={pattern!r} applies to {wanted} only")
            continue
        reasons = []
        for cls in matching:
            reason = cls.check_convertible(module, **{k: options[k] for k in cls.options})
            if reason is None:
                plans.append((name, module, cls))
                break
            reasons.append(f"{cls.pattern}: {reason}" if len(matching) > 1 else reason)
        else:
            skip("; ".join(reasons))

    # Build every replacement before touching the model.
    replacements: dict[int, nn.Module] = {}
    swapped: list[SwappedLayer] = []
    for name, module, cls in plans:
        try:
            new = cls.from_dense(module, backend=backend, **{k: options[k] for k in cls.options})
        except Exception as exc:
            err = type(exc) if isinstance(exc, (ValueError, TypeError)) else RuntimeError
            raise err(f"{fn}: converting layer {name!r} ({type(module).__name__}) failed, the model is "
                      f"unchanged: {exc}") from exc
        replacements[id(module)] = new
        swapped.append(
            SwappedLayer(name, cls.pattern, type(module).__name__, type(new).__name__, tuple(module.weight.shape),
                         module.weight.numel() * module.weight.element_size(), new.stored_bytes())
        )
    permuted = [name for name, module, _ in plans if getattr(replacements[id(module)], "permuted", False)]
    # Layers in training mode with trainable parameters: the user may expect to keep training them.
    trainable = [name for name, module, _ in plans
                 if module.training and any(p.requires_grad for p in module.parameters(recurse=False))]
    olds = {id(module): module for _, module, _ in plans}

    def commit() -> list[str]:
        for old_id, new in replacements.items():
            move_hooks(olds[old_id], new)
        notes = _guard_transformer_fast_paths(model, replacements, occ)
        replace_modules(model, replacements, occ)
        if replacements:
            notes += _declare_in_hugging_face_config(model)
        return notes

    notes = _commit(model, commit)
    if permuted:
        notes.append(f"{len(permuted)} swapped layer(s) carry an input_perm ({_shown(permuted)}): their compressed "
                     "weights are stored in the permuted input order and the kernels gather their inputs by it (on the "
                     "CPU the dense weight keeps the original order: no gather); densify() gives the dense layers "
                     "back with their input_perm")
    if trainable:
        notes.append(f"{len(trainable)} swapped layer(s) had trainable parameters ({_shown(trainable)}): sparse layers are "
                     "for inference, their compressed weights and biases no longer receive gradients "
                     "(inputs still do); densify() gives trainable dense layers back")
    return SwapReport(tuple(swapped), tuple(skipped), "sparsify", tuple(notes))


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _declare_in_hugging_face_config(model: nn.Module) -> list[str]:
    """A transformers model's config gains ``quantization_config = {"quant_method": "sparsekernels", ...}``, so that
    ``save_pretrained`` writes a checkpoint that ``from_pretrained`` loads into sparse layers (after
    ``import sparsekernels.huggingface``) instead of re-initialising them. Recognised without importing
    transformers; a config that already declares another quantization is left alone (and said so)."""
    config = getattr(model, "config", None)
    if config is None or not type(config).__module__.startswith("transformers."):
        return []
    existing = getattr(config, "quantization_config", None)
    if existing is None:
        config.quantization_config = {"quant_method": HF_QUANT_METHOD, "format_version": HF_FORMAT_VERSION}
        return [f"model.config.quantization_config now declares quant_method={HF_QUANT_METHOD!r}: save_pretrained "
                "writes the compressed layers, and from_pretrained loads them after `import sparsekernels.huggingface`"]
    method = existing.get("quant_method") if isinstance(existing, dict) else getattr(existing, "quant_method", None)
    if str(getattr(method, "value", method)) != HF_QUANT_METHOD:
        return [f"model.config.quantization_config declares another method ({method!r}): a save_pretrained "
                "checkpoint of this model will not load into sparse layers"]
    return []


def _commit(model: nn.Module, commit: Callable[[], object]):
    """Run ``commit`` (which puts built replacements into ``model``); if it raises, restore ``model`` and re-raise."""
    restore = snapshot(model)
    try:
        return commit()
    except BaseException:
        restore()
        raise


def densify(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> SwapReport:
    """Undo :func:`sparsify`: replace every sparse module of ``model`` by its dense ``to_dense()`` layer.

    Args:
        model: an ``nn.Module``.
        filter_fn: ``filter_fn(qualified_name, module) -> bool``; sparse layers for which it returns
            False stay sparse.

    Returns:
        A :class:`SwapReport` (``action="densify"``) listing the layers made dense again.

    Raises:
        TypeError: ``model`` not an ``nn.Module`` or ``filter_fn`` not callable. If converting a layer fails, the
            error names the layer and the model is left unchanged.
    """
    fn = "densify()"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: expected filter_fn to be callable (name, module) -> bool or None, got {type(filter_fn).__name__}")
    sparse_types = sparse_module_types()
    occ = module_occurrences(model)
    replacements: dict[int, nn.Module] = {}
    olds: dict[int, nn.Module] = {}
    swapped: list[SwappedLayer] = []
    skipped: list[SkippedLayer] = []
    for name, module in model.named_modules():
        if not sparse_types or not isinstance(module, sparse_types):
            continue
        if not name:
            skipped.append(SkippedLayer("(root)", type(module).__name__, "the model itself is the layer; call .to_dense()"))
            continue
        if filter_fn is not None and not filter_fn(name, module):
            skipped.append(SkippedLayer(name, type(module).__name__, "excluded by filter_fn"))
            continue
        stored = module.stored_bytes()
        try:
            dense = module.to_dense()
        except Exception as exc:
            err = type(exc) if isinstance(exc, (ValueError, TypeError)) else RuntimeError
            raise err(f"{fn}: converting layer {name!r} ({type(module).__name__}) failed, the model is "
                      f"unchanged: {exc}") from exc
        replacements[id(module)] = dense
        olds[id(module)] = module
        swapped.append(
            SwappedLayer(name, "dense", type(module).__name__, type(dense).__name__, tuple(dense.weight.shape),
                         dense.weight.numel() * dense.weight.element_size(), stored)
        )

    def commit() -> None:
        for old_id, dense in replacements.items():
            move_hooks(olds[old_id], dense)
            for hid in [k for k, h in dense._forward_pre_hooks.items() if h is _fast_path_guard]:
                del dense._forward_pre_hooks[hid]
        replace_modules(model, replacements, occ)

    _commit(model, commit)
    return SwapReport(tuple(swapped), tuple(skipped), "densify")
