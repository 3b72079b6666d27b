"""Channel pruning: the physically smaller model equals the masked dense model, on several architectures;
selection, rounding, importance criteria, iterative pruning, the report and every error path."""
import copy

import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pruning.channels import (
    ChannelPruningReport,
    TraceError,
    bn_scale_penalty,
    mask_channels,
    prune_channels,
)
from test_pruning_batches import TwoInputs
from tolerances import assert_close_rel


def conv_bn(cin, cout, k=3, groups=1, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU())


class PlainCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(conv_bn(3, 12), nn.MaxPool2d(2), conv_bn(12, 20), nn.Conv2d(20, 16, 1),
                                      nn.AdaptiveAvgPool2d(3))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(16 * 3 * 3, 11), nn.ReLU(), nn.Linear(11, 5))

    def forward(self, x):
        return self.head(self.features(x))


class Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 14)
        self.a = nn.Sequential(conv_bn(14, 10), nn.Conv2d(10, 14, 3, padding=1), nn.BatchNorm2d(14))
        self.down = nn.Sequential(nn.Conv2d(14, 18, 1, stride=2, bias=False), nn.BatchNorm2d(18))
        self.b = nn.Sequential(conv_bn(14, 9, stride=2), nn.Conv2d(9, 18, 3, padding=1), nn.BatchNorm2d(18))
        self.fc = nn.Linear(18, 4)

    def forward(self, x):
        x = self.stem(x)
        x = F.relu(x + self.a(x))
        x = self.down(x) + self.b(x)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Concat(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 8)
        self.b1 = conv_bn(8, 6, k=1)
        self.b2 = conv_bn(8, 10)
        self.mix = conv_bn(8 + 6 + 10, 12)
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        x = torch.cat([x, self.b1(x), self.b2(x)], dim=1)
        return self.fc(self.mix(x).mean((2, 3)))


class Depthwise(nn.Module):
    """MobileNetV2-style inverted residual with a depthwise conv and a squeeze-and-excitation gate."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 12)
        self.expand = conv_bn(12, 24, k=1)
        self.dw = conv_bn(24, 24, groups=24)
        self.se1 = nn.Conv2d(24, 6, 1)
        self.se2 = nn.Conv2d(6, 24, 1)
        self.project = nn.Sequential(nn.Conv2d(24, 12, 1, bias=False), nn.BatchNorm2d(12))
        self.fc = nn.Linear(12, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.dw(self.expand(x))
        s = torch.sigmoid(self.se2(F.relu(self.se1(y.mean((2, 3), keepdim=True)))))
        x = x + self.project(y * s)
        return self.fc(x.mean((2, 3)))


class Grouped(nn.Module):
    """ResNeXt-style grouped conv (4 groups), a GroupNorm and a channel shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.reduce = conv_bn(16, 24, k=1)
        self.grouped = nn.Conv2d(24, 32, 3, padding=1, groups=4, bias=False)
        self.gn = nn.GroupNorm(8, 32)
        self.out = nn.Sequential(nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        y = self.reduce(x)
        b, c, h, w = y.shape
        y = y.view(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w)  # channel shuffle
        y = F.relu(self.gn(self.grouped(y)))
        x = x + self.out(y)
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Shuffle(nn.Module):
    """ShuffleNetV2 unit: chunk, branch, concat, shuffle."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.branch = nn.Sequential(conv_bn(8, 8, k=1), conv_bn(8, 8, groups=8), conv_bn(8, 8, k=1))
        self.fc = nn.Linear(16, 3)

    def forward(self, x):
        x = self.stem(x)
        x1, x2 = x.chunk(2, dim=1)
        x = torch.cat([x1, self.branch(x2)], dim=1)
        b, c, h, w = x.shape
        x = x.view(b, 2, c // 2, h, w).transpose(1, 2).contiguous().view(b, c, h, w)
        return self.fc(x.mean((2, 3)))


ARCHS = [PlainCNN, Residual, Concat, Depthwise, Grouped, Shuffle]


def randomize(model: nn.Module) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so the equivalence test sees them."""
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.GroupNorm)):
            with torch.no_grad():
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
                if isinstance(m, nn.BatchNorm2d):
                    m.running_mean.uniform_(-0.5, 0.5)
                    m.running_var.uniform_(0.5, 2.0)
    return model.eval()


