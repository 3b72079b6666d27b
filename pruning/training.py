"""Training with masks: enforcement, gradual (cubic) pruning, fine-tuning with distillation, L1/L2 penalties.

Zeros stay zero: :func:`attach_mask_hooks` registers two hooks on an optimizer — before each step it
multiplies the masked weights' gradients by the mask (so momentum / Adam state never builds up on
pruned weights), after each step it multiplies the weights by the mask again (so weight decay or any
other update cannot revive them). :func:`finetune` does this for you; with your own loop either attach
the hooks or call :func:`enforce_masks` after every ``optimizer.step()``.
"""
from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .batches import (
    call_model,
    check_batches,
    loss_from_output,
    model_device,
    move_batch,
    output_tensor,
    progress_bar,
    restoring_modes,
    split_batch,
)
from .masks import get_mask, masked_modules
from .patterns import parse_pattern
from .transaction import ModelSnapshot
from .weights import PruningReport, prune_weights

__all__ = [
    "enforce_masks",
    "attach_mask_hooks",
    "cubic_sparsity_schedule",
    "GradualPruner",
    "FinetuneConfig",
    "finetune",
    "l1_penalty",
    "l2_penalty",
    "DEFAULT_FINETUNE_LR",
]

# A tenth of AdamW's usual 1e-3 training rate: fine-tuning recovers accuracy around a pruned optimum
# and must not walk far from it (the "reduced learning rate" of the ASP / Wanda recipes).
DEFAULT_FINETUNE_LR = 1e-4


# ---------------------------------------------------------------------------------------------------
# Enforcement
# ---------------------------------------------------------------------------------------------------


def enforce_masks(model: nn.Module) -> int:
    """Multiply every masked weight (and its gradient, if any) by its ``weight_mask`` now.

    Returns:
        The number of masked modules.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"enforce_masks(): expected an nn.Module, got {type(model).__name__}")
    count = 0
    with torch.no_grad():
        for _, module in masked_modules(model):
            mask = get_mask(module)
            module.weight.mul_(mask)
            if module.weight.grad is not None:
                module.weight.grad.mul_(mask)
            count += 1
    return count


class MaskHookHandle:
    """Removes the optimizer hooks registered by :func:`attach_mask_hooks` (``.remove()``, idempotent)."""

    def __init__(self, handles):
        self._handles = list(handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def attach_mask_hooks(optimizer: torch.optim.Optimizer, model: nn.Module) -> MaskHookHandle:
    """Keep ``model``'s masks enforced across every ``optimizer.step()``.

    Masked modules are looked up at each step, so masks added or changed later (e.g. by
    :class:`GradualPruner`) are honoured.

    Returns:
        A handle; ``handle.remove()`` (or ``with attach_mask_hooks(...):``) detaches the hooks.

    Raises:
        TypeError: not an optimizer / not a module.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"attach_mask_hooks(): expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
    if not isinstance(model, nn.Module):
        raise TypeError(f"attach_mask_hooks(): expected an nn.Module, got {type(model).__name__}")

    def before(opt, args, kwargs):
        with torch.no_grad():
            for _, module in masked_modules(model):
                if module.weight.grad is not None:
                    module.weight.grad.mul_(get_mask(module))

    def after(opt, args, kwargs):
        with torch.no_grad():
            for _, module in masked_modules(model):
                module.weight.mul_(get_mask(module))

    return MaskHookHandle([optimizer.register_step_pre_hook(before), optimizer.register_step_post_hook(after)])


# ---------------------------------------------------------------------------------------------------
# Penalties
# ---------------------------------------------------------------------------------------------------


def _penalty_weights(fn: str, model: nn.Module, filter_fn):
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: expected filter_fn(name, module) -> bool, got {type(filter_fn).__name__}")
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and (filter_fn is None or filter_fn(name, module)):
            yield module.weight


