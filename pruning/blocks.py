"""A model's stack of repeated blocks (a transformer's decoder layers), and running it one block at a time.

:func:`find_block_stack` finds the stack: the ``nn.ModuleList`` of same-class modules that holds the most layers to
prune. :func:`capture_block_inputs` runs the model's own forward once per calibration batch
with every block stood in for by a recorder, and keeps what each block is called with: the hidden states
(the first positional argument, or ``hidden_states=``) that block 0 receives, and every block's other arguments
(Hugging Face's ``attention_mask``, ``position_embeddings``, ``position_ids``...: they may differ per block, e.g.
sliding-window layers get their own mask). Block 0 runs for real on the first batch only, to learn the form of a
block's output; the other blocks pass their input through, and the pass ends at the last block (the head never
runs). The capture checks that the stack is a chain: the blocks are called in order, once each, every block on
the previous one's output. A model that does something else between its blocks is refused with the reason
(:class:`NotAChain`).

Caches are dropped: ``use_cache=False`` is passed to a model whose forward takes it, and any cache object a
block would receive (an object with ``get_seq_length``, as Hugging Face's ``Cache``) is replaced by ``None``, since
a block run several times on the same batch must not append to one.
"""
from __future__ import annotations

import contextlib
import inspect
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from .batches import StopForward, input_args, model_device, move_batch, progress_bar, split_batch, token_mask

__all__ = [
    "BlockStack",
    "find_block_stack",
    "resolve_block_stack",
    "NotAChain",
    "BlockCall",
    "CapturedBatch",
    "BlockInputs",
    "capture_block_inputs",
    "call_block",
    "block_output",
    "execution_device",
    "move_tensors",
]


@dataclass(frozen=True)
class BlockStack:
    """The blocks of a model, in the order its forward calls them.

    Attributes:
        label: how reports name the stack (``"model.layers"``).
        names: each block's qualified name in the model.
        modules: the blocks.
    """

    label: str
    names: tuple[str, ...]
    modules: tuple[nn.Module, ...]

    def index_of(self, layer_name: str) -> int | None:
        """The block that holds the layer ``layer_name``, or ``None``."""
        for i, name in enumerate(self.names):
            if layer_name == name or layer_name.startswith(f"{name}."):
                return i
        return None


def find_block_stack(model: nn.Module, layer_names: Iterable[str]) -> BlockStack | None:
    """The ``nn.ModuleList`` of ``model`` whose modules all have one class and that holds the most of
    ``layer_names`` (ties: the longer, then the first in module order); ``None`` when none holds any. Counting the
    layers held, not the list's length, picks the decoder layers over a longer list inside one of them (a mixture
    of experts' experts)."""
    names = list(layer_names)
    best, best_key = None, (0, 0)
    for prefix, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        block_names = tuple(f"{prefix}.{i}" if prefix else str(i) for i in range(len(module)))
        held = sum(1 for n in names if any(n == b or n.startswith(f"{b}.") for b in block_names))
        if held and (held, len(module)) > best_key:
            best, best_key = BlockStack(prefix or "<model>", block_names, tuple(module)), (held, len(module))
    return best


def resolve_block_stack(fn: str, model: nn.Module, blocks, layer_names: Iterable[str]) -> BlockStack | None:
    """The stack ``prune_weights(blocks=...)`` asks for: ``"auto"`` (:func:`find_block_stack`), ``None`` (no stack),
    the qualified name of an ``nn.ModuleList`` of the model, or the list / sequence of its blocks.

    Raises:
        TypeError / ValueError: anything else, a name that is not a ModuleList of the model, or blocks that are not
            submodules of it.
    """
    if blocks is None:
        return None
    if isinstance(blocks, str) and blocks == "auto":
        return find_block_stack(model, layer_names)
    if isinstance(blocks, str):
        try:
            found = model.get_submodule(blocks)
        except AttributeError:
            found = None
        if not isinstance(found, nn.ModuleList) or len(found) == 0:
            got = "nothing" if found is None else type(found).__name__
            raise ValueError(f"{fn}: expected blocks= to name a non-empty nn.ModuleList of the model, got {got} at "
                             f"{blocks!r}")
        return BlockStack(blocks, tuple(f"{blocks}.{i}" for i in range(len(found))), tuple(found))
    if isinstance(blocks, nn.Module) and not isinstance(blocks, nn.ModuleList):
        raise TypeError(f"{fn}: expected blocks= as 'auto', None, a name or a list of blocks, got a "
                        f"{type(blocks).__name__} (wrap a single block in a list)")
    if not isinstance(blocks, (nn.ModuleList, Sequence)) or isinstance(blocks, str) or len(blocks) == 0:
        raise TypeError(f"{fn}: expected blocks= as 'auto', None, a name or a non-empty list of blocks, got "
                        f"{type(blocks).__name__}")
    where = {id(m): n for n, m in model.named_modules()}
    missing = [i for i, b in enumerate(blocks) if not isinstance(b, nn.Module) or id(b) not in where]
    if missing:
        raise ValueError(f"{fn}: expected blocks= to hold submodules of the model, got entries {missing} that are not")
    names = tuple(where[id(b)] for b in blocks)
    parent = names[0].rpartition(".")[0]
    label = parent if all(n.rpartition(".")[0] == parent for n in names) and parent else ", ".join(names)
    return BlockStack(label, names, tuple(blocks))