def state_equal(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ARCHS, ids=lambda a: a.__name__)
def test_pruned_equals_masked_float64(arch):
    model = randomize(arch()).double()
    x = torch.randn(3, 3, 13, 13, dtype=torch.float64)
    original = copy.deepcopy(model)
    pruned, report = prune_channels(model, x, ratio=0.4, return_report=True, progress=False)
    assert state_equal(model, original), "the input model was modified"
    assert report.params_after < report.params_before
    assert report.macs_after < report.macs_before
    masked = mask_channels(model, report).eval()
    pruned.eval()
    with torch.no_grad():
        out, ref, dense = pruned(x), masked(x), model(x)
    assert out.shape == dense.shape
    assert_close_rel(out, ref, torch.float32, factor=1e-6)  # float64: ~1e-11
    # pruning changed the function (the test is not vacuous)
    assert (out - dense).norm() > 1e-6 * dense.norm()


def test_grouped_and_depthwise_keep_group_structure():
    model = randomize(Grouped())
    pruned = prune_channels(model, torch.randn(1, 3, 9, 9), ratio=0.5, progress=False)
    g = pruned.grouped
    assert g.groups < 4 or g.out_channels < 32
    assert g.in_channels == g.groups * g.weight.shape[1]
    assert g.out_channels % g.groups == 0
    assert pruned.gn.num_channels == g.out_channels and g.out_channels % pruned.gn.num_groups == 0
    model = randomize(Depthwise())
    pruned = prune_channels(model, torch.randn(1, 3, 9, 9), ratio=0.5, progress=False)
    assert pruned.dw[0].groups == pruned.dw[0].in_channels == pruned.dw[0].out_channels == 12


def test_model_untouched_on_error_and_train_mode_kept():
    model = PlainCNN().train()
    before = copy.deepcopy(model)
    with pytest.raises(TraceError, match="forward pass failed"):
        prune_channels(model, torch.randn(1, 5, 12, 12), progress=False)  # wrong input channels
    assert state_equal(model, before) and model.training
    pruned = prune_channels(model, torch.randn(1, 3, 12, 12), progress=False)
    assert pruned.training and pruned is not model
    assert state_equal(model, before)


def test_round_to_and_per_layer():
    model = randomize(Residual())
    x = torch.randn(1, 3, 12, 12)
    pruned = prune_channels(model, x, ratio=0.3, round_to=4, progress=False)
    for conv in (pruned.stem[0], pruned.a[0][0], pruned.b[0][0], pruned.down[0]):
        assert conv.out_channels % 4 == 0, conv
    pruned = prune_channels(model, x, ratio=0.0, per_layer={"a.0.0": 0.5}, progress=False)
    assert pruned.a[0][0].out_channels == 5
    assert pruned.stem[0].out_channels == 14 and pruned.b[0][0].out_channels == 9


def test_global_pruning_prunes_unimportant_group_more():
    model = randomize(PlainCNN())
    with torch.no_grad():
        model.features[2][0].weight.mul_(1e-3)  # the second conv's filters are all tiny
    pruned = prune_channels(model, torch.randn(1, 3, 12, 12), ratio=0.3, global_pruning=True, progress=False)
    assert pruned.features[2][0].out_channels < 20 * 0.7
    assert pruned.features[0][0].out_channels >= 12 * 0.7


@pytest.mark.parametrize("importance", ["l1", "l2", "bn_scale", "taylor"])
def test_importance_removes_the_weak_channels(importance):
    torch.manual_seed(1)
    model = randomize(PlainCNN())
    weak = [1, 4, 7, 9, 10, 11]
    with torch.no_grad():
        model.features[0][0].weight[weak] *= 1e-3
        model.features[0][1].weight[weak] = 1e-3
        model.features[2][0].weight[:, weak] *= 1e-3
    x = torch.randn(4, 3, 12, 12)
    calib = [(torch.randn(4, 3, 12, 12), torch.randint(0, 5, (4,))) for _ in range(2)]
    _, report = prune_channels(model, x, ratio=0.5, importance=importance, calib=calib, return_report=True,
                               progress=False)
    kept = set(report.param_keep["features.0.0.weight"][0])
    assert kept == set(range(12)) - set(weak)


