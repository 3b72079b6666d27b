"""Whole-model swap (sparsify / densify), the swap report, and tune / explain.

The equivalence that matters: the swapped model gives the output of the masked dense model."""
import copy

import pytest
import torch
import torch.nn.utils.prune as torch_prune
from torch import nn
from torch.nn.utils import parametrize

import sparsekernels as sk
from model_state import assert_same_state, model_state
from sparsekernels.ops import dispatch
from tolerances import assert_close_rel


# ----------------------------------------------------------------------------------------------------
# masks (written here on purpose: the tests do not import ``pruning``)


def mask_24(weight: torch.Tensor) -> torch.Tensor:
    """Keep the 2 largest-magnitude values of every group of 4 along the last dim of a 2-D weight."""
    out, k = weight.shape
    groups = weight.reshape(out, k // 4, 4)
    keep = groups.abs().topk(2, dim=-1).indices
    mask = torch.zeros_like(groups, dtype=torch.bool).scatter_(-1, keep, True)
    return (groups * mask).reshape(out, k)


def mask_conv_24(weight: torch.Tensor) -> torch.Tensor:
    """2:4 along input channels at each kernel position: groups of 4 in weight.permute(0, 2, 3, 1)."""
    out, cin, kh, kw = weight.shape
    flat = weight.permute(0, 2, 3, 1).reshape(out, -1)
    return mask_24(flat).reshape(out, kh, kw, cin).permute(0, 3, 1, 2).contiguous()


@torch.no_grad()
def mask_model_24(model: nn.Module) -> nn.Module:
    """2:4-mask every Linear (in % 4 == 0) and Conv2d (in_channels % 4 == 0, groups 1) in place."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and m.in_features % 4 == 0:
            m.weight.copy_(mask_24(m.weight))
        elif isinstance(m, nn.Conv2d) and m.in_channels % 4 == 0 and m.groups == 1:
            m.weight.copy_(mask_conv_24(m.weight))
        if isinstance(m, nn.MultiheadAttention):
            m.in_proj_weight.copy_(mask_24(m.in_proj_weight))
    return model


@torch.no_grad()
def randomize_bn(model: nn.Module) -> None:
    """Non-trivial batch-norm statistics so an eval-mode ResNet is not an identity on its convs."""
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.uniform_(0.5, 1.5)
            m.bias.uniform_(-0.2, 0.2)


def resnet18_masked():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    randomize_bn(model)
    return mask_model_24(model).eval()


def encoder_masked(batch_first=True):
    layer = nn.TransformerEncoderLayer(d_model=32, nhead=4, dim_feedforward=64, dropout=0.0, batch_first=batch_first)
    return mask_model_24(nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=True)).eval()


# ----------------------------------------------------------------------------------------------------
# whole models


def test_resnet18_sparsify_matches_masked_dense():
    model = resnet18_masked()
    x = torch.randn(2, 3, 37, 29)
    with torch.no_grad():
        ref = model(x)
        ref64 = copy.deepcopy(model).double()(x.double())
    names_before = [n for n, _ in model.named_modules()]
    report = sk.sparsify(model)
    assert [n for n, _ in model.named_modules()] == names_before
    # conv1 has 3 input channels: it cannot be 2:4 along input channels, and says so.
    assert report.skipped_reasons.keys() == {"conv1"}
    assert "in_channels" in report.skipped_reasons["conv1"] or "multiple of 4" in report.skipped_reasons["conv1"]
    assert len(report.swapped) == 19 + 1  # 16 block convs + 3 downsample convs + fc
    assert isinstance(model.layer1[0].conv1, sk.SparseConv2d) and isinstance(model.fc, sk.SparseLinear)
    assert isinstance(model.layer2[0].downsample[0], sk.SparseConv2d)
    with torch.no_grad():
        out = model(x)
    assert_close_rel(out, ref64, torch.float32)
    assert_close_rel(out, ref, torch.float32)
    text = str(report)
    assert "layer4.1.conv2" in text and "conv1" in text and "SparseConv2d" in text


def test_transformer_encoder_sparsify_matches_masked_dense():
    model = encoder_masked()
    x = torch.randn(3, 7, 32)
    with torch.no_grad():
        ref = model(x)  # dense: PyTorch's fused fast path
    model_slow = copy.deepcopy(model)
    report = sk.sparsify(model)
    assert set(report.swapped_names) == {f"layers.{i}.linear{j}" for i in range(2) for j in (1, 2)}
    reasons = report.skipped_reasons
    # MultiheadAttention: out_proj is read through .weight, in_proj is a bare Parameter.
    assert "F.multi_head_attention_forward" in reasons["layers.0.self_attn.out_proj"]
    assert "bare Parameter" in reasons["layers.1.self_attn.in_proj_weight"]
    assert type(model.layers[0].self_attn.out_proj).__name__ == "NonDynamicallyQuantizableLinear"
    assert any("fast path" in n for n in report.notes)
    with torch.no_grad():
        out = model(x)
    assert_close_rel(out, ref, torch.float32)
    # and with a padding mask (the encoder's nested-tensor path reads layers[0].linear1.weight)
    pad = torch.zeros(3, 7, dtype=torch.bool)
    pad[0, 5:] = True
    with torch.no_grad():
        ref_pad = model_slow(x, src_key_padding_mask=pad)
        out_pad = model(x, src_key_padding_mask=pad)
    keep = ~pad
    assert_close_rel(out_pad[keep], ref_pad[keep], torch.float32)
    assert model.use_nested_tensor is False
    # densify restores dense layers and removes the fast-path guard
    back = sk.densify(model)
    assert len(back.swapped) == 4 and type(model.layers[0].linear1) is nn.Linear
    assert len(model.layers[0].linear1._forward_pre_hooks) == 0
    with torch.no_grad():
        assert_close_rel(model(x), ref, torch.float32)


def test_densify_roundtrip_resnet():
    model = resnet18_masked()
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    sk.sparsify(model)
    report = sk.densify(model)
    assert report.action == "densify" and len(report.swapped) == 20
    assert not any(isinstance(m, (sk.SparseLinear, sk.SparseConv2d)) for m in model.modules())
    assert type(model.fc) is nn.Linear and type(model.layer1[0].conv1) is nn.Conv2d
    with torch.no_grad():
        assert torch.equal(model(x), ref)
    assert "restored to dense" in str(report)


# ----------------------------------------------------------------------------------------------------
# what is preserved


class Net(nn.Module):
    def __init__(self, dtype=torch.float32):
        super().__init__()
        self.a = nn.Linear(20, 12, dtype=dtype)
        self.b = nn.Linear(12, 8, bias=False, dtype=dtype)
        self.conv = nn.Conv2d(8, 4, 3, padding=1, dtype=dtype)

    def forward(self, x):
        h = self.b(torch.relu(self.a(x)))
        return self.conv(h.reshape(-1, 8, 1, 1).expand(-1, 8, 3, 3).contiguous())


def test_hooks_names_training_dtype_preserved():
    model = mask_model_24(Net())
    model.eval()
    model.b.train()
    seen = []
    h_post = model.a.register_forward_hook(lambda m, i, o: seen.append(("post", type(m).__name__)))
    model.a.register_forward_pre_hook(lambda m, i: seen.append(("pre", type(m).__name__)))
    model.b.register_forward_hook(lambda m, a, k, o: seen.append(("kw", sorted(k))), with_kwargs=True)
    x = torch.randn(5, 20)
    with torch.no_grad():
        ref = model(x)
    seen.clear()
    report = sk.sparsify(model)
    assert report.swapped_names == ["a", "b", "conv"]
    with torch.no_grad():
        out = model(x)
    assert_close_rel(out, ref, torch.float32)
    assert seen == [("pre", "SparseLinear"), ("post", "SparseLinear"), ("kw", [])]
    assert model.b.training and not model.a.training and not model.conv.training
    h_post.remove()  # the user's handle still works on the swapped layer
    seen.clear()
    with torch.no_grad():
        model(x)
    assert seen == [("pre", "SparseLinear"), ("kw", [])]
    # and the hooks travel back with densify
    sk.densify(model)
    seen.clear()
    with torch.no_grad():
        model(x)
    assert seen == [("pre", "Linear"), ("kw", [])] and model.b.training


def test_dtype_and_device_preserved_fp16():
    model = mask_model_24(Net(dtype=torch.float16)).eval()
    sk.sparsify(model)
    for m in (model.a, model.b, model.conv):
        assert m.weight_values.dtype == torch.float16 and m.weight_values.device.type == "cpu"


def test_shared_module_swapped_everywhere():
    shared = nn.Linear(8, 8)
    model = nn.Sequential(shared, nn.ReLU(), shared)
    mask_model_24(model)
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
    report = sk.sparsify(model)
    assert report.swapped_names == ["0"]
    assert model[0] is model[2] and isinstance(model[0], sk.SparseLinear)
    with torch.no_grad():
        assert_close_rel(model(x), ref, torch.float32)


# ----------------------------------------------------------------------------------------------------
# what is left dense, and why


class Odd(nn.Module):
    def __init__(self):
        super().__init__()
        self.dense = nn.Linear(16, 16)  # not 2:4
        self.in6 = nn.Linear(6, 8)  # in % 4 != 0
        self.grouped = nn.Conv2d(8, 8, 3, groups=2)
        self.filtered = nn.Linear(16, 16)
        self.sub = SubLinear(16, 16)
        self.param = nn.Linear(16, 16)
        self.pruned = nn.Linear(16, 16)
        self.tied_a = nn.Linear(16, 16)
        self.tied_b = nn.Linear(16, 16)
        self.ok = nn.Linear(16, 4)


class SubLinear(nn.Linear):
    pass


class Double(nn.Module):
    def forward(self, w):
        return w * 2


def test_skip_reasons():
    model = Odd()
    with torch.no_grad():
        for name in ("filtered", "sub", "param", "tied_a", "ok"):
            getattr(model, name).weight.copy_(mask_24(getattr(model, name).weight))
    model.tied_b.weight = model.tied_a.weight
    parametrize.register_parametrization(model.param, "weight", Double())
    torch_prune.l1_unstructured(model.pruned, "weight", amount=0.5)
    report = sk.sparsify(model, filter_fn=lambda name, m: name != "filtered")
    r = report.skipped_reasons
    assert report.swapped_names == ["ok"]
    assert "not 2:4" in r["dense"] and "row" in r["dense"]
    assert "multiple of 4" in r["in6"]
    assert "groups=2" in r["grouped"]
    assert r["filtered"] == "excluded by filter_fn"
    assert "subclass" in r["sub"]
    assert "parametriz" in r["param"]
    assert "torch.nn.utils.prune" in r["pruned"]
    assert "tied" in r["tied_a"] and "tied_b" in r["tied_a"]
    assert "tied" in r["tied_b"]
    text = str(report)
    for name in r:
        assert name in text


class _FakeHFConv1D(nn.Module):
    """Mimics transformers.pytorch_utils.Conv1D (weight [in, out], y = x @ W + b) without importing transformers."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf, self.nx = nf, nx
        self.weight = nn.Parameter(torch.randn(nx, nf))
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x):
        return torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight).reshape(*x.shape[:-1], self.nf)


