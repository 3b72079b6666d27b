"""Input permutations carried by 2:4 layers: a dense layer with an ``input_perm`` buffer whose weight is 2:4 in the
permuted input order (what channel-permutation pruning produces where it cannot reorder the producers) swaps into a
sparse layer that stores ``W[:, input_perm]`` compressed and gathers its input in the kernels' activation load.
Every backend equals the dense layer (original-order weight) against a float64 reference; outputs are fully
written; no permutation value makes a kernel read out of bounds; the state travels through state dicts,
checkpoints and Hugging Face files, validated at each boundary."""
import copy
import re

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import sparsekernels as sk
from sparsekernels.formats.sparse24 import (
    Sparse24Weight,
    compress_24,
    conv_weight_from_2d,
    conv_weight_to_2d,
    permute_columns,
    unpermute_columns,
)
from sparsekernels.ops import checks
from sparsekernels.ops.sparse24_conv2d import launch_sparse24_conv2d
from sparsekernels.ops.sparse24_linear import launch_sparse24_linear
from test_swap import mask_24
from tolerances import assert_close_rel

BACKENDS = ("auto", "dense", "reference", "triton")


# ----------------------------------------------------------------------------------------------------
# what pruning hands over (written here: the tests do not import pruning)


def permuted_24(weight2d: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """``weight2d`` [out, k] (original order) masked so that its permuted view (blocks of ``len(perm)``) is 2:4."""
    return unpermute_columns(mask_24(permute_columns(weight2d, perm)), perm)


@torch.no_grad()
def add_input_perm(layer: nn.Module, seed: int = 0) -> nn.Module:
    """Give a dense Linear / Conv2d / transformers Conv1D a random ``input_perm`` buffer and make its weight 2:4 in
    that order -- and not in the original one -- as channel-permutation pruning does."""
    g = torch.Generator().manual_seed(seed)
    if isinstance(layer, nn.Linear):
        perm = torch.randperm(layer.in_features, generator=g)
        layer.weight.copy_(permuted_24(layer.weight, perm))
    elif isinstance(layer, nn.Conv2d):
        perm = torch.randperm(layer.in_channels, generator=g)
        w2 = permuted_24(conv_weight_to_2d(layer.weight), perm)
        layer.weight.copy_(conv_weight_from_2d(w2, layer.in_channels, layer.kernel_size))
    else:  # Conv1D: weight [in, out], 2:4 along in
        perm = torch.randperm(layer.weight.shape[0], generator=g)
        layer.weight.copy_(permuted_24(layer.weight.t(), perm).t())
    layer.register_buffer("input_perm", perm)
    return layer


def permuted_weight(n: int, k: int, dtype, seed=0):
    """(dense [n, k] original order, perm, its Sparse24Weight)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(k, generator=g)
    w = permuted_24(torch.randn(n, k, generator=g), perm).to(dtype)
    return w, perm, compress_24(w, input_perm=perm)


def permuted_conv_weight(n: int, c: int, kh: int, kw: int, dtype, seed=0):
    """(dense [n, c, kh, kw] original channel order, perm over c, its Sparse24Weight)."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(c, generator=g)
    w2 = permuted_24(torch.randn(n, kh * kw * c, generator=g), perm).to(dtype)
    return conv_weight_from_2d(w2, c, (kh, kw)), perm, compress_24(w2, input_perm=perm)


# ----------------------------------------------------------------------------------------------------
# the format


def test_format_round_trip_and_its_refusals():
    w, perm, w24 = permuted_weight(6, 24, torch.float32)
    assert not sk.formats.sparse24.is_24_sparse(w) and sk.formats.sparse24.is_24_sparse(w[:, perm])
    assert torch.equal(w24.to_dense(), w) and torch.equal(w24.stored_dense(), w[:, perm])
    assert torch.equal(w.gather(1, w24.indices()), w24.values)  # indices() answers original columns
    assert w24.validate() is w24 and "input_perm=[24]" in repr(w24)
    assert w24.nbytes == compress_24(w[:, perm]).nbytes + 24 * 8
    moved = w24.to(torch.float16)
    assert moved.input_perm is not None and torch.equal(moved.to_dense(), w.half())
    # a conv's channels-last view: one permutation of C, the same at every kernel position
    c4, cperm, c24 = permuted_conv_weight(5, 8, 3, 2, torch.float32)
    assert torch.equal(conv_weight_from_2d(c24.to_dense(), 8, (3, 2)), c4)
    assert torch.equal(c24.stored_dense(), conv_weight_to_2d(c4[:, cperm]))
    bad = perm.clone()
    bad[3] = bad[4]
    for p, exc, match in [(bad, ValueError, "appears more than once"), (perm.to(torch.int32), TypeError, "int64"),
                          (torch.arange(5), ValueError, "dividing in=24"), (perm + 1, ValueError, "outside"),
                          (perm.tolist(), TypeError, "tensor")]:
        with pytest.raises(exc, match=match):
            compress_24(w, input_perm=p)
    with pytest.raises(ValueError, match="input_perm order"):
        compress_24(w, input_perm=torch.arange(24))  # 2:4 only in the permuted order
    with pytest.raises(ValueError, match="permutation"):
        Sparse24Weight(w24.values, w24.meta, w24.shape, bad).validate()
    with pytest.raises(TypeError, match="int64"):
        Sparse24Weight(w24.values, w24.meta, w24.shape, perm.float())
    with pytest.raises(ValueError, match="length dividing"):
        Sparse24Weight(w24.values, w24.meta, w24.shape, torch.arange(7))
    # any contents expand without error, as the kernels compute: out of range dropped, repeats add
    hostile = torch.tensor([0, 0, 30, -2] + list(range(4, 24)))
    dense = Sparse24Weight(w24.values, w24.meta, w24.shape, hostile).to_dense()
    stored = w24.stored_dense()
    assert torch.equal(dense[:, 0], stored[:, 0] + stored[:, 1]) and not dense[:, 1:4].any()


# ----------------------------------------------------------------------------------------------------
# the ops, every backend, against float64


@pytest.mark.interpreter
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("m, n, k, has_bias, split_k", [
    (1, 37, 68, True, 1),  # K not a multiple of the block (32) nor of 8
    (13, 16, 36, False, 1),
    (67, 33, 64, True, 1),  # several token tiles
    (3, 21, 196, True, 3),  # split-K with uneven tiles per split
])
def test_linear_every_backend_equals_the_dense_layer(kernel_device, monkeypatch, dtype, m, n, k, has_bias, split_k):
    w, perm, w24 = permuted_weight(n, k, dtype)
    w24 = w24.to(kernel_device)
    x = torch.randn(m, k).to(dtype).to(kernel_device)
    bias = torch.randn(n).to(dtype).to(kernel_device) if has_bias else None
    ref = F.linear(x.double(), w.double().to(kernel_device), None if bias is None else bias.double())
    out = torch.full((m, n), float("nan"), dtype=dtype, device=kernel_device)
    ws = torch.full((split_k, m, n), float("nan"), device=kernel_device) if split_k > 1 else None
    launch_sparse24_linear(x, w24.values, w24.meta, bias, k, w24.input_perm, out=out, split_k=split_k, workspace=ws)
    assert not out.isnan().any() and (ws is None or not ws.isnan().any()), "an element was left unwritten"
    assert_close_rel(out, ref, dtype)
    monkeypatch.setenv("SPARSEKERNELS_SPLIT_K", str(split_k))
    for backend in BACKENDS:
        assert_close_rel(sk.sparse24_linear(x, w24, bias, backend=backend), ref, dtype)


@pytest.mark.interpreter
@pytest.mark.parametrize("b, c, h, wd, n, k, stride, padding, channels_last, dtype", [
    (2, 8, 7, 6, 9, 3, 1, 1, False, torch.float32),
    (2, 8, 7, 6, 9, 3, 2, 1, True, torch.float16),
    (3, 20, 4, 5, 7, 1, 1, 0, True, torch.float32),  # 1x1: the GEMM path, C > BLOCK_K
    (1, 12, 5, 5, 6, 1, 1, 0, False, torch.float32),
])
def test_conv_every_backend_equals_the_dense_layer(kernel_device, b, c, h, wd, n, k, stride, padding, channels_last,
                                                   dtype):
    weight, perm, w24 = permuted_conv_weight(n, c, k, k, dtype)
    w24 = w24.to(kernel_device)
    x = torch.randn(b, c, h, wd).to(dtype).to(kernel_device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    bias = torch.randn(n).to(dtype).to(kernel_device)
    ref = F.conv2d(x.double(), weight.double().to(kernel_device), bias.double(), stride, padding)
    out = torch.full(ref.shape, float("nan"), dtype=dtype, device=kernel_device).contiguous(memory_format=fmt)
    launch_sparse24_conv2d(x, w24.values, w24.meta, bias, stride, padding, 1, (k, k), w24.input_perm, out=out)
    assert not out.isnan().any(), "an element was left unwritten"
    assert_close_rel(out, ref, dtype)
    for backend in BACKENDS:
        y = sk.sparse24_conv2d(x, w24, bias, stride, padding, kernel_size=k, backend=backend)
        assert_close_rel(y, ref, dtype)
        assert y.is_contiguous(memory_format=fmt), backend


@pytest.mark.interpreter
@pytest.mark.parametrize("op", ["linear", "conv"])
def test_kernels_stay_in_bounds_whatever_the_permutation(kernel_device, monkeypatch, op):
    # past the contract (which refuses these), the kernels mask every gathered index: an index outside [0, K) reads a
    # zero, repeats read twice -- exactly the weight Sparse24Weight.to_dense() gives for such contents
    monkeypatch.setattr(checks, "cached", lambda *args: True)  # skip the contents check, keep the shape checks
    k = 36 if op == "linear" else 8
    hostile = torch.arange(k)
    hostile[:5] = torch.tensor([k, -1, 2**40, 3, 3])
    hostile = hostile.to(kernel_device)
    if op == "linear":
        _, _, w24 = permuted_weight(11, k, torch.float32)
        w24 = Sparse24Weight(w24.values, w24.meta, w24.shape, hostile).to(kernel_device)
        x = torch.randn(5, k, device=kernel_device)
        y = launch_sparse24_linear(x, w24.values, w24.meta, None, k, hostile, split_k=2)
        ref = F.linear(x.double(), w24.to_dense().double())
    else:
        _, _, w24 = permuted_conv_weight(6, k, 3, 3, torch.float32)
        w24 = Sparse24Weight(w24.values, w24.meta, w24.shape, hostile).to(kernel_device)
        x = torch.randn(1, k, 5, 4, device=kernel_device)
        y = launch_sparse24_conv2d(x, w24.values, w24.meta, None, 1, 1, 1, (3, 3), hostile)
        ref = F.conv2d(x.double(), conv_weight_from_2d(w24.to_dense().double(), k, (3, 3)), None, 1, 1)
    assert_close_rel(y, ref, torch.float32)


# ----------------------------------------------------------------------------------------------------
# the modules


def _dense_layers():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    conv1d = transformers.pytorch_utils.Conv1D(10, 24)
    with torch.no_grad():
        conv1d.bias.normal_()
    return {
        "linear": (add_input_perm(nn.Linear(28, 10)), (3, 5, 28)),
        "conv3x3": (add_input_perm(nn.Conv2d(8, 6, 3, padding=1)), (2, 8, 5, 4)),
        "conv1x1": (add_input_perm(nn.Conv2d(12, 6, 1)), (2, 12, 3, 3)),
        "conv1d": (add_input_perm(conv1d), (2, 3, 24)),
    }


@pytest.mark.interpreter
def test_sparse_modules_equal_the_dense_layer_on_every_backend(kernel_device):
    for kind, (dense, shape) in _dense_layers().items():
        dense = dense.to(kernel_device)
        x = torch.randn(shape, device=kernel_device)
        with torch.no_grad():
            ref = copy.deepcopy(dense).double()(x.double())
            plain = dense(x)
        for backend in BACKENDS:
            model = nn.Sequential(copy.deepcopy(dense))
            report = sk.sparsify(model, backend=backend)
            layer = model[0]
            assert report.swapped_names == ["0"] and layer.permuted, kind
            assert "input_perm" in " ".join(report.notes)
            with torch.no_grad():
                y = layer(x)
            assert_close_rel(y, ref, torch.float32)
            if backend == "auto" and kernel_device.type == "cpu":
                assert torch.equal(y, plain), kind  # the dense op on the original-order weight: no gather
                assert set(dict(layer.named_buffers())) == {"input_perm"}
                assert torch.equal(layer.weight, dense.weight)


def test_state_dict_forms_and_refusals():
    dense = add_input_perm(nn.Linear(16, 8))
    layer = sk.SparseLinear.from_dense(dense)
    state = layer.state_dict()
    assert list(state) == ["weight_values", "weight_meta", "bias", "input_perm"]
    assert torch.equal(state["input_perm"], dense.input_perm)
    stored = compress_24(dense.weight.detach()[:, dense.input_perm])
    assert torch.equal(state["weight_values"], stored.values) and torch.equal(state["weight_meta"], stored.meta)
    assert layer.constructor_args() == {"in_features": 16, "out_features": 8, "bias": True, "input_perm": True}
    x = torch.randn(4, 16)
    layer.backend = "reference"  # compressed form: the same state dict
    assert set(dict(layer.named_parameters())) == {"weight_values", "bias"}
    assert all(torch.equal(state[k], v) for k, v in layer.state_dict().items())
    layer.backend = "auto"
    with torch.device("meta"):
        empty = sk.SparseLinear(16, 8, input_perm=True)
    empty.load_state_dict(state, assign=True)
    assert torch.equal(empty(x), dense(x)) and torch.equal(empty.to_dense().weight, dense.weight)
    fresh = sk.SparseLinear(16, 8, input_perm=True)  # a valid zero layer: the identity permutation
    assert torch.equal(fresh.input_perm, torch.arange(16)) and fresh.weight24.validate() is not None
    dup = state["input_perm"].clone()
    dup[0] = dup[1]
    for label, bad, match in [
        ("not a permutation", {**state, "input_perm": dup}, "appears more than once"),
        ("out of range", {**state, "input_perm": state["input_perm"] + 1}, "outside"),
        ("wrong length", {**state, "input_perm": torch.arange(12)}, r"shape \(16,\)"),
        ("int32", {**state, "input_perm": state["input_perm"].int()}, "int64"),
        ("without input_perm", {k: v for k, v in state.items() if k != "input_perm"}, "together"),
        ("only input_perm", {"bias": state["bias"], "input_perm": state["input_perm"]}, "together"),
    ]:
        target = sk.SparseLinear(16, 8, input_perm=True, backend=("reference" if "only" in label else "auto"))
        before = {k: v.clone() for k, v in target.state_dict().items()}
        with pytest.raises(RuntimeError, match=match):
            target.load_state_dict(bad, strict=False)
        assert all(torch.equal(before[k], v) for k, v in target.state_dict().items()), label
    unpermuted = sk.SparseLinear(16, 8)
    with pytest.raises(RuntimeError, match="built without one"):
        unpermuted.load_state_dict(state, strict=False)
    with pytest.raises(TypeError, match="bool"):
        sk.SparseLinear(16, 8, input_perm=torch.arange(16))


def test_to_dense_and_densify_give_back_the_layer_pruning_made():
    model = nn.Sequential(add_input_perm(nn.Linear(16, 8)))
    before = copy.deepcopy(model)
    sk.sparsify(model)
    dense = model[0].to_dense()
    assert torch.equal(dense.weight, before[0].weight) and torch.equal(dense.input_perm, before[0].input_perm)
    sk.densify(model)
    assert type(model[0]) is nn.Linear and torch.equal(model[0].input_perm, before[0].input_perm)
    assert sk.sparsify(model).swapped_names == ["0"]  # converts back: densify is sparsify's exact inverse
    conv = add_input_perm(nn.Conv2d(8, 4, 3, padding=1), seed=1)
    back = sk.SparseConv2d.from_dense(conv).to_dense()
    assert torch.equal(back.weight, conv.weight) and torch.equal(back.input_perm, conv.input_perm)


def test_bad_dense_permutations_are_left_dense_with_the_reason():
    base = add_input_perm(nn.Linear(16, 8))
    cases = {
        "dup": (lambda p: torch.cat([p[:1], p[:-1]]), "appears more than once"),
        "int32": (lambda p: p.int(), "int64"),
        "short": (lambda p: p[:12], r"shape \(16,\)"),
        "identity": (lambda p: torch.arange(16), "not 2:4 sparse.*input_perm"),
    }
    for label, (make, match) in cases.items():
        layer = copy.deepcopy(base)
        layer.input_perm = make(base.input_perm)
        model = nn.Sequential(layer)
        report = sk.sparsify(model)
        assert not report.swapped and type(model[0]) is nn.Linear, label
        assert re.search(match, report.skipped_reasons["0"]), (label, report)


def test_checkpoints_and_hugging_face_files_carry_the_permutation(tmp_path):
    model = nn.Sequential(add_input_perm(nn.Linear(16, 8)), nn.ReLU(), add_input_perm(nn.Linear(8, 4), seed=1))
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    sk.sparsify(model)
    sk.save_sparse(model, tmp_path / "model.safetensors")
    fresh = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    sk.load_sparse(fresh, tmp_path / "model.safetensors")
    assert fresh[0].permuted and fresh[2].permuted
    with torch.no_grad():
        assert torch.equal(fresh(x), ref)

    transformers = pytest.importorskip("transformers")
    import sparsekernels.huggingface  # noqa: F401  registers the from_pretrained plug-in

    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=50)
    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(config).eval()
    for proj in (lm.model.layers[0].mlp.down_proj, lm.model.layers[0].self_attn.o_proj):
        add_input_perm(proj)
    ids = torch.randint(0, 50, (2, 7))
    with torch.no_grad():
        dense_logits = lm(ids).logits
    sk.sparsify(lm)
    lm.save_pretrained(tmp_path / "hf")
    back = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "hf")
    down = back.model.layers[0].mlp.down_proj
    assert isinstance(down, sk.SparseLinear) and down.permuted
    with torch.no_grad():
        assert torch.equal(back(ids).logits, dense_logits)
