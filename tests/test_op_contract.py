"""One contract per op, on every backend: a table of inputs (good and bad) for each op, called through the public
function, the ``torch.ops.sparsekernels`` custom op directly and the module. Every backend gives the same verdict
(the same exception type, or an answer), and every answer matches a float64 reference. The one documented
exception: the Triton interpreter (CPU) refuses bfloat16, which its ``tl.dot`` cannot compute."""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekernels as sk
from sparsekernels import compress_24, compress_blocks
from sparsekernels.formats.sparse24 import conv_weight_from_2d
from sparsekernels.ops.functional import custom_op
from test_swap import mask_24
from tolerances import assert_close_rel

HAS_CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if HAS_CUDA else "cpu")
BACKENDS = ("auto", "dense", "reference", "triton") + (("cusparselt",) if HAS_CUDA else ())

for _op in ("sparse24_linear", "sparse24_conv2d", "block_sparse_linear"):
    custom_op(_op)  # registers torch.ops.sparsekernels.<op>
OPS = torch.ops.sparsekernels


def _documented_refusal(backend: str, dtype: torch.dtype):
    """The exception type a backend that cannot compute a good case raises for it, or None."""
    if backend == "triton" and not HAS_CUDA and dtype == torch.bfloat16:
        return RuntimeError
    return None


def _verdict(call):
    try:
        return call()
    except (TypeError, ValueError, RuntimeError) as exc:
        return exc


def _check_row(name, calls: dict, reference, dtype):
    """``calls``: backend -> zero-argument call. The same verdict on every backend; answers match ``reference``."""
    verdicts = {b: _verdict(c) for b, c in calls.items()}
    kinds = {}
    for backend, v in verdicts.items():
        if not isinstance(v, Exception):
            kinds[backend] = "answer"
            continue
        documented = _documented_refusal(backend, dtype) if reference is not None else None
        if documented is not None and type(v) is documented:
            continue  # a refusal the contract names
        kinds[backend] = type(v).__name__
    assert len(set(kinds.values())) == 1, f"{name}: verdicts differ across backends: " + ", ".join(
        f"{b}: {kinds[b]} ({verdicts[b]})" for b in kinds)
    verdict = next(iter(kinds.values()))
    if reference is None:
        assert verdict != "answer", f"{name}: a bad input was accepted by every backend"
        return
    assert verdict == "answer", f"{name}: a good input was refused: {verdicts}"
    for backend, out in verdicts.items():
        if not isinstance(out, Exception):
            dt = "tf32" if (backend == "triton" and dtype == torch.float32 and HAS_CUDA) else dtype
            assert_close_rel(out, reference, dt, factor=2)


# ----------------------------------------------------------------------------------------------------
# 2:4 Linear


def _linear_weight(dtype, n=8, k=12):
    w = mask_24(torch.randn(n, k, dtype=torch.float64))
    return w, compress_24(w.to(dtype).to(DEVICE)), torch.randn(n, dtype=torch.float64)


