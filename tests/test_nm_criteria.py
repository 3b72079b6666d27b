"""N:M criteria beyond SparseGPT (RIA, ALPS): their formulas, that they plug into prune_weights by name once
pruning.nm_criteria is imported, that ALPS reconstructs a layer better than SparseGPT, and that they combine
with channel permutation (score -> permute -> mask)."""
import copy

import pytest
import torch
from torch import nn

import pruning
from pruning.channels.permute import permute_for_nm
from pruning.importance import resolve_importance
from pruning.nm_criteria import ALPS, RIA, alps_prune, layer_score_matrices, refit_masked, ria_scores
from pruning.patterns import nm_mask, weight_matrix
from pruning.permutation import SearchConfig
from pruning.sparsegpt import sparsegpt_prune
from tolerances import rel_error


def correlated_inputs(rows, cols, gen):
    """Inputs with correlated features and a few outlier channels, as real layer inputs have."""
    mix = torch.randn(cols, cols, generator=gen) / cols**0.5 + torch.eye(cols)
    x = torch.randn(rows, cols, generator=gen) @ mix
    x[:, :3] *= 8
    return x.double()


def layer_error(w, w0, h):
    d = (w - w0).double()
    return float(torch.einsum("ij,jk,ik->", d, h, d) / torch.einsum("ij,jk,ik->", w0.double(), h, w0.double()))


def mlp(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 24), nn.GELU(), nn.Linear(24, 8))


def test_ria_scores_formula_and_registration():
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(5, 8, generator=gen)
    sq = torch.rand(8, generator=gen) + 0.1
    a = w.abs().double()
    want = (a / a.sum(1, keepdim=True) + a / a.sum(0, keepdim=True)) * sq.double().sqrt() ** 0.5
    torch.testing.assert_close(ria_scores(w, sq), want)
    assert isinstance(resolve_importance("ria"), RIA) and isinstance(resolve_importance("ALPS"), ALPS)
    with pytest.raises(ValueError, match="sq_norms of shape \\(8,\\)"):
        ria_scores(w, torch.rand(7))
    with pytest.raises(ValueError, match="alpha"):
        RIA(alpha=-1)


