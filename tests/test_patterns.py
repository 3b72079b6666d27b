"""Property tests of the sparsity patterns: N:M validity, exact budgets, block tiles, the conv GEMM view."""
import random

import pytest
import torch
from torch import nn

from pruning import block_mask, global_unstructured_masks, nm_mask, unstructured_mask
from pruning.patterns import (
    Pattern,
    gemm_shape,
    is_conv1d,
    matrix_to_weight,
    parse_pattern,
    pruned_count,
    scores_to_mask,
    weight_matrix,
)

SEEDS = range(25)


def _random_shape(rng: random.Random, last_multiple: int = 1) -> tuple[int, ...]:
    lead = [rng.randint(1, 7) for _ in range(rng.randint(0, 2))]
    return (*lead, last_multiple * rng.randint(1, 9))


@pytest.mark.parametrize("seed", SEEDS)
def test_nm_mask_keeps_exactly_n_largest_per_group(seed):
    rng = random.Random(seed)
    m = rng.choice([2, 4, 8, 16])
    n = rng.randint(0, m)
    shape = _random_shape(rng, m)
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(shape, generator=g, dtype=rng.choice([torch.float32, torch.float64, torch.float16]))
    if seed % 5 == 0:  # heavy ties: exact counts must still hold
        scores = scores.round()
    mask = nm_mask(scores, n, m)
    assert mask.dtype == torch.bool and mask.shape == scores.shape
    groups_mask = mask.reshape(-1, m)
    groups = scores.reshape(-1, m).double()
    assert bool((groups_mask.sum(1) == n).all())
    if 0 < n < m:
        kept_min = groups.masked_fill(~groups_mask, float("inf")).min(1).values
        pruned_max = groups.masked_fill(groups_mask, float("-inf")).max(1).values
        assert bool((kept_min >= pruned_max).all())


def test_nm_mask_is_what_compress_24_accepts_for_linear_and_conv():
    from sparsekernels import compress_24

    w = torch.randn(13, 36)
    pruned = w * nm_mask(w.abs(), 2, 4)
    assert torch.equal(compress_24(pruned).to_dense(), pruned)
    conv = nn.Conv2d(8, 5, 3)
    view = weight_matrix(conv.weight.detach())
    assert torch.equal(view, conv.weight.detach().permute(0, 2, 3, 1).reshape(5, -1))
    pruned_view = view * nm_mask(view.abs(), 2, 4)
    assert torch.equal(compress_24(pruned_view).to_dense(), pruned_view)
    # back in the conv layout, every (out, kh, kw) position keeps 2 of each 4 input channels
    back = matrix_to_weight(pruned_view, conv.weight.shape)
    nz = (back != 0).permute(0, 2, 3, 1).reshape(5, 3, 3, 2, 4).sum(-1)
    assert bool((nz <= 2).all())


def test_nm_mask_handles_nan_scores_as_least_important():
    scores = torch.tensor([[float("nan"), 1.0, 2.0, 3.0]])
    assert nm_mask(scores, 2, 4).tolist() == [[False, False, True, True]]


@pytest.mark.parametrize("seed", SEEDS)
def test_unstructured_mask_meets_budget_exactly(seed):
    rng = random.Random(seed)
    shape = _random_shape(rng)
    sparsity = rng.choice([0.0, 1.0, rng.random()])
    scores = torch.randn(shape, generator=torch.Generator().manual_seed(seed))
    if seed % 4 == 0:
        scores = scores.round()
    mask = unstructured_mask(scores, sparsity)
    assert int((~mask).sum()) == pruned_count(scores.numel(), sparsity)
    if mask.any() and (~mask).any():
        assert float(scores[mask].min()) >= float(scores[~mask].max())


