"""Channel permutation for N:M sparsity at zero inference cost, applied through the dependency graph.

Reordering a layer's input channels before its N:M mask is chosen (:mod:`pruning.permutation`) only helps if
the reordering is free at inference. It is when the channels are reordered where they are *made*: the rows of
every producing layer, with every norm, bias, residual add and concatenation member coupled to them, and the
input columns of every consumer. :class:`pruning.channels.DependencyGraph` knows exactly those couplings (a
*unit* is a set of channels that must move together, a *group* the units of one channel space), so
:func:`permute_for_nm` can:

* **plain groups** (an MLP's hidden width, a CNN's channels, a residual stream whose norms are understood):
  one permutation of the group's units serves every consumer; it is searched on the sum of the consumers'
  objectives (each normalised by its total importance, so every consumer counts equally) and applied to every
  attached parameter (producer rows, biases, norm scales and running statistics, consumer columns);
* **attention heads** (a unit of the graph is a whole head, or a key / value group of heads): the channels
  inside each head are reordered, identically in the q, k and v rows of that head (``q . k`` is unchanged,
  the value rows move with the output projection's columns), one search per head. Decoder attention applies
  rotary embeddings to q and k, so there only the v rows and the output projection's columns move, one
  permutation per key / value head shared by the query heads that read it.

Everything else (channels the graph freezes: the model's input or output, ops it does not understand) is
reported as **carried by the runtime**, with the reason, together with the permutation found for that layer
alone: the kernel must gather its input channels in that order. For the graph, reductions over channels
(RMSNorm's ``mean``, ``sum``, ...) are taken as what they are for a permutation: invariant. (For pruning
they freeze the channels, since removing one changes the statistic.)

The model is run on ``example_inputs`` before and after; unless its outputs agree to the dtype's tolerance
the model is restored and :class:`PermutationError` is raised. On success it stays permuted in place.
"""
from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ..batches import call_model, eval_mode, iter_tensors, progress_bar
from ..nm_criteria import layer_score_matrices
from ..patterns import INPUT_PERM
from ..permutation import PermutationResult, SearchConfig, channel_rows, nm_kept, search_permutation
from .graph import DependencyGraph
from .handlers import norm_dim, traced_input
from .tracer import Channels, OpCall, register_op_handler

__all__ = ["permute_for_nm", "PermutationReport", "LayerPermutation", "PermutationError", "nm_eligible_layers"]

# Relative output difference a permutation may cause (summation order only) before it is refused. A misread
# coupling changes outputs by O(1); float64 allows 1e-6 because some models compute parts in float32 whatever
# their dtype (Hugging Face's LlamaRMSNorm: 7e-8 measured).
_RTOL = {torch.float64: 1e-6, torch.float32: 1e-4, torch.float16: 5e-3, torch.bfloat16: 3e-2}
_REDUCTIONS = ("mean", "sum", "amax", "amin", "std", "var", "norm", "logsumexp", "prod")


class PermutationError(ValueError):
    """The permuted model did not compute the same function (the model has been restored)."""


@dataclass(frozen=True)
class LayerPermutation:
    """One N:M-eligible layer: how its input channels were reordered and what the mask keeps.

    Attributes:
        name: the Linear / Conv2d module.
        carried_by: ``"model"`` (its producers were permuted in place with it: zero inference cost),
            ``"runtime"`` (the kernel must gather its inputs by :attr:`PermutationReport.runtime_permutations`;
            the weights were left in their order), or ``"unchanged"``.
        how: ``"group"``, ``"heads"``, ``"layer"`` (its own search) or ``""``.
        reason: why the runtime must carry it, or why it was not optimised; ``""`` otherwise.
        group: the dependency-graph group of its input channels (``None`` when untraced).
        kept_identity, kept: kept share of the layer's total importance without / with the permutation.
        seconds: search time of the permutation it got (shared by every layer of a group).
    """

    name: str
    carried_by: str
    how: str
    reason: str
    group: int | None
    kept_identity: float
    kept: float
    seconds: float


