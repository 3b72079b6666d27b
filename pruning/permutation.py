"""Channel permutation search for N:M sparsity (Pool & Yu, NeurIPS 2021; NVIDIA ASP; RIA, ICLR 2024).

An N:M mask keeps the ``n`` most important of every ``m`` consecutive input columns of a GEMM-view weight
``[out, in]``. Which columns share a group is an accident of the layer's input order: two large columns in the
same group of 4 compete for the 2 places. Reordering the input columns first (and the producing layers' output
channels with them, which costs nothing at inference) lets the mask keep more of the importance. This module
finds the reordering; :mod:`pruning.channels.permute` applies it to a model through the dependency graph.

The objective, for a score matrix ``S`` ``[rows, cols]`` (higher = more important) and a column permutation
``p`` (new column ``i`` is old column ``p[i]``)::

    kept(p) = sum over rows r, groups g of  top-n { S[r, p[g*m + j]] : j < m }

:func:`search_permutation` maximises it:

1. **Start**: the identity and a *balanced* assignment (columns sorted by their total score and dealt to the
   groups in serpentine order, so the heaviest columns land in different groups, as RIA's heuristic
   allocation does); ``init="auto"`` starts from the better of the two, so the result never keeps less than
   the identity.
2. **Refine** (as ASP's channel swaps): every sweep pairs the groups at random and, for each pair, evaluates
   all ``m * m`` swaps of one column of each group, making the best one when it raises the pair's kept
   importance. A swap's value needs no sort: with column ``a`` taken out of a group, the ``n`` largest of the
   other ``m - 1`` and a newcomer ``y`` are the ``n - 1`` largest of the others plus ``max(n-th largest, y)``,
   so every swap of a pair costs one elementwise max and one sum over the rows. The evaluation is vectorised
   over all rows and many pairs at once with torch ops, so it runs on whatever device ``S`` is on (a GPU
   too). (Evaluating all 35 splits of a pair's 8 columns, double swaps included, was 8x slower per sweep
   and kept less importance in the same time.) Sweeps stop after ``max_sweeps``, after ``time_limit``
   seconds, or once ``patience`` sweeps in a row gained less than ``tol`` (relative).
3. **Tiny problems** (at most ``exhaustive_limit`` distinct groupings: up to 12 columns for 2:4) are solved
   exactly by enumeration.

Several matrices that read the same channels (the consumers of one residual stream) share one permutation:
pass them as a sequence and their objectives are summed (:func:`search_permutation`'s ``weights`` scales each).

Measured on a 4096 x 14336 layer (Wanda-like float32 scores, one thread of the shared 2-core development CPU):
the kept share of the importance goes from 0.8566 (identity) to 0.8788 after the balanced start (4 s), 0.8799
after 3 sweeps (12 s) and 0.8819 with the default ``time_limit`` (122 s); the transposed 14336 x 4096 layer
behaves the same (``benchmarks/results/cpu/nm_quality.md``).
"""
from __future__ import annotations

import itertools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch


__all__ = [
    "SearchConfig",
    "PermutationResult",
    "nm_kept",
    "search_permutation",
    "invert_permutation",
    "check_permutation",
    "permuted_nm_mask",
    "channel_rows",
]


