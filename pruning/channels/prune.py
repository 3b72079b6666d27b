"""Channel selection and model surgery: :func:`prune_channels` returns a new, physically smaller model."""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from ..batches import call_model, check_batches, eval_mode, input_args, iter_tensors
from ..importance import resolve_importance
from ..training import finetune
from ..transaction import read_only
from .attention import PrunedMultiheadAttention
from .graph import DependencyGraph, module_names
from .hf_config import HF_CONFIG_MODES, config_rule, limit_to_config, update_config
from .hf_modules import is_hf_conv1d, set_head_counts
from .importance import group_importance
from .report import ChannelPruningReport, GroupReport, count_macs, count_params, layer_stats
from .tracer import TraceError

__all__ = ["prune_channels", "mask_channels", "select_units", "apply_channel_pruning"]

_FN = "prune_channels()"


def _check_ratio(label: str, r) -> float:
    if isinstance(r, bool) or not isinstance(r, (int, float)):
        raise TypeError(f"{_FN}: expected {label} as a number, got {type(r).__name__}")
    if not 0.0 <= r < 1.0:  # also rejects NaN
        raise ValueError(f"{_FN}: expected 0 <= {label} < 1, got {r}")
    return float(r)


def _group_ratio(graph: DependencyGraph, group, ratio: float, per_layer: Mapping | None) -> float:
    if per_layer:
        for space in group.spaces:
            mod = space.rsplit(":", 1)[0]
            if mod in per_layer:
                return float(per_layer[mod])
    return ratio


def _n_keep(n_units: int, unit_channels: int, target_keep: float, round_to: int | None, n_frozen: int) -> int:
    keep = max(1, int(math.ceil(target_keep - 1e-9)))
    if round_to:
        m = round_to // math.gcd(round_to, unit_channels)
        if n_units <= m:
            return n_units
        keep = max(m, int(round(keep / m)) * m)
    return min(n_units, max(keep, n_frozen, 1))


def _allowed_keep(group, keep: int) -> int:
    """``keep`` rounded up to a unit count the group may keep (:attr:`ChannelGroup.keep_counts`)."""
    if not group.keep_counts:
        return keep
    return min((c for c in group.keep_counts if c >= keep), default=len(group.units))


def _keep_one_per_space(group, removed: set, scores: Mapping[int, float]) -> None:
    """Put back the best unit of every space of ``group`` that would lose all its units (possible only in a
    group joined by a concatenation, where a space holds some of the group's units)."""
    for units in group.partial_spaces:
        if units and units <= removed:
            removed.discard(max(units, key=lambda u: (scores.get(u, 0.0), u)))