@dataclass(frozen=True)
class PermutationReport:
    """What :func:`permute_for_nm` did.

    Attributes:
        n, m: the pattern.
        layers: one :class:`LayerPermutation` per eligible layer, in module order.
        skipped: ``(layer, reason)`` for Linear / Conv2d layers that are not N:M-eligible or were filtered out.
        runtime_permutations: layer name -> int64 permutation of its input features (Linear) or channels
            (Conv2d) that the runtime must apply (``x[..., perm]``); the weight was left in the original order.
        max_rel_error: largest relative output difference of the permuted model on ``example_inputs``.
        seconds: wall time of the whole call.
    """

    n: int
    m: int
    layers: tuple[LayerPermutation, ...]
    skipped: tuple[tuple[str, str], ...]
    runtime_permutations: Mapping[str, torch.Tensor]
    max_rel_error: float
    seconds: float

    def layer(self, name: str) -> LayerPermutation:
        """The record of layer ``name``.

        Raises:
            KeyError: no such eligible layer."""
        for rec in self.layers:
            if rec.name == name:
                return rec
        raise KeyError(f"PermutationReport: no eligible layer {name!r}; layers are {[r.name for r in self.layers]}")

    def to_dict(self) -> dict:
        """A JSON-serialisable view (without the runtime permutations' values)."""
        return {"n": self.n, "m": self.m, "max_rel_error": self.max_rel_error, "seconds": self.seconds,
                "layers": [r.__dict__.copy() for r in self.layers], "skipped": [list(s) for s in self.skipped],
                "runtime_layers": sorted(self.runtime_permutations)}

    def __str__(self) -> str:
        lines = [f"PermutationReport {self.n}:{self.m}: {len(self.layers)} layer(s), "
                 f"{sum(r.carried_by == 'model' for r in self.layers)} permuted in place, "
                 f"{len(self.runtime_permutations)} carried by the runtime; max output change "
                 f"{self.max_rel_error:.2e}; {self.seconds:.1f} s"]
        width = max([len(r.name) for r in self.layers] + [5])
        for r in self.layers:
            why = f"  ({r.reason})" if r.reason else ""
            lines.append(f"  {r.name:<{width}}  {r.carried_by:<9} {r.how:<17} kept {r.kept_identity:.4f} -> "
                         f"{r.kept:.4f}{why}")
        lines += [f"  {name:<{width}}  skipped: {why}" for name, why in self.skipped]
        return "\n".join(lines)


# ---------------------------------------------------------------------------------------------------
# Which layers, and their score matrices
# ---------------------------------------------------------------------------------------------------


def nm_eligible_layers(model: nn.Module, m: int, filter_fn: Callable | None = None):
    """``(eligible, skipped)``: name -> Linear / ungrouped Conv2d whose input features / channels are a
    multiple of ``m`` (and that ``filter_fn(name, module)`` accepts), and ``(name, reason)`` for the others."""
    eligible, skipped = {}, []
    for name, mod in model.named_modules():
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            continue
        if filter_fn is not None and not filter_fn(name, mod):
            skipped.append((name, "excluded by filter_fn"))
        elif isinstance(mod, nn.Conv2d) and mod.groups != 1:
            skipped.append((name, f"grouped convolution (groups={mod.groups}): its N:M groups lie within conv groups"))
        elif _in_channels(mod) % m:
            skipped.append((name, f"input channels ({_in_channels(mod)}) not a multiple of m={m}"))
        else:
            eligible[name] = mod
    return eligible, skipped


def _in_channels(mod: nn.Module) -> int:
    return mod.in_features if isinstance(mod, nn.Linear) else mod.in_channels


def _rows_of(matrix: torch.Tensor, mod: nn.Module) -> torch.Tensor:
    """The layer's score matrix as ``[rows, input channels]`` (conv: one row per output and kernel position)."""
    return channel_rows(matrix.detach().float(), _in_channels(mod))


# ---------------------------------------------------------------------------------------------------
# A graph whose reductions over channels do not freeze them (they are invariant to a permutation)
# ---------------------------------------------------------------------------------------------------


