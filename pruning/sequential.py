"""Block-sequential pruning: a language model pruned one block (decoder layer) at a time, in time linear in its
depth and in memory that does not grow with it.

:func:`prune_sequentially` is what :func:`pruning.prune_weights` runs on a model with a stack of blocks
(:mod:`pruning.blocks`), for a criterion with a per-layer rule (``layer_inputs``: magnitude, Wanda, SparseGPT):

1. **Capture.** The model's forward runs once per calibration batch up to its stack, and each block's inputs are
   kept (block 0's hidden states; every block's other arguments).
2. **Block by block.** Each group of the block's layers that share an input (q / k / v, gate / up: found on the
   first batch, by the identity of the tensor they receive) gets one set of statistics, collected once. With
   ``criterion.true_sequential`` (SparseGPT's default) each group is calibrated on the output of the groups before
   it, already pruned: one pass per group, each ending as soon as the group's input has been seen. Otherwise one
   calibrating pass serves every group of the block. Then one propagating pass runs the pruned block to make the
   next block's inputs. Per block that is a bounded number of block passes, so the whole costs time linear in
   depth, and only the current block, its statistics and the activations are live.
3. **Outside the stack.** Selected layers the model runs before its first block (a vision model's patch
   embedding) are pruned first, from whole-model passes that stop at block 0; layers after the stack (a pooler,
   a classifier, the head when asked for) last, from whole-model passes through the pruned blocks.

A criterion that needs no calibration (magnitude), or masks already chosen from whole-model scores (Taylor,
whose scores need the full model's loss gradient; or a ``"global"`` budget), is committed layer by layer with no
pass at all.

Devices: by default each block computes where its weights are. ``device=`` moves one block at a time there (and
back), so a model held on the CPU is pruned with one block on the GPU; ``offload=True`` keeps the captured
activations on the CPU between passes. A model dispatched by Accelerate (``device_map``, CPU or disk offload) is
run through its own hooks, which onload each layer's weights for its forward; weights are read and written where
they are (:mod:`pruning.offload`).

All or nothing: every layer is committed in place as soon as it is pruned (later blocks must see it pruned), and
its previous weight is first saved to an :class:`pruning.offload.UndoLog`, on disk by default (``undo="disk"``:
the memory held stays flat whatever the depth, for the price of writing the pruned layers' weights once and, on
failure, reading them back) or in memory (``undo="memory"``). On any error or Ctrl-C the saved weights are written
back and every module's attributes (masks, hooks, modes) restored.
"""
from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from .batches import StopForward, eval_mode, progress_bar
from .blocks import BlockStack, block_output, call_block, capture_block_inputs, execution_device, move_tensors
from .calibration import InputRecorder, collect_input_statistics
from .importance import ImportanceCriterion, check_finite_scores, prune_layer_in_order
from .masks import attach_mask
from .offload import UndoLog, check_writable, read_weight, write_weight
from .patterns import Pattern, is_conv1d, matrix_to_weight, weight_matrix
from .transaction import ModelSnapshot

__all__ = ["SequentialConfig", "SequentialResult", "prune_sequentially"]


@dataclass(frozen=True)
class SequentialConfig:
    """How the block-sequential pipeline places its work.

    Attributes:
        device: where each block computes (it is moved there for its passes and back); ``None``: where its weights
            are (an Accelerate-dispatched model: its hooks' execution devices; ``device`` must then be ``None``).
        offload: keep the captured activations on the CPU between passes (else on the compute device).
        undo: where the weights to put back on failure are kept: ``"disk"`` (a temporary folder), ``"memory"``, or
            a folder to make the temporary folder in.
    """

    device: torch.device | None = None
    offload: bool = False
    undo: str | os.PathLike = "disk"


@dataclass
class SequentialResult:
    """What :func:`prune_sequentially` committed.

    Attributes:
        pruned: layer name -> ``(numel, pruned)`` of its mask, in the order committed.
        unscored: selected layers never called during calibration (left dense).
        description: the route taken, for the report.
        undo_bytes: the most bytes the undo log held in memory.
    """

    pruned: dict[str, tuple[int, int]] = field(default_factory=dict)
    unscored: list[str] = field(default_factory=list)
    description: str = ""
    undo_bytes: int = 0