@dataclass(frozen=True)
class SearchConfig:
    """The knobs of :func:`search_permutation`.

    Attributes:
        max_sweeps: refinement sweeps at most (each sweep visits every group once, paired at random).
        time_limit: seconds of refinement at most (checked between chunks; ``None``: no limit). The start
            and the final scoring are not counted.
        tol: a sweep "improves" when it raises the kept importance by more than ``tol`` (relative); a split
            is accepted only when it raises its pair's kept importance by more than ``tol`` (relative), so
            float rounding cannot make the search cycle.
        patience: stop after this many sweeps in a row without improvement.
        init: ``"auto"`` (the better of identity and balanced), ``"identity"`` or ``"balanced"``.
        exhaustive_limit: solve exactly by enumeration when the number of distinct groupings is at most this.
        chunk_elements: elements of the largest temporary tensor of a refinement step (``rows * pairs * m *
            m``); ``None``: 2**20 on the CPU (cache-sized: 1.5x faster than 2**24 on the development CPU) and
            2**26 on a GPU.
        seed: seed of the random pairing (the search is deterministic for a given seed and device).
    """

    max_sweeps: int = 60
    time_limit: float | None = 120.0
    tol: float = 1e-6
    patience: int = 4
    init: str = "auto"
    exhaustive_limit: int = 10_000
    chunk_elements: int | None = None
    seed: int = 0

    def __post_init__(self):
        fn = "SearchConfig"
        for label in ("max_sweeps", "patience", "exhaustive_limit", "chunk_elements"):
            v = getattr(self, label)
            if v is None and label == "chunk_elements":
                continue
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{fn}: expected {label} as an int >= 0, got {v!r}")
        if self.chunk_elements is not None and self.chunk_elements < 1:
            raise ValueError(f"{fn}: expected chunk_elements >= 1, got {self.chunk_elements}")
        if self.time_limit is not None and (not isinstance(self.time_limit, (int, float)) or not self.time_limit >= 0):
            raise ValueError(f"{fn}: expected time_limit None or a number >= 0, got {self.time_limit!r}")
        if not isinstance(self.tol, (int, float)) or not self.tol >= 0:
            raise ValueError(f"{fn}: expected tol >= 0, got {self.tol!r}")
        if self.init not in ("auto", "identity", "balanced"):
            raise ValueError(f"{fn}: expected init 'auto', 'identity' or 'balanced', got {self.init!r}")


@dataclass(frozen=True)
class PermutationResult:
    """What :func:`search_permutation` found.

    Attributes:
        perm: int64 ``[cols]`` on the scores' device: new column ``i`` is old column ``perm[i]``.
        kept_identity: kept importance without permutation (float64 sum).
        kept_start: kept importance of the starting point.
        kept: kept importance of ``perm`` (never below ``kept_identity``).
        total: the total importance (sum of all scores).
        seconds: wall time of the whole search.
        sweeps: refinement sweeps run.
        method: ``"exhaustive"``, ``"identity"`` (nothing to search) or ``"<start>+swaps"``.
        history: kept importance after the start and after each sweep.
    """

    perm: torch.Tensor
    kept_identity: float
    kept_start: float
    kept: float
    total: float
    seconds: float
    sweeps: int
    method: str
    history: tuple[float, ...] = ()

    @property
    def ratio_identity(self) -> float:
        """Kept share of the total importance without permutation."""
        return self.kept_identity / self.total if self.total else 1.0

    @property
    def ratio(self) -> float:
        """Kept share of the total importance with :attr:`perm`."""
        return self.kept / self.total if self.total else 1.0

    @property
    def gain(self) -> float:
        """Relative increase of the kept importance over the identity (0.01 = 1 % more kept)."""
        return self.kept / self.kept_identity - 1.0 if self.kept_identity else 0.0

    def to_dict(self) -> dict:
        """A JSON-serialisable summary (without the permutation itself)."""
        return {"kept_identity": self.kept_identity, "kept_start": self.kept_start, "kept": self.kept,
                "total": self.total, "ratio_identity": self.ratio_identity, "ratio": self.ratio, "gain": self.gain,
                "seconds": self.seconds, "sweeps": self.sweeps, "method": self.method}


# ---------------------------------------------------------------------------------------------------
# The objective
# ---------------------------------------------------------------------------------------------------


def _top_n_sum(x: torch.Tensor, n: int) -> torch.Tensor:
    """Sum of the ``n`` largest values along the last dim of ``x`` (any size ``m``)."""
    m = x.shape[-1]
    if n >= m:
        return x.sum(-1)
    if n == 0:
        return x.new_zeros(x.shape[:-1])
    if n == 2 and m == 4:
        # the two largest of four without a sort: 7 elementwise ops (about 3x faster than topk here)
        a, b, c, d = x.unbind(-1)
        hi1, lo1 = torch.maximum(a, b), torch.minimum(a, b)
        hi2, lo2 = torch.maximum(c, d), torch.minimum(c, d)
        return torch.maximum(hi1, hi2) + torch.maximum(torch.minimum(hi1, hi2), torch.maximum(lo1, lo2))
    if n == 1:
        return x.amax(-1)
    return x.topk(n, dim=-1, sorted=False).values.sum(-1)


