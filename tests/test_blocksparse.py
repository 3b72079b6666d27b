"""Block-sparse format, the block-sparse Linear kernel (Triton interpreter on CPU), its op and the module."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sparsekernels.formats.blocksparse import BlockSparseWeight, block_sparsity, compress_blocks
from conftest import spy
from sparsekernels.nn.blocksparse import BlockSparseLinear
from sparsekernels.ops import routing
from sparsekernels.ops.blocksparse_linear import block_sparse_linear_reference
from sparsekernels.ops.functional import block_sparse_linear
from tolerances import assert_close_rel, rel_error


def block_masked(out, k, bs, keep, dtype=torch.float64, empty_rows=(), generator=None):
    """A random [out, k] weight whose bs x bs blocks are kept with probability ``keep``."""
    nbr, nbc = -(-out // bs), -(-k // bs)
    mask = torch.rand(nbr, nbc, generator=generator) < keep
    mask[0, 0] = True  # never the all-zero weight
    for r in empty_rows:
        mask[r] = False
    dense_mask = mask.repeat_interleave(bs, 0).repeat_interleave(bs, 1)[:out, :k]
    w = torch.randn(out, k, dtype=torch.float64, generator=generator) * dense_mask
    return w.to(dtype), mask


@pytest.fixture
def poisoned(kernel_override):
    """Kernel outputs start as NaN, so an element the kernel forgets to write fails the test."""

    def make(real):
        def launch(x2d, values, row_ptr, col_idx, bias, n):
            out = torch.full((x2d.shape[0], n), float("nan"), dtype=x2d.dtype, device=x2d.device)
            return real(x2d, values, row_ptr, col_idx, bias, n, out=out)

        return launch

    kernel_override("block_sparse_linear", "triton", make)


# --------------------------------------------------------------------------------------------------
# Format
# --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bs", [16, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_compress_round_trip_odd_shapes(bs, dtype):
    out, k = 2 * bs + 7, 3 * bs - 5
    w, mask = block_masked(out, k, bs, 0.5, dtype, empty_rows=(1,))
    wb = compress_blocks(w, bs)
    assert torch.equal(wb.to_dense(), w)
    assert wb.shape == (out, k) and wb.block_size == bs and wb.dtype == dtype
    assert wb.nnz_blocks == int(mask.sum())
    assert wb.values.shape == (wb.nnz_blocks, bs, bs)
    assert wb.row_ptr.dtype == torch.int32 and wb.col_idx.dtype == torch.int32
    assert wb.row_ptr.tolist() == [0, *torch.cumsum(mask.sum(1), 0).tolist()]
    assert wb.row_ptr[2] == wb.row_ptr[1]  # the empty block row
    assert wb.density == int(mask.sum()) / mask.numel()
    assert wb.nbytes == wb.values.nbytes + wb.row_ptr.nbytes + wb.col_idx.nbytes
    # column indices ascending inside each block row
    for r in range(mask.shape[0]):
        cols = wb.col_idx[wb.row_ptr[r]: wb.row_ptr[r + 1]].tolist()
        assert cols == sorted(cols) == torch.nonzero(mask[r]).flatten().tolist()
    assert math.isclose(block_sparsity(w, bs), 1 - wb.density)


def test_compress_keeps_block_with_a_single_nonzero_and_zero_weight():
    w = torch.zeros(40, 50)
    wb = compress_blocks(w, 16)
    assert wb.nnz_blocks == 0 and wb.density == 0.0 and torch.equal(wb.to_dense(), w)
    w[39, 49] = 3.0  # in the padded edge block
    wb = compress_blocks(w, 16)
    assert wb.nnz_blocks == 1 and wb.col_idx.tolist() == [3] and wb.row_ptr.tolist() == [0, 0, 0, 1]
    assert torch.equal(wb.to_dense(), w)


def test_weight_to_and_repr():
    w, _ = block_masked(40, 70, 16, 0.4, torch.float32)
    wb = compress_blocks(w, 16)
    h = wb.to(torch.float16)
    assert h.dtype == torch.float16 and h.row_ptr.dtype == torch.int32
    assert torch.equal(h.to_dense(), w.half())
    assert "block_size=16" in repr(wb) and "density" in repr(wb)


@pytest.mark.parametrize(
    "weight, bs, exc, match",
    [
        ([[1.0]], 16, TypeError, "torch.Tensor"),
        (torch.ones(2, 3, 4), 16, ValueError, "2-D"),
        (torch.ones(4, 4, dtype=torch.int32), 16, TypeError, "dtype"),
        (torch.ones(4, 4, dtype=torch.float64), 16, TypeError, "dtype"),
        (torch.ones(0, 4), 16, ValueError, "non-empty"),
        (torch.ones(4, 4, device="meta"), 16, ValueError, "meta"),
        (torch.ones(4, 4), 8, ValueError, r"block_size in \(16, 32, 64\), got 8"),
        (torch.ones(4, 4), 16.0, TypeError, "block_size"),
        (torch.ones(4, 4), True, TypeError, "block_size"),
    ],
)
def test_compress_errors(weight, bs, exc, match):
    with pytest.raises(exc, match=match):
        compress_blocks(weight, bs)
    if isinstance(weight, torch.Tensor):
        with pytest.raises(exc, match=match):
            block_sparsity(weight, bs)


def test_weight_post_init_errors():
    w, _ = block_masked(40, 50, 16, 0.5, torch.float32)
    wb = compress_blocks(w, 16)
    v, rp, ci = wb.values, wb.row_ptr, wb.col_idx
    with pytest.raises(ValueError, match=r"values of shape \[nnz_blocks, 16, 16\]"):
        BlockSparseWeight(v[:, :8], rp, ci, (40, 50), 16)
    with pytest.raises(ValueError, match="int32 row_ptr"):
        BlockSparseWeight(v, rp.long(), ci, (40, 50), 16)
    with pytest.raises(ValueError, match="int32 row_ptr of shape"):
        BlockSparseWeight(v, rp[:-1], ci, (40, 50), 16)
    with pytest.raises(ValueError, match="int32 col_idx"):
        BlockSparseWeight(v, rp, ci[:-1], (40, 50), 16)
    with pytest.raises(ValueError, match="one device"):
        BlockSparseWeight(v, rp.to("meta"), ci, (40, 50), 16)
    with pytest.raises(ValueError, match="block_size"):
        BlockSparseWeight(v, rp, ci, (40, 50), 24)


# --------------------------------------------------------------------------------------------------
# Kernel under the interpreter (fp16, fp32), reference, dense
# --------------------------------------------------------------------------------------------------
@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("bs, m, out, k, bias", [(16, 13, 61, 45, True), (32, 1, 70, 100, False), (32, 3, 96, 64, True)])
def test_triton_kernel_matches_float64(kernel_device, poisoned, dtype, bs, m, out, k, bias):
    w, mask = block_masked(out, k, bs, 0.5, dtype, empty_rows=(1,))
    assert not mask[1].any()
    wb = compress_blocks(w, bs).to(kernel_device)
    x = torch.randn(m, k, dtype=dtype, device=kernel_device)
    b = torch.randn(out, dtype=dtype, device=kernel_device) if bias else None
    y = block_sparse_linear(x, wb, b, backend="triton")
    ref = F.linear(x.double(), w.double().to(kernel_device), None if b is None else b.double())
    assert y.dtype == dtype and y.shape == (m, out)
    assert not torch.isnan(y).any(), "an output element was never written"
    assert_close_rel(y, ref, dtype)
    # the all-zero block row's outputs are exactly the bias (or zero)
    rows = slice(bs, 2 * bs)
    expect = torch.zeros_like(y[:, rows]) if b is None else b[rows].expand(m, -1)
    assert torch.equal(y[:, rows], expect)


@pytest.mark.interpreter
def test_triton_kernel_leading_dims_and_noncontiguous_input(kernel_device, poisoned):
    w, _ = block_masked(48, 40, 16, 0.6, torch.float32)
    wb = compress_blocks(w, 16).to(kernel_device)
    x = torch.randn(2, 40, 5, device=kernel_device).transpose(1, 2)  # [2, 5, 40], not contiguous
    y = block_sparse_linear(x, wb, backend="triton")
    assert y.shape == (2, 5, 48)
    assert_close_rel(y, F.linear(x.double(), w.double().to(kernel_device)), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("bs", [16, 32, 64])
def test_triton_kernel_bf16_gpu(bs):
    w, _ = block_masked(4 * bs + 3, 3 * bs + 1, bs, 0.3, torch.bfloat16, empty_rows=(2,))
    wb = compress_blocks(w.cuda(), bs)
    x = torch.randn(37, w.shape[1], dtype=torch.bfloat16, device="cuda")
    y = block_sparse_linear(x, wb, backend="triton")
    ref = F.linear(x.double(), w.double().cuda())
    dense_err = rel_error(F.linear(x, w.cuda()), ref)
    assert_close_rel(y, ref, torch.bfloat16)
    assert rel_error(y, ref) <= 2 * dense_err + 1e-3


@pytest.mark.parametrize("bs", [16, 64])
def test_reference_and_dense_match_float64(bs):
    w32, _ = block_masked(3 * bs + 1, 2 * bs + 9, bs, 0.5, torch.float32, empty_rows=(0,))
    w = w32.double()
    wb = compress_blocks(w32, bs).to(torch.float64)  # a float64 reference from a float32 weight
    x = torch.randn(2, 7, w.shape[1], dtype=torch.float64)
    b = torch.randn(w.shape[0], dtype=torch.float64)
    ref = F.linear(x, w, b)
    assert rel_error(block_sparse_linear_reference(x, wb, b), ref) < 1e-13
    assert rel_error(routing.implementation("block_sparse_linear", "dense")(x.reshape(-1, w.shape[1]), wb.values,
                     wb.row_ptr, wb.col_idx, b, w.shape[0]), ref.reshape(-1, w.shape[0])) < 1e-13
    # float32 through the public function, every CPU backend
    x32, b32 = x.float(), b.float()
    wb32 = compress_blocks(w32, bs)
    for backend in ("reference", "dense", "auto"):
        assert_close_rel(block_sparse_linear(x32, wb32, b32, backend=backend), ref, torch.float32)


def test_cpu_auto_picks_block_path_only_when_sparse_and_tall(kernel_override):
    calls = spy(kernel_override, "block_sparse_linear", "reference")
    bs = 16
    w_sparse, _ = block_masked(8 * bs, 8 * bs, bs, 0.02, torch.float32)  # ~1 of 64 blocks (+ block 0,0)
    wb = compress_blocks(w_sparse, bs)
    assert wb.density <= routing.CPU_BLOCK_MAX_DENSITY
    x_tall = torch.randn(routing.CPU_BLOCK_MIN_ROWS, 8 * bs)
    y = block_sparse_linear(x_tall, wb)
    assert calls == ["reference"]
    block_sparse_linear(x_tall[:1], wb)  # too few rows: cached dense
    assert calls == ["reference"]
    assert_close_rel(y, F.linear(x_tall.double(), w_sparse.double()), torch.float32)


def test_cpu_auto_dense_cache_follows_in_place_updates():
    layer = BlockSparseLinear.from_dense(_block_linear(64, 48, 16, 0.5), min_block_sparsity=0.0)
    x = torch.randn(3, 48)
    y1 = layer(x)
    assert torch.equal(layer(x), y1)  # cached copy reused
    with torch.no_grad():
        layer.block_values.mul_(2)
    assert_close_rel(layer(x), 2 * (y1 - layer.bias) + layer.bias, torch.float32)


def test_public_function_errors(monkeypatch):
    w, _ = block_masked(32, 48, 16, 0.5, torch.float32)
    wb = compress_blocks(w, 16)
    x = torch.randn(3, 48)
    with pytest.raises(TypeError, match="x to be a torch.Tensor"):
        block_sparse_linear([[0.0]], wb)
    with pytest.raises(TypeError, match="BlockSparseWeight"):
        block_sparse_linear(x, w)
    with pytest.raises(ValueError, match=r"\[..., 48\].*got \(3, 40\)"):
        block_sparse_linear(torch.randn(3, 40), wb)
    with pytest.raises(TypeError, match="dtype torch.float32, got torch.float16"):
        block_sparse_linear(x.half(), wb)
    with pytest.raises(ValueError, match="device"):
        block_sparse_linear(x.to("meta"), wb)
    with pytest.raises(TypeError, match="bias to be a torch.Tensor"):
        block_sparse_linear(x, wb, [0.0])
    with pytest.raises(ValueError, match=r"bias of shape \(32,\)"):
        block_sparse_linear(x, wb, torch.zeros(31))
    with pytest.raises(TypeError, match="bias of the weight.s dtype torch.float32"):
        block_sparse_linear(x, wb, torch.zeros(32, dtype=torch.float16))
    with pytest.raises(ValueError, match="backend"):
        block_sparse_linear(x, wb, backend="fast")
    with pytest.raises(ValueError, match="backend 'cusparselt' does not compute block_sparse_linear"):
        block_sparse_linear(x.to(wb.device), wb, backend="cusparselt")
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="SPARSEKERNELS_BACKEND"):
        block_sparse_linear(x, wb)
    monkeypatch.delenv("SPARSEKERNELS_BACKEND")
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="needs CUDA tensors"):
            block_sparse_linear(x, wb, backend="triton")


def test_env_override_forces_backend(monkeypatch, kernel_override):
    calls = spy(kernel_override, "block_sparse_linear", "reference")
    w, _ = block_masked(32, 48, 16, 0.5, torch.float32)
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "reference")
    block_sparse_linear(torch.randn(2, 48), compress_blocks(w, 16), backend="dense")
    assert calls == ["reference"]


def test_custom_op_opcheck():
    w, _ = block_masked(32, 48, 16, 0.5, torch.float32)
    wb = compress_blocks(w, 16)
    args = (torch.randn(2, 5, 48), wb.values, wb.row_ptr, wb.col_idx, torch.randn(32), 32, "reference")
    torch.library.opcheck(torch.ops.sparsekernels.block_sparse_linear.default, args)


# --------------------------------------------------------------------------------------------------
# Module
# --------------------------------------------------------------------------------------------------
def _block_linear(out, k, bs, keep, bias=True, dtype=torch.float32, empty_rows=()):
    lin = nn.Linear(k, out, bias=bias, dtype=dtype)
    w, _ = block_masked(out, k, bs, keep, dtype, empty_rows=empty_rows)
    with torch.no_grad():
        lin.weight.copy_(w)
    return lin


@pytest.mark.parametrize("bias", [True, False])
def test_module_round_trip_and_equals_masked_dense(bias):
    lin = _block_linear(70, 100, 32, 0.4, bias=bias, empty_rows=(1,))
    layer = BlockSparseLinear.from_dense(lin, block_size=32, min_block_sparsity=0.0)
    assert layer.block_size == 32 and isinstance(layer.weight_blocks, BlockSparseWeight)
    back = layer.to_dense()
    assert torch.equal(back.weight, lin.weight)
    assert (back.bias is None) == (not bias) and (not bias or torch.equal(back.bias, lin.bias))
    x = torch.randn(3, 5, 100)
    with torch.no_grad():
        ref = lin(x)
    assert torch.equal(layer(x), ref)  # auto on the CPU: F.linear on the same dense weight
    for backend in ("reference", "dense"):
        layer.backend = backend
        assert_close_rel(layer(x), F.linear(x.double(), lin.weight.double(), None if not bias else lin.bias.double()),
                         torch.float32)
    assert set(layer.state_dict()) == {"block_values", "block_row_ptr", "block_col_idx"} | ({"bias"} if bias else set())
    assert not layer.block_values.requires_grad
    assert "block_size=32" in repr(layer) and "nnz_blocks=" in repr(layer)


@pytest.mark.interpreter
def test_module_triton_backend(kernel_device):
    lin = _block_linear(48, 40, 16, 0.5, dtype=torch.float16, empty_rows=(0,)).to(kernel_device)
    layer = BlockSparseLinear.from_dense(lin, backend="triton", min_block_sparsity=0.0)
    x = torch.randn(13, 40, dtype=torch.float16, device=kernel_device)
    assert_close_rel(layer(x), F.linear(x.double(), lin.weight.double(), lin.bias.double()), torch.float16)


def test_from_dense_auto_block_size():
    # kept in 32-blocks: 64-blocks are (almost) never all zero, 32-blocks are
    lin = _block_linear(128, 128, 32, 0.3)
    w = lin.weight.detach()
    assert block_sparsity(w, 32) >= 0.5
    expect = 64 if block_sparsity(w, 64) >= 0.5 else 32
    assert BlockSparseLinear.from_dense(lin).block_size == expect
    lin64 = _block_linear(128, 128, 64, 0.25)
    with torch.no_grad():
        lin64.weight[64:, :] = 0  # at least half the 64-blocks zero
    assert BlockSparseLinear.from_dense(lin64).block_size == 64
    lin16 = nn.Linear(64, 64)
    with torch.no_grad():
        lin16.weight.copy_(torch.block_diag(*[torch.randn(16, 16) for _ in range(4)]))
    # 16-blocks: 75 % zero; 32-blocks: 50 % zero; 64: none
    assert BlockSparseLinear.from_dense(lin16, min_block_sparsity=0.6).block_size == 16
    assert BlockSparseLinear.from_dense(lin16, min_block_sparsity=0.5).block_size == 32


def test_meta_build_and_assign_load():
    lin = _block_linear(70, 100, 16, 0.3, empty_rows=(2,))
    layer = BlockSparseLinear.from_dense(lin, block_size=16, min_block_sparsity=0.0)
    with torch.device("meta"):
        empty = BlockSparseLinear(100, 70, layer.nnz_blocks, 16)
    assert empty.block_values.is_meta and empty.block_row_ptr.is_meta
    empty.load_state_dict(layer.state_dict(), assign=True)
    x = torch.randn(4, 100)
    assert torch.equal(empty(x), layer(x))
    # a freshly built (non-meta) layer holds a valid structure of zeros
    fresh = BlockSparseLinear(100, 70, 5, 16)
    assert fresh.block_row_ptr.tolist() == [0, 5, 5, 5, 5, 5] and fresh.block_col_idx.tolist() == [0, 1, 2, 3, 4]
    assert torch.equal(fresh(x), torch.zeros(4, 70))


def test_load_state_dict_validates_the_structure_and_loads_nothing_of_a_refused_layer():
    layer = BlockSparseLinear.from_dense(_block_linear(70, 100, 16, 0.3), block_size=16, min_block_sparsity=0.0)
    good = layer.state_dict()
    assert layer.loaded_weight_blocks(good, "") is not None
    for name, bad, match in [
        ("block_col_idx", lambda t: t.fill_(7), r"block_col_idx in \[0, 7\)"),
        ("block_col_idx", lambda t: t.flip(0), "strictly increasing within a block row"),
        ("block_row_ptr", lambda t: t.add_(1), r"block_row_ptr\[0\] == 0"),
        ("block_row_ptr", lambda t: t.long(), "int32 row_ptr"),
        ("block_values", lambda t: t.index_fill_(2, torch.tensor([15]), 1.0), "expected zeros in the padding"),
    ]:
        state = {k: v.clone() for k, v in good.items()}
        state[name] = bad(state[name]).contiguous()
        target = BlockSparseLinear(100, 70, layer.nnz_blocks, 16)
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(RuntimeError, match=match):
            target.load_state_dict(state)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items())


def test_module_compiles_fullgraph():
    layer = BlockSparseLinear.from_dense(_block_linear(48, 40, 16, 0.4), min_block_sparsity=0.0)
    x = torch.randn(3, 40)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    assert torch.equal(compiled(x), layer(x))


def test_module_constructor_errors():
    with pytest.raises(ValueError, match="in_features >= 1"):
        BlockSparseLinear(0, 16, 0, 16)
    with pytest.raises(ValueError, match="out_features >= 1"):
        BlockSparseLinear(16, True, 0, 16)
    with pytest.raises(ValueError, match="block_size in"):
        BlockSparseLinear(16, 16, 0, 8)
    with pytest.raises(ValueError, match=r"nnz_blocks in \[0, 6\]"):
        BlockSparseLinear(40, 20, 7, 16)
    with pytest.raises(ValueError, match="nnz_blocks"):
        BlockSparseLinear(40, 20, -1, 16)
    with pytest.raises(TypeError, match="dtype"):
        BlockSparseLinear(40, 20, 1, 16, dtype=torch.float64)
    with pytest.raises(ValueError, match="backend"):
        BlockSparseLinear(40, 20, 1, 16, backend="fastest")


def test_check_convertible_reasons_and_from_dense_errors():
    assert "not an nn.Linear" in BlockSparseLinear.check_convertible(nn.Conv2d(4, 4, 1))
    assert "float64" in BlockSparseLinear.check_convertible(nn.Linear(32, 32, dtype=torch.float64))
    mixed = _block_linear(32, 32, 16, 0.3)
    mixed.bias = nn.Parameter(mixed.bias.detach().half())
    assert "bias dtype" in BlockSparseLinear.check_convertible(mixed)
    assert "meta device" in BlockSparseLinear.check_convertible(nn.Linear(32, 32, device="meta"))
    dense = nn.Linear(64, 64)
    reason = BlockSparseLinear.check_convertible(dense)
    assert "below min_block_sparsity=0.5" in reason and "at 64x64" in reason and "at 16x16" in reason
    with pytest.raises(ValueError, match="cannot convert.*below min_block_sparsity"):
        BlockSparseLinear.from_dense(dense)
    # no zero block at all is never converted, even with min_block_sparsity=0
    assert BlockSparseLinear.check_convertible(dense, min_block_sparsity=0.0) is not None
    ok = _block_linear(64, 64, 16, 0.2)
    assert BlockSparseLinear.check_convertible(ok, block_size=16, min_block_sparsity=0.5) is None
    with pytest.raises(ValueError, match="block_size None or one of"):
        BlockSparseLinear.check_convertible(ok, block_size=8)
    with pytest.raises(ValueError, match=r"min_block_sparsity in \[0, 1\]"):
        BlockSparseLinear.check_convertible(ok, min_block_sparsity=1.5)
    with pytest.raises(ValueError, match="min_block_sparsity"):
        BlockSparseLinear.from_dense(ok, min_block_sparsity=float("nan"))


def test_module_forward_errors():
    layer = BlockSparseLinear.from_dense(_block_linear(32, 48, 16, 0.3), min_block_sparsity=0.0)
    with pytest.raises(ValueError, match=r"\[..., 48\]"):
        layer(torch.randn(2, 47))
    with pytest.raises(TypeError, match="dtype torch.float32"):
        layer(torch.randn(2, 48, dtype=torch.float16))


@pytest.mark.parametrize("backend", ["reference", "dense"])
def test_input_and_bias_gradients_through_the_op(backend):
    # the custom op had no autograd formula: backward raised on every backend but the eager CPU "auto" path
    gen = torch.Generator().manual_seed(0)
    w, _ = block_masked(40, 48, 16, 0.5, dtype=torch.float32, generator=gen)
    wb = compress_blocks(w, 16)
    x = torch.randn(3, 2, 48, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    y = block_sparse_linear(x, wb, bias, backend=backend)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    x64 = x.detach().double().requires_grad_()
    b64 = bias.detach().double().requires_grad_()
    (F.linear(x64, w.double(), b64) * g.double()).sum().backward()
    assert_close_rel(x.grad, x64.grad, torch.float32)
    assert_close_rel(bias.grad, b64.grad, torch.float32)
    values = wb.values.clone().requires_grad_()
    y = torch.ops.sparsekernels.block_sparse_linear(x.detach(), values, wb.row_ptr, wb.col_idx, None, 40, backend)
    with pytest.raises(RuntimeError, match="no gradient for the block-sparse weight"):
        y.sum().backward()