class _Pipeline:
    def __init__(self, model, layers, crit, pat, budgets, calib, stack, masks, config, undo, progress):
        self.model, self.layers, self.crit, self.pat = model, dict(layers), crit, pat
        self.budgets, self.calib, self.stack, self.masks = budgets, calib, stack, masks
        self.config, self.undo, self.progress = config, undo, progress
        self.result = SequentialResult()
        self.hessian = crit.layer_inputs == "hessian"
        self.dtype = getattr(crit, "dtype", torch.float64)
        self.store = torch.device("cpu") if config.offload else config.device

    # -- committing one layer -------------------------------------------------------------------------

    def commit(self, name: str, stats) -> None:
        module = self.layers[name]
        weight = read_weight(module)
        label = f"importance {self.crit.name!r}: layer {name!r}"
        if self.masks is not None:
            keep, new = self.masks[name].to(weight.device), None
        else:
            where = stats.sq_norms.device if stats is not None else weight.device
            matrix = weight_matrix(weight.to(where), transposed=is_conv1d(module))
            new_m, keep_m = prune_layer_in_order(self.crit, module, matrix, stats, self.pat, self.budgets.get(name))
            if not isinstance(keep_m, torch.Tensor) or keep_m.dtype != torch.bool or keep_m.shape != matrix.shape:
                got = f"{keep_m.dtype} {tuple(keep_m.shape)}" if isinstance(keep_m, torch.Tensor) else type(keep_m)
                raise TypeError(f"{label}: expected prune_layer() to return a torch.bool mask shaped "
                                f"{tuple(matrix.shape)}, got {got}")
            if new_m is not None and (not isinstance(new_m, torch.Tensor) or new_m.shape != matrix.shape):
                raise ValueError(f"{label}: expected prune_layer() to return a weight shaped {tuple(matrix.shape)}, got "
                                 f"{getattr(new_m, 'shape', type(new_m).__name__)}")
            keep = matrix_to_weight(keep_m, module).to(weight.device)
            new = None if new_m is None else matrix_to_weight(new_m, module).to(weight.device, weight.dtype)
            if new is not None:
                check_finite_scores(self.crit.name, f"layer {name!r} (its reconstructed weight)", new)
        value = (weight if new is None else new) * keep
        self.undo.save(name, module)
        self.result.undo_bytes = max(self.result.undo_bytes, self.undo.held_bytes)
        write_weight(module, value)
        attach_mask(module, keep, pattern=str(self.pat), importance=self.crit.name)
        self.result.pruned[name] = (keep.numel(), int((~keep).sum()))

    def commit_group(self, group: list[str], stats: Mapping) -> None:
        found = stats.get(group[0])
        for name in group:
            if found is None:
                self.result.unscored.append(name)
            else:
                self.commit(name, found)

    # -- one block ------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def placed(self, index: int, block: nn.Module):
        """``block`` on ``config.device`` for the duration (and back where it was)."""
        if self.config.device is None:
            yield execution_device(block)
            return
        homes = {t.device for t in itertools.chain(block.parameters(), block.buffers())}
        if len(homes) > 1:
            raise ValueError(f"prune_weights(): device= moves one block at a time; expected every tensor of block "
                             f"{self.stack.names[index]!r} on one device, got {sorted(map(str, homes))}")
        block.to(self.config.device)
        try:
            yield self.config.device
        finally:
            if homes:
                block.to(homes.pop())

    def run_block(self, index: int, block: nn.Module, device, recorder: InputRecorder | None = None) -> None:
        """One pass of ``block`` over every captured batch (``recorder``: the hooks of a calibrating pass, whose
        ``StopForward`` ends a batch; none: the propagating pass, whose outputs become the next block's inputs)."""
        for number, batch in enumerate(self.inputs.batches, 1):
            call = batch.calls[index]
            if recorder is None:
                out = block_output(call_block(block, self.inputs.key, batch.hidden, call, device))
                batch.hidden = move_tensors(out, self.store, {})
                continue
            recorder.batch, recorder.tokens = number, batch.tokens
            try:
                call_block(block, self.inputs.key, batch.hidden, call, device)
            except StopForward:
                pass

    def groups(self, index: int, block: nn.Module, names: list[str], device) -> list[list[str]]:
        """The block's layers grouped by the input tensor they receive on the first batch, in call order."""
        by_input: dict[int, list[str]] = {}
        inputs: list[torch.Tensor] = []  # alive until grouped, so that no id is reused

        def hook_for(name: str):
            def hook(mod, args, kwargs):
                x = args[0] if args else next(iter(kwargs.values()))
                inputs.append(x)
                if not any(name in group for group in by_input.values()):
                    by_input.setdefault(id(x), []).append(name)

            return hook

        handles = [self.layers[n].register_forward_pre_hook(hook_for(n), with_kwargs=True) for n in names]
        try:
            first = self.inputs.batches[0]
            call_block(block, self.inputs.key, first.hidden, first.calls[index], device)
        finally:
            for h in handles:
                h.remove()
        groups = list(by_input.values())
        seen = {n for group in groups for n in group}
        return groups + [[n] for n in names if n not in seen]

    def prune_block(self, index: int, names: list[str]) -> None:
        block = self.stack.modules[index]
        with self.placed(index, block) as device:
            if names:
                groups = self.groups(index, block, names, device)
                passes = [[g] for g in groups] if self.crit.true_sequential else [groups]
                for hooked in passes:
                    layers = {g[0]: self.layers[g[0]] for g in hooked}
                    with InputRecorder(layers, hessian=self.hessian, dtype=self.dtype, stop_after=hooked[-1][0],
                                       fn="calibration") as recorder:
                        self.run_block(index, block, device, recorder)
                    for group in hooked:
                        self.commit_group(group, recorder.stats)
            if index + 1 < len(self.stack.modules):
                self.run_block(index, block, device)

    # -- outside the stack ----------------------------------------------------------------------------

    def prune_outside(self, names: list[str], before_stack: bool) -> None:
        """Layers outside the stack, from whole-model passes (stopped at block 0 for the ones before it)."""
        groups = [[n] for n in names] if self.crit.true_sequential else [names]
        for group in groups:
            stop = None
            if before_stack:
                def stop_at_block(mod, args):
                    raise StopForward

                stop = self.stack.modules[0].register_forward_pre_hook(stop_at_block)
            try:
                stats = collect_input_statistics(self.model, {n: self.layers[n] for n in group}, self.calib,
                                                 hessian=self.hessian, dtype=self.dtype, progress=False,
                                                 stop_after=None if before_stack or len(group) > 1 else group[0])
            finally:
                if stop is not None:
                    stop.remove()
            for name in group:
                self.commit_group([name], stats)

    # -- the whole ------------------------------------------------------------------------------------

    def run(self) -> SequentialResult:
        for module in self.layers.values():
            check_writable(module)
        if self.masks is not None or self.crit.layer_inputs == "none":
            self.result.description = "layer by layer (no calibration pass)"
            for name in progress_bar(list(self.layers), desc="layers", enabled=self.progress):
                self.commit(name, None)
            return self.result
        stack = self.stack
        inside = {i: [] for i in range(len(stack.modules))}
        outside = []
        for name in self.layers:
            index = stack.index_of(name)
            (outside if index is None else inside[index]).append(name)
        self.inputs, before = capture_block_inputs(self.model, stack, self.calib, store=self.store,
                                                   watch={n: self.layers[n] for n in outside}, progress=False)
        after = [n for n in outside if n not in before]
        if before:
            self.prune_outside(before, before_stack=True)
            self.inputs, _ = capture_block_inputs(self.model, stack, self.calib, store=self.store, progress=False)
        for index in progress_bar(range(len(stack.modules)), desc="blocks", enabled=self.progress):
            self.prune_block(index, inside[index])
        self.inputs = None
        if after:
            self.prune_outside(after, before_stack=False)
        order = "true-sequential groups" if self.crit.true_sequential else "one calibrating pass per block"
        self.result.description = f"block-sequential over {stack.label!r} ({len(stack.modules)} blocks, {order})"
        return self.result


