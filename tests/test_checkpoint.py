"""Compressed checkpoints: round trips give identical outputs, a 2:4 layer is ~0.5625x of dense on
disk, loading builds on the meta device and never unpickles."""
import json
import os
import pickle
import struct

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

import sparsekernels as sk
from sparsekernels.checkpoint import CheckpointError, read_metadata
from test_hostile_files import Tied
from test_swap import mask_24, mask_model_24, randomize_bn


def resnet_factory():
    """A ResNet with one BasicBlock per stage (torchvision's ResNet-18 blocks; cheaper for the CPU suite)."""
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 1, 1], num_classes=10)


def test_resnet_roundtrip_on_meta(tmp_path):
    model = resnet_factory()
    randomize_bn(model)
    mask_model_24(model).eval()
    sk.sparsify(model)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model(x)
    path = tmp_path / "resnet.safetensors"
    record = sk.save_sparse(model, path, metadata={"model": "resnet18"})
    assert len(record["sparse_modules"]) == 8 + 3 + 1  # block convs, downsample convs, fc (stem: 3 channels)
    loaded = sk.load_sparse(resnet_factory, path).eval()
    assert isinstance(loaded.layer3[0].conv2, sk.SparseConv2d) and isinstance(loaded.fc, sk.SparseLinear)
    assert type(loaded.conv1) is nn.Conv2d
    assert all(t.device.type == "cpu" for t in loaded.state_dict().values())
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["model"] == "resnet18"


def test_load_into_instance_keeps_hooks(tmp_path):
    model = mask_model_24(nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))).eval()
    sk.sparsify(model)
    x = torch.randn(3, 16)
    with torch.no_grad():
        ref = model(x)
    sk.save_sparse(model, tmp_path / "m.safetensors")
    target = nn.Sequential(nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    calls = []
    target[2].register_forward_hook(lambda m, i, o: calls.append(type(m).__name__))
    loaded = sk.load_sparse(target, tmp_path / "m.safetensors", backend="reference")
    assert loaded is target and loaded[0].backend == "reference"
    with torch.no_grad():
        out = loaded(x)
    assert calls == ["SparseLinear"]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def _file_bytes(path) -> int:
    return os.path.getsize(path)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_size_ratio(tmp_path, dtype):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(1024, 512, bias=False, dtype=dtype))
    with torch.no_grad():
        dense[0].weight.copy_(mask_24(dense[0].weight))
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(tmp_path / "dense.safetensors"))
    sk.sparsify(dense)
    sk.save_sparse(dense, tmp_path / "sparse.safetensors")
    ratio = _file_bytes(tmp_path / "sparse.safetensors") / _file_bytes(tmp_path / "dense.safetensors")
    # values 1/2 + 2-bit indices 1/16 = 0.5625 of the dense bytes, plus a JSON header of < 1 KiB
    assert 0.5625 <= ratio <= 0.5625 + 1024 / (1024 * 512 * 2)
    tensors = sk.load_sparse(lambda: nn.Sequential(nn.Linear(1024, 512, bias=False, dtype=dtype)),
                             tmp_path / "sparse.safetensors").state_dict()
    stored = sum(t.numel() * t.element_size() for t in tensors.values())
    assert stored == 1024 * 512 * 2 * 0.5625


def test_bert_from_config_swaps_and_roundtrips(tmp_path):
    from transformers import BertConfig, BertModel

    config = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128,
                        vocab_size=97, max_position_embeddings=40)
    model = mask_model_24(BertModel(config)).eval()
    ids = torch.randint(0, 97, (2, 11))
    mask = torch.ones(2, 11, dtype=torch.long)
    mask[1, 8:] = 0
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=mask).last_hidden_state
    report = sk.sparsify(model)
    # q, k, v, attention output, intermediate, output per layer, and the pooler
    assert len(report.swapped) == 2 * 6 + 1 and report.skipped == ()
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask).last_hidden_state
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    record = sk.save_sparse(model, tmp_path / "bert.safetensors")
    # BERT's non-persistent buffers (position / token type ids) travel with the checkpoint
    assert "embeddings.position_ids" in record["nonpersistent_buffers"]
    loaded = sk.load_sparse(lambda: BertModel(config), tmp_path / "bert.safetensors").eval()
    assert isinstance(loaded.encoder.layer[1].attention.self.query, sk.SparseLinear)
    with torch.no_grad():
        again = loaded(input_ids=ids, attention_mask=mask).last_hidden_state
    assert torch.equal(again, out)


