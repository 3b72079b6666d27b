"""Persistence: remove_masks, save_plan / load_plan / apply_plan round trips and their error paths."""
import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from pruning import apply_plan, load_plan, prune_weights, remove_masks, save_plan
from pruning.plan import PruningPlan
from pruning.masks import masked_modules


class Model(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 5))

    def forward(self, x):
        return self.body(torch.relu(self.conv(x)).flatten(1))


def _fresh(seed=0):
    torch.manual_seed(seed)
    return Model()


def test_round_trip_into_fresh_model_gives_identical_weights(tmp_path):
    model = _fresh()
    dense_state = copy.deepcopy(model.state_dict())
    report = prune_weights(model, "2:4", progress=False)
    tensor_path, json_path = save_plan(model, tmp_path / "plans" / "m.json")
    assert tensor_path.name == "m.safetensors" and json_path.name == "m.json"
    meta = json.loads(json_path.read_text())
    assert meta["format"] == "pruning-plan" and set(meta["layers"]) == {"conv", "body.0", "body.2"}
    assert meta["layers"]["conv"] == {
        "kind": "Conv2d", "weight_shape": [8, 4, 3, 3], "pattern": "2:4", "importance": "magnitude", "sparsity": 0.5,
    }
    fresh = _fresh(seed=123)
    fresh.load_state_dict(dense_state)
    applied = apply_plan(fresh, tmp_path / "plans" / "m")
    assert applied.pruned_names == report.pruned_names
    for (name, a), (_, b) in zip(model.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), name
    x = torch.randn(2, 4, 6, 6)
    assert torch.equal(model(x), fresh(x))


def test_round_trip_with_weights_reproduces_sparsegpt(tmp_path):
    model = _fresh()
    prune_weights(model, "2:4", "sparsegpt", calib=[torch.randn(3, 4, 6, 6) for _ in range(2)], progress=False)
    save_plan(model, tmp_path / "sgpt", include_weights=True)
    plan = load_plan(tmp_path / "sgpt.safetensors")
    assert isinstance(plan, PruningPlan) and set(plan.weights) == set(plan.masks)
    fresh = _fresh(seed=9)  # different dense weights: the plan carries the reconstructed ones
    apply_plan(fresh, plan)
    for name, module in masked_modules(model):
        other = fresh.get_submodule(name)
        assert torch.equal(module.weight, other.weight) and torch.equal(module.weight_mask, other.weight_mask)


def test_remove_masks_leaves_plain_weights_and_state_dicts_load(tmp_path):
    model = _fresh()
    prune_weights(model, "unstructured", sparsity=0.7, progress=False)
    # a masked model's state_dict loads back into a masked model (resume)
    other = _fresh(seed=5)
    prune_weights(other, "unstructured", sparsity=0.7, progress=False)
    other.load_state_dict(model.state_dict())
    assert torch.equal(other.conv.weight_mask, model.conv.weight_mask)
    zeros = {n: (m.weight == 0).clone() for n, m in masked_modules(model)}
    with torch.no_grad():
        model.conv.weight.add_(1.0)  # stray write: removal re-applies the mask one last time
    removed = remove_masks(model)
    assert removed == ["conv", "body.0", "body.2"]
    assert not list(masked_modules(model)) and not hasattr(model.conv, "_pruning_info")
    assert list(model.state_dict()) == list(_fresh().state_dict())
    for name, zero in zeros.items():
        assert bool((model.get_submodule(name).weight[zero] == 0).all())
    _fresh().load_state_dict(model.state_dict())  # strict load into a plain instance
    assert remove_masks(model) == []
    with pytest.raises(TypeError, match="nn.Module"):
        remove_masks(None)