@pytest.mark.parametrize("seed", range(10))
def test_unstructured_mask_row_budget(seed):
    rng = random.Random(seed)
    rows, cols = rng.randint(1, 9), rng.randint(1, 40)
    sparsity = rng.random()
    scores = torch.randn(rows, cols, generator=torch.Generator().manual_seed(seed))
    mask = unstructured_mask(scores, sparsity, dim=-1)
    assert bool(((~mask).sum(1) == pruned_count(cols, sparsity)).all())
    mask0 = unstructured_mask(scores, sparsity, dim=0)
    assert bool(((~mask0).sum(0) == pruned_count(rows, sparsity)).all())


@pytest.mark.parametrize("seed", SEEDS)
def test_global_budget_is_exact_across_tensors(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    scores = {f"t{i}": torch.rand(_random_shape(rng), generator=g) * rng.choice([0.1, 1.0, 10.0]) for i in range(rng.randint(1, 5))}
    sparsity = rng.random()
    masks = global_unstructured_masks(scores, sparsity)
    assert list(masks) == list(scores)
    total = sum(s.numel() for s in scores.values())
    assert sum(int((~m).sum()) for m in masks.values()) == pruned_count(total, sparsity)
    kept = [s[m] for s, m in zip(scores.values(), masks.values()) if m.any()]
    pruned = [s[~m] for s, m in zip(scores.values(), masks.values()) if (~m).any()]
    if kept and pruned:
        assert float(torch.cat(kept).min()) >= float(torch.cat(pruned).max())


@pytest.mark.parametrize("seed", range(15))
def test_block_mask_prunes_whole_tiles_with_lowest_sums(seed):
    rng = random.Random(seed)
    br, bc = rng.choice([(16, 16), (32, 32), (2, 3), (1, 4)])
    tr, tc = rng.randint(1, 4), rng.randint(1, 4)
    scores = torch.rand(br * tr, bc * tc, generator=torch.Generator().manual_seed(seed))
    sparsity = rng.random()
    mask = block_mask(scores, (br, bc), sparsity)
    tiles = mask.reshape(tr, br, tc, bc).permute(0, 2, 1, 3).reshape(tr * tc, -1)
    assert bool((tiles.all(1) | (~tiles).all(1)).all()), "a tile is partly kept"
    tile_kept = tiles[:, 0]
    assert int((~tile_kept).sum()) == pruned_count(tr * tc, sparsity)
    sums = scores.reshape(tr, br, tc, bc).sum(dim=(1, 3)).reshape(-1)
    if tile_kept.any() and (~tile_kept).any():
        assert float(sums[tile_kept].min()) >= float(sums[~tile_kept].max())
    assert torch.equal(block_mask(scores, br if br == bc else (br, bc), sparsity), mask)


def test_pattern_parsing():
    assert parse_pattern("2:4") == Pattern("nm", n=2, m=4)
    assert parse_pattern(" 1 : 8 ").fixed_sparsity == pytest.approx(0.875)
    assert parse_pattern("Unstructured") == Pattern("unstructured")
    assert parse_pattern("global").kind == "global"
    assert parse_pattern("block16x16") == Pattern("block", block=(16, 16))
    assert parse_pattern("block:32x8").block == (32, 8)
    assert str(parse_pattern("block32x8")) == "block32x8" and str(parse_pattern("2:4")) == "2:4"
    for bad in ["4:4", "0:4", "5:4", "2-4", "block0x4", "structured", ""]:
        with pytest.raises(ValueError):
            parse_pattern(bad)
    with pytest.raises(TypeError):
        parse_pattern(24)


def test_weight_matrix_round_trip():
    w = torch.randn(6, 5, 3, 2)
    assert torch.equal(matrix_to_weight(weight_matrix(w), w.shape), w)
    lin = torch.randn(4, 7)
    assert torch.equal(matrix_to_weight(weight_matrix(lin), lin.shape), lin)
    with pytest.raises(ValueError, match="2-D or 4-D"):
        weight_matrix(torch.randn(2, 3, 4))
    with pytest.raises(ValueError, match="2-D or 4-D"):
        matrix_to_weight(torch.randn(2, 3), (6,))


def test_conv1d_gemm_view_is_the_transpose_and_round_trips():
    """A Hugging Face ``Conv1D`` computes ``x @ W + b`` with ``W`` stored ``[in, out]``: its GEMM view is ``W.T``, so
    N:M groups run along the input features, and the inverse puts a GEMM-view mask back in the ``[in, out]``
    layout; recognised by class name and module prefix, with no transformers import needed."""
    from transformers.pytorch_utils import Conv1D

    torch.manual_seed(0)
    layer = Conv1D(6, 8)  # nf=6 outputs, nx=8 inputs: weight [8, 6]
    assert is_conv1d(layer) and not is_conv1d(nn.Linear(8, 6)) and gemm_shape(layer) == (6, 8)
    assert gemm_shape(nn.Conv2d(3, 5, (2, 3))) == (5, 18)
    x = torch.randn(3, 8)
    matrix = weight_matrix(layer)
    assert matrix.shape == (6, 8) and torch.allclose(x @ matrix.T + layer.bias, layer(x))
    keep = scores_to_mask(matrix.abs(), parse_pattern("2:4"), None, False)
    mask = matrix_to_weight(keep, layer)
    assert mask.shape == (8, 6) and torch.equal(mask, keep.T)
    assert torch.equal(matrix_to_weight(keep, (8, 6), transposed=True), mask)
    assert torch.equal(weight_matrix(mask, transposed=True), keep)   # a tensor shaped like the weight
    assert bool(((mask.T.reshape(6, 2, 4).sum(-1)) == 2).all())      # 2 of every 4 input features kept
    with pytest.raises(ValueError, match="2-D or 4-D"):
        weight_matrix(torch.randn(2, 3, 4, 5), transposed=True)
    with pytest.raises(ValueError, match="2-D or 4-D"):
        matrix_to_weight(torch.randn(2, 3), (1, 2, 3, 1), transposed=True)

    class Conv1D(nn.Module):  # same name, not transformers': not taken for one
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 2))

    assert not is_conv1d(Conv1D())


