"""The 2:4 Linear op: the Triton kernel (under TRITON_INTERPRET=1 without a GPU), every backend, the
custom op under torch.compile, and every error path."""
import pytest
import torch
import torch.nn.functional as F

from sparsekernels.formats.sparse24 import compress_24
from sparsekernels.ops import routing
from sparsekernels.ops import sparse24_linear as op_module
from sparsekernels.ops.cache import cached_entries
from sparsekernels.ops.functional import sparse24_linear
from sparsekernels.ops.sparse24_linear import INTERPRETER_CONFIG, launch_sparse24_linear, sparse24_linear_reference
from tolerances import RTOL, assert_close_rel, rel_error

BM, BN, BK = INTERPRETER_CONFIG[:3]


def random_w24(n: int, k: int, dtype):
    w = torch.randn(n, k)
    keep = torch.rand(n, k // 4, 4).argsort(-1) < 2
    return compress_24((w * keep.reshape(n, k)).to(dtype))


def reference64(x, w24, bias):
    return sparse24_linear_reference(
        x.double(), w24.to(torch.float64), None if bias is None else bias.double()
    )


# ---------------------------------------------------------------- the kernel itself


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
@pytest.mark.parametrize(
    "m, n, k, has_bias, split_k",
    [
        (1, 37, 68, True, 1),  # N, K not multiples of the blocks (16, 32); K not a multiple of 8
        (3, 40, 100, False, 1),
        (13, 16, 36, True, 1),
        (67, 33, 64, False, 1),  # several token tiles
        (3, 21, 196, True, 3),  # split-K with uneven tiles per split
        (1, 18, 36, False, 4),  # a split with no K tiles at all still writes zeros
    ],
)
def test_kernel_matches_float64_reference_every_element_written(kernel_device, dtype, m, n, k, has_bias, split_k):
    w24 = random_w24(n, k, dtype).to(kernel_device)
    x = torch.randn(m, k, device=kernel_device).to(dtype)
    bias = torch.randn(n, device=kernel_device).to(dtype) if has_bias else None
    out = torch.full((m, n), float("nan"), dtype=dtype, device=kernel_device)
    workspace = torch.full((split_k, m, n), float("nan"), device=kernel_device) if split_k > 1 else None
    y = launch_sparse24_linear(x, w24.values, w24.meta, bias, k, out=out, split_k=split_k, workspace=workspace)
    assert y.data_ptr() == out.data_ptr()
    assert not torch.isnan(out).any(), "an output element was left unwritten"
    if workspace is not None:
        assert not torch.isnan(workspace).any(), "a split-K partial was left unwritten"
    ref = reference64(x, w24, bias)
    assert_close_rel(out, ref, dtype)
    # Flash-attention's rule: at most about twice the error of the dense PyTorch op at this precision.
    dense_err = rel_error(F.linear(x.float(), w24.to_dense().float(), None if bias is None else bias.float()).to(dtype), ref)
    assert rel_error(out, ref) <= 2 * dense_err + RTOL[dtype] / 10


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_kernel_leading_batch_dims_and_noncontiguous_x(kernel_device, dtype):
    n, k = 19, 44
    w24 = random_w24(n, k, dtype).to(kernel_device)
    bias = torch.randn(n, device=kernel_device).to(dtype)
    x = torch.randn(2, 3, k, device=kernel_device).to(dtype)
    y = sparse24_linear(x, w24, bias, backend="triton")
    assert y.shape == (2, 3, n) and y.dtype == dtype
    assert_close_rel(y, reference64(x, w24, bias), dtype)
    # A transposed view: strides (1, k) on the 2-D input the kernel reads.
    xt = torch.randn(k, 5, device=kernel_device).to(dtype).t()
    assert not xt.is_contiguous()
    assert_close_rel(sparse24_linear(xt, w24, backend="triton"), reference64(xt, w24, None), dtype)


@pytest.mark.interpreter
def test_split_k_env_override(kernel_device, monkeypatch):
    w24 = random_w24(20, 72, torch.float32).to(kernel_device)
    x = torch.randn(2, 72, device=kernel_device)
    monkeypatch.setenv("SPARSEKERNELS_SPLIT_K", "2")
    assert_close_rel(sparse24_linear(x, w24, backend="triton"), reference64(x, w24, None), torch.float32)
    monkeypatch.setenv("SPARSEKERNELS_SPLIT_K", "zero")
    with pytest.raises(ValueError, match="expected SPARSEKERNELS_SPLIT_K to be an integer >= 1, got 'zero'"):
        sparse24_linear(x, w24, backend="triton")


@pytest.mark.interpreter
def test_kernel_empty_batch(kernel_device):
    w24 = random_w24(8, 16, torch.float32).to(kernel_device)
    y = sparse24_linear(torch.randn(0, 16, device=kernel_device), w24, backend="triton")
    assert y.shape == (0, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("m", [1, 13, 67, 300])
def test_kernel_gpu_autotuned_both_regimes(dtype, m):
    n, k = 4096 + 48, 1024 + 72
    w24 = random_w24(n, k, dtype).cuda()
    x = torch.randn(m, k, device="cuda").to(dtype)
    bias = torch.randn(n, device="cuda").to(dtype)
    y = sparse24_linear(x, w24, bias, backend="triton")
    assert_close_rel(y, reference64(x, w24, bias), dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["auto", "dense", "cusparselt"])
def test_gpu_backends(backend):
    n, k = 256, 512
    w24 = random_w24(n, k, torch.float16).cuda()
    x = torch.randn(7, k, device="cuda").half()
    assert_close_rel(sparse24_linear(x, w24, backend=backend), reference64(x, w24, None), torch.float16)


# ---------------------------------------------------------------- the pure-PyTorch backends


@pytest.mark.parametrize("backend", ["reference", "dense", "auto"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_backends_match_float64(backend, dtype):
    n, k = 29, 52
    w24 = random_w24(n, k, dtype)
    x = torch.randn(4, 3, k).to(dtype)
    bias = torch.randn(n).to(dtype)
    assert_close_rel(sparse24_linear(x, w24, bias, backend=backend), reference64(x, w24, bias), dtype)


def test_cpu_auto_cache_follows_in_place_updates():
    w24 = random_w24(12, 16, torch.float32)
    x = torch.randn(2, 16)
    first = sparse24_linear(x, w24)
    assert torch.equal(first, F.linear(x, w24.to_dense()))
    w24.values.mul_(2)
    assert torch.allclose(sparse24_linear(x, w24), 2 * first, rtol=1e-6, atol=1e-6)


def test_cpu_auto_with_inference_tensors():
    with torch.inference_mode():
        w24 = random_w24(10, 24, torch.float32)
        x = torch.randn(3, 24)
        assert_close_rel(sparse24_linear(x, w24), reference64(x, w24, None), torch.float32)
        assert_close_rel(sparse24_linear(x, w24), reference64(x, w24, None), torch.float32)


def test_env_override_forces_backend(monkeypatch):
    w24 = random_w24(8, 16, torch.float32)
    x = torch.randn(3, 16)
    calls = []
    real = op_module.sparse24_linear_reference
    monkeypatch.setattr(op_module, "sparse24_linear_reference", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "reference")
    y = sparse24_linear(x, w24, backend="dense")
    assert calls == [1]
    assert_close_rel(y, reference64(x, w24, None), torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("winner", ["triton", "dense"])
def test_dispatched_branch_runs_the_measured_choice(kernel_device, winner, monkeypatch, tmp_path):
    # The CUDA "auto" branch, driven with the interpreter: the dispatcher is device-agnostic and a fake
    # timer decides the winner, so the test checks the wiring (candidates, key, cached dense copy).
    from sparsekernels.ops import dispatch

    monkeypatch.setenv("SPARSEKERNELS_CACHE_DIR", str(tmp_path))
    dispatch.reset()
    w24 = random_w24(24, 40, torch.float32).to(kernel_device)
    x = torch.randn(5, 40, device=kernel_device)
    bias = torch.randn(24, device=kernel_device)
    ran = []
    real_launch = op_module.launch_sparse24_linear
    routing.register_kernel("sparse24_linear", "triton", lambda *a, **k: ran.append("triton") or real_launch(*a, **k))
    fake_ms = {"triton": 1.0, "dense": 5.0} if winner == "triton" else {"triton": 5.0, "dense": 1.0}
    try:
        with dispatch.use_timer(lambda name, fn, device: (fn(), fake_ms[name])[1]):
            ran.clear()
            y = routing.run_dispatched("sparse24_linear", x, w24.values, w24.meta, bias, 40)
        assert_close_rel(y, reference64(x, w24, bias), torch.float32)
        decision = dispatch.lookup("sparse24_linear", (8, 24, 40, torch.float32, True), device=kernel_device)
        assert decision is not None and decision.choice == winner
        ran.clear()
        routing.run_dispatched("sparse24_linear", x, w24.values, w24.meta, bias, 40)  # cache hit: the winner only
        assert ran == (["triton"] if winner == "triton" else [])
        if winner == "dense":
            assert "sparse24_dense" in cached_entries(w24.values)
    finally:
        routing.register_kernel("sparse24_linear", "triton", real_launch)
        dispatch.reset()


# ---------------------------------------------------------------- torch.compile / torch.library


@pytest.mark.interpreter
def test_torch_compile_fullgraph_traces_the_op(kernel_device):
    w24 = random_w24(20, 32, torch.float32).to(kernel_device)
    bias = torch.randn(20, device=kernel_device)

    def f(x):
        return torch.relu(sparse24_linear(x, w24, bias, backend="triton")) + 1

    x = torch.randn(2, 5, 32, device=kernel_device)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))
    assert_close_rel(compiled(x), torch.relu(reference64(x, w24, bias)) + 1, torch.float32)


def test_torch_compile_fullgraph_cpu_auto():
    w24 = random_w24(12, 24, torch.float32)
    f = lambda x: sparse24_linear(x, w24) * 2  # noqa: E731
    x = torch.randn(3, 24)
    torch.testing.assert_close(torch.compile(f, fullgraph=True, backend="eager")(x), f(x))


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "reference", "auto"])
def test_opcheck(kernel_device, backend):
    w24 = random_w24(16, 32, torch.float32).to(kernel_device)
    x = torch.randn(2, 3, 32, device=kernel_device)
    bias = torch.randn(16, device=kernel_device)
    torch.library.opcheck(torch.ops.sparsekernels.sparse24_linear.default, (x, w24.values, w24.meta, bias, 32, backend))


# ---------------------------------------------------------------- errors at the boundary


@pytest.fixture
def w24_small():
    return random_w24(8, 16, torch.float32)


def test_error_x_not_a_tensor(w24_small):
    with pytest.raises(TypeError, match="expected x to be a torch.Tensor, got list"):
        sparse24_linear([[0.0] * 16], w24_small)


def test_error_w24_not_compressed():
    with pytest.raises(TypeError, match="expected w24 to be a Sparse24Weight.*got Tensor"):
        sparse24_linear(torch.randn(2, 16), torch.randn(8, 16))


def test_error_x_wrong_last_dim(w24_small):
    with pytest.raises(ValueError, match=r"expected x of shape \[..., 16\].*got \(2, 12\)"):
        sparse24_linear(torch.randn(2, 12), w24_small)


def test_error_dtype_mismatch(w24_small):
    with pytest.raises(TypeError, match="expected x of the weight's dtype torch.float32, got torch.float16"):
        sparse24_linear(torch.randn(2, 16).half(), w24_small)
    with pytest.raises(TypeError, match="expected x of dtype float16, bfloat16 or float32, got torch.float64"):
        sparse24_linear(torch.randn(2, 16, dtype=torch.float64), w24_small)


def test_error_device_mismatch(w24_small):
    with pytest.raises(ValueError, match="expected x on the weight's device cpu, got meta"):
        sparse24_linear(torch.randn(2, 16, device="meta"), w24_small)
    with pytest.raises(ValueError, match="expected bias on the weight's device cpu, got meta"):
        sparse24_linear(torch.randn(2, 16), w24_small, torch.randn(8, device="meta"))


def test_error_bias(w24_small):
    with pytest.raises(ValueError, match=r"expected bias of shape \(8,\), got \(7,\)"):
        sparse24_linear(torch.randn(2, 16), w24_small, torch.randn(7))
    with pytest.raises(TypeError, match="expected bias of the weight's dtype torch.float32, got torch.float16"):
        sparse24_linear(torch.randn(2, 16), w24_small, torch.randn(8).half())
    with pytest.raises(TypeError, match="expected bias to be a torch.Tensor or None, got float"):
        sparse24_linear(torch.randn(2, 16), w24_small, 1.0)


def test_error_bad_backend_name(w24_small):
    with pytest.raises(ValueError, match=r"expected backend to be one of .*got 'cuda'"):
        sparse24_linear(torch.randn(2, 16), w24_small, backend="cuda")


def test_error_bad_env_override(w24_small, monkeypatch):
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="expected SPARSEKERNELS_BACKEND to be one of .*got 'fast'"):
        sparse24_linear(torch.randn(2, 16), w24_small)


