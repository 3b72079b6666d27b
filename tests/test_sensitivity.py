"""Sensitivity analysis: curves, the model left untouched, and the automatic allocation."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pruning import prune_weights, sensitivity_analysis
from pruning.sensitivity import SensitivityResult


class Net(nn.Module):
    """``sensitive`` feeds the output through a 20x gain; ``robust`` is damped by 0.05."""

    def __init__(self):
        super().__init__()
        self.sensitive = nn.Linear(16, 16)
        self.robust = nn.Linear(16, 16)
        self.head = nn.Linear(32, 4)

    def forward(self, x):
        return self.head(torch.cat([20.0 * self.sensitive(x), 0.05 * self.robust(x)], dim=-1))


def _calib(n=3):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(8, 16, generator=g) for _ in range(n)]


def test_curves_rank_and_allocation():
    torch.manual_seed(0)
    model = Net()
    state = copy.deepcopy(model.state_dict())
    result = sensitivity_analysis(model, _calib(), sparsities=(0.2, 0.5, 0.8), progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), "analysis must leave the model unchanged"
    assert result.metric == "output_error" and result.sparsities == (0.2, 0.5, 0.8)
    assert set(result.curves) == {"sensitive", "robust", "head"}
    for curve in result.curves.values():
        assert all(v > 0 for v in curve) and list(curve) == sorted(curve)
    assert result.ranking()[0] == "robust" and result.curves["sensitive"][-1] > 10 * result.curves["robust"][-1]

    alloc = result.allocate(0.5)
    overall = sum(alloc[n] * result.numels[n] for n in alloc) / sum(result.numels.values())
    assert overall == pytest.approx(0.5, abs=1e-9)
    assert alloc["robust"] > alloc["sensitive"]
    assert all(0.0 <= s <= 0.8 for s in alloc.values())
    bounded = result.allocate(0.4, min_sparsity=0.3, max_sparsity=0.6)
    assert all(0.3 - 1e-12 <= s <= 0.6 + 1e-12 for s in bounded.values())
    # the allocation plugs into prune_weights and beats a uniform budget of the same size
    pruned, uniform = copy.deepcopy(model), copy.deepcopy(model)
    prune_weights(pruned, "unstructured", sparsity=alloc, progress=False)
    prune_weights(uniform, "unstructured", sparsity=0.5, progress=False)
    x = torch.randn(64, 16)
    ref = model(x)
    assert (pruned(x) - ref).norm() < (uniform(x) - ref).norm()
    assert result.to_dict()["curves"]["robust"] == list(result.curves["robust"])


def test_loss_metric_nm_and_wanda():
    torch.manual_seed(1)
    model = Net()
    with torch.no_grad():  # the dense model's own predictions: pruning can only raise the loss much
        batches = [(x, model(x).argmax(-1)) for x in _calib()]

    def loss_fn(m, b):
        return F.cross_entropy(m(b[0]), b[1])

    result = sensitivity_analysis(model, batches, loss_fn=loss_fn, importance="taylor", sparsities=(0.5, 0.9), progress=False)
    assert result.metric == "loss_increase" and result.dense_loss >= 0
    assert result.curves["sensitive"][-1] > result.curves["robust"][-1]
    nm = sensitivity_analysis(model, _calib(), pattern="2:4", importance="wanda", progress=False)
    assert nm.sparsities == (0.5,) and nm.pattern == "2:4"
    with pytest.raises(ValueError, match="fixed sparsity"):
        nm.allocate(0.5)
    skipped = sensitivity_analysis(nn.Sequential(nn.Linear(6, 4), nn.Linear(4, 4)), [torch.randn(2, 6)], pattern="2:4", progress=False)
    assert "not a multiple of m=4" in skipped.skipped["0"] and list(skipped.curves) == ["1"]


def test_sensitivity_error_paths():
    model = Net()
    calib = _calib()
    cases = [
        (TypeError, "nn.Module", dict(model=None)),
        (TypeError, "iterable of batches", dict(calib=None)),
        (ValueError, "re-iterable", dict(calib=iter(calib))),
        (ValueError, "global", dict(pattern="global")),
        (ValueError, "sparsegpt", dict(importance="sparsegpt")),
        (ValueError, "needs loss_fn", dict(importance="taylor")),
        (TypeError, "loss_fn", dict(loss_fn="mse")),
        (TypeError, "filter_fn", dict(filter_fn=1)),
        (ValueError, "strictly increasing", dict(sparsities=(0.5, 0.2))),
        (ValueError, "strictly increasing", dict(sparsities=(0.0, 0.5))),
        (ValueError, "non-empty", dict(sparsities=())),
    ]
    for exc, match, kwargs in cases:
        kwargs = {"model": model, "calib": calib, "progress": False, **kwargs}
        with pytest.raises(exc, match=match):
            sensitivity_analysis(**kwargs)
    result = sensitivity_analysis(model, calib, sparsities=(0.5, 0.75), progress=False)
    with pytest.raises(ValueError, match="target_sparsity"):
        result.allocate(0.9)
    with pytest.raises(ValueError, match="not extrapolated"):
        result.allocate(0.5, max_sparsity=0.95)
    with pytest.raises(ValueError, match="no layer"):
        SensitivityResult("output_error", "unstructured", "magnitude", (0.5,), {}, {}, None, {}).allocate(0.3)