_FakeHFConv1D.__name__ = _FakeHFConv1D.__qualname__ = "Conv1D"
_FakeHFConv1D.__module__ = "transformers.pytorch_utils"


def test_hf_conv1d_is_swapped_by_class_name_without_transformers():
    # GPT-2 is built from transformers' Conv1D (weight [in, out]): SparseConv1D recognises it by class name and
    # module, swaps it exactly, and reports what it cannot swap
    model = nn.Sequential()
    model.add_module("c_fc", _FakeHFConv1D(16, 8))
    model.add_module("c_proj", _FakeHFConv1D(8, 16))
    model.add_module("head", mask_model_24(nn.Linear(8, 4)))
    with torch.no_grad():
        for name in ("c_fc", "c_proj"):
            conv = getattr(model, name)
            conv.weight.copy_(mask_24(conv.weight.t().contiguous()).t())
    x = torch.randn(3, 8)
    with torch.no_grad():
        ref = model(x)
    report = sk.sparsify(model, filter_fn=lambda name, m: name != "c_proj")
    r = report.skipped_reasons
    assert report.swapped_names == ["c_fc", "head"]
    assert type(model.c_fc).__name__ == "SparseConv1D" and model.c_fc.weight.shape == (8, 16)
    assert r == {"c_proj": "excluded by filter_fn"}
    assert "Conv1D -> SparseConv1D" in str(report)
    with torch.no_grad():
        assert torch.equal(model(x), ref)  # the same addmm on the same dense weight
    sk.densify(model)
    assert type(model.c_fc).__name__ == "Conv1D"


