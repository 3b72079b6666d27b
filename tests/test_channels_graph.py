"""The dependency graph: which channels are coupled, what is kept and why, and the tracer's error paths."""
import numpy as np
import pytest
import torch
from torch import nn
from torch.nn import functional as F

from pruning.channels import DependencyGraph, TraceError, prune_channels
from test_channels_prune import Concat, Depthwise, Grouped, PlainCNN, Residual, Shuffle


def group_of(graph, param, dim=0):
    att = next(a for a in graph.attachments[param] if a.dim == dim)
    roots = set(graph.root_of(att.labels).tolist())
    gids = {graph.root_group[r] for r in roots}
    assert len(gids) == 1
    return graph.groups[gids.pop()]


def test_residual_adds_unite_channels():
    g = DependencyGraph(Residual(), torch.randn(1, 3, 12, 12))
    stem = group_of(g, "stem.0.weight")
    assert group_of(g, "a.1.weight") is stem  # x + a(x)
    assert group_of(g, "a.0.0.weight") is not stem
    assert group_of(g, "down.0.weight") is group_of(g, "b.1.weight")  # down(x) + b(x)
    assert stem.prunable and len(stem.units) == 14
    assert "a.2.weight" in stem.params and "a.2.running_var" in stem.params  # BN follows the conv
    assert not group_of(g, "fc.weight").prunable  # the classifier's outputs are the model's outputs


def test_concat_offsets_and_flatten_linear():
    g = DependencyGraph(Concat(), torch.randn(1, 3, 12, 12))
    mix_in = next(a for a in g.attachments["mix.0.weight"] if a.dim == 1)
    b1 = next(a for a in g.attachments["b1.0.weight"] if a.dim == 0)
    b2 = next(a for a in g.attachments["b2.0.weight"] if a.dim == 0)
    stem = next(a for a in g.attachments["stem.0.weight"] if a.dim == 0)
    np.testing.assert_array_equal(g.root_of(mix_in.labels), g.root_of(np.concatenate([stem.labels, b1.labels,
                                                                                      b2.labels])))
    g = DependencyGraph(PlainCNN(), torch.randn(1, 3, 12, 12))
    fc_in = next(a for a in g.attachments["head.1.weight"] if a.dim == 1)
    conv = next(a for a in g.attachments["features.3.weight"] if a.dim == 0)
    # flatten after a 3x3 map: every channel feeds 9 consecutive features
    np.testing.assert_array_equal(g.root_of(fc_in.labels), np.repeat(g.root_of(conv.labels), 9))


def test_depthwise_and_squeeze_excitation():
    g = DependencyGraph(Depthwise(), torch.randn(1, 3, 9, 9))
    grp = group_of(g, "expand.0.weight")
    assert group_of(g, "dw.0.weight") is grp  # depthwise: input channel i is output channel i
    assert group_of(g, "se2.weight") is grp  # y * s ties the gate to the gated channels
    assert group_of(g, "se1.weight") is not grp
    assert len(grp.units) == 24


def test_grouped_conv_units_are_whole_groups():
    class G(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 12, 1)
            self.b = nn.Conv2d(12, 8, 3, padding=1, groups=4)
            self.c = nn.Conv2d(8, 5, 1)

        def forward(self, x):
            return self.c(F.relu(self.b(F.relu(self.a(x)))))

    g = DependencyGraph(G(), torch.randn(1, 3, 5, 5))
    grp = group_of(g, "a.weight")
    assert group_of(g, "b.weight") is grp
    assert len(grp.units) == 4 and grp.unit_channels == 3
    pruned = prune_channels(G(), torch.randn(1, 3, 5, 5), ratio=0.5, progress=False)
    assert pruned.b.groups == 2 and pruned.a.out_channels == 6 and pruned.b.out_channels == 4


def test_channel_shuffle_and_chunk_tie_columns():
    g = DependencyGraph(Shuffle(), torch.randn(1, 3, 8, 8))
    stem = next(a for a in g.attachments["stem.0.weight"] if a.dim == 0)
    roots = g.root_of(stem.labels)
    # chunk(2): channel k of the first half is removed with channel k of the second half
    np.testing.assert_array_equal(roots[:8], roots[8:])
    assert group_of(g, "stem.0.weight").prunable


