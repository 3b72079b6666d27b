"""One scoring protocol for weight and channel pruning: Taylor computed once and leaving the caller's gradients,
``requires_grad`` flags and train / eval modes alone; a user criterion registered once serves both kinds of
pruning; Wanda scores channels too."""
import copy
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruning
from pruning.channels import DependencyGraph, group_importance, mask_channels, prune_channels
from pruning.importance import ScoreCriterion, Taylor, register_criterion, resolve_importance
from tolerances import RTOL, assert_close_rel, rel_error


def _cnn():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 6, 3), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 4))


def _batches(n=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(4, 3, 8, 8, generator=g), torch.randint(0, 4, (4,), generator=g)) for _ in range(n)]


def _ce(model, batch):
    return F.cross_entropy(model(batch[0]), batch[1])


def _with_caller_state(model):
    """Pre-existing gradients on every parameter, a frozen parameter, and mixed train / eval modes."""
    model.train()
    model[1].eval()
    model[0].bias.requires_grad_(False)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return {n: p.grad.clone() for n, p in model.named_parameters()}


def _assert_caller_state_kept(model, grads):
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), f"{n}.grad was changed"
    assert not model[0].bias.requires_grad and model[0].weight.requires_grad
    assert model.training and not model[1].training and all(m.training for i, m in enumerate(model) if i != 1)


def test_taylor_leaves_gradients_flags_and_modes_alone_for_weights_and_channels():
    torch.manual_seed(0)
    model = _cnn()
    grads = _with_caller_state(model)
    bn_stats = model[1].running_mean.clone()
    batches = _batches()
    names = ["0.weight", "3.weight", "1.weight"]
    weight_scores = Taylor().scores(model, names, batches, _ce, progress=False)
    _assert_caller_state_kept(model, grads)
    channel_scores = Taylor().channel_scores(model, {"0.weight": [0], "3.weight": [0, 1]}, batches, _ce, progress=False)
    _assert_caller_state_kept(model, grads)
    graph = DependencyGraph(model, batches[0][0])
    _assert_caller_state_kept(model, grads)
    group_importance(model, graph, "taylor", calib=batches, progress=False)  # the default loss: cross-entropy
    _assert_caller_state_kept(model, grads)
    report = pruning.prune_weights(model, "unstructured", "taylor", sparsity=0.3, calib=batches, loss_fn=_ce,
                                   progress=False)
    assert report.layers and all(layer.importance == "taylor" for layer in report.layers)
    _assert_caller_state_kept(model, grads)
    assert torch.equal(model[1].running_mean, bn_stats), "scoring must not touch BatchNorm statistics"

    # both reductions come from the same products: per element sum_b |w g_b|, per channel sum_b |sum_slice w g_b|
    fresh = _cnn()
    fresh.load_state_dict(model.state_dict(), strict=False)
    fresh.eval()
    expect_elem = torch.zeros_like(fresh[3].weight)
    expect_chan = torch.zeros(8, dtype=torch.float64)
    for b in batches:
        (g,) = torch.autograd.grad(_ce(fresh, b), [fresh[3].weight])
        product = (fresh[3].weight * g).detach()
        expect_elem += product.abs()
        expect_chan += product.double().sum((0, 2, 3)).abs()
    weight_scores = Taylor().scores(fresh, ["3.weight"], batches, _ce, progress=False)
    assert rel_error(weight_scores["3.weight"], expect_elem) <= RTOL[torch.float32]
    channel_scores = Taylor().channel_scores(fresh, {"3.weight": [1]}, batches, _ce, progress=False)
    assert rel_error(channel_scores[("3.weight", 1)], expect_chan) <= RTOL[torch.float32]


@dataclass(frozen=True)
class Smallest(ScoreCriterion):
    """The reverse of magnitude: the largest weights score lowest (so a test can tell it was used)."""

    name = "smallest"

    def scores(self, model, names, calib=None, loss_fn=None, *, progress=True):
        return {n: -model.get_parameter(n).detach().abs() for n in names}


def test_a_registered_criterion_serves_weight_and_channel_pruning():
    torch.manual_seed(1)
    model = _cnn().eval()
    with torch.no_grad():
        model[0].weight[5] *= 100.0  # filter 5 is by far the largest
    x = torch.randn(2, 3, 8, 8)
    with register_criterion("Smallest", Smallest):
        assert isinstance(resolve_importance("smallest"), Smallest)
        masked = copy.deepcopy(model)
        report = pruning.prune_weights(masked, "unstructured", "smallest", sparsity=0.5, progress=False)
        assert report.importance == "smallest"
        w = model[0].weight.detach().abs()
        kept = masked[0].weight_mask
        assert w[kept].max() <= w[~kept].min(), "the largest weights must be the ones pruned"
        _, by_smallest = prune_channels(model, x, ratio=0.25, importance="smallest", return_report=True,
                                        progress=False)
        assert 5 not in by_smallest.param_keep["0.weight"][0] and by_smallest.importance == "smallest"
    _, by_l1 = prune_channels(model, x, ratio=0.25, importance="l1", return_report=True, progress=False)
    assert 5 in by_l1.param_keep["0.weight"][0]
    with pytest.raises(ValueError, match="expected one of"):
        resolve_importance("smallest")  # unregistered again
    with pytest.raises(TypeError, match="non-empty string"):
        register_criterion("", Smallest)
    with pytest.raises(TypeError, match="callable"):
        register_criterion("x", 3)


def test_wanda_scores_channels_and_sparsegpt_does_not():
    torch.manual_seed(2)
    model = _cnn().double().eval()
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    calib = [b[0].double() for b in _batches()]
    pruned, report = prune_channels(model, x, ratio=0.5, importance="wanda", calib=calib, return_report=True,
                                    progress=False)
    assert report.importance == "wanda" and pruned[0].out_channels == 4
    with torch.no_grad():
        assert_close_rel(pruned(x), mask_channels(model, report)(x), torch.float32, factor=1e-6)
    with pytest.raises(ValueError, match="needs calib"):
        prune_channels(model, x, importance="wanda", progress=False)
    with pytest.raises(ValueError, match="does not serve channel pruning"):
        prune_channels(model, x, importance="sparsegpt", calib=calib, progress=False)
    with pytest.raises(ValueError, match="does not serve weight pruning"):
        pruning.prune_weights(model, "unstructured", "bn_scale", sparsity=0.5, progress=False)


def test_a_registration_can_override_a_builtin_and_is_undone_in_order():
    outer = register_criterion("magnitude", Smallest)
    inner = register_criterion("magnitude", Taylor)
    assert isinstance(resolve_importance("magnitude"), Taylor)
    inner.remove()
    assert isinstance(resolve_importance("magnitude"), Smallest)
    outer.remove()
    assert resolve_importance("magnitude") == pruning.Magnitude()
    with register_criterion("broken", lambda: "not a criterion"), pytest.raises(TypeError, match="returned a str"):
        resolve_importance("broken")