def test_hf_conv1d_that_is_not_24_is_left_with_the_reason():
    model = nn.Sequential()
    model.add_module("c_fc", _FakeHFConv1D(8, 12))
    model.add_module("c_odd", _FakeHFConv1D(4, 6))
    report = sk.sparsify(model)
    assert report.swapped == ()
    assert "not 2:4 sparse along its input dim" in report.skipped_reasons["c_fc"]
    assert report.skipped_reasons["c_odd"] == "nx=6 (the input size) is not a multiple of 4"


def test_root_layer_is_reported():
    lin = mask_model_24(nn.Linear(8, 8))
    report = sk.sparsify(lin)
    assert report.swapped == () and "(root)" in report.skipped_reasons


def test_failure_midway_leaves_model_unchanged(monkeypatch):
    model = mask_model_24(Net())
    before = dict(model.named_modules())
    real = sk.SparseLinear.from_dense.__func__
    calls = []

    def flaky(cls, linear, *, backend="auto"):
        calls.append(1)
        if len(calls) == 2:
            raise ValueError("simulated failure")
        return real(cls, linear, backend=backend)

    monkeypatch.setattr(sk.SparseLinear, "from_dense", classmethod(flaky))
    with pytest.raises(ValueError, match="converting layer 'b'.*unchanged.*simulated"):
        sk.sparsify(model)
    assert dict(model.named_modules()) == before
    assert all(type(m) in (Net, nn.Linear, nn.Conv2d) for m in model.modules())


