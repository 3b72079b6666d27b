"""2:4 sparse Conv2d: the implicit-GEMM Triton kernel (interpreter on CPU), reference, op and SparseConv2d."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import spy
from sparsekernels.formats.sparse24 import Sparse24Weight, compress_24, conv_weight_from_2d, conv_weight_to_2d
from sparsekernels.nn.conv import SparseConv2d
from sparsekernels.ops import routing
from sparsekernels.ops.functional import sparse24_conv2d
from sparsekernels.ops.sparse24_conv2d import conv_output_size, sparse24_conv2d_reference
from tolerances import assert_close_rel, rel_error


def masked_conv_weight(out, cin, kh, kw, dtype=torch.float32):
    """A random [out, cin, kh, kw] weight, 2:4 along input channels at every kernel position."""
    w2 = torch.randn(out, kh * kw * cin, dtype=torch.float64)
    scores = torch.rand(out, kh * kw * cin // 4, 4)
    keep = torch.zeros_like(scores).scatter_(-1, scores.topk(2, dim=-1).indices, 1.0).reshape(w2.shape)
    w2 = (w2 * keep.double()).to(dtype)
    return conv_weight_from_2d(w2, cin, (kh, kw)), compress_24(w2)


@pytest.fixture
def poisoned(kernel_override):
    """Kernel outputs start as NaN, so an element the kernel forgets to write fails the test."""

    def make(real):
        def launch(x, values, meta, bias, stride, padding, dilation, kernel_size):
            oh, ow = (conv_output_size(x.shape[2 + a], kernel_size[a], stride[a], padding[a], dilation[a])
                      for a in (0, 1))
            out = torch.full((x.shape[0], values.shape[0], oh, ow), float("nan"), dtype=x.dtype, device=x.device)
            out = out.contiguous(memory_format=routing.conv_output_format(x))
            return real(x, values, meta, bias, stride, padding, dilation, kernel_size, out=out)

        return launch

    kernel_override("sparse24_conv2d", "triton", make)


# (B, C, H, W, out, kh, kw, stride, padding, dilation, channels_last, bias)
KERNEL_CASES = [
    (1, 8, 7, 9, 13, 3, 3, 1, 1, 1, False, True),  # 3x3, odd spatial, out not a multiple of the block
    (3, 12, 9, 7, 20, 3, 3, 2, 2, 2, True, False),  # stride 2, padding 2, dilation 2, batch 3
    (3, 8, 5, 5, 17, 1, 1, 1, 0, 1, True, True),  # 1x1 through the GEMM path
    (1, 16, 6, 5, 9, 1, 1, 2, 0, 1, False, True),  # 1x1 stride 2 (a ResNet downsample)
    (2, 20, 5, 6, 7, 1, 3, (1, 2), (0, 1), 1, False, False),  # non-square kernel, C > BLOCK_K
]


def _case_id(case):
    b, c, h, w, n, kh, kw, s, p, d, cl, bias = case
    return f"B{b}-C{c}-{h}x{w}-N{n}-k{kh}x{kw}-s{s}-p{p}-d{d}-{'cl' if cl else 'nchw'}-{'bias' if bias else 'nobias'}"


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("case", KERNEL_CASES, ids=_case_id)
def test_triton_kernel_matches_float64(kernel_device, poisoned, dtype, case):
    b, c, h, w, n, kh, kw, stride, padding, dilation, channels_last, has_bias = case
    weight, w24 = masked_conv_weight(n, c, kh, kw, dtype)
    w24 = w24.to(kernel_device)
    x = torch.randn(b, c, h, w, dtype=dtype, device=kernel_device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    bias = torch.randn(n, dtype=dtype, device=kernel_device) if has_bias else None
    y = sparse24_conv2d(x, w24, bias, stride, padding, dilation, backend="triton", kernel_size=(kh, kw))
    ref = F.conv2d(
        x.double(), weight.double().to(kernel_device), None if bias is None else bias.double(), stride, padding, dilation
    )
    assert y.dtype == dtype
    assert not torch.isnan(y).any(), "an output element was never written"
    assert_close_rel(y, ref, dtype)
    # memory format follows the input
    assert y.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_kernel_gpu_resnet_like(dtype):
    weight, w24 = masked_conv_weight(72, 64, 3, 3, dtype)
    x = torch.randn(3, 64, 29, 31, dtype=dtype, device="cuda").contiguous(memory_format=torch.channels_last)
    y = sparse24_conv2d(x, w24.to("cuda"), None, 2, 1, 1, backend="triton", kernel_size=3)
    ref = F.conv2d(x.double(), weight.double().cuda(), None, 2, 1, 1)
    dense_err = rel_error(F.conv2d(x, weight.cuda(), None, 2, 1, 1), ref)
    assert_close_rel(y, ref, dtype)
    assert rel_error(y, ref) <= 2 * dense_err + 1e-3


@pytest.mark.parametrize(
    "b, c, h, w, n, kh, kw, stride, padding, dilation",
    [
        (2, 8, 11, 10, 6, 3, 3, 1, 1, 1),
        (1, 4, 9, 13, 5, 2, 3, (2, 1), (1, 0), (1, 2)),
        (3, 12, 7, 7, 10, 1, 1, 1, 0, 1),
        (1, 8, 12, 9, 3, 5, 5, 3, 2, 1),
    ],
)
def test_reference_matches_conv2d_float64(b, c, h, w, n, kh, kw, stride, padding, dilation):
    weight, w24 = masked_conv_weight(n, c, kh, kw, torch.float32)
    x = torch.randn(b, c, h, w, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    ref = F.conv2d(x, weight.double(), bias, stride, padding, dilation)
    out = sparse24_conv2d_reference(x, w24.to(torch.float64), bias, stride, padding, dilation, kernel_size=(kh, kw))
    assert rel_error(out, ref) < 1e-13
    # the CPU backends of the public function, in float32
    x32, b32 = x.float(), bias.float()
    for backend in ("reference", "dense", "auto"):
        out = sparse24_conv2d(x32, w24, b32, stride, padding, dilation, backend=backend, kernel_size=(kh, kw))
        assert_close_rel(out, ref, torch.float32)


def test_weight_layout_helpers_round_trip():
    w = torch.randn(5, 8, 3, 2)
    w2 = conv_weight_to_2d(w)
    assert w2.shape == (5, 3 * 2 * 8)
    assert torch.equal(w2[1, (2 * 2 + 1) * 8 + 6], w[1, 6, 2, 1])  # position (r, s), channel c
    back = conv_weight_from_2d(w2, 8, (3, 2))
    assert torch.equal(back, w) and back.is_contiguous()
    one = conv_weight_from_2d(torch.randn(4, 16), 16, (1, 1))
    assert one.stride() == (16, 1, 1, 1)  # canonical NCHW strides, even for 1x1


def test_output_memory_format_rule_on_cpu():
    _, w24 = masked_conv_weight(6, 8, 1, 1)
    x = torch.randn(2, 8, 5, 5)
    for backend in ("auto", "dense", "reference"):
        assert sparse24_conv2d(x, w24, backend=backend, kernel_size=1).is_contiguous()
        y = sparse24_conv2d(x.contiguous(memory_format=torch.channels_last), w24, backend=backend, kernel_size=1)
        assert y.is_contiguous(memory_format=torch.channels_last) and not y.is_contiguous()


def test_kernel_size_is_required_so_no_channel_count_runs_another_convolution():
    # 36 inputs per output channel: a 3x3 kernel over 4 channels, or a 1x1 kernel over 36. Inferring the kernel
    # from x's channel count would run the 1x1 convolution on a 36-channel input without a word.
    weight, w24 = masked_conv_weight(6, 4, 3, 3)
    x = torch.randn(1, 4, 6, 6)
    for backend in ("auto", "dense", "reference"):
        out = sparse24_conv2d(x, w24, None, 1, 1, kernel_size=3, backend=backend)
        assert_close_rel(out, F.conv2d(x.double(), weight.double(), None, 1, 1), torch.float32)
        with pytest.raises(TypeError, match="kernel_size"):
            sparse24_conv2d(x, w24, None, 1, 1, backend=backend)
        with pytest.raises(TypeError, match="expected kernel_size=\\(kh, kw\\), got None"):
            sparse24_conv2d(x, w24, None, 1, 1, kernel_size=None, backend=backend)
        with pytest.raises(ValueError, match="kh \\* kw \\* C = 324"):
            sparse24_conv2d(torch.randn(1, 36, 6, 6), w24, None, 1, 1, kernel_size=3, backend=backend)
    # the custom op itself takes the kernel size as an argument: the same refusal
    with pytest.raises(ValueError, match="kh \\* kw \\* C = 324"):
        torch.ops.sparsekernels.sparse24_conv2d(torch.randn(1, 36, 6, 6), w24.values, w24.meta, None, [1, 1], [1, 1],
                                                [1, 1], [3, 3], "reference")


def test_public_function_errors(monkeypatch):
    _, w24 = masked_conv_weight(6, 8, 3, 3)
    _, w24_13 = masked_conv_weight(6, 8, 1, 3)
    x = torch.randn(2, 8, 7, 7)
    cases = [
        (([0.0], w24), {}, TypeError, "x to be a torch.Tensor"),
        ((x, torch.randn(6, 72)), {}, TypeError, "Sparse24Weight"),
        ((x[0], w24), {}, ValueError, r"\[B, C, H, W\]"),
        ((torch.randn(2, 6, 7, 7), w24), {}, ValueError, "multiple of 4"),
        ((torch.randn(2, 16, 7, 7), w24), {}, ValueError, "kh \\* kw \\* C = 144"),
        ((x, w24_13), {}, ValueError, "kh \\* kw \\* C = 72"),
        ((x, w24), {"kernel_size": (1, 9)}, ValueError, "smaller than the dilated kernel"),  # 7x7 input
        ((x, w24), {"kernel_size": (2, 2)}, ValueError, "kh \\* kw \\* C = 32"),
        ((x, w24), {"kernel_size": "3"}, TypeError, "kernel_size"),
        ((torch.randn(2, 8, 0, 7), w24), {}, ValueError, "non-empty spatial"),
        ((x.half(), w24), {}, TypeError, "dtype torch.float32, got torch.float16"),
        ((x.to("meta"), w24), {}, ValueError, "device"),
        ((x, w24, [0.0]), {}, TypeError, "bias to be a torch.Tensor"),
        ((x, w24, torch.zeros(5)), {}, ValueError, r"bias of shape \(6,\)"),
        ((x, w24, torch.zeros(6, dtype=torch.float16)), {}, TypeError, "bias of the weight.s dtype torch.float32"),
        ((x, w24, None, 0), {}, ValueError, "stride >= 1"),
        ((x, w24, None, 1, -1), {}, ValueError, "padding >= 0"),
        ((x, w24, None, 1, 0, 0), {}, ValueError, "dilation >= 1"),
        ((x, w24, None, (1, 2, 3)), {}, TypeError, "pair of ints"),
        ((x, w24, None, 1, "same"), {}, TypeError, "padding"),
        ((x, w24, None, 1.5), {}, TypeError, "stride"),
        ((torch.randn(1, 8, 2, 2), w24), {}, ValueError, "smaller than the dilated kernel"),
        ((x, w24), {"backend": "fast"}, ValueError, "backend"),
    ]
    for args, kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            sparse24_conv2d(*args, **{"kernel_size": 3, **kwargs})
    with pytest.raises(ValueError, match="backend 'cusparselt' does not compute sparse24_conv2d"):
        sparse24_conv2d(x, w24, backend="cusparselt", kernel_size=3)
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="SPARSEKERNELS_BACKEND"):
        sparse24_conv2d(x, w24, kernel_size=3)
    monkeypatch.delenv("SPARSEKERNELS_BACKEND")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="bfloat16 on the CPU"):
            sparse24_conv2d(x.bfloat16(), w24.to(torch.bfloat16), backend="triton", kernel_size=3)
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            sparse24_conv2d(x, w24, backend="triton", kernel_size=3)
    with pytest.raises(TypeError, match="Sparse24Weight"):
        sparse24_conv2d_reference(x, None, kernel_size=3)


def test_env_override_forces_backend(monkeypatch, kernel_override):
    calls = spy(kernel_override, "sparse24_conv2d", "reference")
    _, w24 = masked_conv_weight(6, 8, 3, 3)
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "reference")
    sparse24_conv2d(torch.randn(1, 8, 5, 5), w24, backend="dense", kernel_size=3)
    assert calls == ["reference"]


def test_custom_op_opcheck():
    _, w24 = masked_conv_weight(6, 8, 3, 3)
    x = torch.randn(2, 8, 6, 7).contiguous(memory_format=torch.channels_last)
    args = (x, w24.values, w24.meta, torch.randn(6), [2, 1], [1, 1], [1, 2], [3, 3], "reference")
    torch.library.opcheck(torch.ops.sparsekernels.sparse24_conv2d.default, args)


# --------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------
def masked_conv(cin, cout, k, dtype=torch.float32, **kwargs):
    conv = nn.Conv2d(cin, cout, k, dtype=dtype, **kwargs)
    kh, kw = conv.kernel_size
    weight, _ = masked_conv_weight(cout, cin, kh, kw, dtype)
    with torch.no_grad():
        conv.weight.copy_(weight)
    return conv


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(
    "kwargs", [dict(k=3, stride=2, padding=1), dict(k=1), dict(k=(3, 1), padding=(1, 0), dilation=2)], ids=str
)
def test_module_round_trip_and_equals_masked_dense(bias, kwargs):
    kwargs = dict(kwargs)
    k = kwargs.pop("k")
    conv = masked_conv(8, 10, k, bias=bias, **kwargs).eval()
    layer = SparseConv2d.from_dense(conv)
    back = layer.to_dense()
    assert torch.equal(back.weight, conv.weight)
    assert (back.stride, back.padding, back.dilation, back.kernel_size) == (
        conv.stride, conv.padding, conv.dilation, conv.kernel_size)
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, conv.bias))
    x = torch.randn(2, 8, 9, 11)
    with torch.no_grad():
        ref = conv(x)
    assert torch.equal(layer(x), ref)  # auto on the CPU: the same dense conv on the cached dense weight
    for backend in ("reference", "dense"):
        layer.backend = backend
        assert_close_rel(layer(x), F.conv2d(x.double(), conv.weight.double(), None if not bias else conv.bias.double(),
                                            conv.stride, conv.padding, conv.dilation), torch.float32)
    assert set(layer.state_dict()) == {"weight_values", "weight_meta"} | ({"bias"} if bias else set())
    assert not layer.weight_values.requires_grad
    assert isinstance(layer.weight24, Sparse24Weight)
    assert "sparsity=2:4" in repr(layer)


@pytest.mark.interpreter
def test_module_triton_backend(kernel_device):
    conv = masked_conv(8, 12, 3, dtype=torch.float16, padding=1).to(kernel_device)
    layer = SparseConv2d.from_dense(conv, backend="triton")
    x = torch.randn(1, 8, 5, 7, dtype=torch.float16, device=kernel_device)
    ref = F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), 1, 1)
    assert_close_rel(layer(x), ref, torch.float16)


def test_padding_same_and_valid_convert():
    conv = masked_conv(8, 6, 3, padding="same")
    layer = SparseConv2d.from_dense(conv)
    assert layer.padding == (1, 1)
    x = torch.randn(1, 8, 6, 5)
    with torch.no_grad():
        assert torch.equal(layer(x), conv(x))
    assert SparseConv2d.from_dense(masked_conv(8, 6, 3, padding="valid")).padding == (0, 0)


def test_unbatched_input_like_conv2d():
    # nn.Conv2d takes an unbatched [C, H, W] input; the swapped layer used to reject it
    conv = masked_conv(8, 6, 3, padding=1, stride=(2, 1)).eval()
    layer = SparseConv2d.from_dense(conv)
    x = torch.randn(8, 7, 5)
    with torch.no_grad():
        ref = conv(x)
    out = layer(x)
    assert out.shape == ref.shape == (6, 4, 5)
    assert torch.equal(out, ref)  # auto on the CPU: the same dense conv
    layer.backend = "reference"
    assert_close_rel(layer(x), F.conv2d(x[None].double(), conv.weight.double(), conv.bias.double(),
                                        conv.stride, conv.padding)[0], torch.float32)
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\]"):
        layer(torch.randn(4, 7, 5))


def test_meta_build_and_assign_load_and_cache_refresh():
    conv = masked_conv(8, 6, 3, padding=1)
    layer = SparseConv2d.from_dense(conv)
    with torch.device("meta"):
        empty = SparseConv2d(8, 6, 3, padding=1)
    assert empty.weight_values.is_meta and empty.weight_meta.is_meta
    empty.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(empty(x), layer(x))
    # loading new weights in place invalidates the cached dense copy
    other = SparseConv2d.from_dense(masked_conv(8, 6, 3, padding=1))
    before = layer(x)
    layer.load_state_dict(other.state_dict())
    assert torch.equal(layer(x), other(x)) and not torch.equal(layer(x), before)
    # a freshly built layer holds zeros
    assert torch.equal(SparseConv2d(8, 6, 3, padding=1)(x), torch.zeros(2, 6, 5, 5))


def test_module_compiles_fullgraph():
    layer = SparseConv2d.from_dense(masked_conv(8, 6, 3, padding=1))
    x = torch.randn(2, 8, 5, 6)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))


def test_check_convertible_reasons():
    check = SparseConv2d.check_convertible
    assert "not an nn.Conv2d" in check(nn.Linear(4, 4))
    assert "groups=2" in check(nn.Conv2d(8, 8, 3, groups=2))
    assert "padding_mode='reflect'" in check(nn.Conv2d(8, 8, 3, padding=1, padding_mode="reflect"))
    assert "asymmetrically" in check(nn.Conv2d(8, 8, 2, padding="same"))
    assert "float64" in check(nn.Conv2d(8, 8, 3, dtype=torch.float64))
    mixed = masked_conv(8, 8, 3)
    mixed.bias = nn.Parameter(mixed.bias.detach().half())
    assert "bias dtype" in check(mixed)
    assert "in_channels=6" in check(nn.Conv2d(6, 8, 3))
    assert "meta device" in check(nn.Conv2d(8, 8, 3, device="meta"))
    dense = masked_conv(8, 4, 3)
    with torch.no_grad():
        dense.weight[2, 5, 1, 2] = 1.0  # output 2, position (1, 2), channels 4..7 -> 3 non-zeros
        dense.weight[2, 6, 1, 2] = 1.0
        dense.weight[2, 7, 1, 2] = 1.0
    reason = check(dense)
    assert "not 2:4" in reason and "output channel 2" in reason and "(1, 2)" in reason and "4..7" in reason
    with pytest.raises(ValueError, match="cannot convert.*not 2:4"):
        SparseConv2d.from_dense(dense)
    assert check(masked_conv(8, 4, 3)) is None


def test_module_constructor_and_forward_errors():
    with pytest.raises(ValueError, match="in_channels to be a positive multiple of 4"):
        SparseConv2d(6, 4, 3)
    with pytest.raises(ValueError, match="out_channels >= 1"):
        SparseConv2d(8, 0, 3)
    with pytest.raises(ValueError, match="kernel_size >= 1"):
        SparseConv2d(8, 4, 0)
    with pytest.raises(TypeError, match="padding"):
        SparseConv2d(8, 4, 3, padding="same")
    with pytest.raises(TypeError, match="dtype"):
        SparseConv2d(8, 4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend"):
        SparseConv2d(8, 4, 3, backend="cudnn")
    layer = SparseConv2d(8, 4, 3)
    with pytest.raises(ValueError, match=r"\[B, 8, H, W\]"):
        layer(torch.randn(1, 4, 5, 5))
    with pytest.raises(TypeError, match="dtype torch.float32"):
        layer(torch.randn(1, 8, 5, 5, dtype=torch.float16))


@pytest.mark.parametrize("backend, op", [("reference", "sparsekernels.sparse24_conv2d.default"),
                                         ("auto", "aten.conv2d.default")])
def test_module_exports(backend, op):
    # an explicit backend exports the sparse op on the compressed state; CPU "auto" the dense op on its one copy
    layer = SparseConv2d.from_dense(masked_conv(8, 6, 3, padding=1, stride=2), backend=backend)
    x = torch.randn(2, 8, 7, 5)
    ep = torch.export.export(layer, (x,))
    assert op in [str(n.target) for n in ep.graph.nodes]
    assert torch.equal(ep.module()(x), layer(x))


@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_input_and_bias_gradients_through_the_op(backend):
    # the custom op had no autograd formula: only the eager CPU "auto" fast path (plain F.conv2d) could
    # backpropagate; every other backend raised "no autograd formula was registered"
    torch.manual_seed(0)
    weight, w24 = masked_conv_weight(6, 8, 3, 2)
    x = torch.randn(2, 8, 7, 6, requires_grad=True)
    bias = torch.randn(6, requires_grad=True)
    kw = dict(stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    y = sparse24_conv2d(x, w24, bias, backend=backend, kernel_size=(3, 2), **kw)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    (F.conv2d(x64, weight.double(), b64, **kw) * g.double()).sum().backward()
    assert_close_rel(x.grad, x64.grad, torch.float32)
    assert_close_rel(bias.grad, b64.grad, torch.float32)
