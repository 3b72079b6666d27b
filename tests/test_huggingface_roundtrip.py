"""Hugging Face round trip: a 2:4 Llama-style model saves compressed with save_pretrained (0.5625x of the dense fp16
bytes per 2:4 layer) and loads back with from_pretrained into sparse layers built on the meta device, with the same
logits; a dense export loads in plain transformers; llm-compressor's dense 2:4 checkpoints and compressed-tensors'
sparse-24-bitmask checkpoints import as sparse layers; a swapped lm_head still answers .weight.

Models are random-init tiny configs (no download); 2:4 masks are a magnitude top-2 of every group of 4."""
import json
import os
import struct

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

transformers = pytest.importorskip("transformers")
if int(transformers.__version__.split(".")[0]) < 5:
    pytest.skip("sparsekernels.huggingface needs transformers >= 5", allow_module_level=True)

import sparsekernels as sk  # noqa: E402
import sparsekernels.huggingface as skhf  # noqa: E402  (registers the "sparsekernels" quantizer)
from sparsekernels import SparseLinear  # noqa: E402
from sparsekernels.huggingface.bitmask import find_bitmask_layers, sparse24_from_bitmask  # noqa: E402
from tolerances import assert_close_rel  # noqa: E402

from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM  # noqa: E402

VOCAB = 136  # distinct from every layer's dense shape: the no-dense-copy test tells tensors apart by shape


def tiny_llama(dtype=torch.float32, tie=False, seed=0) -> LlamaForCausalLM:
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      tie_word_embeddings=tie)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def mask_24(model: nn.Module, skip=()) -> list[str]:
    """Keep the 2 largest magnitudes of every 4 consecutive inputs of each Linear (not in ``skip``)."""
    names = []
    with torch.no_grad():
        for name, m in model.named_modules():
            if type(m) is nn.Linear and name not in skip:
                g = m.weight.reshape(m.out_features, -1, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
                m.weight.copy_((g * keep).reshape(m.weight.shape))
                names.append(name)
    return names


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def sparse_layers(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, SparseLinear)]


def tensor_bytes(path) -> dict[str, int]:
    """Bytes of every tensor of a safetensors file, from its header."""
    with open(path, "rb") as f:
        header = json.loads(f.read(struct.unpack("<Q", f.read(8))[0]))
    return {k: v["data_offsets"][1] - v["data_offsets"][0] for k, v in header.items() if k != "__metadata__"}


IDS = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(1))


# ------------------------------------------------------------------------------------------------------------
# sparsekernels format: save_pretrained / from_pretrained


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_save_pretrained_is_compressed_and_reloads_sparse_with_the_same_logits(tmp_path, dtype):
    model = tiny_llama(dtype)
    masked = mask_24(model)
    ref64 = logits(tiny_llama_like(model), IDS)
    dense_dir, sparse_dir = tmp_path / "dense", tmp_path / "sparse"
    model.save_pretrained(dense_dir)
    ref = logits(model, IDS)
    report = sk.sparsify(model)
    assert sorted(report.swapped_names) == sorted(masked) and "lm_head" in masked
    assert torch.equal(logits(model, IDS), ref)
    skhf.mark_sparse(model)
    model.save_pretrained(sparse_dir)
    # the reference for loading: the dense masked checkpoint loaded by plain transformers (built the same way: in
    # fp16, from_pretrained keeps RoPE's inv_freq in fp32 where model.to(fp16) cast it)
    ref = logits(LlamaForCausalLM.from_pretrained(dense_dir), IDS)

    config = json.loads((sparse_dir / "config.json").read_text())["quantization_config"]
    assert config["quant_method"] == "sparsekernels" and config["sparsify_dense"] is False
    assert sorted(n for g in config["sparse_modules"] for n in g["names"]) == sorted(masked)
    dense_b, sparse_b = tensor_bytes(dense_dir / "model.safetensors"), tensor_bytes(sparse_dir / "model.safetensors")
    layer_dense = sum(dense_b[f"{n}.weight"] for n in masked)
    layer_sparse = sum(sparse_b[f"{n}.weight_values"] + sparse_b[f"{n}.weight_meta"] for n in masked)
    ratio = layer_sparse / layer_dense
    assert ratio == pytest.approx(0.5625 if dtype == torch.float16 else 0.53125)
    others = sum(b for k, b in dense_b.items() if k.rpartition(".")[0] not in masked)
    file_ratio = (os.path.getsize(sparse_dir / "model.safetensors") - others) / \
        (os.path.getsize(dense_dir / "model.safetensors") - others)
    assert abs(file_ratio - ratio) < 0.02  # the file sizes say the same, up to the headers

    loaded = AutoModelForCausalLM.from_pretrained(sparse_dir)
    assert sorted(sparse_layers(loaded)) == sorted(masked)
    assert loaded.lm_head.weight.dtype == dtype and not loaded.lm_head.weight.requires_grad
    out = logits(loaded, IDS)
    assert torch.equal(out, ref)  # the same weights through the same ops
    assert_close_rel(out.float(), ref64, dtype, factor=4)  # and close to the masked model in float64
    # the loaded model is declared: it saves again in the same format
    loaded.save_pretrained(tmp_path / "again")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "again"), IDS), ref)
    if dtype == torch.float32:  # another Auto class: the base model's names lack the "model." prefix, and lm_head
        base = transformers.AutoModel.from_pretrained(sparse_dir)
        assert sorted(sparse_layers(base)) == sorted(n.removeprefix("model.") for n in masked if n != "lm_head")
        with torch.no_grad():
            assert torch.equal(base(IDS).last_hidden_state, loaded.model(IDS).last_hidden_state)