def test_bn_scale_penalty():
    model = PlainCNN()
    with torch.no_grad():
        model.features[0][1].weight.fill_(-2.0)
        model.features[2][1].weight.fill_(0.5)
    pen = bn_scale_penalty(model, strength=0.1)
    assert torch.allclose(pen, torch.tensor(0.1 * (12 * 2.0 + 20 * 0.5)))
    pen.backward()
    assert model.features[0][1].weight.grad is not None
    assert float(bn_scale_penalty(nn.Linear(2, 2))) == 0.0
    with pytest.raises(ValueError, match="strength"):
        bn_scale_penalty(model, strength=-1.0)
    with pytest.raises(TypeError, match="nn.Module"):
        bn_scale_penalty("model")


def test_report_counts():
    model = randomize(Residual())
    x = torch.randn(2, 3, 12, 12)
    pruned, report = prune_channels(model, x, ratio=0.5, return_report=True, progress=False)
    assert isinstance(report, ChannelPruningReport)
    assert report.params_before == sum(p.numel() for p in model.parameters())
    assert report.params_after == sum(p.numel() for p in pruned.parameters())
    # MACs of a conv by hand: stem conv 3->14, 3x3, 12x12 output, batch 2
    assert report.layers["stem.0"].macs_before == 2 * 14 * 3 * 9 * 144
    assert report.layers["stem.0"].macs_after == 2 * pruned.stem[0].out_channels * 3 * 9 * 144
    assert report.macs_after == sum(s.macs_after for s in report.layers.values())
    assert report.mac_reduction > 2.0
    pruned_groups = report.pruned_groups
    assert pruned_groups and all(g.channels_after < g.channels_before for g in pruned_groups)
    assert any(g.kept_reason and "output" in g.kept_reason for g in report.groups)
    assert "MACs" in report.summary()


def test_iterative_pruning_with_finetune():
    pytest.importorskip("pruning.training")
    torch.manual_seed(0)
    model = randomize(PlainCNN()).train()
    data = [(torch.randn(8, 3, 12, 12), torch.randint(0, 5, (8,))) for _ in range(2)]
    pruned, report = prune_channels(model, torch.randn(1, 3, 12, 12), ratio=0.5, steps=2, finetune_data=data,
                                    finetune_kwargs={"epochs": 1, "lr": 1e-3}, return_report=True,
                                    progress=False)
    assert report.steps == 2
    # two steps of 1 - sqrt(0.5) each leave about half of the 12 stem channels
    assert 5 <= pruned.features[0][0].out_channels <= 7
    assert pruned(torch.randn(2, 3, 12, 12)).shape == (2, 5)
    # composite kept indices refer to the original model
    keep = report.param_keep["features.0.0.weight"][0]
    assert len(keep) == pruned.features[0][0].out_channels and max(keep) < 12


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        ({"ratio": 1.0}, ValueError, "ratio"),
        ({"ratio": -0.1}, ValueError, "ratio"),
        ({"ratio": float("nan")}, ValueError, r"0 <= ratio < 1, got nan"),
        ({"per_layer": {"features.0.0": float("inf")}}, ValueError, r"0 <= per_layer\['features.0.0'\] < 1, got inf"),
        ({"ratio": "half"}, TypeError, "ratio"),
        ({"importance": "random"}, ValueError, "importance"),
        ({"round_to": 0}, ValueError, "round_to"),
        ({"steps": 0}, ValueError, "steps"),
        ({"per_layer": {"nope": 0.5}}, ValueError, "nope"),
        ({"per_layer": {"features.0.0": 2.0}}, ValueError, "per_layer"),
        ({"per_layer": [0.5]}, TypeError, "per_layer"),
        ({"ignore": ["nope"]}, ValueError, "nope"),
        ({"ignore": [nn.Linear(2, 2)]}, ValueError, "not a submodule"),
        ({"ignore": [3]}, TypeError, "ignore"),
        ({"importance": "taylor"}, ValueError, "calib"),
        ({"finetune_kwargs": [1]}, TypeError, "finetune_kwargs"),
        ({"max_group_ratio": 1.5}, ValueError, "max_group_ratio"),
    ],
)
def test_argument_errors(kwargs, exc, match):
    with pytest.raises(exc, match=match):
        prune_channels(PlainCNN(), torch.randn(1, 3, 12, 12), progress=False, **kwargs)