class NotAChain(ValueError):
    """The model does not run its stack as a chain of blocks (each called once, in order, on the previous one's
    output), so it cannot be run one block at a time; the message says what it does instead."""


@dataclass
class BlockCall:
    """How one block is called on one batch, its hidden-state argument left out."""

    args: tuple
    kwargs: dict


@dataclass
class CapturedBatch:
    """One calibration batch as the stack sees it.

    Attributes:
        hidden: the hidden states the current block receives (updated as the pipeline moves down the stack).
        calls: each block's other arguments.
        tokens: the batch's real tokens (:func:`pruning.batches.token_mask`) or ``None``.
    """

    hidden: torch.Tensor
    calls: list[BlockCall]
    tokens: torch.Tensor | None


@dataclass
class BlockInputs:
    """What :func:`capture_block_inputs` kept: ``key`` is where a block takes its hidden states (``0``: the first
    positional argument, or a keyword's name); ``batches`` one entry per calibration batch."""

    key: int | str
    batches: list[CapturedBatch] = field(default_factory=list)


def _is_cache(value) -> bool:
    return callable(getattr(value, "get_seq_length", None)) and not isinstance(value, torch.Tensor)


def _without_cache(value):
    if _is_cache(value):
        return None
    return value


def move_tensors(obj, device: torch.device | None, memo: dict):
    """``obj`` with every tensor inside (tuples, lists, dicts) moved to ``device`` (``None``: left where it is); a
    tensor met twice is moved once (``memo``: id -> moved), so shared tensors stay shared."""
    if device is None:
        return obj
    if isinstance(obj, torch.Tensor):
        moved = memo.get(id(obj))
        if moved is None:
            moved = memo[id(obj)] = (obj, obj.to(device))
        return moved[1]
    if isinstance(obj, dict):
        return {k: move_tensors(v, device, memo) for k, v in obj.items()}
    if isinstance(obj, (tuple, list)):
        return type(obj)(move_tensors(v, device, memo) for v in obj)
    return obj


def block_output(out) -> torch.Tensor:
    """The hidden states in a block's output: the output itself, or the first element of a tuple / list.

    Raises:
        NotAChain: neither.
    """
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise NotAChain(f"expected a block to return its hidden states (a tensor, or a tuple starting with one), got "
                    f"{type(out).__name__}")


def _shaped_like(template, hidden: torch.Tensor):
    """``hidden`` in the form of the block output ``template``."""
    if isinstance(template, torch.Tensor):
        return hidden
    return type(template)((hidden, *template[1:]))


def _forward_accepts(model: nn.Module, name: str) -> bool:
    try:
        return name in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def _standing_in(blocks: Sequence[nn.Module], make):
    """Every block's ``forward`` replaced by ``make(i, real_forward)`` for the duration (the instance attribute; an
    Accelerate wrapper there is put back afterwards)."""
    saved = [(b, b.__dict__.get("forward")) for b in blocks]
    try:
        for i, block in enumerate(blocks):
            block.forward = make(i, block.forward)
        yield
    finally:
        for block, own in saved:
            if own is None:
                block.__dict__.pop("forward", None)
            else:
                block.forward = own