@pytest.mark.parametrize("name", ["ria", "alps"])
def test_prune_weights_by_name_gives_exact_24(name):
    model = mlp()
    calib = [torch.randn(20, 16) for _ in range(3)]
    report = pruning.prune_weights(model, "2:4", name, calib=calib, progress=False)
    assert report.importance == name and len(report.layers) == 3
    for layer in report.layers:
        mask = model.get_submodule(layer.name).weight_mask
        assert (mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all()


def test_alps_unstructured_budget_is_exact():
    model = mlp(1)
    report = pruning.prune_weights(model, "unstructured", "alps", sparsity=0.6, calib=[torch.randn(40, 16)],
                                   progress=False)
    assert all(layer.pruned == round(0.6 * layer.numel) for layer in report.layers)


def test_alps_reconstructs_a_layer_better_than_sparsegpt():
    gen = torch.Generator().manual_seed(2)
    x = correlated_inputs(512, 64, gen)
    w0 = torch.randn(48, 64, generator=gen, dtype=torch.float64)
    h = x.T @ x
    sgpt, _ = sparsegpt_prune(w0, h, n=2, m=4)
    alps, mask = alps_prune(w0, h, n=2, m=4)
    assert (mask.reshape(48, -1, 4).sum(-1) == 2).all() and torch.equal(alps != 0, mask & (alps != 0))
    assert layer_error(alps, w0, h) < 0.8 * layer_error(sgpt, w0, h)


def test_refit_masked_is_the_least_squares_solution():
    gen = torch.Generator().manual_seed(3)
    x = correlated_inputs(200, 12, gen)
    h = x.T @ x + 0.1 * torch.eye(12, dtype=torch.float64)
    w0 = torch.randn(3, 12, generator=gen, dtype=torch.float64)
    mask = nm_mask(torch.rand(3, 12, generator=gen), 2, 4)
    got = refit_masked(w0, h, mask, iters=50, tol=1e-12)
    for r in range(3):  # per row: H_SS w_S = (H w0)_S
        s = mask[r]
        exact = torch.linalg.solve(h[s][:, s], (h @ w0[r])[s])
        torch.testing.assert_close(got[r, s], exact, rtol=1e-7, atol=1e-9)
        assert (got[r, ~s] == 0).all()


def test_alps_errors_and_model_left_unchanged_on_failure():
    with pytest.raises(ValueError, match="damp"):
        ALPS(damp=0)
    with pytest.raises(ValueError, match="iters"):
        ALPS(iters=-1)
    with pytest.raises(ValueError, match="\\[out, cols\\] weight"):
        alps_prune(torch.rand(4, 8), torch.rand(7, 7), n=2, m=4)
    with pytest.raises(ValueError, match="sparsity"):
        alps_prune(torch.rand(4, 8), torch.eye(8))

    class Guard(nn.Module):
        """Fails once the layer it watches has been pruned: the failure comes after a layer was rewritten."""

        def __init__(self, watched):
            super().__init__()
            self.watched = [watched]

        def forward(self, x):
            if (self.watched[0].weight == 0).any():
                raise RuntimeError("watched layer pruned")
            return x

    model = mlp(4)
    model.insert(1, Guard(model[0]))
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(RuntimeError, match="watched layer pruned"):
        pruning.prune_weights(model, "2:4", "alps", calib=[torch.randn(10, 16)], progress=False)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


def test_layer_score_matrices():
    model = mlp(5)
    calib = [torch.randn(12, 16)]
    scores = layer_score_matrices(model, ["0", "2"], "ria", calib, progress=False)
    assert set(scores) == {"0", "2"} and scores["2"].shape == (24, 32)
    assert torch.equal(layer_score_matrices(model, ["4"], "magnitude", progress=False)["4"],
                       weight_matrix(model[4].weight).abs())
    with pytest.raises(ValueError, match="needs calib"):
        layer_score_matrices(model, ["0"], "wanda")
    with pytest.raises(ValueError, match="chooses masks itself"):
        layer_score_matrices(model, ["0"], "alps", calib)


def test_score_permute_mask_pipeline_keeps_the_function_and_helps():
    """RIA scores -> permutation (in place where the graph allows, gathered by the runtime elsewhere) ->
    ALPS masks in the permuted order; before pruning the model is unchanged in function."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8)).double()
    calib = [torch.randn(64, 16, dtype=torch.float64) * torch.linspace(0.2, 4, 16, dtype=torch.float64)
             for _ in range(2)]
    x = calib[0][:8]
    ref = model(x)
    dense = copy.deepcopy(model)
    plain = copy.deepcopy(model)
    report = permute_for_nm(model, x, "ria", calib=calib, config=SearchConfig(max_sweeps=10), progress=False)
    assert rel_error(model(x), ref) < 1e-12
    assert set(report.runtime_permutations) == {"0"}  # it reads the model input
    assert report.layer("2").carried_by == "model" and report.layer("2").kept >= report.layer("2").kept_identity
    pruning.prune_weights(model, "2:4", "alps", calib=calib, progress=False)  # "0" in its input_perm order
    pruning.prune_weights(plain, "2:4", "alps", calib=calib, progress=False)
    perm0 = report.runtime_permutations["0"]
    assert (model[0].weight_mask[:, perm0].reshape(32, -1, 4).sum(-1) == 2).all()  # N:M in the gathered order
    assert (model[2].weight_mask.reshape(32, -1, 4).sum(-1) == 2).all()  # contiguous N:M: permuted in place
    y = torch.cat(calib)
    with torch.no_grad():
        err_perm, err_plain = rel_error(model(y), dense(y)), rel_error(plain(y), dense(y))
    assert err_perm < 1.2 * err_plain, (err_perm, err_plain)