def tiny_llama_like(model) -> nn.Module:
    """A float64 copy of a dense ``model`` (the reference)."""
    copy = tiny_llama(torch.float64)
    copy.load_state_dict({k: v.double() for k, v in model.state_dict().items()})
    return copy


class DenseShapes(TorchDispatchMode):
    """Records every floating-point tensor an op produces on a real device (not meta) whose shape is in ``shapes``."""

    def __init__(self, shapes):
        super().__init__()
        self.shapes, self.seen = set(shapes), []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (list, tuple)) else [out]:
            if isinstance(t, torch.Tensor) and t.device.type != "meta" and t.is_floating_point() \
                    and tuple(t.shape) in self.shapes:
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_loading_builds_on_the_meta_device_without_a_dense_copy(tmp_path, monkeypatch):
    model = tiny_llama()
    masked = mask_24(model, skip=("lm_head",))  # lm_head's [vocab, hidden] is also the embedding's shape
    ref = logits(model, IDS)
    sk.sparsify(model)
    skhf.mark_sparse(model)
    model.save_pretrained(tmp_path, max_shard_size="100KB")  # sharded: the layers are spread over several files
    assert len(list(tmp_path.glob("*.safetensors"))) > 1
    shapes = {tuple(model.get_submodule(n).weight.shape) for n in masked}
    monkeypatch.setenv("HF_DEACTIVATE_ASYNC_LOAD", "1")  # every tensor op in this thread, where the mode sees it
    config = transformers.AutoConfig.from_pretrained(tmp_path)
    config.quantization_config["backend"] = "reference"  # keep the compressed form resident on the CPU too
    with DenseShapes(shapes) as mode:
        loaded = AutoModelForCausalLM.from_pretrained(tmp_path, config=config)
    assert mode.seen == [], f"dense-shaped tensors of sparse layers were built while loading: {mode.seen}"
    assert sorted(loaded.hf_quantizer.loaded_names) == sorted(masked)
    for name in masked:
        layer = loaded.get_submodule(name)
        assert set(dict(layer.named_parameters())) == {"weight_values"} and layer.weight_values.device.type == "cpu"
        assert layer.stored_bytes() == layer.weight_values.nbytes + layer.weight_meta.nbytes
    assert_close_rel(logits(loaded, IDS), ref, torch.float32)


def test_undeclared_compressed_layers_are_found_in_the_checkpoint(tmp_path):
    # sparsify declares the method in a Hugging Face model's config (without importing transformers) but lists no
    # layers: save_pretrained right after it works, and the 2:4 layers are found from the tensor names
    model = tiny_llama()
    masked = mask_24(model)
    ref = logits(model, IDS)
    report = sk.sparsify(model)
    assert model.config.quantization_config == {"quant_method": "sparsekernels", "format_version": 1}
    assert any("quantization_config" in note for note in report.notes)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert sorted(sparse_layers(loaded)) == sorted(masked) and torch.equal(logits(loaded, IDS), ref)
    assert skhf.mark_sparse(model).sparse_modules  # mark_sparse takes such a dict over and lists the layers