def capture_block_inputs(
    model: nn.Module,
    stack: BlockStack,
    calib: Iterable,
    *,
    store: torch.device | None = None,
    watch: dict[str, nn.Module] | None = None,
    progress: bool = True,
) -> tuple[BlockInputs, list[str]]:
    """Run ``model`` on every calibration batch up to its last block and keep each block's inputs.

    Args:
        model: the model, already in eval mode under ``torch.no_grad()``.
        stack: its blocks.
        calib: the calibration batches (:mod:`pruning.batches`).
        store: where the kept tensors live (``None``: where they were made).
        watch: layers outside the stack; the ones the model calls before block 0 are returned (in call order).
        progress: show a progress bar.

    Returns:
        ``(inputs, called)``: the kept inputs, and the names of the ``watch`` layers called before block 0.

    Raises:
        NotAChain: the model does not run the stack as a chain (see the module docstring).
        ValueError: no calibration batch.
    """
    captured = BlockInputs(key=0)
    last = len(stack.modules) - 1
    state: dict = {"template": None}
    called: list[str] = []
    device = model_device(model)
    use_cache = _forward_accepts(model, "use_cache")

    def make(i: int, real):
        def stand_in(*args, **kwargs):
            if state["next"] != i:
                raise NotAChain(f"expected the blocks of {stack.label!r} to be called in order, once each per forward; "
                                f"got block {i} called when block {state['next']} was due")
            state["next"] = i + 1
            if i == 0:
                captured.key = 0 if args else "hidden_states"
            key = captured.key
            if key == 0 and not args or key != 0 and key not in kwargs:
                raise NotAChain(f"expected every block of {stack.label!r} to take its hidden states as the first "
                                "positional argument or as hidden_states=, got neither")
            hidden = args[0] if key == 0 else kwargs[key]
            rest_args = tuple(_without_cache(a) for a in (args[1:] if key == 0 else args))
            rest_kwargs = {k: (False if k == "use_cache" else _without_cache(v)) for k, v in kwargs.items() if k != key}
            if i == 0:
                state["batch"] = CapturedBatch(move_tensors(hidden, store, state["memo"]), [], state["tokens"])
                if state["template"] is None:
                    state["template"] = real(*args, **kwargs)
                    out = state["template"]
                    state["out"] = block_output(out)
                else:
                    out, state["out"] = _shaped_like(state["template"], hidden), hidden
            else:
                if hidden is not state["out"]:
                    raise NotAChain(f"expected block {i} of {stack.label!r} to receive the output of block {i - 1} "
                                    "as it is; the model changes the hidden states between its blocks")
                out, state["out"] = _shaped_like(state["template"], hidden), hidden
            state["batch"].calls.append(BlockCall(move_tensors(rest_args, store, state["memo"]),
                                                  move_tensors(rest_kwargs, store, state["memo"])))
            if i == last:
                raise StopForward
            return out

        return stand_in

    def watch_hook(name: str):
        def hook(mod, args):
            if state["next"] > 0:
                raise NotAChain(f"expected the layers outside {stack.label!r} to run before or after the stack, got "
                                f"{name!r} called between its blocks")
            if name not in called:
                called.append(name)

        return hook

    handles = [m.register_forward_pre_hook(watch_hook(n)) for n, m in (watch or {}).items()]
    try:
        with _standing_in(stack.modules, make):
            for batch in progress_bar(calib, desc="capture", enabled=progress):
                inputs, _ = split_batch(batch, "calibration batch")
                args, kwargs = input_args(inputs, "calibration batch inputs")
                if use_cache:
                    kwargs["use_cache"] = False
                state.update(next=0, memo={}, tokens=token_mask(inputs))
                try:
                    model(*move_batch(args, device), **move_batch(kwargs, device))
                except StopForward:
                    captured.batches.append(state["batch"])
                    continue
                raise NotAChain(f"expected the forward pass to reach the last block of {stack.label!r}, got a forward "
                                f"that returned after calling {state['next']} of its {last + 1} blocks")
    finally:
        for h in handles:
            h.remove()
    if not captured.batches:
        raise ValueError("calibration: expected at least one calibration batch, got an empty iterable")
    return captured, called


def execution_device(block: nn.Module) -> torch.device:
    """Where ``block`` computes: its Accelerate hook's execution device, else the device of its first tensor that
    holds values, else the CPU."""
    hook = getattr(block, "_hf_hook", None)
    device = getattr(hook, "execution_device", None)
    if device is not None:
        return torch.device(device if not isinstance(device, int) else f"cuda:{device}")
    return model_device(block)


def call_block(block: nn.Module, key: int | str, hidden: torch.Tensor, call: BlockCall,
               device: torch.device | None):
    """``block`` called on ``hidden`` with its other captured arguments, every tensor moved to ``device`` first."""
    memo: dict = {}
    hidden = move_tensors(hidden, device, memo)
    args = move_tensors(call.args, device, memo)
    kwargs = move_tensors(call.kwargs, device, memo)
    if key == 0:
        return block(hidden, *args, **kwargs)
    return block(*args, **{**kwargs, key: hidden})
