"""SparseConv1D: transformers' Conv1D (GPT-2's projections, weight [in, out]) as a registered 2:4 module. Swapped
by sparsify with outputs exactly those of the masked dense model, densified back into a Conv1D, saved and loaded
with save_sparse / load_sparse; recognised by the registry's matches_dense hook, without importing transformers."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import sparsekernels as sk
from sparsekernels.nn import SparseConv1D, SparseModule, register_sparse_module, unregister_sparse_module
from tolerances import assert_close_rel

transformers = pytest.importorskip("transformers")
from transformers.pytorch_utils import Conv1D  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def mask_conv1d_24(conv: nn.Module) -> nn.Module:
    """Keep the 2 largest magnitudes of every 4 consecutive inputs (weight rows) of each output column."""
    with torch.no_grad():
        w = conv.weight.t()
        g = w.reshape(w.shape[0], -1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
        conv.weight.copy_((g * keep).reshape(w.shape).t())
    return conv


def conv1d(nf: int, nx: int, seed: int = 0, dtype=torch.float32) -> nn.Module:
    torch.manual_seed(seed)
    conv = Conv1D(nf, nx).to(dtype)
    with torch.no_grad():
        conv.bias.normal_()
    return mask_conv1d_24(conv)


def tiny_gpt2(seed: int = 0):
    cfg = transformers.GPT2Config(vocab_size=61, n_embd=32, n_layer=2, n_head=4, n_positions=32, n_inner=52,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    for m in model.modules():
        if type(m) is Conv1D and m.nx % 4 == 0:
            mask_conv1d_24(m)
    return model


IDS = torch.randint(0, 61, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("nf, nx, rows", [(13, 8, 1), (24, 20, 3), (7, 36, 13)])
def test_sparse_conv1d_equals_conv1d(nf, nx, rows):
    dense = conv1d(nf, nx)
    x = torch.randn(rows, 5, nx)
    layer = SparseConv1D.from_dense(dense)
    with torch.no_grad():
        ref, ref64 = dense(x), x.double() @ dense.weight.double() + dense.bias.double()
        assert torch.equal(layer(x), ref)  # the CPU's resident dense weight runs Conv1D's own addmm
        compressed = SparseConv1D.from_dense(dense, backend="reference")
        assert "weight_values" in dict(compressed.named_parameters())
        assert_close_rel(compressed(x), ref64, torch.float32, factor=2.0)
    for module in (layer, compressed):
        assert module.weight.shape == (nx, nf) and torch.equal(module.weight, dense.weight)
        state = module.state_dict()
        assert set(state) == {"weight_values", "weight_meta", "bias"}
        assert state["weight_values"].shape == (nf, nx // 2) and state["weight_meta"].shape == (nf, (nx + 7) // 8)


def test_to_dense_is_a_transformers_conv1d_with_the_same_weights():
    dense = conv1d(12, 16)
    back = SparseConv1D.from_dense(dense).to_dense()
    assert type(back) is Conv1D and (back.nf, back.nx) == (12, 16)
    assert torch.equal(back.weight, dense.weight) and torch.equal(back.bias, dense.bias)
    half = SparseConv1D.from_dense(conv1d(12, 16, dtype=torch.float16)).to_dense()
    assert half.weight.dtype == half.bias.dtype == torch.float16


def test_meta_construction_then_assign_load():
    dense = conv1d(10, 24)
    state = SparseConv1D.from_dense(dense).state_dict()
    layer = SparseConv1D(10, 24, device="meta")
    assert layer.weight_values.shape == (10, 12) and layer.weight_values.is_meta
    layer.load_state_dict(state, assign=True)
    assert torch.equal(layer.weight, dense.weight)
    x = torch.randn(4, 24)
    with torch.no_grad():
        assert torch.equal(layer(x), dense(x))


def test_what_cannot_be_converted_says_why():
    assert "not a transformers Conv1D" in SparseConv1D.check_convertible(nn.Linear(8, 8))
    assert "not 2:4 sparse along its input dim" in SparseConv1D.check_convertible(Conv1D(8, 8))
    assert SparseConv1D.check_convertible(mask_conv1d_24(Conv1D(4, 8)).double()).startswith("weight dtype")
    with torch.device("meta"):
        assert "meta device" in SparseConv1D.check_convertible(Conv1D(4, 8))
    odd = Conv1D(4, 6)
    assert SparseConv1D.check_convertible(odd) == "nx=6 (the input size) is not a multiple of 4"
    with pytest.raises(ValueError, match=r"SparseConv1D.from_dense\(\): cannot convert"):
        SparseConv1D.from_dense(odd)
    with pytest.raises(ValueError, match="expected nx to be a positive multiple of 4, got 6"):
        SparseConv1D(4, 6)
    with pytest.raises(ValueError, match="expected nf >= 1, got 0"):
        SparseConv1D(0, 8)


def test_sparsify_swaps_every_gpt2_conv1d_exactly_and_densify_undoes_it():
    model = tiny_gpt2()
    with torch.no_grad():
        ref = model(IDS).logits
    report = sk.sparsify(model)
    convs = [n for n, m in model.named_modules() if isinstance(m, SparseConv1D)]
    assert sorted(report.swapped_names) == sorted(convs) and len(convs) == 8
    assert {n.rsplit(".", 1)[-1] for n in convs} == {"c_attn", "c_proj", "c_fc"}
    assert set(report.skipped_reasons) == {"lm_head"}  # tied to the embedding
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)
    sk.densify(model)
    assert not any(isinstance(m, SparseModule) for m in model.modules())
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, ref)


def test_save_sparse_load_sparse_gpt2(tmp_path):
    model = tiny_gpt2()
    with torch.no_grad():
        ref = model(IDS).logits
    sk.sparsify(model)
    path = tmp_path / "gpt2.safetensors"
    sk.save_sparse(model, path)
    loaded = sk.load_sparse(lambda: transformers.GPT2LMHeadModel(model.config), path).eval()
    assert isinstance(loaded.transformer.h[1].mlp.c_fc, SparseConv1D)
    with torch.no_grad():
        assert torch.equal(loaded(IDS).logits, ref)
    into = tiny_gpt2(seed=1)  # a model instance: its Conv1D layers are replaced in place
    sk.load_sparse(into, path)
    with torch.no_grad():
        assert torch.equal(into.eval()(IDS).logits, ref)


def test_load_sparse_refuses_a_conv1d_record_at_a_linear(tmp_path):
    model = nn.Sequential(mask_conv1d_24(Conv1D(8, 8)))
    sk.sparsify(model)  # the root's child is swapped
    path = tmp_path / "m.safetensors"
    sk.save_sparse(model, path)
    with pytest.raises(ValueError, match="expected the model to have a transformers Conv1D there, got Linear"):
        sk.load_sparse(nn.Sequential(nn.Linear(8, 8)), path)


def test_matches_dense_is_the_registry_hook():
    class Tagged(nn.Linear):
        pass

    @register_sparse_module
    class TaggedSparse(SparseModule):  # replaces a type it names only through matches_dense
        pattern = "tagged"

        @classmethod
        def matches_dense(cls, module):
            return type(module) is Tagged

        @classmethod
        def dense_label(cls):
            return "Tagged layers"

        @classmethod
        def check_convertible(cls, module):
            return "never converts (a test class)"

    try:
        model = nn.Sequential(Tagged(4, 4), nn.Linear(4, 4))
        report = sk.sparsify(model, pattern="tagged")
        assert report.skipped_reasons == {"0": "never converts (a test class)",
                                          "1": "pattern='tagged' applies to Tagged layers only"}
    finally:
        unregister_sparse_module(TaggedSparse)

    class Neither(SparseModule):
        pattern = "neither"

    with pytest.raises(TypeError, match="dense_type .* or override matches_dense"):
        register_sparse_module(Neither)


def test_importing_sparsekernels_does_not_import_transformers():
    code = "import sys, sparsekernels, sparsekernels.nn; assert 'transformers' not in sys.modules, 'imported'"
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