def test_type_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        prune_channels("resnet", torch.randn(1))
    with pytest.raises(TypeError, match="example_inputs"):
        prune_channels(PlainCNN(), 3.0)
    with pytest.raises(TypeError, match="ChannelPruningReport"):
        mask_channels(PlainCNN(), {})
    with pytest.raises(TypeError, match="nn.Module"):
        mask_channels(None, None)


def test_mask_channels_rejects_foreign_report():
    _, report = prune_channels(PlainCNN(), torch.randn(1, 3, 12, 12), return_report=True, progress=False)
    with pytest.raises(ValueError, match="lacks"):
        mask_channels(Residual(), report)


def test_taylor_default_loss_needs_targets():
    with pytest.raises(TypeError, match="loss_fn"):
        prune_channels(PlainCNN(), torch.randn(1, 3, 12, 12), importance="taylor",
                       calib=[torch.randn(2, 3, 12, 12)], progress=False)
    with pytest.raises(ValueError, match="empty"):
        prune_channels(PlainCNN(), torch.randn(1, 3, 12, 12), importance="taylor", calib=[], progress=False)


def test_dict_and_tuple_inputs():
    m = TwoInputs()
    x = torch.randn(2, 6)
    p1 = prune_channels(m, (x,), ratio=0.5, progress=False)
    p2 = prune_channels(m, {"x": x, "scale": 2.0}, ratio=0.5, progress=False)
    p3 = prune_channels(m, [x, 2.0], ratio=0.5, progress=False)
    assert p1.a.out_features == p2.a.out_features == p3.a.out_features == 4 and p1.b.in_features == 4


def test_taylor_with_custom_loss_and_bn_scale_fallback():
    model = randomize(PlainCNN())
    x = torch.randn(2, 3, 12, 12)
    calib = [torch.randn(2, 3, 12, 12) for _ in range(2)]
    calls = []

    def loss_fn(m, batch):
        calls.append(batch.shape)
        return m(batch).pow(2).mean()

    pruned = prune_channels(model, x, ratio=0.5, importance="taylor", calib=calib, loss_fn=loss_fn,
                            progress=False)
    assert len(calls) == 2 and pruned.features[0][0].out_channels == 6
    assert all(p.grad is None for p in model.parameters())  # the input model saw no backward pass
    # a loss that is not a scalar, or carries no gradient, is reported (not as autograd's bare RuntimeError)
    before = copy.deepcopy(model)
    with pytest.raises(TypeError, match=r"scalar tensor, got a tensor of shape \(2, 5\)"):
        prune_channels(model, x, ratio=0.5, importance="taylor", calib=calib, loss_fn=lambda m, b: m(b),
                       progress=False)
    with pytest.raises(ValueError, match="without a gradient"):
        prune_channels(model, x, ratio=0.5, importance="taylor", calib=calib,
                       loss_fn=lambda m, b: m(b).pow(2).mean().detach(), progress=False)
    assert state_equal(model, before)
    # bn_scale: features.3 (a conv without BatchNorm) still gets pruned, by its weights' L1 norm
    pruned = prune_channels(model, x, ratio=0.5, importance="bn_scale", progress=False)
    assert pruned.features[3].out_channels == 8 and pruned.head[1].in_features == 8 * 9