def test_loading_never_unpickles(tmp_path, monkeypatch):
    model = mask_model_24(nn.Sequential(nn.Linear(8, 8))).eval()
    sk.sparsify(model)
    path = tmp_path / "m.safetensors"
    sk.save_sparse(model, path)
    raw = path.read_bytes()
    header_len = struct.unpack("<Q", raw[:8])[0]
    header = json.loads(raw[8 : 8 + header_len])  # a safetensors file: JSON header + raw bytes
    assert json.loads(header["__metadata__"]["sparsekernels"])["sparse_modules"][0]["class"] == "SparseLinear"

    def forbidden(*a, **k):
        raise AssertionError("unpickling attempted")

    for target, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(target, name, forbidden)
    loaded = sk.load_sparse(lambda: nn.Sequential(nn.Linear(8, 8)), path)
    assert isinstance(loaded[0], sk.SparseLinear)


def test_tied_weights_stored_once(tmp_path):
    model = mask_model_24(Tied()).eval()  # an embedding tied to the output head
    report = sk.sparsify(model)
    assert "tied" in report.skipped_reasons["head"] and report.swapped_names == ["mid"]
    ids = torch.randint(0, 6, (2, 5))
    with torch.no_grad():
        ref = model(ids)
    record = sk.save_sparse(model, tmp_path / "t.safetensors")
    assert record["aliases"] == {"head.weight": "emb.weight"}
    loaded = sk.load_sparse(Tied, tmp_path / "t.safetensors")
    assert loaded.head.weight.data_ptr() == loaded.emb.weight.data_ptr()
    # re-tied as one Parameter (it used to come back as two Parameter objects over the same memory)
    assert loaded.head.weight is loaded.emb.weight
    assert isinstance(loaded.emb.weight, nn.Parameter) and loaded.emb.weight.requires_grad
    assert len(list(loaded.parameters())) == len(list(model.parameters()))
    into = Tied()  # loading into an existing instance re-ties too
    assert sk.load_sparse(into, tmp_path / "t.safetensors").head.weight is into.emb.weight
    with torch.no_grad():
        assert torch.equal(loaded(ids), ref)


def test_block_sparse_roundtrip(tmp_path):
    model = nn.Sequential(nn.Linear(64, 32))
    with torch.no_grad():
        model[0].weight[:, 32:] = 0
    sk.sparsify(model, pattern="block", block_size=16)
    assert isinstance(model[0], sk.BlockSparseLinear)
    x = torch.randn(3, 64)
    with torch.no_grad():
        ref = model(x)
    sk.save_sparse(model, tmp_path / "b.safetensors")
    loaded = sk.load_sparse(lambda: nn.Sequential(nn.Linear(64, 32)), tmp_path / "b.safetensors")
    assert isinstance(loaded[0], sk.BlockSparseLinear) and loaded[0].nnz_blocks == model[0].nnz_blocks
    with torch.no_grad():
        assert torch.equal(loaded(x), ref)


# ----------------------------------------------------------------------------------------------------
# errors


def _saved(tmp_path):
    model = mask_model_24(nn.Sequential(nn.Linear(8, 8)))
    sk.sparsify(model)
    path = tmp_path / "m.safetensors"
    sk.save_sparse(model, path)
    return path