def test_plan_error_paths(tmp_path):
    model = _fresh()
    with pytest.raises(ValueError, match="no masks"):
        save_plan(model, tmp_path / "empty")
    with pytest.raises(TypeError, match="nn.Module"):
        save_plan("model", tmp_path / "x")
    with pytest.raises(TypeError, match="path"):
        save_plan(model, 42)
    prune_weights(model, "2:4", progress=False)
    save_plan(model, tmp_path / "p")

    class Other(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(4, 12, 3)  # other shape
            self.body = nn.Sequential(nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.ReLU())  # body.2 not a Linear

    other = Other()
    before = copy.deepcopy(other.state_dict())
    with pytest.raises(ValueError, match="does not fit") as info:
        apply_plan(other, tmp_path / "p")
    msg = str(info.value)
    assert "'conv': plan has weight shape (8, 4, 3, 3), model has (12, 4, 3, 3)" in msg
    assert "'body.2': expected nn.Linear, nn.Conv2d or a transformers Conv1D, got ReLU" in msg
    for k, v in other.state_dict().items():
        assert torch.equal(v, before[k]), "a failed apply_plan must not change the model"
    with pytest.raises(ValueError, match="no such module"):
        apply_plan(nn.Sequential(nn.Linear(3, 3)), tmp_path / "p")
    with pytest.raises(TypeError, match="PruningPlan or a path"):
        apply_plan(_fresh(), {"conv": None})
    with pytest.raises(TypeError, match="nn.Module"):
        apply_plan(None, tmp_path / "p")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_plan(tmp_path / "missing")

    meta = json.loads((tmp_path / "p.json").read_text())
    tensors = load_file(str(tmp_path / "p.safetensors"))

    def write(name, meta_obj=None, tensor_dict=None, raw=None):
        save_file(tensor_dict if tensor_dict is not None else tensors, str(tmp_path / f"{name}.safetensors"))
        (tmp_path / f"{name}.json").write_text(raw if raw is not None else json.dumps(meta_obj or meta))
        return tmp_path / name

    with pytest.raises(ValueError, match="not valid JSON"):
        load_plan(write("bad_json", raw="{nope"))
    with pytest.raises(ValueError, match="pruning-plan"):
        load_plan(write("bad_format", {**meta, "format": "other"}))
    with pytest.raises(ValueError, match="JSON object"):
        load_plan(write("bad_list", raw="[1, 2]"))
    with pytest.raises(ValueError, match="version"):
        load_plan(write("bad_version", {**meta, "version": 99}))
    with pytest.raises(ValueError, match="'layers'"):
        load_plan(write("bad_layers", {**meta, "layers": []}))
    with pytest.raises(ValueError, match="has no mask"):
        load_plan(write("missing_mask", tensor_dict={k: v for k, v in tensors.items() if not k.startswith("conv")}))
    with pytest.raises(ValueError, match="not described"):
        load_plan(write("extra", tensor_dict={**tensors, "stray": torch.zeros(2)}))
    with pytest.raises(ValueError, match="is F32 .* expected BOOL"):
        load_plan(write("bad_dtype", tensor_dict={**tensors, "conv.weight_mask": tensors["conv.weight_mask"].float()}))
    with pytest.raises(ValueError, match="has no weight here"):
        load_plan(write("no_weights", {**meta, "has_weights": True}))


def test_plans_carry_input_permutations_and_conv1d_layers(tmp_path):
    """A layer that carries ``input_perm`` (its mask is N:M in that order) saves it with the plan, and a fresh model
    gets it back; GPT-2's Conv1D layers are planned like Linears."""
    from pruning.channels.permute import permute_for_nm
    from pruning.permutation import SearchConfig

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    fresh = copy.deepcopy(model)
    calib = [torch.randn(32, 16) * torch.linspace(0.2, 4, 16)]
    report = permute_for_nm(model, calib[0], "wanda", calib=calib, config=SearchConfig(max_sweeps=4),
                            progress=False)
    assert "0" in report.runtime_permutations
    # the model was permuted in place where it could be: a fresh copy of the permuted model is what the plan fits
    fresh.load_state_dict({k: v for k, v in model.state_dict().items() if not k.endswith("input_perm")})
    prune_weights(model, "2:4", "wanda", calib=calib, progress=False)
    save_plan(model, tmp_path / "plan")
    plan = load_plan(tmp_path / "plan")
    assert set(plan.input_perms) == {"0"} and torch.equal(plan.input_perms["0"], model[0].input_perm)
    assert json.loads((tmp_path / "plan.json").read_text())["layers"]["0"]["input_perm"] == 16
    apply_plan(fresh, plan)
    assert torch.equal(fresh[0].input_perm, model[0].input_perm)
    for (_, a), (_, b) in zip(masked_modules(model), masked_modules(fresh)):
        assert torch.equal(a.weight_mask, b.weight_mask)

    tensors = load_file(tmp_path / "plan.safetensors")  # a plan file whose permutation repeats an index
    tensors["0.input_perm"] = torch.zeros(16, dtype=torch.int64)
    save_file(tensors, tmp_path / "plan.safetensors", metadata={"format": "pruning-plan", "version": "1"})
    with pytest.raises(ValueError, match="0.input_perm: is not a permutation"):
        load_plan(tmp_path / "plan")

    transformers = pytest.importorskip("transformers")
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=50,
                                                                n_positions=16)).eval()
    twin = copy.deepcopy(gpt2)
    prune_weights(gpt2, "2:4", "magnitude", progress=False)
    save_plan(gpt2, tmp_path / "gpt2")
    assert json.loads((tmp_path / "gpt2.json").read_text())["layers"]["transformer.h.0.attn.c_attn"]["kind"] == "Conv1D"
    apply_plan(twin, tmp_path / "gpt2")
    ids = torch.randint(0, 50, (1, 9))
    with torch.no_grad():
        assert torch.equal(twin(ids).logits, gpt2(ids).logits)
