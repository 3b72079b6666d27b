"""SparseLinear: conversion both ways, equivalence with the masked dense layer, state_dict, meta-device
build + load_state_dict(assign=True), the CPU path, and errors."""
import pytest
import torch
from torch import nn

from sparsekernels.nn.linear import SparseLinear
from tolerances import assert_close_rel


def masked_linear(in_f: int, out_f: int, bias=True, dtype=torch.float32) -> nn.Linear:
    lin = nn.Linear(in_f, out_f, bias=bias, dtype=dtype)
    keep = torch.rand(out_f, in_f // 4, 4).argsort(-1) < 2
    with torch.no_grad():
        lin.weight.mul_(keep.reshape(out_f, in_f).to(dtype))
    return lin


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("bias", [True, False])
def test_from_dense_to_dense_round_trip(dtype, bias):
    lin = masked_linear(36, 23, bias=bias, dtype=dtype)
    sl = SparseLinear.from_dense(lin)
    assert sl.weight_values.dtype == dtype and not sl.weight_values.requires_grad
    back = sl.to_dense()
    assert isinstance(back, nn.Linear) and back.weight.dtype == dtype and back.weight.device == lin.weight.device
    assert torch.equal(back.weight, lin.weight)
    if bias:
        assert torch.equal(back.bias, lin.bias)
    else:
        assert back.bias is None
    assert torch.equal(sl.weight24.to_dense(), lin.weight)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_output_equals_masked_dense_layer(dtype):
    lin = masked_linear(52, 30, dtype=dtype)
    sl = SparseLinear.from_dense(lin)
    x = torch.randn(2, 5, 52).to(dtype)
    with torch.no_grad():
        ref = nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double())
        assert_close_rel(sl(x), ref, dtype)
        assert_close_rel(lin(x), ref, dtype)


@pytest.mark.interpreter
def test_triton_backend_module(kernel_device):
    lin = masked_linear(40, 19).to(kernel_device)
    sl = SparseLinear.from_dense(lin, backend="triton")
    x = torch.randn(3, 40, device=kernel_device)
    with torch.no_grad():
        assert_close_rel(sl(x), nn.functional.linear(x.double(), lin.weight.double(), lin.bias.double()), torch.float32)


def test_state_dict_keys_shapes_and_nothing_else():
    sl = SparseLinear.from_dense(masked_linear(20, 7))
    sl(torch.randn(2, 20))  # populates the CPU cache, which must not enter the state_dict
    state = sl.state_dict()
    assert set(state) == {"weight_values", "weight_meta", "bias"}
    assert state["weight_values"].shape == (7, 10)
    assert state["weight_meta"].shape == (7, 3) and state["weight_meta"].dtype == torch.uint8
    assert state["bias"].shape == (7,)
    assert set(SparseLinear.from_dense(masked_linear(20, 7, bias=False)).state_dict()) == {"weight_values", "weight_meta"}


def test_meta_device_build_then_load_assign():
    src = SparseLinear.from_dense(masked_linear(44, 13))
    with torch.device("meta"):
        model = nn.Sequential(SparseLinear(44, 13), nn.ReLU())
    assert model[0]._parameters["weight_values"].device.type == "meta"
    model.load_state_dict({f"0.{k}": v for k, v in src.state_dict().items()}, assign=True)
    # loaded onto the CPU with backend "auto": the dense weight is the one resident copy
    resident = dict(model[0].named_parameters())
    assert set(resident) == {"weight", "bias"} and set(model[0]._buffers) == set()
    assert isinstance(resident["weight"], nn.Parameter) and not resident["weight"].requires_grad
    assert resident["weight"].device.type == "cpu"
    assert set(model[0].state_dict()) == {"weight_values", "weight_meta", "bias"}
    x = torch.randn(4, 44)
    with torch.no_grad():
        torch.testing.assert_close(model(x), torch.relu(src(x)), rtol=0, atol=0)


def test_fresh_layer_is_a_valid_zero_layer():
    sl = SparseLinear(16, 5, dtype=torch.float16)
    assert torch.equal(sl.weight24.to_dense(), torch.zeros(5, 16, dtype=torch.float16))
    assert sl.weight_meta.shape == (5, 2) and sl.bias.shape == (5,)


