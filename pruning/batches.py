"""The batch contract: how every part of ``pruning`` reads a batch, calls the model and finds its output.

One contract serves calibration statistics (Wanda, SparseGPT), Taylor importance (weights and channels),
fine-tuning, gradual pruning and sensitivity analysis:

==========================  ==========================================  ===============================
batch                       the model is called as                      targets
==========================  ==========================================  ===============================
``Tensor`` ``x``            ``model(x)``                                none
``Mapping`` ``b``           ``model(**b)`` (Hugging Face style)         ``b["labels"]`` if present
``(inputs, targets)``       ``inputs`` as above, or ``model(*inputs)``  ``targets``
                            when ``inputs`` is a tuple / list
``(inputs,)``               as above                                    none
==========================  ==========================================  ===============================

A tuple or list is always ``(inputs, targets)``, the PyTorch ``DataLoader`` convention, so a classification
loader can be passed as ``calib`` as it is (consumers that need no targets ignore them). Several positional
inputs are written ``((a, b), targets)`` or ``((a, b),)``, or as a dict of keyword inputs. The same
*inputs* rule (a tensor, a mapping of keyword inputs, a tuple / list of positional inputs) is what
``prune_channels(example_inputs=...)`` takes.

Padding: a mapping batch's 2-D ``attention_mask`` (``0`` = padded position, the Hugging Face convention) says
which tokens are real (:func:`token_mask`); calibration statistics leave the padded ones out.

Also here: the helpers every batch consumer shares (moving a batch to the model's device, running a model
in eval mode with its modes restored, finding the logits in an output, the default task loss, the
progress bar).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "split_batch",
    "input_args",
    "token_mask",
    "StopForward",
    "call_model",
    "move_batch",
    "model_device",
    "iter_tensors",
    "check_batches",
    "output_tensor",
    "loss_from_output",
    "default_loss",
    "restoring_modes",
    "eval_mode",
    "progress_bar",
]

_CONTRACT = (
    "a batch is a Tensor (the inputs), a Mapping of keyword inputs (targets under 'labels'), or a tuple/list "
    "(inputs, targets) or (inputs,) whose inputs are a Tensor, a Mapping or a tuple/list of positional inputs; "
    "pass several positional inputs as ((a, b), targets) or as a dict"
)


def split_batch(batch, what: str = "batch") -> tuple[object, object | None]:
    """Split one batch into ``(inputs, targets)`` following the contract in the module docstring.

    Args:
        batch: a ``torch.Tensor`` (inputs, no targets), a ``Mapping`` (keyword inputs; targets are its
            ``"labels"`` entry or ``None``), or a tuple / list ``(inputs, targets)`` or ``(inputs,)``.
        what: how error messages name the batch (e.g. ``"calibration batch"``).

    Returns:
        ``(inputs, targets)``; ``targets`` is ``None`` when the batch carries none. A mapping is its own
        inputs, ``"labels"`` included (a Hugging Face model then computes its loss).

    Raises:
        TypeError: any other type, or a tuple / list whose length is not 1 or 2.
    """
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, Mapping):
        return batch, batch.get("labels")
    if isinstance(batch, (tuple, list)):
        if len(batch) == 2:
            return batch[0], batch[1]
        if len(batch) == 1:
            return batch[0], None
        raise TypeError(f"{what}: expected (inputs, targets) or (inputs,), got a {type(batch).__name__} of "
                        f"{len(batch)}; {_CONTRACT}")
    raise TypeError(f"{what}: expected a Tensor, a Mapping or a tuple/list, got {type(batch).__name__}; {_CONTRACT}")


def input_args(inputs, what: str = "inputs") -> tuple[tuple, dict]:
    """``(args, kwargs)`` that call a model on ``inputs``: a tensor is one positional argument, a mapping is
    keyword arguments, a tuple / list is positional arguments.

    Raises:
        TypeError: any other type (the message starts with ``what``).
    """
    if isinstance(inputs, torch.Tensor):
        return (inputs,), {}
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, (tuple, list)):
        return tuple(inputs), {}
    raise TypeError(f"{what}: expected a Tensor, a tuple/list of positional inputs or a dict of keyword inputs, "
                    f"got {type(inputs).__name__}")


def token_mask(inputs) -> torch.Tensor | None:
    """The real (unpadded) tokens of one batch's inputs: a ``torch.bool`` ``[batch, seq]`` tensor, ``True`` where a
    mapping's 2-D ``attention_mask`` is non-zero; ``None`` when the inputs carry no such mask (every row counts).

    Raises:
        ValueError: an ``attention_mask`` that is 2-D but not made of 0 / 1 (or booleans).
    """
    mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
    if not isinstance(mask, torch.Tensor) or mask.dim() != 2:
        return None
    if mask.dtype != torch.bool and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError("calibration batch: expected a 2-D attention_mask of 0 (padding) and 1 (token), got values "
                         f"{sorted({float(v) for v in mask.unique()[:5].tolist()})}")
    return mask != 0


class StopForward(Exception):
    """Raised by a hook to end a forward pass early, once what it came for has been seen (caught by the loop
    that started the pass)."""


def call_model(model: nn.Module, inputs, what: str = "inputs"):
    """``model(x)``, ``model(**inputs)`` or ``model(*inputs)`` for a tensor, a mapping or a tuple / list.

    Raises:
        TypeError: ``inputs`` of any other type.
    """
    args, kwargs = input_args(inputs, what)
    return model(*args, **kwargs)


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer) that holds values; CPU for a model without one (a model
    whose weights an Accelerate offload hook keeps on the meta device between forward passes included)."""
    for t in model.parameters():
        if t.device.type != "meta":
            return t.device
    for t in model.buffers():
        if t.device.type != "meta":
            return t.device
    return torch.device("cpu")