def _model_with_everything():
    """Hooks, a layer in training mode, gradients, a frozen parameter, an encoder whose fast path sparsify guards."""
    model = nn.Sequential(Net(), encoder_masked())
    mask_model_24(model)
    model[0].a.register_forward_hook(lambda m, i, o: None)
    model[0].b.register_forward_pre_hook(lambda m, i: None)
    model[0].b.train()
    model[0].conv.eval()
    model[0].a.weight.grad = torch.randn_like(model[0].a.weight)
    model[0].a.bias.requires_grad_(False)
    return model


@pytest.mark.parametrize("where", ["from_dense", "commit", "interrupt"])
def test_sparsify_is_all_or_nothing(monkeypatch, where):
    import sparsekernels.swap as swap

    model = _model_with_everything()
    before = model_state(model)
    if where == "from_dense":
        real = sk.SparseConv2d.from_dense.__func__
        monkeypatch.setattr(sk.SparseConv2d, "from_dense", classmethod(
            lambda cls, conv, **kw: (_ for _ in ()).throw(RuntimeError("simulated"))))
        exc = RuntimeError
    else:
        real = swap.replace_modules
        error = KeyboardInterrupt if where == "interrupt" else OSError

        def half_then_fail(model_, replacements, occ):  # the commit fails after putting half the layers in
            real(model_, dict(list(replacements.items())[: len(replacements) // 2]), occ)
            raise error("simulated")

        monkeypatch.setattr(swap, "replace_modules", half_then_fail)
        exc = error
    with pytest.raises(exc, match="simulated"):
        sk.sparsify(model)
    assert_same_state(before, model_state(model))
    monkeypatch.undo()
    assert len(sk.sparsify(model).swapped) > 2  # and it still works afterwards


@pytest.mark.parametrize("where", ["to_dense", "commit"])
def test_densify_is_all_or_nothing(monkeypatch, where):
    import sparsekernels.swap as swap

    model = _model_with_everything()
    sk.sparsify(model)
    before = model_state(model)
    if where == "to_dense":
        monkeypatch.setattr(sk.SparseConv2d, "to_dense", lambda self: (_ for _ in ()).throw(ValueError("simulated")))
        match = "converting layer '0.conv'.*unchanged.*simulated"
    else:
        real = swap.replace_modules

        def half_then_fail(model_, replacements, occ):
            real(model_, dict(list(replacements.items())[:1]), occ)
            raise RuntimeError("simulated")

        monkeypatch.setattr(swap, "replace_modules", half_then_fail)
        match = "simulated"
    with pytest.raises((ValueError, RuntimeError), match=match):
        sk.densify(model)
    assert_same_state(before, model_state(model))


def test_block_pattern():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 16))
    with torch.no_grad():
        w = model[0].weight
        blocks = torch.rand(4, 4) < 0.3  # 16x16 blocks, ~70 % zero
        blocks[0, 0] = True
        w.mul_(blocks.repeat_interleave(16, 0).repeat_interleave(16, 1))
        model[2].weight.copy_(mask_24(model[2].weight))  # 2:4, not block sparse
    x = torch.randn(5, 64)
    with torch.no_grad():
        ref = model(x)
    report = sk.sparsify(model, pattern="block", block_size=16)
    assert report.swapped_names == ["0"] and isinstance(model[0], sk.BlockSparseLinear)
    assert "block sparsity below" in report.skipped_reasons["2"]
    with torch.no_grad():
        assert_close_rel(model(x), ref, torch.float32)
    report = sk.sparsify(model, pattern="any")
    assert report.swapped_names == ["2"] and isinstance(model[2], sk.SparseLinear)
    r = report.skipped_reasons["4"]
    assert r.startswith("2:4: weight is not 2:4 sparse") and "; block: block sparsity below" in r
    with torch.no_grad():
        assert_close_rel(model(x), ref, torch.float32)
    conv = nn.Sequential(nn.Conv2d(8, 8, 1))
    assert "nn.Linear only" in sk.sparsify(conv, pattern="block").skipped_reasons["0"]
    assert len(sk.densify(model).swapped) == 2


@pytest.mark.parametrize(
    "call, exc, match",
    [
        (lambda: sk.sparsify("model"), TypeError, "expected an nn.Module"),
        (lambda: sk.sparsify(nn.Linear(4, 4), filter_fn=3), TypeError, "filter_fn"),
        (lambda: sk.sparsify(nn.Linear(4, 4), backend="fast"), ValueError, "backend"),
        (lambda: sk.sparsify(nn.Linear(4, 4), pattern="1:4"), ValueError, "pattern"),
        (lambda: sk.densify(3), TypeError, "expected an nn.Module"),
        (lambda: sk.densify(nn.Linear(4, 4), filter_fn="x"), TypeError, "filter_fn"),
    ],
)
def test_swap_errors(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


def test_densify_filter():
    model = mask_model_24(Net())
    sk.sparsify(model)
    report = sk.densify(model, filter_fn=lambda n, m: n != "a")
    assert report.swapped_names == ["b", "conv"] and report.skipped_reasons == {"a": "excluded by filter_fn"}
    assert isinstance(model.a, sk.SparseLinear)


# ----------------------------------------------------------------------------------------------------
# tune / explain


class DispatchingLinear(sk.SparseLinear):
    """A SparseLinear that asks the dispatcher on every call, as the ops do on CUDA."""

    def forward(self, x):
        dense = lambda: torch.nn.functional.linear(x, self.weight24.to_dense(), self.bias)  # noqa: E731
        cands = {"triton": lambda: super(DispatchingLinear, self).forward(x), "dense": dense}
        key = (x.reshape(-1, self.in_features).shape[0], self.out_features, self.in_features, str(x.dtype))
        return cands[dispatch.select("sparse24_linear", key, cands, default="dense", device="cpu")]()


@pytest.fixture
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "cache"))
    dispatch.reset()
    yield
    dispatch.set_timer(None)
    dispatch.reset()