class ConcatSE(nn.Module):
    """Residual stem -> depthwise/pointwise branch, ``cat([y, z])`` gated by squeeze-and-excitation: the
    concatenation joins the stem's channels and the pointwise conv's into one group whose spaces each hold
    only part of its units (the SE gate spans all 40)."""

    def __init__(self):
        super().__init__()
        self.stem = conv_bn(3, 16)
        self.a = nn.Conv2d(16, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.pw = nn.Conv2d(16, 24, 1)
        self.f1, self.f2 = nn.Conv2d(40, 10, 1), nn.Conv2d(10, 40, 1)
        self.fc = nn.Linear(40, 7)

    def forward(self, x):
        x = self.stem(x)
        y = x + self.bn(self.a(x))
        c = torch.cat([y, self.pw(self.dw(y))], 1)
        c = c * torch.sigmoid(self.f2(F.relu(self.f1(c.mean((2, 3), keepdim=True)))))
        return self.fc(c.mean((2, 3)))


@pytest.mark.parametrize("ratio", [0.4, 0.99])
def test_concat_gated_by_se_is_pruned_and_no_part_emptied(ratio):
    """This group must be pruned, not kept whole as "units of unequal sizes" (MACs would not drop at any
    ratio); at ratio 0.99 every part of the concatenation must still keep a channel."""
    model = randomize(ConcatSE()).double()
    x = torch.randn(2, 3, 11, 11, dtype=torch.float64)
    original = copy.deepcopy(model)
    pruned, report = prune_channels(model, x, ratio=ratio, return_report=True, progress=False)
    assert state_equal(model, original)
    assert report.kept == ("model output: output shapes are kept",)
    assert report.macs_after < 0.6 * report.macs_before
    stem, pw = pruned.stem[0].out_channels, pruned.pw.out_channels
    assert 1 <= stem < 16 and 1 <= pw < 24
    assert pruned.f2.out_channels == pruned.fc.in_features == stem + pw
    assert pruned.dw.groups == pruned.dw.out_channels == stem
    if ratio == 0.99:
        assert (stem, pw) == (1, 1)
    masked = mask_channels(model, report).eval()
    with torch.no_grad():
        out, ref = pruned.eval()(x), masked(x)
    assert out.shape == (2, 7)
    assert_close_rel(out, ref, torch.float32, factor=1e-6)


class TiedLinears(nn.Module):
    """``l2`` shares ``l1``'s weight; with ``first_tied`` the model input feeds ``l1`` directly."""

    def __init__(self, first_tied: bool):
        super().__init__()
        self.first_tied = first_tied
        self.a = nn.Linear(5, 8)
        self.l1, self.l2 = nn.Linear(8, 8), nn.Linear(8, 8)
        self.l2.weight = self.l1.weight
        self.o = nn.Linear(8, 3)

    def forward(self, x):
        h = x if self.first_tied else F.relu(self.a(x))
        return self.o(F.relu(self.l2(F.relu(self.l1(h)))))


def test_tied_weights_stay_tied_and_are_pruned_consistently():
    """Every holder of a tied parameter gets the pruned tensor (so the check forward passes and the channels
    are pruned), and a tied use on the untraced model input fixes the width."""
    torch.manual_seed(0)
    model = TiedLinears(first_tied=False).double().eval()
    x = torch.randn(4, 5, dtype=torch.float64)
    original = copy.deepcopy(model)
    pruned, report = prune_channels(model, x, ratio=0.5, return_report=True, progress=False)
    assert state_equal(model, original)
    assert report.kept == ("model output: output shapes are kept",)
    assert pruned.l1.weight is pruned.l2.weight and pruned.l1.weight.shape == (4, 4)
    assert pruned.a.out_features == pruned.l2.in_features == pruned.o.in_features == 4
    masked = mask_channels(model, report).eval()
    with torch.no_grad():
        assert_close_rel(pruned(x), masked(x), torch.float32, factor=1e-6)

    # l1 reads the 8 model inputs, so the tied weight's input width (= its output width) is fixed
    model = TiedLinears(first_tied=True).double().eval()
    x = torch.randn(4, 8, dtype=torch.float64)
    pruned, report = prune_channels(model, x, ratio=0.5, return_report=True, progress=False)
    assert any("tied parameter l1.weight" in k for k in report.kept)
    assert not any("failed on pruned shapes" in k for k in report.kept)
    assert pruned.l1.weight is pruned.l2.weight and pruned.l1.weight.shape == (8, 8)
    with torch.no_grad():
        assert torch.equal(pruned(x), model(x))