def test_pattern_error_paths():
    with pytest.raises(TypeError, match="torch.Tensor"):
        nm_mask([1.0, 2.0])
    with pytest.raises(TypeError, match="real-valued"):
        nm_mask(torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="0-d"):
        nm_mask(torch.tensor(1.0))
    with pytest.raises(ValueError, match="multiple of m=4"):
        nm_mask(torch.randn(3, 6))
    with pytest.raises(ValueError, match="0 <= n <= m"):
        nm_mask(torch.randn(4), 5, 4)
    with pytest.raises(TypeError, match="integer n"):
        nm_mask(torch.randn(4), 2.0, 4)
    with pytest.raises(ValueError, match="0 <= sparsity <= 1"):
        unstructured_mask(torch.randn(4), 1.5)
    with pytest.raises(TypeError, match="sparsity"):
        unstructured_mask(torch.randn(4), "half")
    with pytest.raises(ValueError, match="dim"):
        unstructured_mask(torch.randn(4, 4), 0.5, dim=2)
    with pytest.raises(TypeError, match="mapping"):
        global_unstructured_masks([torch.randn(3)], 0.5)
    with pytest.raises(ValueError, match="empty"):
        global_unstructured_masks({}, 0.5)
    with pytest.raises(ValueError, match="0 <= sparsity"):
        global_unstructured_masks({"a": torch.randn(3)}, -0.1)
    with pytest.raises(ValueError, match="2-D"):
        block_mask(torch.randn(4, 4, 4), 2, 0.5)
    with pytest.raises(ValueError, match="divisible"):
        block_mask(torch.randn(16, 20), 16, 0.5)
    with pytest.raises(ValueError, match="block"):
        block_mask(torch.randn(16, 16), (0, 16), 0.5)
    with pytest.raises(ValueError, match="block"):
        block_mask(torch.randn(16, 16), (16, 16, 1), 0.5)


def test_global_masks_need_one_device():
    with pytest.raises(ValueError, match="one device"):
        global_unstructured_masks({"a": torch.randn(3), "b": torch.randn(3, device="meta")}, 0.5)