def test_cpu_cache_follows_load_state_dict():
    a, b = SparseLinear.from_dense(masked_linear(24, 6)), SparseLinear.from_dense(masked_linear(24, 6))
    x = torch.randn(3, 24)
    with torch.no_grad():
        a(x)  # cache a's dense copy
        a.load_state_dict(b.state_dict())  # in-place copy into a's tensors
        torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_backend_attribute_repr_and_env(monkeypatch):
    sl = SparseLinear.from_dense(masked_linear(8, 4), backend="reference")
    assert sl.backend == "reference"
    assert "in_features=8, out_features=4, bias=True, sparsity=2:4, backend='reference'" in repr(sl)
    monkeypatch.setenv("SPARSEKERNELS_BACKEND", "nope")
    with pytest.raises(ValueError, match="SPARSEKERNELS_BACKEND"):
        sl(torch.randn(1, 8))


def test_compile_fullgraph_module():
    model = nn.Sequential(SparseLinear.from_dense(masked_linear(32, 16)), nn.GELU())
    x = torch.randn(3, 32)
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(model, fullgraph=True, backend="eager")(x), model(x))


def test_torch_export_keeps_one_custom_op_node():
    # an explicit backend keeps the compressed state resident: the exported graph calls the sparse op on it
    model = nn.Sequential(SparseLinear.from_dense(masked_linear(32, 16), backend="reference"), nn.ReLU())
    x = torch.randn(3, 32)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["sparsekernels.sparse24_linear.default", "aten.relu.default"]
    assert {"0.weight_values", "0.weight_meta"} <= set(ep.state_dict) and "0.weight" not in ep.state_dict
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


def test_torch_export_on_cpu_auto_traces_the_one_dense_copy():
    # CPU "auto" keeps one dense weight: export sees nn.Linear's own op on it, and nothing compressed beside it
    model = nn.Sequential(SparseLinear.from_dense(masked_linear(32, 16)), nn.ReLU())
    x = torch.randn(3, 32)
    ep = torch.export.export(model, (x,))
    targets = [str(n.target) for n in ep.graph.nodes if n.op == "call_function"]
    assert targets == ["aten.linear.default", "aten.relu.default"]
    assert set(ep.state_dict) == {"0.weight", "0.bias"}
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), model(x), rtol=0, atol=0)


def test_resident_form_follows_device_and_backend():
    dense = masked_linear(24, 8)
    sl = SparseLinear.from_dense(dense)
    x = torch.randn(2, 24)
    assert set(sl._parameters) == {"weight", "bias"}
    sl.backend = "reference"  # an explicit backend needs the compressed tensors
    assert set(sl._parameters) == {"weight_values", "bias"} and set(sl._buffers) == {"weight_meta"}
    torch.testing.assert_close(sl(x), dense(x), rtol=0, atol=1e-6)
    sl.backend = "auto"
    assert set(sl._parameters) == {"weight", "bias"}
    sl.to("meta")
    assert sl._parameters["weight_values"].device.type == "meta"
    sl.to_empty(device="cpu")
    assert set(sl._parameters) == {"weight", "bias"}
    # both forms answer .weight (dense) and .weight24 (compressed)
    ref = SparseLinear.from_dense(dense, backend="reference")
    torch.testing.assert_close(ref.weight, dense.weight.detach(), rtol=0, atol=0)
    torch.testing.assert_close(SparseLinear.from_dense(dense).weight24.to_dense(), dense.weight.detach(),
                               rtol=0, atol=0)


def test_check_convertible_reasons():
    assert SparseLinear.check_convertible(masked_linear(8, 4)) is None
    assert SparseLinear.check_convertible(nn.Conv2d(4, 4, 1)) == "not an nn.Linear (got Conv2d)"
    assert SparseLinear.check_convertible(nn.Linear(6, 4)) == "in_features=6 is not a multiple of 4"
    assert "torch.float64 is not float16, bfloat16 or float32" in SparseLinear.check_convertible(
        nn.Linear(8, 4, dtype=torch.float64)
    )
    assert "meta device" in SparseLinear.check_convertible(nn.Linear(8, 4, device="meta"))
    dense = nn.Linear(8, 4)
    with torch.no_grad():
        dense.weight.copy_(masked_linear(8, 4).weight)
        dense.weight[2, 4:8] = 1.0
    assert SparseLinear.check_convertible(dense) == (
        "weight is not 2:4 sparse: row 2, group 1 (columns 4..7) has 4 non-zeros"
    )


def test_from_dense_errors():
    with pytest.raises(ValueError, match=r"cannot convert Linear\(in_features=6.*in_features=6 is not a multiple of 4"):
        SparseLinear.from_dense(nn.Linear(6, 4))
    with pytest.raises(ValueError, match="row 0, group 0"):
        SparseLinear.from_dense(nn.Linear(8, 4))
    with pytest.raises(ValueError, match="expected backend to be one of"):
        SparseLinear.from_dense(masked_linear(8, 4), backend="gpu")