def move_batch(batch, device: torch.device):
    """``batch`` with every tensor inside (tuples, lists, mappings, nested) moved to ``device``; other values
    are kept as they are."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device)
    if isinstance(batch, Mapping):
        return {k: move_batch(v, device) for k, v in batch.items()}
    if isinstance(batch, tuple):
        return tuple(move_batch(v, device) for v in batch)
    if isinstance(batch, list):
        return [move_batch(v, device) for v in batch]
    return batch


def iter_tensors(obj) -> Iterator[torch.Tensor]:
    """Every tensor inside ``obj`` (a tensor, or tuples / lists / mappings of them, nested; a Hugging Face
    ``ModelOutput`` is a mapping), depth first."""
    if isinstance(obj, torch.Tensor):
        yield obj
    elif isinstance(obj, Mapping):
        for v in obj.values():
            yield from iter_tensors(v)
    elif isinstance(obj, (tuple, list)):
        for v in obj:
            yield from iter_tensors(v)


def check_batches(fn: str, batches, *, label: str = "calib", reiterated_by: str | None = None) -> None:
    """Check that ``batches`` is an iterable of batches (and re-iterable when ``reiterated_by`` says why it
    must be: a one-shot iterator would be empty on the second pass).

    Raises:
        TypeError: ``None``, a single tensor, a string, or not iterable.
        ValueError: a one-shot iterator where ``reiterated_by`` is given.
    """
    if batches is None or isinstance(batches, (torch.Tensor, str, bytes)) or not isinstance(batches, Iterable):
        raise TypeError(f"{fn}: expected {label} as an iterable of batches (a list or a DataLoader; wrap a single "
                        f"tensor in a list), got {type(batches).__name__}")
    if reiterated_by is not None and isinstance(batches, Iterator):
        raise ValueError(f"{fn}: {reiterated_by} needs a re-iterable {label} (a list or a DataLoader), got a "
                         f"one-shot iterator ({type(batches).__name__}); wrap it with list(...)")


def output_tensor(output, fn: str = "output_tensor()") -> torch.Tensor:
    """The main tensor of a model output: the output itself, its ``logits``, its ``last_hidden_state``, the
    first tensor of a mapping other than ``loss``, or the first element of a tuple / list.

    Raises:
        TypeError: no such tensor.
    """
    if isinstance(output, torch.Tensor):
        return output
    for key in ("logits", "last_hidden_state"):
        value = output.get(key) if isinstance(output, Mapping) else getattr(output, key, None)
        if isinstance(value, torch.Tensor):
            return value
    if isinstance(output, Mapping):
        for key, value in output.items():
            if key != "loss" and isinstance(value, torch.Tensor):
                return value
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"{fn}: cannot find an output tensor in a model output of type {type(output).__name__}")


def loss_from_output(output, targets, fn: str = "default_loss()") -> torch.Tensor:
    """The default task loss of one batch: the model's own ``loss`` when its output carries one (a Hugging
    Face model given ``labels``), else the cross-entropy of its logits (:func:`output_tensor`, flattened to
    ``[-1, classes]``) against ``targets`` (flattened to ``[-1]``).

    Raises:
        TypeError: neither a loss in the output nor targets in the batch.
    """
    loss = output.get("loss") if isinstance(output, Mapping) else getattr(output, "loss", None)
    if isinstance(loss, torch.Tensor):
        return loss
    if targets is None:
        raise TypeError(f"{fn}: the default loss needs (inputs, targets) batches, or a model output with a .loss "
                        "(a Hugging Face model given labels); got a batch without targets and an output without a "
                        "loss; pass loss_fn(model, batch) -> scalar")
    logits = output_tensor(output, fn)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


def default_loss(model: nn.Module, batch) -> torch.Tensor:
    """``loss_fn(model, batch)`` used where none is given: :func:`loss_from_output` of the model on the batch's
    inputs, against its targets.

    Raises:
        TypeError: a batch outside the contract, or neither targets nor a loss in the model's output.
    """
    inputs, targets = split_batch(batch)
    return loss_from_output(call_model(model, inputs), targets)


@contextlib.contextmanager
def restoring_modes(*models: nn.Module | None):
    """On exit, every submodule of each model (``None`` entries are skipped) gets back its own ``training``
    flag, whatever the body did to them and even on error."""
    flags = [(m, m.training) for model in models if model is not None for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode for the duration (BatchNorm statistics untouched, dropout off), every submodule's own
    ``training`` flag restored afterwards."""
    with restoring_modes(model):
        model.eval()
        yield


def progress_bar(iterable=None, *, desc: str, enabled: bool, total: int | None = None):
    """A ``tqdm`` bar over ``iterable`` (or a manual one with ``total``) that disappears when done; ``enabled``
    turns it off. The length of ``iterable`` is used when it has one."""
    from tqdm.auto import tqdm

    if total is None and iterable is not None and hasattr(iterable, "__len__"):
        total = len(iterable)
    return tqdm(iterable, desc=desc, total=total, disable=not enabled, leave=False)