def test_tune_and_explain_record_decisions(isolated_cache):
    model = mask_model_24(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8)))
    sk.sparsify(model)
    for i in (0, 2):
        model[i] = DispatchingLinear.from_dense(model[i].to_dense())
    times = {("triton", 32): 0.5, ("dense", 32): 1.0, ("triton", 8): 2.0, ("dense", 8): 1.0}
    dispatch.set_timer(lambda name, fn, device: times[(name, fn().shape[-1])])
    report = sk.tune(model, torch.randn(4, 16), progress=False)
    layers = {l.name: l for l in report.layers}
    assert layers["0"].decisions[0].choice == "triton" and layers["2"].decisions[0].choice == "dense"
    assert layers["0"].decisions[0].timings["dense"].median_ms == 1.0
    text = str(report)
    assert "triton ms" in text and "dense ms" in text and "2.00x" in text and "1.00x" in text
    # explain() later (and after a restart: decisions come back from the tuning cache)
    dispatch.reset()
    again = sk.explain(model, print_report=False)
    assert [d.choice for l in again.layers for d in l.decisions] == ["triton", "dense"]
    assert all(d.source == "cache" for l in again.layers for d in l.decisions)


def test_tune_input_kinds_and_cpu_explanation(isolated_cache, capsys):
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(8, 4)

        def forward(self, x, y=None):
            return self.lin(x if y is None else x + y)

    model = mask_model_24(TwoInputs())
    sk.sparsify(model)
    x = torch.randn(2, 8)
    for inputs in (x, (x, x), {"x": x, "y": x}):
        report = sk.tune(model, inputs, progress=False)
        assert report.layers[0].decisions == ()
    printed = sk.explain(model)
    out = capsys.readouterr().out
    assert "lin" in out and "auto on CPU" in out and "one copy" in out
    assert printed.layers[0].shape == "8->4" and printed.layers[0].backend == "auto"
    with pytest.raises(TypeError, match="example_inputs"):
        sk.tune(model, [x])
    with pytest.raises(TypeError, match="nn.Module"):
        sk.tune("model", x)
    with pytest.raises(TypeError, match="nn.Module"):
        sk.explain(None)
    assert "no sparse layers" in str(sk.explain(nn.Linear(3, 3), print_report=False))