# ------------------------------------------------------------------------------------------------------------
# .weight, resize_token_embeddings, tied embeddings


def test_swapped_lm_head_answers_weight_and_resizes_through_the_helper(tmp_path):
    model = tiny_llama()
    mask_24(model)
    dense_head = model.lm_head.weight.detach().clone()
    ref = logits(model, IDS)
    sk.sparsify(model)
    assert isinstance(model.get_output_embeddings(), SparseLinear)
    assert torch.equal(model.get_output_embeddings().weight, dense_head)
    model.lm_head.backend = "reference"  # the compressed form answers .weight too
    assert torch.equal(model.get_output_embeddings().weight, dense_head)
    model.lm_head.backend = "auto"
    with pytest.raises(TypeError, match="not an instance of"):  # transformers only resizes an nn.Linear
        model.resize_token_embeddings(VOCAB + 4)
    skhf.resize_token_embeddings(model, VOCAB + 4)
    assert type(model.lm_head) is nn.Linear and model.lm_head.out_features == VOCAB + 4
    assert torch.equal(model.lm_head.weight[:VOCAB], dense_head)
    assert torch.equal(logits(model, IDS)[..., :VOCAB], ref)
    skhf.mark_sparse(model)
    model.save_pretrained(tmp_path)  # the record follows: lm_head is dense now
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert type(loaded.lm_head) is nn.Linear and len(sparse_layers(loaded)) == 14
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_tied_embeddings_stay_tied_and_untouched(tmp_path):
    model = tiny_llama(tie=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    mask_24(model, skip=("lm_head",))
    embed = model.model.embed_tokens.weight.detach().clone()
    report = sk.sparsify(model)
    assert "tied" in report.skipped_reasons["lm_head"]
    skhf.mark_sparse(model)
    model.save_pretrained(tmp_path)
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and type(loaded.lm_head) is nn.Linear
    assert torch.equal(loaded.get_output_embeddings().weight, embed) and len(sparse_layers(loaded)) == 14
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))
    skhf.resize_token_embeddings(loaded, VOCAB + 8)
    assert loaded.lm_head.weight is loaded.model.embed_tokens.weight and loaded.lm_head.weight.shape[0] == VOCAB + 8


# ------------------------------------------------------------------------------------------------------------
# dense export


def test_dense_export_loads_in_plain_transformers(tmp_path):
    model = tiny_llama()
    mask_24(model)
    sk.sparsify(model)
    skhf.mark_sparse(model)
    ref = logits(model, IDS)
    skhf.save_dense(model, tmp_path)
    assert "quantization_config" not in json.loads((tmp_path / "config.json").read_text())
    keys = tensor_bytes(tmp_path / "model.safetensors")
    assert "lm_head.weight" in keys and not any(k.endswith(("weight_values", "weight_meta")) for k in keys)
    assert len(sparse_layers(model)) == 15  # the model itself is unchanged
    assert model.config.quantization_config is model.hf_quantizer.quantization_config
    plain = LlamaForCausalLM.from_pretrained(tmp_path)
    assert getattr(plain, "hf_quantizer", None) is None and not sparse_layers(plain)
    assert torch.equal(logits(plain, IDS), ref)
    # transformers' own way: dequantize() densifies in place and drops the quantization config
    model.dequantize()
    assert not sparse_layers(model) and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path / "dequantized")
    assert "quantization_config" not in json.loads((tmp_path / "dequantized" / "config.json").read_text())
    assert torch.equal(logits(model, IDS), ref)


# ------------------------------------------------------------------------------------------------------------
# imports: llm-compressor dense 2:4, compressed-tensors sparse-24-bitmask

LLMCOMPRESSOR_RECIPE = """default_stage:
  default_modifiers:
    SparseGPTModifier:
      sparsity: 0.5
      mask_structure: '2:4'
      targets: [Linear]
      ignore: [lm_head]
"""