def _permutation_reduce(call: OpCall) -> None:
    st = traced_input(call)
    if st is None:
        return
    x, args, kwargs = call.args[0], call.args, call.kwargs
    dim = call.arg(1, "dim")
    if call.name == "norm":
        dim = kwargs.get("dim", args[2] if len(args) > 2 else None)
    if dim is None or (isinstance(dim, (list, tuple)) and len(dim) == 0):
        return  # a reduction over everything: the result carries no channels, and no order
    dims = {norm_dim(d, x.dim()) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    if dims & set(range(st.start, st.stop)):
        return  # over the channels: invariant to their order, carries none
    keep = bool(kwargs.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
    shift = 0 if keep else sum(1 for d in dims if d < st.start)
    out = call.out[0] if isinstance(call.out, tuple) else call.out
    call.trace.set_state(out, Channels(st.start - shift, st.labels))


def _permutation_graph(model: nn.Module, example_inputs, ignore) -> DependencyGraph:
    regs = [register_op_handler(name, _permutation_reduce) for name in _REDUCTIONS]
    try:
        return DependencyGraph(model, example_inputs, ignore=ignore)
    finally:
        for r in reversed(regs):
            r.remove()


# ---------------------------------------------------------------------------------------------------
# Planning: one permutation per group (or per head), one per runtime layer
# ---------------------------------------------------------------------------------------------------


@dataclass
class _Plan:
    occ: dict = field(default_factory=dict)  # unit -> the unit whose channels move into its place
    tau: dict = field(default_factory=dict)  # head unit -> permutation of the channels inside each of its heads
    fixed: set = field(default_factory=set)  # parameters whose rows stay in place inside a head (rotary q / k)
    records: dict = field(default_factory=dict)  # layer -> (carried_by, how, reason, group, seconds)
    runtime: dict = field(default_factory=dict)  # layer -> permutation


@dataclass(frozen=True)
class _Heads:
    """An attention unit of the graph: ``size`` channels (one head, or a key / value group of ``size // dim``
    query heads), heads of ``dim`` channels; ``fixed``: parameters whose channels must not move inside a head."""

    size: int
    dim: int
    fixed: frozenset


def _head_units(graph: DependencyGraph) -> dict:
    """Unit -> :class:`_Heads` for every attention unit of the graph. Decoder attention applies rotary embeddings
    to q and k, whose channels therefore stay in place: only v's rows and the output projection's columns move
    (one permutation per key / value head, shared by its query heads)."""
    out = {}
    for name, info in graph.attention.items():
        layout = info.get("layout")
        fixed: frozenset = frozenset()
        dim = int(info["head_size"])
        if layout is not None and getattr(layout, "kind", None) == "decoder":
            dim = int(layout.head_dim)
            prefix = f"{name}." if name else ""
            fixed = frozenset(f"{prefix}{child}.{p}" for child in layout.inputs[:2] for p in ("weight", "bias"))
        for u in set(graph.root_of(info["labels"]).tolist()):
            out[int(u)] = _Heads(int(info["head_size"]), dim, fixed)
    return out


def _consumer_roots(graph: DependencyGraph, name: str):
    pname = f"{name}.weight" if name else "weight"
    for a in graph.attachments.get(pname, []):
        if a.dim == 1 and a.kind == "in":
            return graph.root_of(a.labels)
    return None


def _classify(graph, name, mod, roots, heads, m):
    """``(kind, group, reason)``: kind ``"plain"``, ``"heads"`` or ``"runtime"``."""
    if roots is None:
        return "runtime", None, "its input channels come from the model input or an op the tracer does not follow"
    gids = {graph.root_group[int(r)] for r in set(roots.tolist())}
    if len(gids) > 1:
        return "runtime", None, f"its input concatenates {len(gids)} channel groups"
    gi = gids.pop()
    g = graph.groups[gi]
    if g.frozen_reason or g.frozen_units:
        why = g.frozen_reason or graph.frozen_roots.get(next(iter(g.frozen_units)), "frozen channels")
        return "runtime", gi, f"its channels cannot be reordered in the model: {why}"
    if g.partial_spaces:
        return "runtime", gi, "its channel group is joined by a concatenation of parts of different widths"
    _, counts = np.unique(roots, return_counts=True)
    if (counts == 1).all():
        return "plain", gi, ""
    head = heads.get(int(roots[0]))
    d = head.size if head else 0
    if head and all(int(u) in heads for u in g.units) and (counts == d).all() and head.dim % m == 0:
        starts = [int(np.nonzero(roots == u)[0][0]) for u in dict.fromkeys(roots.tolist())]
        if all(s % m == 0 and (roots[s:s + d] == roots[s]).all() for s in starts):
            return "heads", gi, ""
    return "runtime", gi, f"its channels are coupled in units of {int(counts.max())} (conv / norm groups, flatten)"


def _search(mats, n, m, cfg, weights=None) -> PermutationResult:
    return search_permutation(mats, n, m, weights=weights, config=cfg)


def _plan_group(gi, members, graph, scores, n, m, cfg, plan) -> None:
    """One shared permutation for a plain group, searched on its consumers in the first one's channel order."""
    ref = members[0][1]
    same = [(name, roots) for name, roots in members if np.array_equal(roots, ref)]
    mats = [scores[name] for name, _ in same]
    weights = [1.0 / max(float(s.double().sum()), 1e-30) for s in mats]
    res = _search(mats, n, m, cfg, weights)
    p = res.perm.cpu().numpy()
    for i, u in enumerate(ref.tolist()):
        if int(ref[p[i]]) != u:
            plan.occ[int(u)] = int(ref[p[i]])
    for name, roots in members:
        shared = len(same) > 1
        how, reason = "group", ""
        if not np.array_equal(roots, ref):
            reason = "permuted with its channel group but not optimised (its input channels are in another order)"
        elif shared:
            reason = f"one permutation shared by {len(same)} layers reading these channels"
        plan.records[name] = ("model", how, reason, gi, res.seconds)


def _plan_heads(gi, members, graph, scores, n, m, cfg, heads, plan) -> None:
    """A permutation inside every head, searched on the columns of that head in every consumer (a key / value
    group's query heads share one: they read the same value rows)."""
    seconds = 0.0
    units = list(dict.fromkeys(members[0][1].tolist()))
    for u in units:
        head = heads[u]
        mats = []
        for name, roots in members:
            s = int(np.nonzero(roots == u)[0][0])
            mats += [scores[name][:, c:c + head.dim] for c in range(s, s + head.size, head.dim)]
        res = _search(mats, n, m, cfg)
        seconds += res.seconds
        perm = res.perm.cpu().numpy()
        if not (perm == np.arange(head.dim)).all():
            plan.tau[int(u)] = perm
            plan.fixed |= head.fixed
    for name, _ in members:
        plan.records[name] = ("model", "heads", "", gi, seconds)


# ---------------------------------------------------------------------------------------------------
# Applying the plan
# ---------------------------------------------------------------------------------------------------


def _attachment_index(roots: np.ndarray, plan: _Plan, pname: str) -> np.ndarray | None:
    """``idx`` such that ``new = old.index_select(dim, idx)`` for one attachment of parameter ``pname``
    (``roots``: the unit of each index)."""
    occ = np.array([plan.occ.get(int(u), int(u)) for u in roots], dtype=np.int64)
    has_tau = [] if pname in plan.fixed else [int(u) in plan.tau for u in roots]
    if (occ == roots).all() and not any(has_tau):
        return None
    order = np.argsort(roots, kind="stable")
    uniq, start, counts = np.unique(roots[order], return_index=True, return_counts=True)
    own = np.searchsorted(uniq, roots)
    k = np.empty(len(roots), dtype=np.int64)
    k[order] = np.arange(len(roots)) - start[own[order]]
    if any(has_tau):
        for u, tau in plan.tau.items():
            sel = roots == u
            if sel.any():
                kk = k[sel]
                k[sel] = (kk // len(tau)) * len(tau) + tau[kk % len(tau)]
    target = np.searchsorted(uniq, occ)
    if (uniq[target] != occ).any() or (counts[target] != counts[own]).any():
        raise PermutationError("permute_for_nm(): internal error: a unit moved onto one of another size")
    return order[start[target] + k]


def _tensor(model: nn.Module, name: str) -> torch.Tensor:
    mod_name, _, attr = name.rpartition(".")
    return getattr(model.get_submodule(mod_name) if mod_name else model, attr)


def _index_plan(model, graph, plan) -> dict:
    """``(tensor name, dim) -> index`` for every parameter / buffer the plan reorders."""
    out = {}
    for pname, lst in graph.attachments.items():
        for a in lst:
            idx = _attachment_index(graph.root_of(a.labels), plan, pname)
            if idx is not None:
                out[(pname, a.dim)] = idx
    names = {n for n, _ in model.named_parameters()} | {n for n, _ in model.named_buffers()}
    # a pruned layer's mask (pruning.masks) is not used in the forward, so the graph does not see it: it
    # moves with its weight
    for (pname, dim), idx in list(out.items()):
        mod_name, _, attr = pname.rpartition(".")
        mask_name = f"{mod_name}.weight_mask" if mod_name else "weight_mask"
        if attr == "weight" and mask_name in names:
            out[(mask_name, dim)] = idx
    return out


def _apply(model, index) -> None:
    with torch.no_grad():
        for (pname, dim), idx in index.items():
            t = _tensor(model, pname)
            t.copy_(t.index_select(dim, torch.as_tensor(idx, dtype=torch.long, device=t.device)))


def _outputs(model, example_inputs) -> list[torch.Tensor]:
    with eval_mode(model), torch.no_grad():
        out = call_model(model, example_inputs, "permute_for_nm(): example_inputs")
    return [t.detach().clone() for t in iter_tensors(out) if t.is_floating_point()]


def _rel_error(before, after) -> float:
    worst = 0.0
    for a, b in zip(before, after):
        ref = a.double()
        worst = max(worst, float((b.double() - ref).norm() / ref.norm().clamp_min(1e-30)))
    return worst


# ---------------------------------------------------------------------------------------------------
# The entry point
# ---------------------------------------------------------------------------------------------------


def permute_for_nm(
    model: nn.Module,
    example_inputs,
    scores="magnitude",
    n: int = 2,
    m: int = 4,
    *,
    calib: Iterable | None = None,
    loss_fn: Callable | None = None,
    filter_fn: Callable[[str, nn.Module], bool] | None = None,
    config: SearchConfig | None = None,
    runtime: bool = True,
    ignore=(),
    check: bool = True,
    progress: bool = True,
) -> PermutationReport:
    """Reorder the input channels of every N:M-eligible layer so its N:M mask keeps more importance, at zero
    inference cost where the dependency graph allows, leaving the model permuted in place.

    Args:
        model: any ``nn.Module``; modified in place on success, left exactly as it was on error.
        example_inputs: what the model is called with (a tensor, a tuple of positional inputs, or a dict of
            keyword inputs); traced once for the graph and run before / after to check the function.
        scores: what the permutation maximises: a registered scoring criterion name (``"magnitude"``,
            ``"wanda"``, ``"ria"``...) or :class:`pruning.importance.ScoreCriterion`, or a mapping layer name ->
            GEMM-view score matrix ``[out, cols]`` (:func:`pruning.patterns.weight_matrix` layout).
        n, m: the N:M pattern the masks will use.
        calib, loss_fn: calibration batches (and a loss) for criteria that need them.
        filter_fn: ``filter_fn(name, module) -> bool`` selects the layers whose masks matter.
        config: :class:`pruning.permutation.SearchConfig` for every search (the default allows 120 s per
            search: pass a smaller ``time_limit`` for a model with many layers the runtime carries).
        runtime: also search a permutation for each layer the runtime must carry and attach it to that layer as an
            ``int64`` buffer ``input_perm`` (else the layer is only reported). The weight stays in its order and the
            model computes the same function; :func:`pruning.prune_weights` then chooses the layer's N:M mask in the
            permuted order, and :func:`sparsekernels.sparsify` stores the weight that way and gathers the input by
            it in the kernel (``docs/pruning.md``, "Channel permutation").
        ignore: modules whose output channels must not move (as :class:`DependencyGraph`'s ``ignore``).
        check: run the model before and after and refuse a permutation that changes its outputs.
        progress: show progress bars.

    Returns:
        A :class:`PermutationReport`.

    Raises:
        TypeError / ValueError: bad arguments, a score matrix of the wrong shape, a criterion without scores.
        PermutationError: the permuted model's outputs differ (the model is restored first).
        pruning.channels.TraceError: the model could not be traced.
    """
    fn = "permute_for_nm()"
    start = time.perf_counter()
    if not isinstance(model, nn.Module):
        raise TypeError(f"{fn}: expected an nn.Module, got {type(model).__name__}")
    for label, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn}: expected an integer {label}, got {type(v).__name__}")
    if not 1 <= n < m:
        raise ValueError(f"{fn}: expected 1 <= n < m, got n={n}, m={m}")
    if filter_fn is not None and not callable(filter_fn):
        raise TypeError(f"{fn}: expected filter_fn(name, module) -> bool, got {type(filter_fn).__name__}")
    cfg = config if config is not None else SearchConfig()
    eligible, skipped = nm_eligible_layers(model, m, filter_fn)
    carrying = [name for name, mod in model.named_modules() if INPUT_PERM in mod._buffers]
    if carrying:
        raise ValueError(f"{fn}: expected a model whose layers carry no input_perm yet, got {len(carrying)} that do "
                         f"({carrying[0]!r}...): permute_for_nm was already run on it, and its masks would be chosen "
                         "in an order the new permutation does not know; permute the original model once")
    if isinstance(scores, Mapping):
        matrices = {}
        for name, mod in eligible.items():
            if name not in scores:
                skipped.append((name, "no score matrix given"))
                continue
            s = scores[name]
            want = (mod.weight.shape[0], mod.weight[0].numel())
            if not isinstance(s, torch.Tensor) or tuple(s.shape) != want:
                got = tuple(s.shape) if isinstance(s, torch.Tensor) else type(s).__name__
                raise ValueError(f"{fn}: expected scores[{name!r}] of shape {want} (GEMM view), got {got}")
            matrices[name] = s
    else:
        matrices = layer_score_matrices(model, list(eligible), scores, calib, loss_fn, progress=progress)
        skipped += [(name, "the criterion gave it no scores (not called during calibration?)")
                    for name in eligible if name not in matrices]
    rows = {name: _rows_of(s, eligible[name]) for name, s in matrices.items()}
    before = _outputs(model, example_inputs) if check else []
    graph = _permutation_graph(model, example_inputs, ignore)
    heads = _head_units(graph)

    plan = _Plan()
    by_group: dict[int, list] = {}
    kinds = {}
    for name in rows:
        roots = _consumer_roots(graph, name)
        kind, gi, reason = _classify(graph, name, eligible[name], roots, heads, m)
        kinds[name] = (kind, gi, reason)
        if kind != "runtime":
            by_group.setdefault(gi, []).append((name, roots))
    for gi, members in progress_bar(list(by_group.items()), desc="permutation groups", enabled=progress):
        if kinds[members[0][0]][0] == "heads":
            _plan_heads(gi, members, graph, rows, n, m, cfg, heads, plan)
        else:
            _plan_group(gi, members, graph, rows, n, m, cfg, plan)
    for name in progress_bar([k for k in rows if k not in plan.records], desc="runtime layers", enabled=progress):
        kind, gi, reason = kinds[name]
        if runtime:
            res = _search(rows[name], n, m, cfg)
            plan.runtime[name] = res.perm.cpu()
            plan.records[name] = ("runtime", "layer", reason, gi, res.seconds)
        else:
            plan.records[name] = ("unchanged", "", reason, gi, 0.0)

    index = _index_plan(model, graph, plan)
    saved = {key: _tensor(model, key[0]).detach().clone() for key in index}
    try:
        _apply(model, index)
        error = _rel_error(before, _outputs(model, example_inputs)) if check else 0.0
        dtype = next((t.dtype for t in before), torch.float32)
        if error > _RTOL.get(dtype, 1e-4):
            raise PermutationError(f"{fn}: the permuted model's outputs differ from the original's by {error:.3e} "
                                   f"(relative; expected at most {_RTOL.get(dtype, 1e-4):.0e} for {dtype}); the model "
                                   "was restored. An op the dependency graph misreads? Pass its module in ignore=.")
    except BaseException:
        with torch.no_grad():
            for (pname, _), t in saved.items():
                _tensor(model, pname).copy_(t)
        raise
    for name, perm in plan.runtime.items():
        layer = model.get_submodule(name)
        layer.register_buffer(INPUT_PERM, perm.to(device=layer.weight.device, dtype=torch.int64))

    records = []
    for name in eligible:
        if name not in plan.records:
            continue
        carried_by, how, reason, gi, seconds = plan.records[name]
        s = rows[name]
        kept_id = nm_kept(s, n, m)
        total = float(s.double().sum()) or 1.0
        if carried_by == "runtime":
            kept = nm_kept(s, n, m, plan.runtime[name])
        else:
            # the layer's weight was reordered in place: score its new column order
            idx = index.get((f"{name}.weight", 1))
            kept = kept_id if idx is None else nm_kept(s, n, m, torch.as_tensor(idx, dtype=torch.long))
        records.append(LayerPermutation(name, carried_by, how, reason, gi, kept_id / total, kept / total, seconds))
    return PermutationReport(n, m, tuple(records), tuple(skipped), dict(plan.runtime), error,
                             time.perf_counter() - start)