def test_explain_describes_conv_and_fixed_backend():
    model = mask_model_24(nn.Sequential(nn.Conv2d(8, 4, 3, stride=2, padding=1), nn.Flatten(), nn.Linear(16, 4)))
    sk.sparsify(model, filter_fn=lambda n, m: n == "0")
    model[0].backend = "reference"
    rep = sk.explain(model, torch.randn(1, 8, 4, 4), print_report=False)
    (layer,) = rep.layers
    assert layer.shape == "8->4 k3x3 s2 p1 d1" and "fixed backend 'reference'" in layer.note


@pytest.mark.interpreter
def test_tune_through_the_real_op(isolated_cache, kernel_device, monkeypatch):
    """SparseLinear -> sparse24_linear -> the dispatcher, end to end (on the CPU: the op's CUDA "auto"
    branch driven through Triton's interpreter; a fake timer decides)."""
    import dataclasses

    from sparsekernels.nn.sparse24_module import Sparse24Module
    from sparsekernels.ops import routing

    if kernel_device.type == "cpu":
        # keep the compressed state on the CPU and route CPU "auto" to the op's dispatched (GPU) branch
        monkeypatch.setattr(Sparse24Module, "keeps_dense", lambda self, device: False)
        route = routing.ROUTES["sparse24_linear"]
        dispatched = dataclasses.replace(route, cpu_auto=lambda *a: routing.run_dispatched("sparse24_linear", *a))
        monkeypatch.setitem(routing.ROUTES, "sparse24_linear", dispatched)
    model = mask_model_24(nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Linear(12, 8))).to(kernel_device).eval()
    x = torch.randn(3, 16, device=kernel_device)
    with torch.no_grad():
        ref = model(x)
    sk.sparsify(model)
    dispatch.set_timer(lambda name, fn, device: {"triton": 0.5, "dense": 1.0}.get(name, 2.0))
    report = sk.tune(model, x, progress=False)
    assert [d.choice for l in report.layers for d in l.decisions] == ["triton", "triton"]
    assert report.layers[0].decisions[0].key == '[4,12,16,"torch.float32",true]'
    with torch.no_grad():
        assert_close_rel(model(x), ref, torch.float32)
    text = str(report)
    assert "triton ms" in text and "2.00x" in text


def test_training_mode_swap_says_the_layers_stop_learning():
    model = mask_model_24(Net())
    model.train()
    report = sk.sparsify(model)
    note = [n for n in report.notes if "trainable parameters" in n]
    assert len(note) == 1 and "3 swapped layer(s)" in note[0] and "densify()" in note[0]
    assert "note: 3 swapped layer(s)" in str(report)
    # gradients still reach the input
    x = torch.randn(5, 20, requires_grad=True)
    model(x).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # an eval-mode swap (the deployment case) carries no such note
    model2 = mask_model_24(Net()).eval()
    assert not [n for n in sk.sparsify(model2).notes if "trainable parameters" in n]