def test_llmcompressor_dense_checkpoint_imports_as_sparse(tmp_path):
    # llm-compressor 0.14 writes a 2:4 model as a plain dense checkpoint (no quantization_config) plus recipe.yaml
    model = tiny_llama()
    masked = mask_24(model, skip=("lm_head",))
    ref = logits(model, IDS)
    model.save_pretrained(tmp_path)
    (tmp_path / "recipe.yaml").write_text(LLMCOMPRESSOR_RECIPE)

    loaded = skhf.load_pretrained(tmp_path)
    assert sorted(sparse_layers(loaded)) == sorted(masked)
    reasons = loaded.hf_quantizer.swap_report.skipped_reasons
    assert "not 2:4 sparse" in reasons["lm_head"]
    assert torch.equal(logits(loaded, IDS), ref)
    # the same through from_pretrained directly
    direct = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=skhf.SparseKernelsConfig())
    assert sorted(sparse_layers(direct)) == sorted(masked) and torch.equal(logits(direct, IDS), ref)
    # and it then saves compressed
    direct.save_pretrained(tmp_path / "sparse")
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sparse"), IDS), ref)
    ignored = skhf.load_pretrained(tmp_path, ignore=("*.mlp.*",))
    assert not any(".mlp." in n for n in sparse_layers(ignored)) and len(sparse_layers(ignored)) == 8
    # older llm-compressor releases added a compressed-tensors config whose sparsity format is "dense"
    edit_config(tmp_path, lambda c: c.update(quantization_config={
        "quant_method": "compressed-tensors", "version": "0.9.0", "sparsity_config": {
            "format": "dense", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head"]}}))
    older = skhf.load_pretrained(tmp_path)
    assert sorted(sparse_layers(older)) == sorted(masked) and torch.equal(logits(older, IDS), ref)


def write_bitmask_checkpoint(model: nn.Module, directory, targets) -> None:
    """A compressed-tensors sparse-24-bitmask directory, written from the format's description (see
    sparsekernels/huggingface/bitmask.py): per target layer, ``compressed`` (the two kept values of every group of 4,
    row-major), ``bitmask`` (uint8, one little-endian bit per element, exactly two set per group) and ``shape``."""
    from safetensors.torch import save_file

    model.save_pretrained(directory)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    for name in targets:
        w = state.pop(f"{name}.weight")
        rows, cols = w.shape
        g = w.reshape(rows, -1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True).reshape(rows, cols)
        bits = torch.nn.functional.pad(keep, (0, -cols % 8)).reshape(rows, -1, 8).to(torch.int32)
        state[f"{name}.compressed"] = w[keep].reshape(rows, cols // 2)
        state[f"{name}.bitmask"] = (bits << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)
        state[f"{name}.shape"] = torch.tensor([rows, cols]).reshape(-1, 1)
    save_file(state, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
    path = os.path.join(directory, "config.json")
    config = json.loads(open(path).read())
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "version": "0.14.0",
        "sparsity_config": {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"],
                            "ignore": ["lm_head"], "global_sparsity": 0.4, "registry_requires_subclass": False},
        "transform_config": {},
    }
    open(path, "w").write(json.dumps(config, indent=2))


def test_compressed_tensors_bitmask_checkpoint_imports_as_sparse(tmp_path):
    model = tiny_llama()
    masked = mask_24(model, skip=("lm_head",))
    ref = logits(model, IDS)
    write_bitmask_checkpoint(model, tmp_path, masked)
    loaded = skhf.load_pretrained(tmp_path)
    assert sorted(loaded.hf_quantizer.bitmask_layers) == sorted(masked) == sorted(sparse_layers(loaded))
    assert type(loaded.lm_head) is nn.Linear
    assert torch.equal(logits(loaded, IDS), ref)
    loaded.save_pretrained(tmp_path / "sparse")  # saved in the sparsekernels format, under the model's names
    keys = tensor_bytes(tmp_path / "sparse" / "model.safetensors")
    assert not find_bitmask_layers(keys) and all(f"{n}.weight_meta" in keys for n in masked)
    assert torch.equal(logits(AutoModelForCausalLM.from_pretrained(tmp_path / "sparse"), IDS), ref)


def test_bitmask_conversion_matches_compress_24():
    torch.manual_seed(3)
    for rows, cols in [(1, 4), (3, 12), (13, 40), (67, 8)]:  # odd group counts: a half-used last byte
        w = torch.randn(rows, cols)
        g = w.reshape(rows, -1, 4)
        keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True).reshape(rows, cols)
        w = w * keep
        bits = torch.nn.functional.pad(keep, (0, -cols % 8)).reshape(rows, -1, 8).to(torch.int32)
        bitmask = (bits << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)
        w24 = sparse24_from_bitmask(w[keep].reshape(rows, cols // 2), bitmask, torch.tensor([[rows], [cols]]))
        ref = sk.compress_24(w)
        assert torch.equal(w24.to_dense(), w) and torch.equal(w24.meta, ref.meta)
        assert torch.equal(w24.values, ref.values)
        w24.validate()


def test_bitmask_errors():
    values, bitmask = torch.zeros(2, 4), torch.tensor([[0b00110011], [0b01110011]], dtype=torch.uint8)
    with pytest.raises(ValueError, match="row 1, group 1 .columns 4..7. keeps 3"):
        sparse24_from_bitmask(values, bitmask, [2, 8])
    with pytest.raises(ValueError, match="row 0 has bits set past its last column"):
        sparse24_from_bitmask(torch.zeros(1, 2), torch.tensor([[0b00010011]], dtype=torch.uint8), [1, 4])
    with pytest.raises(ValueError, match="bitmask of shape"):
        sparse24_from_bitmask(values, bitmask[:1], [2, 8])
    with pytest.raises(ValueError, match="compressed values of shape"):
        sparse24_from_bitmask(torch.zeros(2, 3), bitmask, [2, 8])
    with pytest.raises(TypeError, match="uint8 bitmask"):
        sparse24_from_bitmask(values, bitmask.to(torch.int32), [2, 8])
    with pytest.raises(TypeError, match="floating-point"):
        sparse24_from_bitmask(values.long(), bitmask, [2, 8])
    with pytest.raises(ValueError, match="multiple of 4"):
        sparse24_from_bitmask(values, bitmask, [2, 6])
    assert find_bitmask_layers(["a.compressed", "a.bitmask", "a.shape", "b.compressed", "c.weight"]) == \
        {"a": {"compressed": "a.compressed", "bitmask": "a.bitmask", "shape": "a.shape"}}


# ------------------------------------------------------------------------------------------------------------
# errors at the boundary


@pytest.fixture
def saved_sparse(tmp_path):
    """A sparse checkpoint whose q_proj of layer 0 stayed dense."""
    model = tiny_llama()
    mask_24(model)
    sk.sparsify(model, filter_fn=lambda n, m: n != "model.layers.0.self_attn.q_proj")
    skhf.mark_sparse(model)
    model.save_pretrained(tmp_path)
    return tmp_path


def edit_config(directory, edit) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))


def test_loading_errors(saved_sparse):
    def declare_q(c):
        square = next(g for g in c["quantization_config"]["sparse_modules"] if g["args"]["out_features"] == 64
                      and g["args"]["in_features"] == 64)
        square["names"].append("model.layers.0.self_attn.q_proj")

    edit_config(saved_sparse, declare_q)
    with pytest.raises(ValueError, match=r"lists the sparse layer 'model.layers.0.self_attn.q_proj' but the checkpoint "
                                         r"has no model.layers.0.self_attn.q_proj.weight_values"):
        AutoModelForCausalLM.from_pretrained(saved_sparse)

    def wrong_size(c):
        c["quantization_config"]["sparse_modules"] = [{"class": "SparseLinear", "names": ["lm_head"],
                                                       "args": {"in_features": 64, "out_features": 7, "bias": False}}]
    edit_config(saved_sparse, wrong_size)
    with pytest.raises(ValueError, match="'lm_head' has out_features=136 in the model but 7"):
        AutoModelForCausalLM.from_pretrained(saved_sparse)
    edit_config(saved_sparse, lambda c: c["quantization_config"]["sparse_modules"][0].update({"class": "CsrLinear"}))
    with pytest.raises(ValueError, match="'CsrLinear', which this installation does not provide"):
        AutoModelForCausalLM.from_pretrained(saved_sparse)
    edit_config(saved_sparse, lambda c: c["quantization_config"].update({"sparse_modules": [], "format_version": 9}))
    with pytest.raises(ValueError, match="newer sparsekernels"):
        AutoModelForCausalLM.from_pretrained(saved_sparse)
    edit_config(saved_sparse, lambda c: c.update(tie_word_embeddings=True) or c["quantization_config"].update(
        format_version=1))
    with pytest.raises(ValueError, match="'lm_head' is stored sparse but its weight is tied"):
        AutoModelForCausalLM.from_pretrained(saved_sparse)


def test_corrupt_metadata_is_refused(saved_sparse):
    from safetensors.torch import load_file, save_file

    path = str(saved_sparse / "model.safetensors")
    state = load_file(path)
    state["lm_head.weight_meta"][3, 1] = 0x00  # positions 0 and 0: not two distinct positions
    save_file(state, path, metadata={"format": "pt"})
    with pytest.raises(ValueError, match="layer 'lm_head': .*row 3, group 2"):
        AutoModelForCausalLM.from_pretrained(saved_sparse)


def test_config_and_api_errors(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="quant_method 'sparsekernels'"):
        skhf.SparseKernelsConfig(quant_method="gptq")
    with pytest.raises(ValueError, match="backend"):
        skhf.SparseKernelsConfig(backend="fast")
    with pytest.raises(ValueError, match="sparse_modules entry"):
        skhf.SparseKernelsConfig(sparse_modules=[{"class": "SparseLinear"}])
    with pytest.raises(ValueError, match="ignore"):
        skhf.SparseKernelsConfig(ignore=[3])
    with pytest.raises(TypeError, match="PreTrainedModel"):
        skhf.mark_sparse(nn.Linear(4, 4))
    with pytest.raises(TypeError, match="PreTrainedModel"):
        skhf.save_dense(nn.Linear(4, 4), tmp_path)
    with pytest.raises(TypeError, match="state_dict"):
        skhf.save_dense(tiny_llama(), tmp_path, state_dict={})
    with pytest.raises(TypeError, match="quantization_config is set by load_pretrained"):
        skhf.load_pretrained(tmp_path, quantization_config=skhf.SparseKernelsConfig())
    quantizer = skhf.SparseKernelsHfQuantizer(skhf.SparseKernelsConfig())
    with pytest.raises(ValueError, match="offloaded to disk"):
        quantizer.validate_environment(device_map={"": "disk"})
    tiny_llama().save_pretrained(tmp_path)
    quantized = {"quant_method": "compressed-tensors", "config_groups": {"g": {}}, "format": "int-quantized"}
    edit_config(tmp_path, lambda c: c.update(quantization_config=quantized))
    with pytest.raises(ValueError, match="sparsity only, got quantized weights"):
        skhf.load_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.update(quantization_config={"quant_method": "compressed-tensors",
                                                                   "sparsity_config": {"format": "sparse-bitmask"}}))
    with pytest.raises(ValueError, match="'sparse-bitmask'"):
        skhf.load_pretrained(tmp_path)
    edit_config(tmp_path, lambda c: c.update(quantization_config={"quant_method": "gptq", "bits": 4}))
    with pytest.raises(ValueError, match="quantized with 'gptq'"):
        skhf.load_pretrained(tmp_path)
    from transformers.quantizers.auto import AUTO_QUANTIZER_MAPPING

    monkeypatch.setitem(AUTO_QUANTIZER_MAPPING, "sparsekernels", type("Other", (skhf.SparseKernelsHfQuantizer,), {}))
    with pytest.raises(RuntimeError, match="already has"):
        skhf.register()


def tiny_gpt2_24():
    """A GPT-2 whose Conv1D projections (weight [in, out]) are 2:4 along their input dim."""
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=32,
                                  bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if type(m).__name__ == "Conv1D":
                w = m.weight.t()
                g = w.reshape(w.shape[0], -1, 4)
                keep = torch.zeros_like(g, dtype=torch.bool).scatter_(-1, g.abs().topk(2, -1).indices, True)
                m.weight.copy_((g * keep).reshape(w.shape).t())
    return model


def test_gpt2_dense_24_checkpoint_imports_every_conv1d_sparse(tmp_path):
    model = tiny_gpt2_24()
    model.save_pretrained(tmp_path)
    loaded = skhf.load_pretrained(tmp_path)
    convs = [n for n, m in loaded.named_modules() if isinstance(m, sk.nn.SparseConv1D)]
    assert len(convs) == 8 and loaded.transformer.h[0].attn.c_attn.weight.shape == (32, 96)
    assert loaded.hf_quantizer.swap_report.skipped_reasons.keys() == {"lm_head"}  # tied to the embedding
    assert torch.equal(logits(loaded, IDS), logits(model, IDS))


def test_gpt2_save_pretrained_is_compressed_and_reloads_sparse_conv1d(tmp_path):
    model = tiny_gpt2_24()
    ref = logits(model, IDS)
    sk.sparsify(model)
    skhf.mark_sparse(model)
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    groups = {g["class"]: g for g in config["quantization_config"]["sparse_modules"]}
    assert set(groups) == {"SparseConv1D"}
    sizes = tensor_bytes(tmp_path / "model.safetensors")
    assert sizes["transformer.h.0.attn.c_attn.weight_values"] == 96 * 16 * 4  # [out, in/2] of the GEMM view
    assert "transformer.h.0.attn.c_attn.weight" not in sizes
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert isinstance(loaded.transformer.h[1].mlp.c_proj, sk.nn.SparseConv1D)
    assert torch.equal(logits(loaded, IDS), ref)
    skhf.save_dense(loaded, tmp_path / "dense")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "dense")
    assert type(plain.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert torch.equal(logits(plain, IDS), ref)


# ------------------------------------------------------------------------------------------------------------
# the real writers, where installed (llm-compressor pins older torch / transformers; compressed-tensors dropped the
# sparse-24-bitmask compressor after 0.14, whose metadata asks for transformers < 5: both install with --no-deps)


def test_compressed_tensors_own_bitmask_writer(tmp_path):
    compressors = pytest.importorskip("compressed_tensors.compressors")
    if not hasattr(compressors, "Sparse24BitMaskCompressor"):
        pytest.skip("this compressed-tensors has no sparse-24-bitmask compressor (dropped after 0.14)")
    from compressed_tensors.config import Sparse24BitMaskConfig
    from safetensors.torch import save_file

    model = tiny_llama()
    masked = mask_24(model, skip=("lm_head",))
    ref = logits(model, IDS)
    model.save_pretrained(tmp_path)
    compressor = compressors.ModelCompressor(sparsity_config=Sparse24BitMaskConfig(
        targets=["Linear"], ignore=["lm_head"], sparsity_structure="2:4"))
    state = compressor.compress(model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(tmp_path / "model.safetensors"),
              metadata={"format": "pt"})
    compressor.update_config(str(tmp_path))
    loaded = skhf.load_pretrained(tmp_path)
    assert sorted(sparse_layers(loaded)) == sorted(masked) and torch.equal(logits(loaded, IDS), ref)


@pytest.mark.slow
def test_llmcompressor_oneshot_output_imports_as_sparse(tmp_path):
    pytest.importorskip("llmcompressor")
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier
    from tokenizers import Tokenizer, models, pre_tokenizers
    from torch.utils.data import DataLoader

    tiny_llama().save_pretrained(tmp_path / "base")  # oneshot reads the model's config back from its path
    model = LlamaForCausalLM.from_pretrained(tmp_path / "base").eval()
    words = Tokenizer(models.WordLevel({f"t{i}": i for i in range(VOCAB)}, unk_token="t0"))
    words.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=words, unk_token="t0", pad_token="t1")
    ids = torch.randint(0, VOCAB, (8, 16), generator=torch.Generator().manual_seed(2))
    calib = DataLoader([{"input_ids": ids[i:i + 1], "attention_mask": torch.ones(1, 16, dtype=torch.long)}
                        for i in range(8)], batch_size=None)
    oneshot(model=model, processor=tokenizer, dataset=calib, num_calibration_samples=8, max_seq_length=16,
            recipe=SparseGPTModifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["lm_head"]),
            output_dir=str(tmp_path / "out"))
    written = LlamaForCausalLM.from_pretrained(tmp_path / "out").eval()
    loaded = skhf.load_pretrained(tmp_path / "out")
    assert len(sparse_layers(loaded)) >= 14
    assert torch.equal(logits(loaded, IDS), logits(written, IDS))


# ------------------------------------------------------------------------------------------------------------