def select_units(
    graph: DependencyGraph,
    scores: Mapping[int, float],
    ratio: float,
    *,
    per_layer: Mapping | None = None,
    global_pruning: bool = False,
    round_to: int | None = None,
    max_group_ratio: float = 0.9,
) -> set:
    """Choose the units to remove.

    Local (default): every prunable group loses ``ratio`` of its units (or its ``per_layer`` ratio), the
    least important first. Global: units of all groups are ranked together by importance normalised by
    their group's mean, and the lowest ``ratio`` of all prunable units go, no group losing more than
    ``max_group_ratio``. ``round_to`` rounds every group's kept channel count to a multiple; a group with
    ``keep_counts`` keeps the nearest allowed count at or above that.

    Returns:
        the set of removed unit roots.
    """
    removed: set = set()
    cand = []
    for g in graph.groups:
        if not g.prunable:
            continue
        free = [u for u in g.units if u not in g.frozen_units]
        n = len(g.units)
        if global_pruning:
            vals = np.array([scores.get(u, 0.0) for u in g.units], dtype=np.float64)
            mean = vals.mean() if vals.mean() > 0 else 1.0
            cap = _n_keep(n, g.unit_channels, n * (1 - max_group_ratio), round_to, len(g.frozen_units))
            cand.append((g, free, mean, cap))
            continue
        r = _group_ratio(graph, g, ratio, per_layer)
        keep = _allowed_keep(g, _n_keep(n, g.unit_channels, n * (1.0 - r), round_to, len(g.frozen_units)))
        order = sorted(free, key=lambda u: (scores.get(u, 0.0), u))
        removed.update(order[: n - keep])
        _keep_one_per_space(g, removed, scores)
    if global_pruning and cand:
        pool = [(scores.get(u, 0.0) / mean, u, gi) for gi, (g, free, mean, cap) in enumerate(cand) for u in free]
        pool.sort()
        total = sum(len(g.units) for g, _, _, _ in cand)
        target = int(round(ratio * total))
        left = {gi: len(g.units) for gi, (g, _, _, _) in enumerate(cand)}
        chosen: dict[int, list] = {gi: [] for gi in left}
        count = 0
        for _, u, gi in pool:
            if count >= target:
                break
            if left[gi] - 1 < cand[gi][3]:
                continue
            left[gi] -= 1
            chosen[gi].append(u)
            count += 1
        for gi, us in chosen.items():
            g = cand[gi][0]
            n = len(g.units)
            keep = _allowed_keep(g, _n_keep(n, g.unit_channels, n - len(us), round_to, len(g.frozen_units)))
            order = sorted((u for u in g.units if u not in g.frozen_units), key=lambda u: (scores.get(u, 0.0), u))
            removed.update(order[: n - keep])
            _keep_one_per_space(g, removed, scores)
    return removed


def _removed_mask(graph: DependencyGraph, removed: set) -> np.ndarray:
    """``mask[s]``: slot ``s`` is a removed unit's root."""
    rem = np.zeros(graph.num_slots, dtype=bool)
    rem[list(removed)] = True
    return rem


def _keep_indices(graph: DependencyGraph, removed: set) -> dict:
    """``{param name: {dim: kept index array}}`` for every attached parameter that loses indices."""
    rem = _removed_mask(graph, removed)
    out = {}
    for pname, lst in graph.attachments.items():
        for a in lst:
            keep = ~rem[graph.root_of(a.labels)]
            if not keep.all():
                out.setdefault(pname, {})[a.dim] = np.nonzero(keep)[0]
    return out


def _get_owner(model: nn.Module, name: str):
    mod_name, _, attr = name.rpartition(".")
    return model.get_submodule(mod_name) if mod_name else model, attr


def apply_channel_pruning(model: nn.Module, graph: DependencyGraph, removed: set) -> dict:
    """Physically remove the units ``removed`` from ``model`` (in place; ``graph`` must be built on it) and update the
    module attributes (``out_channels``, ``groups``, ``num_features``, ``normalized_shape``,
    ``num_attention_heads``, a Conv1D's ``nx`` / ``nf``, a decoder attention's head counts, ...). Returns
    ``{param name: {dim: kept index array}}`` for every parameter that lost indices."""
    keep = _keep_indices(graph, removed)
    # every (module, attribute) holding each tensor, so tied parameters stay tied (and all get pruned)
    holders: dict[int, list] = {}
    for m in model.modules():
        for store in (m._parameters, m._buffers):
            for attr, t in store.items():
                if t is not None:
                    holders.setdefault(id(t), []).append((m, attr))
    for pname, dims in keep.items():
        owner, attr = _get_owner(model, pname)
        t = getattr(owner, attr)
        new = t.detach()
        for dim, idx in dims.items():
            new = new.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=new.device))
        new = new.clone()
        if isinstance(t, nn.Parameter):
            new = nn.Parameter(new, requires_grad=t.requires_grad)
        for m, a in holders.get(id(t), [(owner, attr)]):
            if isinstance(new, nn.Parameter):
                m._parameters[a] = new
            else:
                m._buffers[a] = new
    rem = _removed_mask(graph, removed)
    for name, m in model.named_modules():
        if isinstance(m, nn.modules.conv._ConvNd) and not m.transposed:
            # a grouped conv loses whole groups, so the outputs per group stay as they were
            if m.groups > 1:
                m.groups = m.weight.shape[0] // (m.out_channels // m.groups)
            m.out_channels = m.weight.shape[0]
            m.in_channels = m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif is_hf_conv1d(m):
            m.nx, m.nf = m.weight.shape
        elif isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
            ref = m.weight if m.weight is not None else m.running_mean
            if ref is not None:
                m.num_features = ref.shape[0]
        elif isinstance(m, nn.GroupNorm):
            if m.weight is not None:
                # whole norm groups are removed, so the channels per group stay as they were
                m.num_groups = m.weight.shape[0] // (m.num_channels // m.num_groups)
                m.num_channels = m.weight.shape[0]
        elif isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1:
            if m.weight is not None:
                m.normalized_shape = (m.weight.shape[0],)
            elif name in graph.layer_norms:
                m.normalized_shape = (int((~rem[graph.root_of(graph.layer_norms[name])]).sum()),)
        elif isinstance(m, nn.Embedding):
            m.embedding_dim = m.weight.shape[1]
        if name in graph.attention:
            info = graph.attention[name]
            kept = int((~rem[graph.root_of(info["labels"])]).sum()) // info["head_size"]
            if "layout" in info:  # Hugging Face decoder attention: whole KV groups (heads)
                set_head_counts(m, info["layout"], kept)
            elif info["kind"] == "mha":
                if kept != m.num_heads:
                    m.__class__ = PrunedMultiheadAttention  # this instance only
                    m.num_heads = kept
            else:
                m.num_attention_heads = kept
                if hasattr(m, "all_head_size"):
                    m.all_head_size = kept * info["head_size"]
    return keep