def test_save_errors(tmp_path):
    with pytest.raises(TypeError, match="expected an nn.Module"):
        sk.save_sparse({"a": 1}, tmp_path / "x")
    model = nn.Linear(4, 4)
    with pytest.raises(TypeError, match="str -> str"):
        sk.save_sparse(model, tmp_path / "x", metadata={"a": 1})
    with pytest.raises(ValueError, match="reserved"):
        sk.save_sparse(model, tmp_path / "x", metadata={"sparsekernels": "x"})
    with pytest.raises(ValueError, match="meta device"):
        sk.save_sparse(nn.Linear(4, 4, device="meta"), tmp_path / "x")

    class Extra(nn.Linear):
        def get_extra_state(self):
            return {"step": 3}

        def set_extra_state(self, state):
            pass

    with pytest.raises(TypeError, match="only tensors.*dict at '_extra_state'"):
        sk.save_sparse(Extra(4, 4), tmp_path / "x")


def test_load_errors(tmp_path):
    path = _saved(tmp_path)
    factory = lambda: nn.Sequential(nn.Linear(8, 8))  # noqa: E731
    with pytest.raises(FileNotFoundError):
        sk.load_sparse(factory, tmp_path / "missing.safetensors")
    (tmp_path / "junk").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="safetensors"):
        sk.load_sparse(factory, tmp_path / "junk")
    save_file({"w": torch.zeros(2)}, str(tmp_path / "foreign.safetensors"))
    with pytest.raises(ValueError, match="save_sparse"):
        sk.load_sparse(factory, tmp_path / "foreign.safetensors")
    with pytest.raises(TypeError, match="nn.Module or a callable"):
        sk.load_sparse(3, path)
    with pytest.raises(TypeError, match="factory to return an nn.Module"):
        sk.load_sparse(lambda: 3, path)
    with pytest.raises(ValueError, match="no such module"):
        sk.load_sparse(lambda: nn.Sequential(), path)
    with pytest.raises(ValueError, match="expected the model to have an nn.Linear there, got ReLU"):
        sk.load_sparse(lambda: nn.Sequential(nn.ReLU()), path)
    with pytest.raises(ValueError, match="out_features=16 in the model but 8 in the checkpoint"):
        sk.load_sparse(lambda: nn.Sequential(nn.Linear(8, 16)), path)
    # strict or not, a tensor of a model built on the meta device must come from the file
    for strict in (False, True):
        with pytest.raises(CheckpointError, match=r"tensor '1.weight'.*missing key"):
            sk.load_sparse(lambda: nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)), path, strict=strict)
    with pytest.raises(ValueError, match="expected backend"):
        sk.load_sparse(factory, path, backend="fast")


def test_unknown_class_and_format(tmp_path):
    record = read_metadata(_saved(tmp_path))
    tensors = {"x": torch.zeros(1)}
    bad = dict(record, sparse_modules=[dict(record["sparse_modules"][0], **{"class": "FancyLinear"})])
    save_file(tensors, str(tmp_path / "u.safetensors"), metadata={"sparsekernels": json.dumps(bad)})
    with pytest.raises(ValueError, match="FancyLinear"):
        sk.load_sparse(lambda: nn.Sequential(nn.Linear(8, 8)), tmp_path / "u.safetensors")
    save_file(tensors, str(tmp_path / "f.safetensors"), metadata={"sparsekernels": json.dumps(dict(record, format=99))})
    with pytest.raises(ValueError, match="format"):
        read_metadata(tmp_path / "f.safetensors")


def test_a_sparse_module_saved_on_its_own(tmp_path):
    layer = sk.SparseLinear.from_dense(mask_model_24(nn.Sequential(nn.Linear(8, 4)))[0])
    record = sk.save_sparse(layer, tmp_path / "l.safetensors")
    assert record["sparse_modules"][0]["name"] == ""
    loaded = sk.load_sparse(lambda: nn.Linear(8, 4), tmp_path / "l.safetensors")
    assert isinstance(loaded, sk.SparseLinear)
    x = torch.randn(2, 8)
    assert torch.equal(loaded(x), layer(x))
    with pytest.raises(ValueError, match="cannot be replaced in place: pass a factory"):
        sk.load_sparse(nn.Linear(8, 4), tmp_path / "l.safetensors")
