"""Importance criteria: im2col columns, calibration statistics, Taylor / Wanda scores, SparseGPT's OBS updates,
the criterion registry."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning import nm_mask
from pruning.calibration import collect_input_statistics, layer_input_columns, real_token_rows, taylor_scores
from pruning.importance import (
    BNScale,
    Magnitude,
    SparseGPT,
    Taylor,
    Wanda,
    magnitude_scores,
    resolve_importance,
    wanda_scores,
)
from pruning.patterns import pruned_count, weight_matrix
from pruning.sparsegpt import sparsegpt_prune
from tolerances import RTOL, assert_close_rel, rel_error


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(kernel_size=3, padding=1),
        dict(kernel_size=(3, 2), stride=2, padding=(0, 1), dilation=(1, 2)),
        dict(kernel_size=3, padding="same", dilation=2),
        dict(kernel_size=2, padding="same"),
        dict(kernel_size=3, padding="valid"),
        dict(kernel_size=3, padding=2, padding_mode="reflect"),
        dict(kernel_size=1),
    ],
)
def test_conv_columns_reproduce_the_convolution(kwargs):
    conv = nn.Conv2d(5, 7, bias=False, **kwargs).double()
    x = torch.randn(3, 5, 9, 11, dtype=torch.float64)
    cols = layer_input_columns(conv, x)
    out = conv(x)
    gemm = (cols @ weight_matrix(conv.weight.detach()).T).reshape(3, out.shape[2], out.shape[3], 7).permute(0, 3, 1, 2)
    assert_close_rel(gemm, out, torch.float32)  # float64 inputs: far inside the fp32 bound


def test_linear_columns_and_errors():
    lin = nn.Linear(6, 3)
    x = torch.randn(2, 5, 6)
    assert torch.equal(layer_input_columns(lin, x), x.reshape(10, 6))
    with pytest.raises(ValueError, match=r"\[..., 6\]"):
        layer_input_columns(lin, torch.randn(2, 5))
    with pytest.raises(ValueError, match="grouped"):
        layer_input_columns(nn.Conv2d(4, 4, 3, groups=2), torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="expected input"):
        layer_input_columns(nn.Conv2d(4, 4, 3), torch.randn(1, 3, 5, 5))
    with pytest.raises(TypeError, match="nn.Linear, nn.Conv2d or Conv1D"):
        layer_input_columns(nn.ReLU(), torch.randn(3))
    # a single unbatched image is accepted
    assert layer_input_columns(nn.Conv2d(2, 3, 3), torch.randn(2, 5, 5)).shape == (9, 18)


class _KwModel(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 12)
        self.bn = nn.BatchNorm1d(12)
        self.b = nn.Linear(12, 4)
        self.unused = nn.Linear(3, 3)

    def forward(self, x, scale=1.0):
        return self.b(torch.relu(self.bn(self.a(x * scale))))


def test_statistics_match_manual_computation_for_every_batch_format():
    torch.manual_seed(1)
    model = _KwModel().double()
    model.train()
    xs = [torch.randn(n, 8, dtype=torch.float64) for n in (5, 3, 7)]
    # tensors, 1-tuples, keyword dicts, (inputs, targets) pairs (targets ignored), positional inputs
    formats = [xs, [(x,) for x in xs], [{"x": x} for x in xs], [(x, torch.zeros(len(x))) for x in xs],
               [((x, 1.0), None) for x in xs]]
    bn_before = model.bn.running_mean.clone()
    for calib in formats:
        stats = collect_input_statistics(model, {"a": model.a, "b": model.b, "unused": model.unused}, calib, hessian=True, progress=False)
        assert "unused" not in stats
        X = torch.cat(xs)
        assert stats["a"].rows == X.shape[0]
        assert_close_rel(stats["a"].sq_norms, X.square().sum(0), torch.float32)
        assert_close_rel(stats["a"].hessian, X.T @ X, torch.float32)
        with torch.no_grad():
            model.eval()
            H = torch.relu(model.bn(model.a(X)))
            model.train()
        assert_close_rel(stats["b"].hessian, H.T @ H, torch.float32)
    assert model.training and model.bn.training, "training flags must be restored"
    assert torch.equal(model.bn.running_mean, bn_before), "calibration must not touch BatchNorm statistics"
    assert not model.a._forward_pre_hooks and not model.b._forward_pre_hooks


def test_statistics_hooks_removed_on_error_and_errors():
    model = _KwModel()

    def bad():
        yield torch.randn(4, 8)
        raise RuntimeError("data loader broke")

    with pytest.raises(RuntimeError, match="broke"):
        collect_input_statistics(model, {"a": model.a}, bad(), progress=False)
    assert not model.a._forward_pre_hooks
    with pytest.raises(ValueError, match="at least one"):
        collect_input_statistics(model, {"a": model.a}, [], progress=False)
    with pytest.raises(TypeError, match="iterable of batches"):
        collect_input_statistics(model, {"a": model.a}, torch.randn(4, 8), progress=False)
    with pytest.raises(TypeError, match="calibration batch"):
        collect_input_statistics(model, {"a": model.a}, [3], progress=False)
    with pytest.raises(TypeError, match=r"calibration batch: expected \(inputs, targets\).*\(\(a, b\), targets\)"):
        collect_input_statistics(model, {"a": model.a}, [(torch.randn(4, 8), 1.0, 2.0)], progress=False)


def test_wanda_and_magnitude_scores():
    w = torch.randn(5, 6)
    sq = torch.rand(6) * 4
    assert torch.equal(magnitude_scores(w), w.abs())
    assert_close_rel(wanda_scores(w, sq), w.double().abs() * sq.double().sqrt(), torch.float32)
    with pytest.raises(ValueError, match=r"\(6,\)"):
        wanda_scores(w, torch.rand(5))


def test_taylor_scores_sum_per_batch_abs_products_and_leave_grads_alone():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 3)).double()
    model[0].weight.requires_grad_(False)
    sentinel = torch.randn(3, 7, dtype=torch.float64)
    model[2].weight.grad = sentinel.clone()
    batches = [(torch.randn(4, 5, dtype=torch.float64), torch.randint(0, 3, (4,))) for _ in range(3)]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    scores = taylor_scores(model, {"0": model[0].weight, "2": model[2].weight}, batches, loss_fn, progress=False)
    expect = torch.zeros(3, 7, dtype=torch.float64)
    for b in batches:
        w = model[2].weight.detach().clone().requires_grad_(True)
        out = F.linear(torch.tanh(model[0](b[0])), w, model[2].bias)
        (g,) = torch.autograd.grad(F.cross_entropy(out, b[1]), w)
        expect += (w * g).abs().detach()
    assert rel_error(scores["2"], expect) <= RTOL[torch.float32]
    assert torch.equal(model[2].weight.grad, sentinel), ".grad must be untouched"
    assert not model[0].weight.requires_grad, "requires_grad must be restored"
    with pytest.raises(TypeError, match=r"scalar tensor, got a tensor of shape \(4, 3\)"):
        taylor_scores(model, {"2": model[2].weight}, batches, lambda m, b: m(b[0]), progress=False)
    with pytest.raises(TypeError, match="scalar tensor, got int"):
        taylor_scores(model, {"2": model[2].weight}, batches, lambda m, b: 3, progress=False)
    with pytest.raises(ValueError, match="without a gradient"):  # not autograd's bare RuntimeError
        taylor_scores(model, {"2": model[2].weight}, batches, lambda m, b: loss_fn(m, b).detach(), progress=False)
    assert torch.equal(model[2].weight.grad, sentinel) and not model[0].weight.requires_grad
    with pytest.raises(TypeError, match="loss_fn"):
        taylor_scores(model, {"2": model[2].weight}, batches, None, progress=False)
    with pytest.raises(ValueError, match="at least one"):
        taylor_scores(model, {"2": model[2].weight}, [], loss_fn, progress=False)


def _reconstruction_error(x, w, w_new):
    return rel_error(x @ w_new.T, x @ w.T)


@pytest.mark.parametrize("seed", range(4))
def test_sparsegpt_nm_is_valid_and_beats_masking(seed):
    g = torch.Generator().manual_seed(seed)
    rows, cols = 11, 48
    # correlated inputs with a few large features: the case where reconstruction matters
    x = torch.randn(300, 12, generator=g, dtype=torch.float64) @ torch.randn(12, cols, generator=g, dtype=torch.float64)
    x += 0.1 * torch.randn(300, cols, generator=g, dtype=torch.float64)
    x[:, :3] *= 5
    w = torch.randn(rows, cols, generator=g)
    new, keep = sparsegpt_prune(w, x.T @ x, n=2, m=4, blocksize=16)
    assert new.dtype == w.dtype and keep.dtype == torch.bool
    assert bool((keep.reshape(rows, -1, 4).sum(-1) == 2).all())
    assert bool((new[~keep] == 0).all())
    err = _reconstruction_error(x, w.double(), new.double())
    magnitude = w * nm_mask(w.abs(), 2, 4)
    wanda = w * nm_mask(wanda_scores(w, x.square().sum(0)), 2, 4)
    same_mask = w * keep
    assert err < 0.75 * _reconstruction_error(x, w.double(), same_mask.double())
    # ... but no better than the least-squares optimum for its own mask (a bound no method can pass)
    optimum = torch.zeros(rows, cols, dtype=torch.float64)
    for r in range(rows):
        cols_kept = keep[r]
        target = x @ w[r].double()
        optimum[r, cols_kept] = torch.linalg.lstsq(x[:, cols_kept], target.unsqueeze(1)).solution.squeeze(1)
    assert err >= _reconstruction_error(x, w.double(), optimum) - 1e-9
    assert err < _reconstruction_error(x, w.double(), wanda.double()) < _reconstruction_error(x, w.double(), magnitude.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_sparsegpt_unstructured_budget_exact_and_dead_columns(dtype):
    g = torch.Generator().manual_seed(7)
    rows, cols = 9, 37
    x = torch.randn(200, cols, generator=g, dtype=torch.float64)
    x[:, [4, 20]] = 0.0  # dead inputs: their weights should go first
    w = torch.randn(rows, cols, generator=g)
    for sparsity in (0.0, 0.3, 0.61, 1.0):
        new, keep = sparsegpt_prune(w, x.T @ x, sparsity=sparsity, blocksize=8, dtype=dtype)
        assert int((~keep).sum()) == pruned_count(rows * cols, sparsity)
        assert bool((new[~keep] == 0).all())
        if 0.3 <= sparsity < 1.0:
            assert not keep[:, [4, 20]].any()
    new, keep = sparsegpt_prune(w, x.T @ x, sparsity=0.0)
    live = torch.ones(cols, dtype=torch.bool)
    live[[4, 20]] = False
    assert torch.allclose(new[:, live], w[:, live], rtol=0, atol=1e-6) and bool((new[:, ~live] == 0).all())


def test_sparsegpt_errors():
    w, h = torch.randn(4, 8), torch.eye(8)
    with pytest.raises(ValueError, match="2-D"):
        sparsegpt_prune(torch.randn(8), h, n=2, m=4)
    with pytest.raises(ValueError, match=r"\[8, 8\] Hessian"):
        sparsegpt_prune(w, torch.eye(7), n=2, m=4)
    with pytest.raises(ValueError, match="cols % m"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), n=2, m=4)
    with pytest.raises(ValueError, match="implied"):
        sparsegpt_prune(w, h, n=2, m=4, sparsity=0.5)
    with pytest.raises(ValueError, match="unstructured"):
        sparsegpt_prune(w, h)
    with pytest.raises(ValueError, match="blocksize"):
        sparsegpt_prune(w, h, sparsity=0.5, blocksize=0)
    with pytest.raises(ValueError, match="positive definite"):
        sparsegpt_prune(w, -torch.eye(8), sparsity=0.5)


def test_resolve_importance_and_configs():
    assert isinstance(resolve_importance("Magnitude"), Magnitude)
    assert resolve_importance("l2", use="channels") == Magnitude(norm=2) and Magnitude(norm=2).name == "l2"
    assert isinstance(resolve_importance("bn_scale", use="channels"), BNScale)
    with pytest.raises(ValueError, match="does not serve weight pruning"):
        resolve_importance("bn_scale")
    with pytest.raises(ValueError, match="does not serve channel pruning"):
        resolve_importance("sparsegpt", use="channels")
    with pytest.raises(ValueError, match="norm 1 or 2"):
        Magnitude(norm=3)
    assert isinstance(resolve_importance("taylor"), Taylor) and resolve_importance("taylor").needs_loss
    assert isinstance(resolve_importance(Wanda), Wanda)
    crit = SparseGPT(blocksize=32, damp=0.1, dtype=torch.float32, sequential=False)
    assert resolve_importance(crit) is crit
    with pytest.raises(ValueError, match="expected one of"):
        resolve_importance("random")
    with pytest.raises(TypeError, match="expected one of"):
        resolve_importance(3)
    with pytest.raises(ValueError, match="blocksize"):
        SparseGPT(blocksize=0)
    with pytest.raises(ValueError, match="damp"):
        SparseGPT(damp=0.0)
    with pytest.raises(ValueError, match="dtype"):
        SparseGPT(dtype=torch.float16)


class _TokenModel(nn.Module):
    """Token layers (``[batch, seq, features]``), a mean over the real tokens, then a pooler on ``[batch, features]``."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(32, 8)
        self.fc = nn.Linear(8, 12)
        self.pool = nn.Linear(12, 4)

    def forward(self, input_ids, attention_mask=None):
        h = torch.relu(self.fc(self.emb(input_ids)))
        weight = torch.ones_like(input_ids, dtype=h.dtype) if attention_mask is None else attention_mask.to(h.dtype)
        return self.pool((h * weight.unsqueeze(-1)).sum(1) / weight.sum(1, keepdim=True))


