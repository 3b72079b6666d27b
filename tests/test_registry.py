"""The extension point for new sparse formats: a module registered with ``register_sparse_module`` is swapped in
by ``sparsify``, swapped out by ``densify``, explained, and saved / loaded by the checkpoint functions, with no
change anywhere else. The format here is a toy (unstructured CSR through torch.sparse), written the way
``docs/architecture.md`` tells a contributor to write one."""
import pytest
import torch
from torch import nn

import sparsekernels as sk
from sparsekernels.nn import SparseModule, register_sparse_module, sparse_patterns, unregister_sparse_module
from sparsekernels.nn.base import check_dtype, register_bias


class CsrLinear(SparseModule):
    """``nn.Linear`` whose weight is stored in CSR form (kept values, column indices, row pointers)."""

    pattern = "csr"
    dense_type = nn.Linear
    options = ("min_block_sparsity",)  # reuses a sparsify() option: the least fraction of zeros worth it
    cpu_note = "torch.sparse CSR matmul"

    def __init__(self, in_features, out_features, nnz, bias=True, *, backend="auto", device=None, dtype=None):
        super().__init__(backend)
        dtype = check_dtype("CsrLinear()", dtype)
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("crow", torch.zeros(out_features + 1, dtype=torch.int64, device=device))
        self.register_buffer("col", torch.zeros(nnz, dtype=torch.int64, device=device))
        self.values = nn.Parameter(torch.zeros(nnz, dtype=dtype, device=device), requires_grad=False)
        register_bias(self, bias, out_features, device, dtype)

    @classmethod
    def check_convertible(cls, linear, min_block_sparsity=0.5):
        if type(linear) is not nn.Linear:
            return f"not an nn.Linear (got {type(linear).__name__})"
        zeros = float((linear.weight == 0).float().mean())
        return None if zeros >= min_block_sparsity else f"only {zeros:.2f} of the weight is zero"

    @classmethod
    def from_dense(cls, linear, *, backend="auto", min_block_sparsity=0.5):
        csr = linear.weight.detach().to_sparse_csr()
        layer = cls(linear.in_features, linear.out_features, csr.values().numel(), linear.bias is not None,
                    backend=backend, device=linear.weight.device, dtype=linear.weight.dtype)
        with torch.no_grad():
            layer.crow.copy_(csr.crow_indices())
            layer.col.copy_(csr.col_indices())
            layer.values.copy_(csr.values())
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
        return layer

    def weight_csr(self):
        return torch.sparse_csr_tensor(self.crow, self.col, self.values, (self.out_features, self.in_features),
                                       check_invariants=True)

    def to_dense(self):
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, dtype=self.values.dtype)
        with torch.no_grad():
            linear.weight.copy_(self.weight_csr().to_dense())
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    def constructor_args(self):
        return {"in_features": self.in_features, "out_features": self.out_features, "nnz": self.values.numel(),
                "bias": self.bias is not None}

    @property
    def weight_dtype(self):
        return self.values.dtype

    def forward(self, x):
        y = (self.weight_csr() @ x.reshape(-1, self.in_features).T).T.reshape(*x.shape[:-1], self.out_features)
        return y if self.bias is None else y + self.bias


@pytest.fixture
def csr_registered():
    register_sparse_module(CsrLinear)
    yield CsrLinear
    unregister_sparse_module(CsrLinear)


def _unstructured_model():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)).eval()
    with torch.no_grad():
        for layer in (model[0], model[2]):
            layer.weight.mul_(torch.rand_like(layer.weight) > 0.7)  # ~70 % zeros, no 2:4 or block pattern
    return model


def test_a_registered_format_swaps_explains_saves_and_loads(csr_registered, tmp_path):
    assert "csr" in sparse_patterns()
    model = _unstructured_model()
    x = torch.randn(4, 12)
    with torch.no_grad():
        ref = model(x)
    report = sk.sparsify(model, pattern="csr")
    assert report.swapped_names == ["0", "2"] and {s.pattern for s in report.swapped} == {"csr"}
    assert isinstance(model[0], CsrLinear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-6)
    assert "torch.sparse CSR matmul" in str(sk.explain(model, print_report=False))

    path = tmp_path / "csr.safetensors"
    sk.save_sparse(model, path)
    loaded = sk.load_sparse(lambda: nn.Sequential(nn.Linear(12, 10), nn.ReLU(), nn.Linear(10, 6)), path)
    assert isinstance(loaded[2], CsrLinear)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-6)

    back = sk.densify(loaded)
    assert back.swapped_names == ["0", "2"] and type(loaded[0]) is nn.Linear
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), ref, rtol=1e-5, atol=1e-6)


def test_pattern_any_tries_registered_formats_in_order(csr_registered):
    model = _unstructured_model()
    report = sk.sparsify(model, pattern="any", min_block_sparsity=0.6)
    # no 2:4 and no zero block, so the formats registered before csr refuse and csr takes both layers
    assert {s.pattern for s in report.swapped} == {"csr"}


def test_unregistered_format_is_unknown():
    assert "csr" not in sparse_patterns()
    with pytest.raises(ValueError, match="expected pattern to be one of"):
        sk.sparsify(_unstructured_model(), pattern="csr")
    with pytest.raises(ValueError, match="is not registered"):
        unregister_sparse_module(CsrLinear)


def test_registration_errors():
    class NoPattern(SparseModule):
        dense_type = nn.Linear

    class NoDenseType(SparseModule):
        pattern = "x"

    with pytest.raises(TypeError, match="pattern"):
        register_sparse_module(NoPattern)
    with pytest.raises(TypeError, match="dense_type"):
        register_sparse_module(NoDenseType)
    with pytest.raises(TypeError, match="SparseModule subclass"):
        register_sparse_module(nn.Linear)


def test_builtin_formats_are_registered():
    assert sparse_patterns()[:2] == ("2:4", "block")
    assert {c.__name__ for c in sk.nn.sparse_module_types()} >= {"SparseLinear", "SparseConv2d", "BlockSparseLinear"}