def test_constructor_errors():
    with pytest.raises(ValueError, match="expected in_features to be a positive multiple of 4, got 10"):
        SparseLinear(10, 4)
    with pytest.raises(ValueError, match="expected out_features >= 1, got 0"):
        SparseLinear(8, 0)
    with pytest.raises(TypeError, match="expected dtype float16, bfloat16 or float32, got torch.float64"):
        SparseLinear(8, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="expected in_features to be a positive multiple of 4, got 0"):
        SparseLinear(0, 4)
    assert SparseLinear.check_convertible(nn.Linear(0, 4)) == "the weight is empty (4x0)"
    assert SparseLinear.check_convertible(nn.Linear(8, 0)) == "the weight is empty (0x8)"


def test_load_state_dict_validates_and_loads_nothing_of_a_refused_layer():
    sl = SparseLinear.from_dense(masked_linear(12, 4), backend="reference")
    good = {k: v.clone() for k, v in sl.state_dict().items()}
    for name, bad, match in [
        ("weight_meta", lambda t: t.fill_(0x55), "holds positions 1 and 1"),
        ("weight_meta", lambda t: t.to(torch.int64), "uint8 meta"),
        ("weight_values", lambda t: t.double(), "float16, bfloat16 or float32"),
        ("bias", lambda t: t.half(), "bias of weight_values's dtype"),
    ]:
        state = {k: v.clone() for k, v in good.items()}
        state[name] = bad(state[name])
        for layer in (SparseLinear.from_dense(masked_linear(12, 4)), SparseLinear.from_dense(masked_linear(12, 4),
                                                                                            backend="reference")):
            before = {k: v.clone() for k, v in layer.state_dict().items()}
            with pytest.raises(RuntimeError, match=match):
                layer.load_state_dict(state)
            assert all(torch.equal(before[k], v) for k, v in layer.state_dict().items())


def test_forward_errors_name_the_module():
    sl = SparseLinear.from_dense(masked_linear(8, 4))
    with pytest.raises(ValueError, match=r"sparse24_linear\(\): expected x of shape \[..., 8\].*got \(2, 4\)"):
        sl(torch.randn(2, 4))
    with pytest.raises(TypeError, match="expected x of the weight's dtype torch.float32, got torch.float16"):
        sl(torch.randn(2, 8).half())


def test_cpu_sweep_and_design_study_write_results(tmp_path):
    import json

    from sparsekernels.benchmarks import kernels as linear24

    rows = linear24.run_linear24_sweep("cpu", tokens=(1, 3), layers=((32, 24),), out_dir=tmp_path, progress=False)
    assert {(r.tokens, r.backend) for r in rows} == {(1, "dense"), (1, "cpu_auto"), (3, "dense"), (3, "cpu_auto")}
    for r in rows:
        assert r.median_ms > 0 and r.iqr_ms >= 0 and r.gb_per_s > 0 and r.tflop_per_s > 0
        assert r.rel_err_vs_dense is None if r.backend == "dense" else r.rel_err_vs_dense < 1e-6
    data = json.loads((tmp_path / "cpu" / "linear24.json").read_text())
    assert len(data["rows"]) == 4 and data["environment"]["device_type"] == "cpu"
    assert "| 32 | 24 |" in (tmp_path / "cpu" / "linear24.md").read_text()

    study = linear24.cpu_design_study(layers=((16, 8),), tokens=(1,), out_dir=tmp_path, progress=False)
    assert {r.backend for r in study} == {
        "dense", "expand_per_call", "cached_dense", "torch_sparse_csr", "gather", "nn_linear", "sparse_linear"
    }
    assert all(r.paired_speedup > 0 for r in study)
    assert all(r.rel_err_vs_dense is None or r.rel_err_vs_dense < 1e-6 for r in study)
    assert (tmp_path / "cpu" / "cpu_design_study.md").is_file()


def test_sweep_argument_errors(tmp_path):
    from sparsekernels.benchmarks import kernels as linear24

    with pytest.raises(ValueError, match=r"in_features to be a multiple of 4, got layer \(30, 8\)"):
        linear24.run_linear24_sweep("cpu", layers=((30, 8),), out_dir=None, progress=False)
    with pytest.raises(ValueError, match=r"expected tokens >= 1, got \(0,\)"):
        linear24.run_linear24_sweep("cpu", tokens=(0,), layers=((32, 8),), out_dir=None, progress=False)