def l1_penalty(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> torch.Tensor:
    """``sum |w|`` over the weights of every Linear / Conv2d (chosen by ``filter_fn(name, module)``).

    Differentiable; add ``coefficient * l1_penalty(model)`` to a loss to push weights toward zero.
    Returns a 0-d tensor (0.0 if no layer is selected). Raises ``TypeError`` for a non-module.
    """
    terms = [w.abs().sum() for w in _penalty_weights("l1_penalty()", model, filter_fn)]
    return torch.stack(terms).sum() if terms else torch.zeros((), device=model_device(model))


def l2_penalty(model: nn.Module, filter_fn: Callable[[str, nn.Module], bool] | None = None) -> torch.Tensor:
    """``sum w^2`` over the weights of every Linear / Conv2d (chosen by ``filter_fn(name, module)``).

    Differentiable; returns a 0-d tensor (0.0 if no layer is selected). Raises ``TypeError`` for a non-module.
    """
    terms = [w.square().sum() for w in _penalty_weights("l2_penalty()", model, filter_fn)]
    return torch.stack(terms).sum() if terms else torch.zeros((), device=model_device(model))


# ---------------------------------------------------------------------------------------------------
# Gradual pruning
# ---------------------------------------------------------------------------------------------------


def cubic_sparsity_schedule(
    step: int, total_steps: int, initial: float = 0.0, final: float = 0.5, *, begin_step: int = 0
) -> float:
    """Zhu & Gupta's cubic schedule: ``s(t) = final + (initial - final) * (1 - (t - t0) / total)^3``.

    Sparsity rises fast at first (when the network has many redundant weights) and levels off at
    ``final``. Before ``begin_step`` it is ``initial``; after ``begin_step + total_steps`` it is ``final``.

    Args:
        step: current training step (int >= 0).
        total_steps: length of the pruning phase (int >= 1).
        initial, final: sparsities in ``[0, 1]`` with ``initial <= final``.
        begin_step: the step at which pruning starts.

    Raises:
        TypeError / ValueError: non-integer steps, ``total_steps < 1``, negative steps, sparsities outside
            ``[0, 1]`` or ``initial > final``.
    """
    fn = "cubic_sparsity_schedule()"
    for label, v in (("step", step), ("total_steps", total_steps), ("begin_step", begin_step)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn}: expected an integer {label}, got {type(v).__name__}")
    if total_steps < 1 or step < 0 or begin_step < 0:
        raise ValueError(
            f"{fn}: expected total_steps >= 1, step >= 0, begin_step >= 0, got {total_steps}, {step}, {begin_step}"
        )
    for label, v in (("initial", initial), ("final", final)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"{fn}: expected 0 <= {label} <= 1, got {v!r}")
    if initial > final:
        raise ValueError(f"{fn}: expected initial <= final, got initial={initial}, final={final}")
    progress = min(max((step - begin_step) / total_steps, 0.0), 1.0)
    return float(final + (initial - final) * (1.0 - progress) ** 3)


class GradualPruner:
    """Raise sparsity along :func:`cubic_sparsity_schedule` while training, re-computing masks as it goes.

    Call :meth:`step` once after every optimizer step (or :meth:`attach` it to the optimizer, or pass it
    to :func:`finetune` as ``pruner=``). At steps ``begin_step, begin_step + frequency, ...,
    begin_step + total_steps`` it calls :func:`pruning.prune_weights` with the scheduled sparsity; the
    new masks replace the old ones. Weights pruned earlier are zero and so score lowest: they stay
    pruned as the budget grows.

    Args:
        model: the model being trained.
        final_sparsity: target sparsity in ``[0, 1]``.
        total_steps: steps over which sparsity rises (>= 1).
        initial_sparsity: sparsity at ``begin_step``.
        begin_step: first pruning step.
        frequency: prune every ``frequency`` steps (>= 1).
        pattern: ``"unstructured"``, ``"global"`` or ``"block<R>x<C>"`` (N:M fixes its sparsity, so it
            is not gradual: use :func:`pruning.prune_weights` then :func:`finetune`).
        importance, filter_fn, calib, loss_fn: as in :func:`pruning.prune_weights`.
        progress: progress bars inside each pruning call.

    Raises:
        ValueError / TypeError: bad schedule arguments or an N:M pattern.
    """

    def __init__(
        self,
        model: nn.Module,
        final_sparsity: float,
        total_steps: int,
        *,
        initial_sparsity: float = 0.0,
        begin_step: int = 0,
        frequency: int = 100,
        pattern: str = "unstructured",
        importance="magnitude",
        filter_fn: Callable[[str, nn.Module], bool] | None = None,
        calib: Iterable | None = None,
        loss_fn: Callable | None = None,
        progress: bool = False,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GradualPruner: expected an nn.Module, got {type(model).__name__}")
        cubic_sparsity_schedule(begin_step, total_steps, initial_sparsity, final_sparsity, begin_step=begin_step)
        if isinstance(frequency, bool) or not isinstance(frequency, int) or frequency < 1:
            raise ValueError(f"GradualPruner: expected frequency >= 1, got {frequency!r}")
        pat = parse_pattern(pattern)
        if pat.kind == "nm":
            raise ValueError(
                f"GradualPruner: pattern {pat} has a fixed sparsity and cannot be reached gradually; expected "
                "'unstructured', 'global' or 'block<R>x<C>' (for N:M use prune_weights() then finetune())"
            )
        self.model = model
        self.final_sparsity = float(final_sparsity)
        self.initial_sparsity = float(initial_sparsity)
        self.total_steps = total_steps
        self.begin_step = begin_step
        self.frequency = frequency
        self.pattern = str(pat)
        self.importance = importance
        self.filter_fn = filter_fn
        self.calib = calib
        self.loss_fn = loss_fn
        self.progress = progress
        self.current_step = 0
        self.reports: list[tuple[int, PruningReport]] = []

    def sparsity_at(self, step: int) -> float:
        """The scheduled sparsity at ``step``."""
        return cubic_sparsity_schedule(
            step, self.total_steps, self.initial_sparsity, self.final_sparsity, begin_step=self.begin_step
        )

    def is_pruning_step(self, step: int) -> bool:
        """True if masks are re-computed at ``step``."""
        offset = step - self.begin_step
        return 0 <= offset <= self.total_steps and (offset % self.frequency == 0 or offset == self.total_steps)

    def step(self) -> PruningReport | None:
        """Advance one training step; prune if the schedule says so. Returns the report when it pruned.

        All or nothing: if pruning raises, the model and the pruner (its step count, its reports) are left as
        they were, so the same step can be tried again.
        """
        step = self.current_step
        if not self.is_pruning_step(step):
            self.current_step = step + 1
            return None
        report = prune_weights(
            self.model,
            self.pattern,
            self.importance,
            sparsity=self.sparsity_at(step),
            calib=self.calib,
            loss_fn=self.loss_fn,
            filter_fn=self.filter_fn,
            progress=self.progress,
        )
        self.current_step = step + 1
        self.reports.append((step, report))
        return report

    def attach(self, optimizer: torch.optim.Optimizer):
        """Call :meth:`step` after every ``optimizer.step()``; returns a handle with ``.remove()``."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"GradualPruner.attach(): expected a torch.optim.Optimizer, got {type(optimizer).__name__}")
        return optimizer.register_step_post_hook(lambda opt, args, kwargs: self.step())


# ---------------------------------------------------------------------------------------------------
# Fine-tuning
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FinetuneConfig:
    """Settings of :func:`finetune` (every field can also be passed to it as a keyword).

    Attributes:
        epochs: passes over ``data`` (>= 1).
        lr: peak learning rate; default :data:`DEFAULT_FINETUNE_LR` = 1e-4, a tenth of AdamW's usual 1e-3.
            Rule of thumb: a tenth of the rate the dense model was trained with.
        weight_decay: decoupled (AdamW) or L2 (SGD) weight decay.
        optimizer: ``"adamw"`` or ``"sgd"`` (with ``momentum``).
        momentum: SGD momentum.
        schedule: ``"cosine"`` (decay to 0 over all steps) or ``"constant"``.
        distill_weight: with a teacher, loss = ``(1 - distill_weight) * task + distill_weight * KD``.
        temperature: softening temperature ``T`` of the distillation KL (scaled by ``T^2``).
        l1, l2: coefficients of :func:`l1_penalty` / :func:`l2_penalty` added to the loss.
        max_grad_norm: clip the gradient norm (``None``: no clipping).
        max_steps: stop after this many optimizer steps (``None``: run all epochs).
        seed: ``torch.manual_seed`` before training (``None``: leave the RNG alone).
    """

    epochs: int = 1
    lr: float = DEFAULT_FINETUNE_LR
    weight_decay: float = 0.0
    optimizer: str = "adamw"
    momentum: float = 0.9
    schedule: str = "cosine"
    distill_weight: float = 0.5
    temperature: float = 2.0
    l1: float = 0.0
    l2: float = 0.0
    max_grad_norm: float | None = None
    max_steps: int | None = None
    seed: int | None = None

    def __post_init__(self):
        fn = "FinetuneConfig"

        def number(label, v, lo, lo_open=False, hi=None):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v):
                raise TypeError(f"{fn}: expected {label} as a number, got {type(v).__name__}")
            if (v <= lo if lo_open else v < lo) or (hi is not None and v > hi):
                rng = f"{'>' if lo_open else '>='} {lo}" + (f" and <= {hi}" if hi is not None else "")
                raise ValueError(f"{fn}: expected {label} {rng}, got {v}")

        if isinstance(self.epochs, bool) or not isinstance(self.epochs, int) or self.epochs < 1:
            raise ValueError(f"{fn}: expected epochs as an int >= 1, got {self.epochs!r}")
        number("lr", self.lr, 0.0, lo_open=True)
        number("weight_decay", self.weight_decay, 0.0)
        number("momentum", self.momentum, 0.0, hi=1.0)
        number("distill_weight", self.distill_weight, 0.0, hi=1.0)
        number("temperature", self.temperature, 0.0, lo_open=True)
        number("l1", self.l1, 0.0)
        number("l2", self.l2, 0.0)
        if self.optimizer not in ("adamw", "sgd"):
            raise ValueError(f"{fn}: expected optimizer 'adamw' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"{fn}: expected schedule 'cosine' or 'constant', got {self.schedule!r}")
        if self.max_grad_norm is not None:
            number("max_grad_norm", self.max_grad_norm, 0.0, lo_open=True)
        if self.max_steps is not None and (
            isinstance(self.max_steps, bool) or not isinstance(self.max_steps, int) or self.max_steps < 1
        ):
            raise ValueError(f"{fn}: expected max_steps as an int >= 1 or None, got {self.max_steps!r}")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)):
            raise TypeError(f"{fn}: expected seed as an int or None, got {type(self.seed).__name__}")


def _distill_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    s = student.reshape(-1, student.shape[-1]).float() / temperature
    t = teacher.reshape(-1, teacher.shape[-1]).float() / temperature
    kl = F.kl_div(F.log_softmax(s, -1), F.log_softmax(t, -1), log_target=True, reduction="batchmean")
    return kl * temperature**2


def finetune(
    model: nn.Module,
    data: Iterable,
    loss_fn: Callable | None = None,
    *,
    config: FinetuneConfig | None = None,
    teacher: nn.Module | None = None,
    progress: bool = True,
    pruner: GradualPruner | None = None,
    **overrides,
) -> list[float]:
    """Fine-tune a (pruned) model with its masks enforced throughout; optional distillation and penalties.

    Args:
        model: the model; trained in train mode, its modes restored afterwards.
        data: re-iterable of batches (:mod:`pruning.batches`, e.g. a ``DataLoader`` of ``(inputs, targets)``);
            tensors are moved to the model's device.
        loss_fn: ``loss_fn(model, batch) -> scalar``. Default (:func:`pruning.batches.loss_from_output`): the
            model's own ``output.loss`` when it has one (a Hugging Face model given ``labels``), else the
            cross-entropy of its logits against the batch's targets.
        config: a :class:`FinetuneConfig`; keyword ``overrides`` (any of its fields, e.g. ``epochs=3,
            lr=3e-4``) replace its values.
        teacher: the dense model to distil from (eval mode, no gradients): adds the KL divergence between
            temperature-softened teacher and student logits, mixed with the task loss by
            ``config.distill_weight``. The student's logits come from the default loss's forward pass;
            with a custom ``loss_fn`` one extra student forward is run on the batch's inputs (the teacher
            and that forward get the inputs as the batch contract splits them, a mapping whole).
        progress: show a progress bar.
        pruner: a :class:`GradualPruner` stepped after every optimizer step.

    Returns:
        The mean training loss (the full objective: task, distillation and penalties) of each epoch.

    Raises:
        TypeError: bad argument types, unknown keyword, or a batch the default loss cannot handle.
        ValueError: invalid settings, empty ``data``, a one-shot iterator with ``epochs > 1``, or a NaN / inf
            loss (refused before it reaches the weights).
        Any error before the first optimizer step (a bad batch, a failing forward or loss, Ctrl-C) leaves
        ``model`` exactly as it was (:mod:`pruning.transaction`: values, BatchNorm statistics, ``.grad``,
        modes, hooks). After it, an error stops training where it is: the weights keep the steps taken, the
        masks stay enforced, and the modes are restored.
    """
    fn = "finetune()"
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    if config is None:
        config = FinetuneConfig()
    elif not isinstance(config, FinetuneConfig):
        raise TypeError(f"{fn}: expected config as a FinetuneConfig, got {type(config).__name__}")
    fields = {f.name for f in dataclasses.fields(FinetuneConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise TypeError(f"{fn}: unexpected keyword argument(s) {unknown}; expected FinetuneConfig fields {sorted(fields)}")
    cfg = dataclasses.replace(config, **overrides)
    check_batches(fn, data, label="data", reiterated_by=f"epochs={cfg.epochs}" if cfg.epochs > 1 else None)
    if loss_fn is not None and not callable(loss_fn):
        raise TypeError(f"{fn}: expected loss_fn(model, batch) -> scalar, got {type(loss_fn).__name__}")
    if teacher is not None and not isinstance(teacher, nn.Module):
        raise TypeError(f"{fn}: expected teacher as an nn.Module, got {type(teacher).__name__}")
    if pruner is not None and not isinstance(pruner, GradualPruner):
        raise TypeError(f"{fn}: expected pruner as a GradualPruner, got {type(pruner).__name__}")
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError(f"{fn}: the model has no trainable parameters")

    if cfg.seed is not None:
        torch.manual_seed(cfg.seed)
    if cfg.optimizer == "adamw":
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    else:
        opt = torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    steps_per_epoch = len(data) if hasattr(data, "__len__") else None
    total_steps = cfg.epochs * steps_per_epoch if steps_per_epoch else None
    if cfg.max_steps is not None:
        total_steps = min(total_steps, cfg.max_steps) if total_steps else cfg.max_steps
    sched = None
    if cfg.schedule == "cosine" and total_steps:
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total_steps)

    # Until the first optimizer step an error puts the model back whole; the copy is dropped at that step.
    snapshot = ModelSnapshot(model)
    try:
        losses = _train(model, data, loss_fn, cfg, teacher, pruner, opt, sched, params, total_steps, progress,
                        snapshot)
    except BaseException:
        if snapshot.restorable:
            snapshot.restore()
        raise
    return losses


def _train(model, data, loss_fn, cfg: FinetuneConfig, teacher, pruner, opt, sched, params, total_steps, progress,
           snapshot) -> list[float]:
    """The loop of :func:`finetune`; calls ``snapshot.release()`` after the first optimizer step."""
    fn = "finetune()"
    device = model_device(model)
    teacher_device = model_device(teacher) if teacher is not None else None
    enforce_masks(model)
    losses: list[float] = []
    step = 0
    with restoring_modes(model, teacher), attach_mask_hooks(opt, model):
        model.train()
        if teacher is not None:
            teacher.eval()
        bar = progress_bar(total=total_steps, desc="finetune", enabled=progress)
        for epoch in range(cfg.epochs):
            total, count = 0.0, 0
            for batch in data:
                batch = move_batch(batch, device)
                logits = None
                if loss_fn is None:
                    inputs, targets = split_batch(batch, f"{fn} batch")
                    output = call_model(model, inputs)
                    task = loss_from_output(output, targets, fn)
                    logits = output_tensor(output, fn) if teacher is not None else None
                else:
                    task = loss_fn(model, batch)
                    if not isinstance(task, torch.Tensor) or task.numel() != 1:
                        raise TypeError(f"{fn}: expected loss_fn to return a scalar tensor, got {type(task).__name__}")
                    task = task.reshape(())
                loss = task
                if teacher is not None:
                    inputs, _ = split_batch(batch, f"{fn} batch")
                    if logits is None:
                        logits = output_tensor(call_model(model, inputs), fn)
                    with torch.no_grad():
                        t_logits = output_tensor(call_model(teacher, move_batch(inputs, teacher_device)), fn)
                    kd = _distill_loss(logits, t_logits.to(device), cfg.temperature)
                    loss = (1.0 - cfg.distill_weight) * task + cfg.distill_weight * kd
                if cfg.l1:
                    loss = loss + cfg.l1 * l1_penalty(model)
                if cfg.l2:
                    loss = loss + cfg.l2 * l2_penalty(model)
                value = float(loss.detach())
                if not math.isfinite(value):
                    raise ValueError(f"{fn}: the loss of batch {count} in epoch {epoch} is {value}; stopping before "
                                     "it reaches the weights (check the data, the learning rate and the loss)")
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                opt.step()
                snapshot.release()
                if sched is not None:
                    sched.step()
                if pruner is not None:
                    pruner.step()
                total += value
                count += 1
                step += 1
                bar.update(1)
                if cfg.max_steps is not None and step >= cfg.max_steps:
                    break
            if count == 0:
                raise ValueError(f"{fn}: data yielded no batches in epoch {epoch}")
            losses.append(total / count)
            if cfg.max_steps is not None and step >= cfg.max_steps:
                break
        bar.close()
    enforce_masks(model)
    return losses