def _row_cases(k, n):
    """(name, dtype, x, bias, good) for an op taking ``x`` ``[..., k]`` to ``[..., n]``: the cases the 2:4 and the
    block-sparse Linear share. ``bias``: True / False (the weight's bias or none), or the tensor to pass."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    x = torch.randn(3, k, dtype=torch.float64)
    return [
        ("3 rows", f32, x, True, True),
        ("no bias", f32, x, False, True),
        ("leading dims", f32, torch.randn(2, 3, k, dtype=torch.float64), True, True),
        ("one 1-D row", f32, torch.randn(k, dtype=torch.float64), True, True),
        ("zero rows", f32, torch.randn(0, k, dtype=torch.float64), True, True),
        ("zero rows, leading dims", f32, torch.randn(2, 0, k, dtype=torch.float64), True, True),
        ("strided x", f32, torch.randn(3, 2 * k, dtype=torch.float64)[:, ::2], True, True),
        ("float16", f16, x, True, True),
        ("bfloat16", bf16, x, True, True),
        ("bias of shape (1,)", f32, x, torch.randn(1), False),
        ("bias of shape (n, 1)", f32, x, torch.randn(n, 1), False),
        ("scalar bias", f32, x, torch.tensor(1.0), False),
        ("bias of another dtype", f32, x, torch.randn(n, dtype=torch.float16), False),
        ("bias on another device", f32, x, torch.randn(n, device="meta"), False),
        ("bias not a tensor", f32, x, [0.0] * n, False),
        ("x of the wrong width", f32, torch.randn(3, k + 4, dtype=torch.float64), True, False),
        ("0-d x", f32, torch.tensor(1.0, dtype=torch.float64), True, False),
        ("x of another dtype", f32, x.to(torch.float16), True, False),
        ("float64 x", f32, "float64", True, False),
        ("integer x", f32, torch.ones(3, k, dtype=torch.int64), True, False),
        ("x on another device", f32, torch.randn(3, k, device="meta"), True, False),
    ]


def _as_input(x, dtype, k):
    if isinstance(x, str):
        return torch.randn(3, k, dtype=torch.float64, device=DEVICE)  # a dtype no kernel computes
    if x.dtype == torch.float64:
        return x.to(dtype).to(DEVICE)
    return x.to(DEVICE) if x.device.type != "meta" else x


def _bias_arg(bias, b64, dtype):
    if bias is True:
        return b64.to(dtype).to(DEVICE)
    if bias is False:
        return None
    return bias.to(DEVICE) if isinstance(bias, torch.Tensor) and bias.device.type != "meta" else bias


@pytest.mark.interpreter
@pytest.mark.parametrize("case", _row_cases(12, 8), ids=lambda c: c[0])
def test_sparse24_linear_contract(case):
    name, dtype, x, bias, good = case
    w64, w24, b64 = _linear_weight(dtype)
    xin = _as_input(x, dtype, 12)
    bin_ = _bias_arg(bias, b64, dtype)
    reference = None
    if good:
        reference = F.linear(xin.double(), w24.to_dense().double(), None if bin_ is None else bin_.double())
    _check_row(f"sparse24_linear({name})", {b: (lambda b=b: sk.sparse24_linear(xin, w24, bin_, backend=b))
                                            for b in BACKENDS}, reference, dtype)
    _check_row(f"torch.ops.sparsekernels.sparse24_linear({name})",
               {b: (lambda b=b: OPS.sparse24_linear(xin, w24.values, w24.meta, bin_, 12, b)) for b in BACKENDS},
               reference, dtype)


@pytest.mark.parametrize("name, args, exc", [
    ("values of the wrong width", lambda v, m: (v[:, :-1], m, 12), ValueError),
    ("metadata of another dtype", lambda v, m: (v, m.to(torch.int32), 12), TypeError),
    ("metadata of the wrong shape", lambda v, m: (v, m[:-1], 12), ValueError),
    ("metadata on another device", lambda v, m: (v, m.to("meta"), 12), ValueError),
    ("in_features not a multiple of 4", lambda v, m: (v, m, 10), ValueError),
    ("in_features against x", lambda v, m: (torch.cat([v, v], 1), torch.cat([m, m], 1)[:, :3], 24), ValueError),
    ("empty weight", lambda v, m: (v[:0], m[:0], 12), ValueError),
])
def test_sparse24_linear_custom_op_refuses_inconsistent_tensors(name, args, exc):
    _, w24, _ = _linear_weight(torch.float32)
    x = torch.randn(3, 12, device=DEVICE)
    values, meta, k = args(w24.values, w24.meta)
    _check_row(name, {b: (lambda b=b: OPS.sparse24_linear(x, values, meta, None, k, b)) for b in BACKENDS},
               None, torch.float32)
    with pytest.raises(exc):
        OPS.sparse24_linear(x, values, meta, None, k, "reference")


# ----------------------------------------------------------------------------------------------------
# 2:4 Conv2d


def _conv_weight(dtype, n=6, c=4, kh=2, kw=2):
    w2 = mask_24(torch.randn(n, kh * kw * c, dtype=torch.float64))
    return w2, compress_24(w2.to(dtype).to(DEVICE)), torch.randn(n, dtype=torch.float64)


def _conv_cases():
    """(name, dtype, x, bias, geometry (stride, padding, dilation, kernel_size), good)."""
    f32, f16, bf16 = torch.float32, torch.float16, torch.bfloat16
    x = torch.randn(1, 4, 5, 4, dtype=torch.float64)
    g = (1, 1, 1, 2)
    return [
        ("basic", f32, x, True, g, True),
        ("no bias", f32, x, False, g, True),
        ("channels-last", f32, x.contiguous(memory_format=torch.channels_last), True, g, True),
        ("stride 2, padding 2, dilation 2", f32, x, True, (2, 2, 2, 2), True),
        ("zero images", f32, torch.randn(0, 4, 5, 4, dtype=torch.float64), True, g, True),
        ("float16", f16, x, True, g, True),
        ("bfloat16", bf16, x, True, g, True),
        ("bias of shape (1,)", f32, x, torch.randn(1), g, False),
        ("bias of shape (6, 1)", f32, x, torch.randn(6, 1), g, False),
        ("bias of another dtype", f32, x, torch.randn(6, dtype=torch.float16), g, False),
        ("a channel count that divides the weight differently", f32, torch.randn(1, 16, 5, 4, dtype=torch.float64),
         True, g, False),
        ("6 channels", f32, torch.randn(1, 6, 5, 4, dtype=torch.float64), True, g, False),
        ("3-D x", f32, x[0], True, g, False),
        ("zero height", f32, torch.randn(1, 4, 0, 4, dtype=torch.float64), True, g, False),
        ("input smaller than the kernel", f32, torch.randn(1, 4, 1, 1, dtype=torch.float64), True, (1, 0, 1, 2), False),
        ("no kernel_size", f32, x, True, (1, 1, 1, None), False),
        ("kernel_size of the wrong area", f32, x, True, (1, 1, 1, (1, 2)), False),
        ("stride 0", f32, x, True, (0, 1, 1, 2), False),
        ("x of another dtype", f32, x.to(torch.float16), True, g, False),
    ]


@pytest.mark.interpreter
@pytest.mark.parametrize("case", _conv_cases(), ids=lambda c: c[0])
def test_sparse24_conv2d_contract(case):
    name, dtype, x, bias, (stride, padding, dilation, ks), good = case
    w64, w24, b64 = _conv_weight(dtype)
    xin = x.to(dtype).to(DEVICE) if x.dtype == torch.float64 else x.to(DEVICE)
    bin_ = _bias_arg(bias, b64, dtype)
    reference = None
    if good:
        reference = F.conv2d(xin.double(), conv_weight_from_2d(w24.to_dense().double(), 4, (2, 2)),
                             None if bin_ is None else bin_.double(), stride, padding, dilation)
    _check_row(f"sparse24_conv2d({name})", {
        b: (lambda b=b: sk.sparse24_conv2d(xin, w24, bin_, stride, padding, dilation, kernel_size=ks, backend=b))
        for b in BACKENDS if b != "cusparselt"}, reference, dtype)
    pair = lambda v: [v, v] if isinstance(v, int) else (None if v is None else list(v))  # noqa: E731
    _check_row(f"torch.ops.sparsekernels.sparse24_conv2d({name})", {
        b: (lambda b=b: OPS.sparse24_conv2d(xin, w24.values, w24.meta, bin_, pair(stride), pair(padding),
                                            pair(dilation), pair(ks) if ks is not None else [1, 1], b))
        for b in BACKENDS if b != "cusparselt"}, reference if ks is not None else None, dtype)


# ----------------------------------------------------------------------------------------------------
# block-sparse Linear


def _block_weight(dtype, n=36, k=40):
    w = torch.randn(n, k, dtype=torch.float64)
    w[:, 16:32] = 0
    w[16:32] = 0
    return compress_blocks(w.to(dtype).to(DEVICE), 16), torch.randn(n, dtype=torch.float64)


@pytest.mark.interpreter
@pytest.mark.parametrize("case", _row_cases(40, 36), ids=lambda c: c[0])
def test_block_sparse_linear_contract(case):
    name, dtype, x, bias, good = case
    wb, b64 = _block_weight(dtype)
    xin = _as_input(x, dtype, 40)
    bin_ = _bias_arg(bias, b64, dtype)
    reference = None
    if good:
        reference = F.linear(xin.double(), wb.to_dense().double(), None if bin_ is None else bin_.double())
    backends = [b for b in BACKENDS if b != "cusparselt"]
    _check_row(f"block_sparse_linear({name})", {
        b: (lambda b=b: sk.block_sparse_linear(xin, wb, bin_, backend=b)) for b in backends}, reference, dtype)
    if name != "x of the wrong width":  # the custom op takes in_features from x
        _check_row(f"torch.ops.sparsekernels.block_sparse_linear({name})", {
            b: (lambda b=b: OPS.block_sparse_linear(xin, wb.values, wb.row_ptr, wb.col_idx, bin_, 36, b))
            for b in backends}, reference, dtype)


@pytest.mark.parametrize("name, args, exc", [
    ("row_ptr of the wrong length", lambda v, r, c: (v, r[:-1], c, 36), ValueError),
    ("col_idx of another dtype", lambda v, r, c: (v, r, c.long(), 36), TypeError),
    ("non-square blocks", lambda v, r, c: (v[:, :, :8], r, c, 36), ValueError),
    ("a block size that is not 16, 32 or 64", lambda v, r, c: (v[:, :8, :8], r, c, 36), ValueError),
    ("out_features against row_ptr", lambda v, r, c: (v, r, c, 70), ValueError),
    ("out_features 0", lambda v, r, c: (v, r, c, 0), ValueError),
])
def test_block_sparse_custom_op_refuses_inconsistent_tensors(name, args, exc):
    wb, _ = _block_weight(torch.float32)
    x = torch.randn(3, 40, device=DEVICE)
    values, row_ptr, col_idx, n = args(wb.values, wb.row_ptr, wb.col_idx)
    backends = [b for b in BACKENDS if b != "cusparselt"]
    _check_row(name, {b: (lambda b=b: OPS.block_sparse_linear(x, values, row_ptr, col_idx, None, n, b))
                      for b in backends}, None, torch.float32)
    with pytest.raises(exc):
        OPS.block_sparse_linear(x, values, row_ptr, col_idx, None, n, "reference")


# ----------------------------------------------------------------------------------------------------
# the modules


def _modules(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(12, 8, dtype=dtype)
    conv = nn.Conv2d(4, 6, 2, padding=1, dtype=dtype)
    block = nn.Linear(40, 36, dtype=dtype)
    with torch.no_grad():
        lin.weight.copy_(mask_24(lin.weight))
        w2 = mask_24(conv.weight.permute(0, 2, 3, 1).reshape(6, -1))
        conv.weight.copy_(conv_weight_from_2d(w2, 4, (2, 2)))
        block.weight[:, 16:32] = 0
        block.weight[16:32] = 0
    return [
        ("SparseLinear", lin, lambda m, b: sk.SparseLinear.from_dense(m, backend=b)),
        ("SparseConv2d", conv, lambda m, b: sk.SparseConv2d.from_dense(m, backend=b)),
        ("BlockSparseLinear", block, lambda m, b: sk.BlockSparseLinear.from_dense(m, backend=b, block_size=16)),
    ]


_MODULE_INPUTS = {
    "SparseLinear": [("3 rows", (3, 12), True), ("zero rows", (0, 12), True), ("1-D", (12,), True),
                     ("wrong width", (3, 16), False), ("0-d", (), False)],
    "SparseConv2d": [("batch", (1, 4, 4, 3), True), ("unbatched", (4, 4, 3), True), ("zero images", (0, 4, 4, 3), True),
                     ("wrong channels", (1, 16, 4, 3), False), ("zero height", (1, 4, 0, 3), False)],
    "BlockSparseLinear": [("3 rows", (3, 40), True), ("zero rows", (2, 0, 40), True), ("wrong width", (3, 32), False)],
}


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_module_contract(dtype):
    for kind, dense, convert in _modules(dtype):
        dense = dense.to(DEVICE)
        layers = {b: convert(dense, b) for b in BACKENDS if b != "cusparselt" or kind == "SparseLinear"}
        dense64 = copy.deepcopy(dense).double()
        for name, shape, good in _MODULE_INPUTS[kind] + [("another dtype", None, False), ("meta input", "meta", False),
                                                         ("not a tensor", "list", False)]:
            if shape == "list":
                x = [[0.0] * 4]
            elif shape is None:
                x = torch.randn(_MODULE_INPUTS[kind][0][1], dtype=torch.float16 if dtype != torch.float16 else
                                torch.float32, device=DEVICE)
            elif shape == "meta":
                x = torch.randn(_MODULE_INPUTS[kind][0][1], dtype=dtype, device="meta")
            else:
                x = torch.randn(shape, dtype=dtype, device=DEVICE)
            reference = None
            if good:
                with torch.no_grad():
                    reference = dense64(x.double())
            with torch.no_grad():
                _check_row(f"{kind}({name}, {dtype})", {b: (lambda m=m: m(x)) for b, m in layers.items()},
                           reference, dtype)


# ----------------------------------------------------------------------------------------------------
# hostile tensors straight to the launchers: shapes are refused, contents never make a kernel read out of bounds


def _blocks_reference(x, values, row_ptr, col_idx, n):
    """What the block kernel computes for any index contents: each block row's range clamped to [0, nnz], blocks
    whose column is outside the weight skipped, blocks at one position added."""
    nnz, bs, _ = values.shape
    k = x.shape[1]
    out = torch.zeros(x.shape[0], -(-n // bs) * bs, dtype=torch.float64)
    xp = F.pad(x.double(), (0, -(-k // bs) * bs - k))
    for r in range(row_ptr.numel() - 1):
        start = min(max(int(row_ptr[r]), 0), nnz)
        end = min(max(int(row_ptr[r + 1]), start), nnz)
        for j in range(start, end):
            c = int(col_idx[j])
            if 0 <= c < -(-k // bs):
                out[:, r * bs:(r + 1) * bs] += xp[:, c * bs:(c + 1) * bs] @ values[j].double().T
    return out[:, :n]


@pytest.mark.interpreter
@pytest.mark.parametrize("hostile", ["column past the end", "negative column", "huge column", "row_ptr past nnz",
                                     "negative row_ptr", "decreasing row_ptr", "duplicate blocks"])
def test_block_kernel_stays_in_bounds_whatever_the_indices(hostile):
    from sparsekernels.ops.blocksparse_linear import launch_block_sparse_linear

    wb, _ = _block_weight(torch.float32)  # 36 x 40, bs 16: 3 block rows, 3 block columns, 4 kept blocks
    row_ptr, col_idx = wb.row_ptr.clone(), wb.col_idx.clone()
    if hostile == "column past the end":
        col_idx[1] = 3
    elif hostile == "negative column":
        col_idx[0] = -1
    elif hostile == "huge column":
        col_idx[:] = 2**28  # times the block size wraps 32 bits back into range if unchecked
    elif hostile == "row_ptr past nnz":
        row_ptr[1:] = torch.tensor([3, 50, 2**30], dtype=torch.int32)
    elif hostile == "negative row_ptr":
        row_ptr[:] = torch.tensor([-5, 2, -1, 4], dtype=torch.int32)
    elif hostile == "decreasing row_ptr":
        row_ptr[:] = torch.tensor([4, 2, 1, 0], dtype=torch.int32)
    else:
        col_idx[:] = 0
    x = torch.randn(5, 40, device=DEVICE)
    out = torch.full((5, 36), float("nan"), device=DEVICE)
    launch_block_sparse_linear(x, wb.values, row_ptr, col_idx, None, 36, out=out)
    assert_close_rel(out, _blocks_reference(x.cpu(), wb.values.cpu(), row_ptr, col_idx, 36), torch.float32)


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_24_kernels_give_every_backend_the_same_weight_whatever_the_metadata(op):
    # metadata is never an address: any bytes (equal positions, decreasing positions, padding) expand the same way
    # in the kernels and in Sparse24Weight.to_dense (values at one position add)
    g = torch.Generator().manual_seed(3)
    if op == "linear":
        w24 = compress_24(mask_24(torch.randn(8, 12)).to(DEVICE))
        meta = torch.randint(0, 256, w24.meta.shape, generator=g, dtype=torch.uint8).to(DEVICE)
        x = torch.randn(3, 12, device=DEVICE)
        calls = {b: (lambda b=b: OPS.sparse24_linear(x, w24.values, meta, None, 12, b)) for b in BACKENDS
                 if b != "cusparselt"}
        dense = type(w24)(w24.values, meta, w24.shape).to_dense()
        reference = F.linear(x.double(), dense.double())
    else:
        _, w24, _ = _conv_weight(torch.float32)
        meta = torch.randint(0, 256, w24.meta.shape, generator=g, dtype=torch.uint8).to(DEVICE)
        x = torch.randn(1, 4, 5, 4, device=DEVICE)
        calls = {b: (lambda b=b: OPS.sparse24_conv2d(x, w24.values, meta, None, [1, 1], [1, 1], [1, 1], [2, 2], b))
                 for b in BACKENDS if b != "cusparselt"}
        dense = type(w24)(w24.values, meta, w24.shape).to_dense()
        reference = F.conv2d(x.double(), conv_weight_from_2d(dense.double(), 4, (2, 2)), None, 1, 1)
    _check_row(f"{op} with arbitrary metadata", calls, reference, torch.float32)


@pytest.mark.interpreter
def test_launchers_refuse_inconsistent_shapes():
    from sparsekernels.ops.blocksparse_linear import launch_block_sparse_linear
    from sparsekernels.ops.sparse24_conv2d import launch_sparse24_conv2d
    from sparsekernels.ops.sparse24_linear import launch_sparse24_linear

    _, w24, _ = _linear_weight(torch.float32)
    x = torch.randn(3, 12, device=DEVICE)
    with pytest.raises(ValueError, match="bias of shape"):
        launch_sparse24_linear(x, w24.values, w24.meta, torch.randn(1, device=DEVICE), 12)
    with pytest.raises(ValueError, match="weight values of shape"):
        launch_sparse24_linear(x, w24.values[:, :4], w24.meta, None, 12)
    with pytest.raises(ValueError, match="out to be None"):
        launch_sparse24_linear(x, w24.values, w24.meta, None, 12, out=torch.empty(2, 8, device=DEVICE))
    with pytest.raises(ValueError, match="workspace"):
        launch_sparse24_linear(x, w24.values, w24.meta, None, 12, split_k=2, workspace=torch.empty(1, device=DEVICE))
    with pytest.raises(ValueError, match="split_k to be an int >= 1"):
        launch_sparse24_linear(x, w24.values, w24.meta, None, 12, split_k=0)
    _, c24, _ = _conv_weight(torch.float32)
    with pytest.raises(ValueError, match="kh \\* kw \\* C"):
        launch_sparse24_conv2d(torch.randn(1, 8, 4, 4, device=DEVICE), c24.values, c24.meta, None, 1, 0, 1, (2, 2))
    with pytest.raises(ValueError, match="out to be None"):
        launch_sparse24_conv2d(torch.randn(1, 4, 4, 4, device=DEVICE), c24.values, c24.meta, None, 1, 0, 1, (2, 2),
                               out=torch.empty(1, 6, 4, 4, device=DEVICE))
    wb, _ = _block_weight(torch.float32)
    with pytest.raises(ValueError, match="row_ptr of shape"):
        launch_block_sparse_linear(torch.randn(2, 40, device=DEVICE), wb.values, wb.row_ptr[:2], wb.col_idx, None, 36)
    with pytest.raises(ValueError, match="out to be None"):
        launch_block_sparse_linear(torch.randn(2, 40, device=DEVICE), wb.values, wb.row_ptr, wb.col_idx, None, 36,
                                   out=torch.empty(2, 35, device=DEVICE))
    if not HAS_CUDA:
        with pytest.raises(RuntimeError, match="bfloat16"):
            launch_sparse24_linear(x.bfloat16(), w24.values.bfloat16(), w24.meta, None, 12)