def prune_sequentially(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    crit: ImportanceCriterion,
    pattern: Pattern,
    budgets: Mapping[str, float | None],
    calib: Iterable | None,
    stack: BlockStack,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    config: SequentialConfig = SequentialConfig(),
    progress: bool = True,
) -> SequentialResult:
    """Prune ``layers`` of ``model`` block by block and commit them, all or nothing (see the module docstring).

    Args:
        model: the model (plain, or dispatched by Accelerate).
        layers: name -> selected Linear / Conv2d / ``Conv1D``, in module order.
        crit: a criterion with ``layer_inputs`` (unless ``masks`` is given).
        pattern: the pattern; budgets: layer name -> its unstructured budget (``None`` for N:M).
        calib: the calibration batches (re-iterable when layers outside the stack need whole-model passes).
        stack: the model's blocks.
        masks: keep masks (weight-shaped) already chosen for every layer: committed as they are, no pass.
        config: devices, activation offload, where the undo log lives.
        progress: show a progress bar.

    Returns:
        A :class:`SequentialResult`.

    Raises:
        pruning.blocks.NotAChain: the model does not run its stack as a chain (raised before anything changed).
        ValueError / TypeError: bad data or a criterion's bad output (naming the layer); any error of the model's
            forward propagates. In every error case the model is left as it was.
    """
    if config.device is not None and any(getattr(m, "_hf_hook", None) is not None for m in model.modules()):
        raise ValueError("prune_weights(): a model dispatched by Accelerate computes where its device_map says; "
                         f"expected device=None, got device={config.device}")
    snapshot = ModelSnapshot(model, tensors=())
    undo = UndoLog(config.undo)
    try:
        with eval_mode(model), torch.no_grad():
            return _Pipeline(model, layers, crit, pattern, budgets, calib, stack, masks, config, undo, progress).run()
    except BaseException as e:
        restored, failed = undo.restore()
        restored = {f"{n}.weight" if n else "weight" for n in restored}
        lost = [n for n in snapshot.restore() if n not in restored]
        if (lost or failed) and hasattr(e, "add_note"):
            e.add_note("changed in place while pruning ran, not restored: " + ", ".join((failed + lost)[:10])
                       + (" ..." if len(failed + lost) > 10 else ""))
        raise
    finally:
        undo.close()