def test_error_triton_on_cpu_without_interpreter(w24_small, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors.*got tensors on cpu"):
        sparse24_linear(torch.randn(2, 16), w24_small, backend="triton")
    with pytest.raises(RuntimeError, match="backend 'triton' needs CUDA tensors"):
        routing.resolve("sparse24_linear", "f()", "triton", torch.randn(2, 16))


def test_error_cusparselt_off_cuda(w24_small):
    with pytest.raises(RuntimeError, match="backend 'cusparselt' needs CUDA tensors, got tensors on cpu"):
        sparse24_linear(torch.randn(2, 16), w24_small, backend="cusparselt")


def test_cusparselt_reason_names_the_problem():
    reason = routing.cusparselt_unsupported_reason(torch.device("cpu"), torch.float16, 64, 64)
    assert reason == "needs a CUDA device, got cpu"


# ---------------------------------------------------------------- autograd (input and bias only)


@pytest.mark.parametrize("backend", ["reference", "dense", "auto"])
def test_input_and_bias_gradients_through_the_op(backend):
    # the custom op had no autograd formula: backward worked on the eager CPU "auto" fast path only and
    # raised "no autograd formula" on every other backend (and on CUDA, where "auto" runs inside the op)
    torch.manual_seed(0)
    w24 = random_w24(12, 20, torch.float32)
    x = torch.randn(2, 3, 20, requires_grad=True)
    bias = torch.randn(12, requires_grad=True)
    g = torch.randn(2, 3, 12)
    # call the registered op itself: "auto" here is the in-op CPU path, not the eager fast path
    y = torch.ops.sparsekernels.sparse24_linear(x, w24.values, w24.meta, bias, 20, backend)
    (y * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    (F.linear(x64, w24.to_dense().double(), b64) * g.double()).sum().backward()
    assert_close_rel(x.grad, x64.grad, torch.float32)
    assert_close_rel(bias.grad, b64.grad, torch.float32)


def test_no_gradient_for_the_compressed_weight():
    w24 = random_w24(8, 16, torch.float32)
    values = w24.values.clone().requires_grad_()
    y = torch.ops.sparsekernels.sparse24_linear(torch.randn(2, 16), values, w24.meta, None, 16, "reference")
    with pytest.raises(RuntimeError, match="no gradient for the compressed weight"):
        y.sum().backward()