def _check_nm(fn: str, n, m) -> None:
    for label, v in (("n", n), ("m", m)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise TypeError(f"{fn}: expected an integer {label}, got {type(v).__name__}")
    if m < 1 or not 0 <= n <= m:
        raise ValueError(f"{fn}: expected 0 <= n <= m and m >= 1, got n={n}, m={m}")


def _as_matrix(fn: str, scores, weights) -> torch.Tensor:
    """One ``[rows, cols]`` float matrix from a tensor or a sequence of tensors with equal ``cols``."""
    mats = [scores] if isinstance(scores, torch.Tensor) else list(scores) if isinstance(scores, Sequence) else None
    if mats is None or not mats:
        got = type(scores).__name__ if mats is None else "an empty sequence"
        raise TypeError(f"{fn}: expected a [rows, cols] score tensor or a sequence of them, got {got}")
    if weights is not None and len(weights) != len(mats):
        raise ValueError(f"{fn}: expected one weight per score matrix ({len(mats)}), got {len(weights)}")
    out = []
    for i, s in enumerate(mats):
        if not isinstance(s, torch.Tensor):
            raise TypeError(f"{fn}: expected score matrix {i} as a torch.Tensor, got {type(s).__name__}")
        if s.dim() != 2 or s.dtype == torch.bool or s.is_complex():
            raise ValueError(f"{fn}: expected score matrix {i} as a real 2-D tensor, got {s.dtype} "
                             f"of shape {tuple(s.shape)}")
        if s.shape[1] != mats[0].shape[1] or s.device != mats[0].device:
            raise ValueError(f"{fn}: expected every score matrix with {mats[0].shape[1]} columns on "
                             f"{mats[0].device}, got matrix {i} of shape {tuple(s.shape)} on {s.device}")
        s = s.detach().to(torch.promote_types(s.dtype, torch.float32))
        if weights is not None:
            s = s * float(weights[i])
        out.append(s)
    mat = out[0] if len(out) == 1 else torch.cat([s.to(torch.promote_types(out[0].dtype, s.dtype)) for s in out])
    finite = torch.isfinite(mat)
    if not bool(finite.all()):
        raise ValueError(f"{fn}: expected finite scores, got {int((~finite).sum())} NaN/inf of {mat.numel()}")
    return mat


def nm_kept(scores, n: int = 2, m: int = 4, perm: torch.Tensor | None = None) -> float:
    """Total importance an N:M mask keeps: the sum over rows and groups of ``m`` consecutive columns of the
    ``n`` largest scores, after reordering the columns by ``perm`` (new column ``i`` = old column ``perm[i]``).

    Args:
        scores: ``[rows, cols]`` real tensor (or a sequence of them with equal ``cols``: their sum), any device.
        n, m: the pattern; ``cols`` must be a multiple of ``m``.
        perm: int64 ``[cols]`` permutation, or ``None`` for the identity.

    Returns:
        The kept importance as a Python float (accumulated in float64).

    Raises:
        TypeError / ValueError: bad scores, pattern, or permutation.
    """
    fn = "nm_kept()"
    _check_nm(fn, n, m)
    mat = _as_matrix(fn, scores, None)
    if mat.shape[1] % m:
        raise ValueError(f"{fn}: expected cols to be a multiple of m={m}, got {mat.shape[1]}")
    if perm is not None:
        check_permutation(fn, perm, mat.shape[1])
        mat = mat.index_select(1, perm.to(mat.device))
    return _kept(mat, n, m)


def _kept(mat: torch.Tensor, n: int, m: int, rows_per_chunk: int = 4096) -> float:
    total = 0.0
    for r0 in range(0, mat.shape[0], rows_per_chunk):
        part = mat[r0:r0 + rows_per_chunk]
        total += float(_top_n_sum(part.reshape(part.shape[0], -1, m), n).to(torch.float64).sum())
    return total


def check_permutation(fn: str, perm, cols: int) -> None:
    """Raise ``ValueError`` (naming ``fn``) unless ``perm`` is an ``int64`` permutation of ``0 .. cols-1``."""
    if not isinstance(perm, torch.Tensor) or perm.dtype != torch.int64 or perm.shape != (cols,):
        got = f"{perm.dtype} of shape {tuple(perm.shape)}" if isinstance(perm, torch.Tensor) else type(perm).__name__
        raise ValueError(f"{fn}: expected perm as an int64 tensor of shape ({cols},), got {got}")
    if not torch.equal(perm.sort().values.cpu(), torch.arange(cols)):
        raise ValueError(f"{fn}: expected perm to be a permutation of 0..{cols - 1}, got repeated or missing indices")


def invert_permutation(perm: torch.Tensor) -> torch.Tensor:
    """The inverse permutation: ``x[perm][invert_permutation(perm)] == x``.

    Raises:
        ValueError: ``perm`` is not a 1-D int64 permutation.
    """
    if not isinstance(perm, torch.Tensor) or perm.dim() != 1:
        raise ValueError(f"invert_permutation(): expected a 1-D int64 tensor, got {perm!r}")
    check_permutation("invert_permutation()", perm, perm.shape[0])
    inv = torch.empty_like(perm)
    inv[perm] = torch.arange(perm.numel(), device=perm.device)
    return inv


def permuted_nm_mask(scores: torch.Tensor, perm: torch.Tensor, n: int = 2, m: int = 4) -> torch.Tensor:
    """The N:M keep mask chosen in the permuted column order, returned in the original order.

    ``mask[:, perm]`` has exactly ``n`` kept per group of ``m`` consecutive columns: what a kernel that gathers
    its input channels by ``perm`` (the runtime-carried permutation) executes.

    Args:
        scores: ``[rows, cols]`` real tensor; perm: int64 ``[cols]``.

    Raises:
        TypeError / ValueError: as :func:`pruning.patterns.nm_mask` and for a bad ``perm``.
    """
    from .patterns import nm_mask

    fn = "permuted_nm_mask()"
    if not isinstance(scores, torch.Tensor) or scores.dim() != 2:
        raise ValueError(f"{fn}: expected a 2-D score tensor, got {getattr(scores, 'shape', type(scores).__name__)}")
    check_permutation(fn, perm, scores.shape[1])
    perm = perm.to(scores.device)
    return nm_mask(scores.index_select(1, perm), n, m).index_select(1, invert_permutation(perm))


def channel_rows(matrix: torch.Tensor, channels: int) -> torch.Tensor:
    """A GEMM-view score matrix ``[out, k * channels]`` (columns ordered kernel position, then channel, as
    :func:`pruning.patterns.weight_matrix` lays out a convolution) as ``[out * k, channels]``: one row per
    output and kernel position, so a permutation of the input channels permutes its columns.

    Raises:
        ValueError: the column count is not a multiple of ``channels``.
    """
    if matrix.dim() != 2 or channels < 1 or matrix.shape[1] % channels:
        raise ValueError(f"channel_rows(): expected a [out, k * {channels}] matrix, got {tuple(matrix.shape)}")
    return matrix.reshape(-1, channels)


# ---------------------------------------------------------------------------------------------------
# The search
# ---------------------------------------------------------------------------------------------------


def _balanced(mat: torch.Tensor, m: int) -> torch.Tensor:
    """Columns sorted by total score, dealt to the groups in serpentine order (heaviest ones apart)."""
    cols = mat.shape[1]
    groups = cols // m
    order = mat.sum(0).argsort(descending=True, stable=True)
    rank = torch.arange(cols, device=mat.device)
    rnd, pos = rank // groups, rank % groups
    group = torch.where(rnd % 2 == 0, pos, groups - 1 - pos)
    return order[(group * m + rnd).argsort()]


def _num_groupings(cols: int, m: int) -> int:
    g = cols // m
    return math.factorial(cols) // (math.factorial(m) ** g * math.factorial(g))


def _groupings(cols: int, m: int):
    """Every split of ``range(cols)`` into unordered groups of ``m``, as permutations (lists)."""
    def rec(rest):
        if not rest:
            yield []
            return
        head, tail = rest[0], rest[1:]
        for others in itertools.combinations(tail, m - 1):
            left = [c for c in tail if c not in others]
            for r in rec(left):
                yield [head, *others, *r]

    yield from rec(list(range(cols)))


def _exhaustive(mat: torch.Tensor, n: int, m: int, chunk_elements: int) -> torch.Tensor:
    cols = mat.shape[1]
    all_perms = torch.tensor(list(_groupings(cols, m)), dtype=torch.long, device=mat.device)
    best_val, best = -math.inf, all_perms[0]
    step = max(1, chunk_elements // max(1, mat.numel()))
    for k0 in range(0, all_perms.shape[0], step):
        p = all_perms[k0:k0 + step]
        vals = _top_n_sum(mat[:, p].reshape(mat.shape[0], p.shape[0], cols // m, m), n)
        tot = vals.to(torch.float64).sum((0, 2))
        i = int(tot.argmax())
        if float(tot[i]) > best_val:
            best_val, best = float(tot[i]), p[i]
    return best


def _rest_stats(x: torch.Tensor, n: int, m: int):
    """For groups ``x`` ``[pairs, m, rows]`` and each column ``a`` taken out: the sum over rows of the ``n - 1``
    largest of the other ``m - 1`` (``[pairs, m]``) and their ``n``-th largest per row (``[pairs, m, rows]``).
    Putting a column ``y`` in ``a``'s place then keeps ``sum + sum_rows max(nth, y)`` (the ``n`` largest of
    ``m - 1`` values and ``y`` are the ``n - 1`` largest of them plus ``max(n-th largest, y)``)."""
    if (n, m) == (2, 4):
        # the two largest of the three others, without a sort: 2:4 is the case that matters for speed
        a, b, c, d = x.unbind(1)
        hi_ab, lo_ab = torch.maximum(a, b), torch.minimum(a, b)
        hi_cd, lo_cd = torch.maximum(c, d), torch.minimum(c, d)
        first = torch.stack([torch.maximum(b, hi_cd), torch.maximum(a, hi_cd),
                             torch.maximum(hi_ab, d), torch.maximum(hi_ab, c)], 1)
        second = torch.stack([torch.maximum(torch.minimum(b, hi_cd), lo_cd),
                              torch.maximum(torch.minimum(a, hi_cd), lo_cd),
                              torch.maximum(torch.minimum(hi_ab, d), lo_ab),
                              torch.maximum(torch.minimum(hi_ab, c), lo_ab)], 1)
        return first.sum(-1), second
    idx = torch.tensor([[j for j in range(m) if j != a] for a in range(m)], device=x.device)
    top = x[:, idx].topk(n, dim=2, sorted=True).values  # [pairs, m, n, rows]
    return top[:, :, : n - 1].sum((2, 3)), top[:, :, n - 1]


def _sweep(mat_t, perm, n, m, gen, chunk_elements, tol, deadline) -> bool:
    """One refinement sweep, in place on ``perm``: the groups are paired at random and each pair makes the
    single column swap that raises its kept importance most (if any does). ``mat_t``: the ``[cols, rows]``
    transposed scores. Returns False when the deadline cut it short (visited pairs keep their swap)."""
    groups = perm.numel() // m
    pairs = groups // 2
    if pairs == 0:
        return True
    order = torch.randperm(groups, generator=gen).to(perm.device)
    grp = perm.view(groups, m)
    g1, g2 = order[:pairs], order[pairs:2 * pairs]
    c1, c2 = grp[g1], grp[g2]  # [pairs, m] copies
    rows = mat_t.shape[1]
    step = max(1, chunk_elements // max(1, rows * m * m))
    done = True
    for p0 in range(0, pairs, step):
        a1, a2 = c1[p0:p0 + step], c2[p0:p0 + step]
        pc = a1.shape[0]
        x1 = mat_t.index_select(0, a1.reshape(-1)).view(pc, m, rows)
        x2 = mat_t.index_select(0, a2.reshape(-1)).view(pc, m, rows)
        base = (_top_n_sum(x1.transpose(1, 2), n) + _top_n_sum(x2.transpose(1, 2), n)).sum(-1)  # [pc]
        s1, r1 = _rest_stats(x1, n, m)
        s2, r2 = _rest_stats(x2, n, m)
        # swap column a of group 1 with column b of group 2: [pc, a, b]
        new = s1[:, :, None] + torch.maximum(r1[:, :, None, :], x2[:, None, :, :]).sum(-1)
        new += s2[:, None, :] + torch.maximum(r2[:, None, :, :], x1[:, :, None, :]).sum(-1)
        best_val, best = new.reshape(pc, m * m).max(1)
        accept = (best_val - base) > tol * base.abs().clamp_min(torch.finfo(base.dtype).tiny)
        rows_ok = accept.nonzero()[:, 0]
        if rows_ok.numel():
            ia, ib = best[rows_ok] // m, best[rows_ok] % m
            col_a = a1[rows_ok, ia].clone()
            a1[rows_ok, ia] = a2[rows_ok, ib]
            a2[rows_ok, ib] = col_a
        if deadline is not None and time.perf_counter() > deadline:
            done = False
            break
    grp[g1] = c1
    grp[g2] = c2
    return done


def search_permutation(
    scores,
    n: int = 2,
    m: int = 4,
    *,
    weights: Sequence[float] | None = None,
    config: SearchConfig | None = None,
    progress: bool = False,
) -> PermutationResult:
    """Find a permutation of the input columns that maximises the importance an N:M mask keeps.

    Args:
        scores: ``[rows, cols]`` importance of every weight (higher = more important; any real dtype, any
            device; ``cols`` a multiple of ``m``), or a sequence of such matrices with equal ``cols`` that share
            one permutation (their objectives are summed). Conv weights: pass :func:`channel_rows` of the
            GEMM view.
        n, m: keep ``n`` of every ``m``.
        weights: optional multiplier per score matrix (e.g. ``1 / total`` so every consumer counts equally).
        config: the search knobs (:class:`SearchConfig`; default: at most 60 sweeps / 120 s).
        progress: show a progress bar over the sweeps.

    Returns:
        A :class:`PermutationResult`; its ``kept`` is never below ``kept_identity``.

    Raises:
        TypeError / ValueError: bad scores (not 2-D, NaN / inf, mismatched columns), pattern or config.
    """
    from .batches import progress_bar

    fn = "search_permutation()"
    start = time.perf_counter()
    _check_nm(fn, n, m)
    cfg = config if config is not None else SearchConfig()
    if not isinstance(cfg, SearchConfig):
        raise TypeError(f"{fn}: expected config as a SearchConfig, got {type(cfg).__name__}")
    mat = _as_matrix(fn, scores, weights)
    rows, cols = mat.shape
    if cols % m:
        raise ValueError(f"{fn}: expected the column count to be a multiple of m={m}, got {cols}")
    total = float(mat.to(torch.float64).sum())
    identity = torch.arange(cols, device=mat.device)
    kept_identity = _kept(mat, n, m)
    if cols <= m or n in (0, m) or rows == 0:
        return PermutationResult(identity, kept_identity, kept_identity, kept_identity, total,
                                 time.perf_counter() - start, 0, "identity")
    chunk = cfg.chunk_elements or (1 << 26 if mat.device.type != "cpu" else 1 << 20)
    if _num_groupings(cols, m) <= cfg.exhaustive_limit:
        perm = _exhaustive(mat, n, m, chunk)
        kept = max(_kept(mat[:, perm], n, m), kept_identity)
        perm = perm if kept > kept_identity else identity
        return PermutationResult(perm, kept_identity, kept_identity, kept, total,
                                 time.perf_counter() - start, 0, "exhaustive")
    perm, kept_start, name = identity.clone(), kept_identity, "identity"
    if cfg.init in ("auto", "balanced"):
        bal = _balanced(mat, m)
        kept_bal = _kept(mat[:, bal], n, m)
        if cfg.init == "balanced" or kept_bal > kept_identity:
            perm, kept_start, name = bal, kept_bal, "balanced"
    mat_t = mat.T.contiguous()  # one copy: a pair's columns are then contiguous rows, fast to gather
    gen = torch.Generator().manual_seed(cfg.seed)
    deadline = None if cfg.time_limit is None else time.perf_counter() + cfg.time_limit
    current, stale, sweeps, history = kept_start, 0, 0, [kept_start]
    bar = progress_bar(total=cfg.max_sweeps, desc="permutation search", enabled=progress)
    try:
        while sweeps < cfg.max_sweeps and stale < cfg.patience:
            finished = _sweep(mat_t, perm, n, m, gen, chunk, cfg.tol, deadline)
            sweeps += 1
            new = _kept(mat[:, perm], n, m)
            history.append(new)
            stale = stale + 1 if new <= current + cfg.tol * abs(current) else 0
            current = new  # each accepted split raised its pair's share, so this only grows (up to rounding)
            bar.update(1)
            bar.set_postfix(kept=f"{current / total:.4f}" if total else "-")
            if not finished:
                break
    finally:
        bar.close()
    if current <= kept_identity:  # never worse than leaving the layer as it is
        perm, current = identity, kept_identity
    return PermutationResult(perm, kept_identity, kept_start, current, total, time.perf_counter() - start, sweeps,
                             f"{name}+swaps", tuple(history))