def mask_channels(model: nn.Module, report: ChannelPruningReport) -> nn.Module:
    """The masked dense twin of a pruned model: a deep copy of the ORIGINAL ``model`` with every parameter
    slice that :func:`prune_channels` removed set to zero (shapes unchanged; buffers untouched). In eval
    mode it computes the same function as the pruned model, except where LayerNorm statistics span pruned
    channels.

    Args:
        model: the model that was passed to :func:`prune_channels`.
        report: the :class:`ChannelPruningReport` it returned.

    Raises:
        TypeError: wrong argument types.
        ValueError: ``report`` names a parameter that ``model`` does not have, or an index out of range.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"mask_channels(): expected an nn.Module, got {type(model).__name__}")
    if not isinstance(report, ChannelPruningReport):
        raise TypeError(f"mask_channels(): expected a ChannelPruningReport, got {type(report).__name__}")
    masked = copy.deepcopy(model)
    state = dict(masked.named_parameters())
    for pname, dims in report.param_keep.items():
        if pname in dict(masked.named_buffers()):
            continue
        if pname not in state:
            raise ValueError(f"mask_channels(): the report names parameter {pname!r}, which the model lacks")
        p = state[pname]
        with torch.no_grad():
            for dim, idx in dims.items():
                if len(idx) and int(max(idx)) >= p.shape[dim]:
                    raise ValueError(f"mask_channels(): index {int(max(idx))} out of range for {pname} dim {dim} "
                                     f"of size {p.shape[dim]}")
                drop = torch.ones(p.shape[dim], dtype=torch.bool)
                drop[torch.as_tensor(np.asarray(idx), dtype=torch.long)] = False
                sl = [slice(None)] * p.dim()
                sl[dim] = drop
                p[tuple(sl)] = 0
    return masked


def _compose(prev: dict, step: dict) -> dict:
    out = {k: dict(v) for k, v in prev.items()}
    for pname, dims in step.items():
        for dim, idx in dims.items():
            base = out.get(pname, {}).get(dim)
            out.setdefault(pname, {})[dim] = np.asarray(base)[idx] if base is not None else idx
    return out


def _check_forward(model: nn.Module, example_inputs):
    """Run ``model`` once (eval, no grad); return ``(exception or None, innermost module name at the failure,
    output shapes)``."""
    stack: list[str] = []
    handles = []

    def push(name):
        def hook(mod, args):
            stack.append(name)
        return hook

    def pop(mod, args, output):
        stack.pop()

    for name, m in model.named_modules():
        handles.append(m.register_forward_pre_hook(push(name)))
        handles.append(m.register_forward_hook(pop))
    try:
        with eval_mode(model), torch.no_grad():
            out = call_model(model, example_inputs)
        return None, None, _shapes(out)
    except Exception as e:  # any failure is reported with the module it happened in
        return e, (stack[-1] if stack else None), None
    finally:
        for h in handles:
            h.remove()


def _shapes(outputs) -> list:
    return [tuple(t.shape) for t in iter_tensors(outputs)]


def prune_channels(
    model: nn.Module,
    example_inputs,
    ratio: float = 0.5,
    importance="l1",
    round_to: int | None = None,
    ignore: Iterable = (),
    per_layer: Mapping[str, float] | None = None,
    global_pruning: bool = False,
    *,
    calib: Iterable | None = None,
    loss_fn: Callable | None = None,
    steps: int = 1,
    finetune_data: Iterable | None = None,
    finetune_kwargs: Mapping | None = None,
    max_group_ratio: float = 0.9,
    strict: bool = False,
    max_retries: int = 8,
    hf_config: str = "update",
    progress: bool = True,
    return_report: bool = False,
):
    """Remove whole channels (filters, features, attention heads) and return a new, physically smaller model.

    Coupled layers are found by tracing (:class:`DependencyGraph`), so residual adds, concatenations,
    depthwise / grouped convs, channel shuffles, squeeze-and-excitation, flatten -> Linear, normalisation
    layers and attention heads stay consistent. The input model is never modified, even when an error is
    raised (:func:`pruning.transaction.read_only`).

    Args:
        model: the model (any ``nn.Module``; parameters float32/float64/half on any device).
        example_inputs: what ``model`` is called with: a tensor, a tuple of positional inputs, or a dict of
            keyword inputs. It decides the traced path and the MAC counts.
        ratio: fraction of each group's units (channels, heads, conv groups) to remove, in [0, 1).
            With ``steps > 1``, the total fraction after all steps.
        importance: ``"l1"`` | ``"l2"`` | ``"taylor"`` | ``"bn_scale"`` | ``"wanda"``, any name registered with
            :func:`pruning.importance.register_criterion`, or a :class:`pruning.importance.ScoreCriterion`
            (see :func:`pruning.channels.importance.group_importance`).
        round_to: keep every group's channel count a multiple of this (e.g. 8, 16, 64); ``None``: no rounding.
        ignore: modules or module names whose output channels must be kept. The model's outputs are always
            kept (so the classifier keeps its classes).
        per_layer: ``{module name: ratio}`` overriding ``ratio`` for the group containing that module's outputs.
        global_pruning: rank units across all groups instead of pruning each group by ``ratio``.
        calib: batches (:mod:`pruning.batches`) for criteria that need them (``"taylor"``, ``"wanda"``).
        loss_fn: ``loss_fn(model, batch) -> scalar`` for Taylor importance and fine-tuning; default
            :func:`pruning.batches.default_loss` (cross-entropy against the batch's targets, or the model's
            own loss).
        steps: prune in this many steps, each removing the same fraction of what is left
            (``1 - (1 - ratio) ** (1 / steps)``), fine-tuning in between when ``finetune_data`` is given.
        finetune_data: batches for :func:`pruning.training.finetune` after every step.
        finetune_kwargs: keyword arguments for ``finetune`` (e.g. ``{"epochs": 2, "lr": 1e-3}``).
        max_group_ratio: with ``global_pruning``, the most any one group may lose.
        strict: raise on ops the tracer does not understand instead of keeping their channels, and on a
            failed check forward pass instead of retrying.
        max_retries: when the pruned model fails its check forward pass inside some module (its code
            computes a shape from a size the trace could not relate to the channels, e.g. Swin's
            ``C // num_heads``), that module's channels are kept and pruning is redone, at most this many times.
        hf_config: for a model whose ``config`` is a Hugging Face config: ``"update"`` prunes only what the config
            can state (one width per field for all layers; heads only where the config has a head size of its own)
            and writes the pruned widths into the returned model's ``config``, so ``save_pretrained`` /
            ``from_pretrained`` round-trip it (:mod:`pruning.channels.hf_config`); ``"ignore"`` prunes without
            regard to the config and leaves it as it was. Other models ignore it.
        progress: progress bars for Taylor calibration and fine-tuning.
        return_report: also return the :class:`ChannelPruningReport`.

    Returns:
        The pruned model (a new object, each module in its original's train / eval mode), or
        ``(model, report)``.

    Raises:
        TypeError: ``model`` is not an ``nn.Module``; wrong argument types.
        ValueError: bad ``ratio`` / ``importance`` / ``round_to`` / ``steps`` / ``per_layer`` / ``ignore`` /
            ``hf_config``; a criterion that needs ``calib`` without it; channel scores holding NaN or inf; with
            ``hf_config="update"``, a Hugging Face config whose width fields are not known, or pruned widths that
            differ across layers (the config states one value).
        TraceError (a ValueError): the forward pass failed while tracing (the message names the module), an
            unsupported op with ``strict=True``, or the pruned model failed its check forward pass.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"{_FN}: expected model as an nn.Module, got {type(model).__name__}")
    input_args(example_inputs, f"{_FN}: example_inputs")
    ratio = _check_ratio("ratio", ratio)
    _check_ratio("max_group_ratio", max_group_ratio)
    criterion = resolve_importance(importance, use="channels")
    if round_to is not None and (isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1):
        raise ValueError(f"{_FN}: expected round_to as a positive int or None, got {round_to!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"{_FN}: expected steps as an int >= 1, got {steps!r}")
    if hf_config not in HF_CONFIG_MODES:
        raise ValueError(f"{_FN}: expected hf_config to be one of {', '.join(HF_CONFIG_MODES)}, got {hf_config!r}")
    rule = config_rule(model, _FN) if hf_config == "update" else None
    if isinstance(ignore, (str, nn.Module)):
        ignore = (ignore,)
    ignore = tuple(ignore)
    modules = dict(model.named_modules())
    if per_layer is not None:
        if not isinstance(per_layer, Mapping):
            raise TypeError(f"{_FN}: expected per_layer as a dict {{module name: ratio}}, got "
                            f"{type(per_layer).__name__}")
        for k, v in per_layer.items():
            if k not in modules:
                raise ValueError(f"{_FN}: per_layer names {k!r}, which is not a submodule of the model")
            _check_ratio(f"per_layer[{k!r}]", v)
    if criterion.needs_calibration:
        if calib is None:
            raise ValueError(f"{_FN}: importance={criterion.name!r} needs calib batches (e.g. a DataLoader of "
                             "(inputs, targets))")
        check_batches(_FN, calib)
    if finetune_kwargs is not None and not isinstance(finetune_kwargs, Mapping):
        raise TypeError(f"{_FN}: expected finetune_kwargs as a dict, got {type(finetune_kwargs).__name__}")
    # names of the ignored modules survive the deep copy
    ignore_names = module_names(model, ignore, _FN)
    # The input model is only read (counted, traced, copied): it leaves this call exactly as it came in,
    # values, modes and hooks, whatever happens (pruning.transaction).
    with read_only(model):
        try:
            macs_before, macs_b, ref_out = count_macs(model, example_inputs, return_output=True)
        except Exception as e:  # name the module where the user's model fails on these inputs
            err, where, _ = _check_forward(model, example_inputs)
            raise TraceError(f"{_FN}: the model's forward pass failed on example_inputs in {where or '<model>'!r} "
                             f"({type(err or e).__name__}: {err or e})") from e
        params_before = count_params(model)
        ref_shapes = _shapes(ref_out)
        del ref_out

        work = model  # never modified: every step prunes a fresh copy
        step_keep = 1.0 - (1.0 - ratio) ** (1.0 / steps)
        total_keep: dict = {}
        first_graph = None
        first_groups = None
        for step in range(steps):
            opaque: dict = {}
            for attempt in range(max_retries + 1):
                trial = copy.deepcopy(work)
                graph = DependencyGraph(trial, example_inputs, ignore=ignore_names, strict=strict, opaque=opaque)
                if rule is not None:
                    limit_to_config(graph, trial, rule)
                scores = group_importance(trial, graph, criterion, calib=calib, loss_fn=loss_fn, progress=progress)
                removed = select_units(graph, scores, step_keep, per_layer=per_layer, global_pruning=global_pruning,
                                       round_to=round_to, max_group_ratio=max_group_ratio)
                keep = apply_channel_pruning(trial, graph, removed)
                err, where, out_shapes = _check_forward(trial, example_inputs)
                if err is None and out_shapes == ref_shapes:
                    break
                if err is None:
                    raise TraceError(f"{_FN}: the pruned model's output shapes {out_shapes} differ from the original "
                                     f"{ref_shapes}")
                if strict or not where or where in opaque or attempt == max_retries:
                    raise TraceError(
                        f"{_FN}: the pruned model failed its check forward pass in {where or '<model>'!r} "
                        f"({type(err).__name__}: {err}); the tracer missed a channel coupling there; pass "
                        "ignore=[...] with the modules around it"
                    ) from err
                # the module's code computes shapes the trace could not see: keep its channels and try again
                opaque[where] = f"its code failed on pruned shapes ({type(err).__name__}), so its channels are kept"
            work = trial
            if first_graph is None:
                first_graph = graph
                first_groups = [(g.index, tuple(g.spaces), g.channels, len(g.units), g.unit_channels, g.frozen_reason,
                                 list(g.units)) for g in graph.groups]
            total_keep = _compose(total_keep, keep)
            if finetune_data is not None:
                finetune(work, finetune_data, loss_fn, progress=progress, **dict(finetune_kwargs or {}))

        config_updates = update_config(work, model, rule, _FN) if rule is not None and work is not model else {}
        macs_after, macs_a = count_macs(work, example_inputs)
        # group report from the first step's graph, counted against the final model's parameters
        groups = []
        final_shapes = {n: tuple(t.shape)
                        for n, t in {**dict(work.named_parameters()), **dict(work.named_buffers())}.items()}
        for (idx, spaces, channels, n_units, uc, reason, units) in first_groups:
            g = first_graph.groups[idx]
            after_units = n_units
            after_ch = channels
            # measure on the first attached parameter of the group
            for pname in g.params:
                for a in first_graph.attachments[pname]:
                    roots = first_graph.root_of(a.labels)
                    if not set(roots.tolist()) & set(units):
                        continue
                    if len(set(roots.tolist())) != n_units or len(roots) != a.labels.size:
                        continue
                    size_after = final_shapes.get(pname, (0,) * (a.dim + 1))[a.dim]
                    after_ch = size_after * channels // max(len(roots), 1)
                    after_units = after_ch // max(uc, 1)
                    break
                else:
                    continue
                break
            kept_reason = None if after_ch < channels else (reason or ("a single unit" if n_units <= 1 else
                                                                          "ratio or rounding left it whole"))
            groups.append(GroupReport(idx, spaces, channels, after_ch, n_units, after_units, kept_reason))
        report = ChannelPruningReport(
            params_before=params_before,
            params_after=count_params(work),
            macs_before=macs_before,
            macs_after=macs_after,
            layers=layer_stats(model, work, macs_b, macs_a),
            groups=tuple(groups),
            kept=tuple(first_graph.frozen),
            param_keep={k: {d: tuple(int(i) for i in v) for d, v in dims.items()} for k, dims in total_keep.items()},
            importance=criterion.name,
            ratio=ratio,
            steps=steps,
            config_updates=config_updates,
        )
        # every module of the result in its original's mode (a frozen BatchNorm in a training model stays frozen)
        modes = {name: m.training for name, m in model.named_modules()}
        for name, m in work.named_modules():
            m.training = modes.get(name, model.training)
        return (work, report) if return_report else work