def test_padded_positions_are_left_out_of_every_statistic():
    """One batch padded with pad tokens and an attention_mask gives the statistics of the same sequences unpadded:
    same row count, norms and Hessian for the token layer; the pooler's rows are sequences, not tokens, so it sees
    every row either way."""
    torch.manual_seed(0)
    model = _TokenModel().double()
    seqs = [torch.randint(1, 32, (n,)) for n in (3, 7, 5)]
    ids = torch.zeros(3, 7, dtype=torch.long)
    mask = torch.zeros(3, 7, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    layers = {"fc": model.fc, "pool": model.pool}
    padded = collect_input_statistics(model, layers, [{"input_ids": ids, "attention_mask": mask}], hessian=True,
                                      progress=False)
    alone = collect_input_statistics(model, layers, [{"input_ids": s[None]} for s in seqs], hessian=True,
                                     progress=False)
    assert padded["fc"].rows == alone["fc"].rows == 15
    assert_close_rel(padded["fc"].sq_norms, alone["fc"].sq_norms, torch.float32)
    assert_close_rel(padded["fc"].hessian, alone["fc"].hessian, torch.float32)
    assert padded["pool"].rows == alone["pool"].rows == 3
    assert_close_rel(padded["pool"].hessian, alone["pool"].hessian, torch.float32)
    x = torch.randn(2, 3, 4)
    tokens = torch.tensor([[True, False, True], [False, True, True]])
    assert torch.equal(real_token_rows(x.reshape(-1, 4), x, tokens), x[tokens])
    assert torch.equal(real_token_rows(x.reshape(-1, 4), x.reshape(6, 4), tokens), x[tokens])
    assert real_token_rows(x.reshape(-1, 4), x, None).shape == (6, 4)
    with pytest.raises(ValueError, match="attention_mask of 0"):
        collect_input_statistics(model, layers, [{"input_ids": ids, "attention_mask": mask * 2}], progress=False)


def test_conv1d_columns_and_per_layer_rules_match_the_whole_model_criteria():
    """A transformers Conv1D reads its input like a Linear; every criterion's per-layer rule (what the
    block-sequential pipeline runs) gives the mask its whole-model scores give."""
    from transformers.pytorch_utils import Conv1D

    from pruning.calibration import InputStatistics
    from pruning.patterns import parse_pattern, scores_to_mask

    conv = Conv1D(6, 8)
    x = torch.randn(2, 5, 8)
    assert torch.equal(layer_input_columns(conv, x), x.reshape(10, 8))
    with pytest.raises(ValueError, match=r"\[\.\.\., 8\]"):
        layer_input_columns(conv, torch.randn(3, 7))
    torch.manual_seed(3)
    matrix = torch.randn(6, 8, dtype=torch.float64)
    cols = torch.randn(40, 8, dtype=torch.float64)
    stats = InputStatistics(40, cols.square().sum(0), cols.T @ cols)
    pat = parse_pattern("2:4")
    assert torch.equal(Magnitude().prune_layer(matrix, None, pat, None)[1], nm_mask(matrix.abs(), 2, 4))
    new, keep = Wanda().prune_layer(matrix, stats, parse_pattern("unstructured"), 0.5)
    assert new is None and torch.equal(keep, scores_to_mask(wanda_scores(matrix, stats.sq_norms),
                                                            parse_pattern("unstructured"), 0.5, True))
    new, keep = SparseGPT(dtype=torch.float64).prune_layer(matrix, stats, pat, None)
    ref_new, ref_keep = sparsegpt_prune(matrix, stats.hessian, n=2, m=4)
    assert torch.equal(keep, ref_keep) and torch.equal(new, ref_new)
    assert (Magnitude.layer_inputs, Wanda.layer_inputs, SparseGPT.layer_inputs, Taylor.layer_inputs) == (
        "none", "norms", "hessian", None)
    assert SparseGPT().true_sequential and not SparseGPT(sequential=False).true_sequential
    with pytest.raises(NotImplementedError, match="no per-layer rule"):
        Taylor().prune_layer(matrix, stats, pat, None)
