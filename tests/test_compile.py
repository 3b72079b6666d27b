"""Swapped models under torch.compile(fullgraph=True), torch.export, and (on a GPU) CUDA graphs.

On the CPU, torch.compile runs with the cheap "eager" / "aot_eager" backends: they trace the whole
graph (fullgraph=True fails on any graph break) and, for aot_eager, run the ops' fake
implementations, which is what matters here; inductor code generation is not under test."""
import copy

import pytest
import torch
from torch import nn

import sparsekernels as sk
from test_swap import encoder_masked, mask_model_24, randomize_bn
from tolerances import assert_close_rel

HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class ConvNet(nn.Module):
    """Conv (3x3, stride 2, padding) -> BN -> ReLU -> 1x1 conv -> pool -> Linear -> Linear."""

    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 12, 1)
        self.fc1 = nn.Linear(12, 20)
        self.fc2 = nn.Linear(20, 5, bias=False)

    def forward(self, x):
        h = torch.relu(self.bn(self.conv1(x)))
        h = self.conv2(h).mean(dim=(2, 3))
        return self.fc2(torch.relu(self.fc1(h)))


def convnet_masked():
    model = ConvNet()
    randomize_bn(model)
    return mask_model_24(model).eval()


def test_resnet18_compile_fullgraph():
    import torchvision

    model = torchvision.models.resnet18(num_classes=10)
    randomize_bn(model)
    mask_model_24(model).eval()
    assert_swapped_compiles(model, torch.randn(2, 3, 32, 32), "eager")


def assert_swapped_compiles(model, x, compile_backend, **sparsify_kwargs):
    """Swap ``model``, compile it with ``fullgraph=True``: the output equals the masked dense model's."""
    with torch.no_grad():
        ref = model(x)
    sk.sparsify(model, **sparsify_kwargs)
    compiled = torch.compile(model, fullgraph=True, backend=compile_backend)
    with torch.no_grad():
        out = compiled(x)
    assert_close_rel(out, ref, torch.float32)


def test_convnet_compile_aot_eager():
    assert_swapped_compiles(convnet_masked(), torch.randn(3, 8, 11, 9), "aot_eager")


@pytest.mark.parametrize("backend", ["reference", "auto"])
def test_convnet_backward_through_compiled_sparse_layers(backend):
    # frozen sparse layers inside a model that trains: the input gradient must flow through the custom ops
    # (they had no autograd formula, so aot_eager's backward trace failed for every backend but CPU "auto")
    model = convnet_masked()
    x = torch.randn(3, 8, 11, 9, requires_grad=True)
    ref = model(x)
    (ref_grad,) = torch.autograd.grad(ref.square().sum(), x)
    sk.sparsify(model, backend=backend)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    x2 = x.detach().clone().requires_grad_()
    out = compiled(x2)
    out.square().sum().backward()
    assert_close_rel(out, ref, torch.float32)
    assert_close_rel(x2.grad, ref_grad, torch.float32)


def test_transformer_encoder_compile_fullgraph():
    assert_swapped_compiles(encoder_masked(), torch.randn(2, 5, 32), "aot_eager")


def export_swapped(model, x, **sparsify_kwargs):
    """Swap ``model`` and export it; the exported program's output equals the masked dense model's."""
    with torch.no_grad():
        ref = model(x)
    sk.sparsify(model, **sparsify_kwargs)
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert_close_rel(exported.module()(x), ref, torch.float32)
    return exported


def test_export_swapped_model():
    # an explicit backend keeps the compressed state resident: the graph calls the sparse ops on it
    exported = export_swapped(convnet_masked(), torch.randn(2, 8, 9, 7), backend="reference")
    graph = str(exported.graph)
    assert "sparsekernels.sparse24_linear" in graph and "sparsekernels.sparse24_conv2d" in graph
    # the exported program carries the compressed state, not a dense weight
    assert "fc1.weight_values" in exported.state_dict and "fc1.weight" not in exported.state_dict


def test_export_cpu_auto_carries_one_dense_copy():
    # CPU "auto" keeps one dense weight per layer: the exported program holds it once, and nothing compressed
    exported = export_swapped(convnet_masked(), torch.randn(2, 8, 9, 7))
    assert "fc1.weight" in exported.state_dict and "fc1.weight_values" not in exported.state_dict


def test_export_transformer_encoder():
    export_swapped(encoder_masked(), torch.randn(2, 5, 32))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_graph_capture(dtype, tmp_path, monkeypatch):
    from sparsekernels.ops import dispatch

    monkeypatch.setenv(dispatch.CACHE_ENV, str(tmp_path / "cache"))
    dispatch.reset()
    model = convnet_masked().to("cuda", dtype)
    x = torch.randn(4, 8, 16, 16, device="cuda", dtype=dtype)
    sk.sparsify(model)
    static_x = x.clone()
    with torch.no_grad():
        sk.tune(model, static_x, progress=False)  # decisions measured before capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                model(static_x)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_out = model(static_x)
        new_x = torch.randn_like(x)
        static_x.copy_(new_x)
        graph.replay()
        torch.cuda.synchronize()
        expected = copy.deepcopy(model)
        sk.densify(expected)
        assert_close_rel(static_out, expected(new_x), dtype, factor=2.0)
    dispatch.reset()


def test_functional_op_first_called_inside_torch_compile():
    # the kernel module is imported on the op's first call; when that call is being traced, the import runs
    # outside the graph (a fresh process, so nothing imported it before)
    import os
    import subprocess
    import sys
    from pathlib import Path

    code = (
        "import sys, torch, sparsekernels as sk\n"
        "w = torch.randn(8, 16); w.view(8, 4, 4)[..., 2:] = 0\n"
        "w24 = sk.compress_24(w)\n"
        "f = torch.compile(lambda x: sk.sparse24_linear(x, w24, backend='reference') * 2, backend='eager')\n"
        "x = torch.randn(2, 16)\n"
        "torch.testing.assert_close(f(x), 2 * (x @ w.T))\n"
        "print('ok')\n"
    )
    repo = Path(__file__).resolve().parents[1]
    env = {**os.environ, "PYTHONPATH": str(repo) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