def test_group_norm_units_are_norm_groups():
    class GN(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 12, 3)
            self.gn = nn.GroupNorm(3, 12)
            self.b = nn.Conv2d(12, 2, 1)

        def forward(self, x):
            return self.b(self.gn(self.a(x)))

    g = DependencyGraph(GN(), torch.randn(1, 3, 6, 6))
    grp = group_of(g, "a.weight")
    assert len(grp.units) == 3 and grp.unit_channels == 4
    pruned = prune_channels(GN(), torch.randn(1, 3, 6, 6), ratio=0.4, progress=False)
    assert pruned.gn.num_groups == 2 and pruned.gn.num_channels == 8


def test_unsupported_op_keeps_channels_with_reason_and_strict_raises():
    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Conv2d(3, 6, 3)
            self.b = nn.Conv2d(6, 6, 1)
            self.c = nn.Conv2d(6, 2, 1)

        def forward(self, x):
            y = self.a(x).cumsum(1)  # mixes channels: not separable
            return self.c(F.relu(self.b(y)))

    g = DependencyGraph(Odd(), torch.randn(1, 3, 6, 6))
    assert not group_of(g, "a.weight").prunable
    assert "cumsum" in group_of(g, "a.weight").frozen_reason
    assert group_of(g, "b.weight").prunable
    assert any("cumsum" in r for r in g.frozen)
    with pytest.raises(TraceError, match="cumsum"):
        DependencyGraph(Odd(), torch.randn(1, 3, 6, 6), strict=True)
    with pytest.raises(TraceError, match="cumsum"):
        prune_channels(Odd(), torch.randn(1, 3, 6, 6), strict=True, progress=False)
    _, report = prune_channels(Odd(), torch.randn(1, 3, 6, 6), return_report=True, progress=False)
    assert any("cumsum" in k for k in report.kept)


def test_ignore_keeps_output_channels():
    m = Residual()
    g = DependencyGraph(m, torch.randn(1, 3, 12, 12), ignore=["a.0"])
    assert not group_of(g, "a.0.0.weight").prunable
    assert "ignore" in group_of(g, "a.0.0.weight").frozen_reason
    pruned = prune_channels(m, torch.randn(1, 3, 12, 12), ratio=0.5, ignore=[m.a[0]], progress=False)
    assert pruned.a[0][0].out_channels == 10 and pruned.b[0][0].out_channels < 9


def test_graph_errors():
    with pytest.raises(TypeError, match="nn.Module"):
        DependencyGraph(lambda x: x, torch.randn(1))
    with pytest.raises(TypeError, match="example_inputs"):
        DependencyGraph(PlainCNN(), "image")
    with pytest.raises(ValueError, match="not a submodule"):
        DependencyGraph(PlainCNN(), torch.randn(1, 3, 12, 12), ignore=["nope"])
    with pytest.raises(ValueError, match="not a submodule"):
        DependencyGraph(PlainCNN(), torch.randn(1, 3, 12, 12), ignore=[nn.ReLU()])
    with pytest.raises(TypeError, match="ignore"):
        DependencyGraph(PlainCNN(), torch.randn(1, 3, 12, 12), ignore=[1.5])
    with pytest.raises(TraceError, match="'features.0.0'"):  # names the module where the forward failed
        DependencyGraph(PlainCNN(), torch.randn(1, 4, 12, 12))


def test_summary_and_model_restored():
    m = Grouped().train()
    g = DependencyGraph(m, torch.randn(1, 3, 9, 9))
    assert m.training and all(mod.training for mod in m.modules())
    assert not m._forward_hooks and not m._forward_pre_hooks
    assert "group 0" in g.summary()


def test_retry_keeps_module_whose_code_hardcodes_a_width():
    class Hard(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 8)
            self.inner = Reshaper()
            self.b = nn.Linear(8, 3)

        def forward(self, x):
            return self.b(self.inner(self.a(x)))

    class Reshaper(nn.Module):
        def forward(self, x):
            return F.relu(x.view(x.shape[0], 2, 4)).reshape(x.shape[0], 8)  # 8 = a hard-coded width

    m = Hard()
    pruned, report = prune_channels(m, torch.randn(3, 4), ratio=0.5, return_report=True, progress=False)
    assert pruned.a.out_features == 8
    assert any("inner" in k and "failed on pruned shapes" in k for k in report.kept)
    with pytest.raises(TraceError, match="'inner'"):
        prune_channels(m, torch.randn(3, 4), ratio=0.5, strict=True, progress=False)
