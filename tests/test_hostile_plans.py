"""Plans are untrusted input: a plan file mutated field by field (or replaced by garbage) is refused by load_plan
with ONE ValueError naming the file, the entry and the problem -- never a KeyError, AttributeError, IndexError,
RecursionError or a huge allocation -- and apply_plan leaves the model exactly as it was."""
import dataclasses
import json
import struct

import pytest
import torch
from model_state import assert_same_state, model_state
from safetensors.torch import load_file, save_file
from torch import nn

import pruning
import pruning.plan_schema
from pruning.plan import PruningPlan
from test_plan import Model


@pytest.fixture
def plan(tmp_path):
    """A valid plan (with weights) at ``tmp_path / "p"``; returns (stem, meta, tensors)."""
    torch.manual_seed(0)
    model = Model()
    pruning.prune_weights(model, "2:4", progress=False)
    pruning.save_plan(model, tmp_path / "p", include_weights=True)
    return tmp_path / "p", json.loads((tmp_path / "p.json").read_text()), load_file(str(tmp_path / "p.safetensors"))


def _layer(meta, name="conv", **changes):
    meta = json.loads(json.dumps(meta))
    meta["layers"][name].update(changes)
    return meta


def _without(meta, key, layer=None):
    meta = json.loads(json.dumps(meta))
    (meta["layers"][layer] if layer else meta).pop(key)
    return meta


JSON_CASES = {
    "not json": (b"{nope", "file: not valid JSON"),
    "not utf-8": (b'{"format": "\xff\xfe"}', "UnicodeDecodeError"),
    "nested too deep": (b"[" * 200_000 + b"]" * 200_000, "RecursionError"),
    "NaN": (lambda m: json.dumps(_layer(m, sparsity=0.5)).replace("0.5", "NaN").encode(), "NaN is not a JSON number"),
    "repeated key": (lambda m: json.dumps(m).replace('"version": 1', '"version": 1, "version": 1').encode(),
                     "appears twice"),
    "a list": (b"[1, 2]", "file: expected a JSON object, got list"),
    "other format": (lambda m: {**m, "format": "pickle"}, "format: expected 'pruning-plan'"),
    "no format": (lambda m: _without(m, "format"), "format: expected 'pruning-plan', got null"),
    "version as text": (lambda m: {**m, "version": "1"}, 'version: expected plan version 1, got "1"'),
    "version true": (lambda m: {**m, "version": True}, "version: expected plan version 1, got true"),
    "newer version": (lambda m: {**m, "version": 2}, "version: expected plan version 1, got 2"),
    "extra key": (lambda m: {**m, "exec": "import os"}, "file: unexpected key(s) ['exec']"),
    "no has_weights": (lambda m: _without(m, "has_weights"), "file: missing key(s) ['has_weights']"),
    "has_weights text": (lambda m: {**m, "has_weights": "yes"}, "has_weights: expected true or false"),
    "layers a list": (lambda m: {**m, "layers": []}, "layers: expected a non-empty 'layers' object, got list"),
    "no layers": (lambda m: {**m, "layers": {}}, "layers: expected a non-empty 'layers' object, got dict (empty)"),
    "layer a list": (lambda m: {**m, "layers": {**m["layers"], "conv": [1]}}, "layers['conv']: expected an object"),
    "layer without kind": (lambda m: _without(m, "kind", "conv"), "layers['conv']: missing key(s) ['kind']"),
    "layer extra key": (lambda m: _layer(m, code="x"), "layers['conv']: unexpected key(s) ['code']"),
    "input_perm of another length": (lambda m: _layer(m, input_perm=3),
                                     "layers['conv'].input_perm: expected the layer's 4 inputs, got 3"),
    "input_perm not a number": (lambda m: _layer(m, input_perm=True), "layers['conv'].input_perm: expected"),
    "other kind": (lambda m: _layer(m, kind="Conv1d"),
                   "layers['conv'].kind: expected one of ['Linear', 'Conv2d', 'Conv1D']"),
    "kind not text": (lambda m: _layer(m, kind={"a": 1}), "layers['conv'].kind: expected one of"),
    "shape text": (lambda m: _layer(m, weight_shape="8,4,3,3"), "layers['conv'].weight_shape: expected a list of 4"),
    "shape with text": (lambda m: _layer(m, weight_shape=[8, "4", 3, 3]), "weight_shape: expected a list of 4"),
    "shape with bool": (lambda m: _layer(m, weight_shape=[8, True, 3, 3]), "weight_shape: expected a list of 4"),
    "shape with zero": (lambda m: _layer(m, weight_shape=[8, 0, 3, 3]), "weight_shape: expected a list of 4"),
    "shape too short": (lambda m: _layer(m, weight_shape=[8, 36]), "weight_shape: expected a list of 4 sizes"),
    "shape huge dim": (lambda m: _layer(m, weight_shape=[2**40, 4, 3, 3]), "weight_shape: expected a list of 4"),
    "shape huge": (lambda m: _layer(m, weight_shape=[2**31, 2**31, 3, 3]), "elements, more than the limit"),
    "sparsity over 1": (lambda m: _layer(m, sparsity=1.5), "layers['conv'].sparsity: expected a number in [0, 1], "
                        "got 1.5"),
    "sparsity negative": (lambda m: _layer(m, sparsity=-0.1), "sparsity: expected a number in [0, 1]"),
    "sparsity text": (lambda m: _layer(m, sparsity="0.5"), "sparsity: expected a number in [0, 1]"),
    "sparsity null": (lambda m: _layer(m, sparsity=None), "sparsity: expected a number in [0, 1], got null"),
    "pattern number": (lambda m: _layer(m, pattern=24), "layers['conv'].pattern: expected a string, got int"),
    "pattern empty": (lambda m: _layer(m, pattern=""), "pattern: expected a printable string of 1 to 200"),
    "pattern long": (lambda m: _layer(m, pattern="x" * 1000), "pattern: expected a printable string"),
    "pattern two lines": (lambda m: _layer(m, pattern="2:4\n# heading"), "pattern: expected a printable string"),
    "importance null": (lambda m: _layer(m, importance=None), "layers['conv'].importance: expected a string"),
    "name with a control character": (lambda m: {**m, "layers": {"con\x00v": m["layers"]["conv"]}}, "layer name"),
}


@pytest.mark.parametrize("case", JSON_CASES)
def test_hostile_plan_json_is_refused_in_one_line(plan, case):
    stem, meta, _ = plan
    mutate, needle = JSON_CASES[case]
    data = mutate(meta) if callable(mutate) else mutate
    if isinstance(data, dict):
        data = json.dumps(data).encode()
    (stem.parent / "p.json").write_bytes(data)
    _assert_refused(stem, stem.parent / "p.json", needle)


def _flip_one(mask):
    mask = mask.clone()
    mask.view(-1)[0] = ~mask.view(-1)[0]
    return mask


TENSOR_CASES = {
    "garbage": (lambda t, path: path.write_bytes(b"garbage, not a safetensors file"), "file: not a readable"),
    "truncated": (lambda t, path: path.write_bytes(path.read_bytes()[: path.stat().st_size // 2]),
                  "file: not a readable"),
    "header claims 1 TB": (lambda t, path: path.write_bytes(struct.pack("<Q", 1 << 40) + b"{}"),
                           "file: not a readable"),
    "missing mask": (lambda t, path: save_file({k: v for k, v in t.items() if k != "conv.weight_mask"}, str(path)),
                     "conv.weight_mask: layer 'conv' is in p.json but has no mask here"),
    "missing weight": (lambda t, path: save_file({k: v for k, v in t.items() if k != "conv.weight"}, str(path)),
                       "conv.weight: layer 'conv' is in p.json but has no weight here"),
    "extra tensor": (lambda t, path: save_file({**t, "os.system": torch.zeros(1)}, str(path)),
                     "tensors: 1 tensor(s) not described in p.json: ['os.system']"),
    "float mask": (lambda t, path: save_file({**t, "conv.weight_mask": t["conv.weight_mask"].float()}, str(path)),
                   "conv.weight_mask: is F32 [8, 4, 3, 3], expected BOOL [8, 4, 3, 3]"),
    "mask of another shape": (lambda t, path: save_file({**t, "conv.weight_mask": torch.ones(8, 36, dtype=torch.bool)},
                                                        str(path)), "is BOOL [8, 36], expected BOOL [8, 4, 3, 3]"),
    "integer weight": (lambda t, path: save_file({**t, "conv.weight": t["conv.weight"].long()}, str(path)),
                       "conv.weight: is I64 [8, 4, 3, 3], expected a floating-point tensor"),
    "NaN weight": (lambda t, path: save_file({**t, "conv.weight": t["conv.weight"] * float("nan")}, str(path)),
                   "conv.weight: the saved weight holds NaN or inf"),
    "mask disagrees with sparsity": (lambda t, path: save_file(
        {**t, "conv.weight_mask": _flip_one(t["conv.weight_mask"])}, str(path)), "conv.weight_mask: has sparsity"),
    "other format": (lambda t, path: save_file(t, str(path), metadata={"format": "pickle"}), "metadata: expected"),
}


@pytest.mark.parametrize("case", TENSOR_CASES)
def test_hostile_plan_tensors_are_refused_in_one_line(plan, case):
    stem, _, tensors = plan
    mutate, needle = TENSOR_CASES[case]
    mutate(tensors, stem.parent / "p.safetensors")
    _assert_refused(stem, stem.parent / "p.safetensors", needle)


def _assert_refused(stem, bad_file, needle):
    with pytest.raises(ValueError) as info:
        pruning.load_plan(stem)
    message = str(info.value)
    assert type(info.value).__name__ in ("ValueError", "_Bad"), type(info.value)
    assert message.startswith(f"load_plan(): {bad_file}: "), message
    assert needle in message, message
    assert "\n" not in message and len(message) < 600, message
    torch.manual_seed(1)
    fresh = Model()
    before = model_state(fresh)
    with pytest.raises(ValueError):
        pruning.apply_plan(fresh, stem)
    assert_same_state(before, model_state(fresh))


def test_plan_limits_are_enforced(plan, monkeypatch):
    stem, _, _ = plan
    limits = pruning.plan_schema.PLAN_LIMITS
    for change, needle in (({"max_layers": 2}, "layers: 3 layers, more than the limit of 2"),
                           ({"max_json_bytes": 100}, "bytes, more than the limit of 100"),
                           ({"max_total_elements": 100}, "weight elements in all, more than the limit of 100")):
        monkeypatch.setattr(pruning.plan_schema, "PLAN_LIMITS", dataclasses.replace(limits, **change))
        _assert_refused(stem, stem.parent / "p.json", needle)


def test_a_valid_plan_for_another_model_changes_nothing(plan):
    stem, _, _ = plan
    other = nn.Sequential(nn.Linear(4, 8))
    before = model_state(other)
    with pytest.raises(ValueError, match="'conv': no such module in Sequential"):
        pruning.apply_plan(other, stem)
    assert_same_state(before, model_state(other))


@pytest.mark.parametrize("plan_obj, error, needle", [
    (PruningPlan({"conv": torch.ones(8, 4, 3, 3)}, {}), TypeError, "plan.masks['conv']: expected a torch.bool"),
    (PruningPlan({"conv": torch.ones(8, 4, 3, 3, dtype=torch.bool)}, {"conv": ["x"]}), TypeError,
     "plan.layers['conv']: expected a dict"),
    (PruningPlan({"conv": torch.ones(8, 4, 3, 3, dtype=torch.bool)}, {},
                 {"conv": torch.full((8, 4, 3, 3), float("inf"))}),
     ValueError, "plan.weights['conv'] holds NaN or inf"),
    (PruningPlan({"conv": torch.ones(8, 4, 3, 3, dtype=torch.bool)}, {}, {"body.0": torch.zeros(16, 288)}),
     ValueError, "has no mask"),
    (PruningPlan({1: torch.ones(8, 4, 3, 3, dtype=torch.bool)}, {}), TypeError, "keyed by layer name"),
])
def test_hostile_plan_objects_change_nothing(plan_obj, error, needle):
    torch.manual_seed(1)
    model = Model()
    before = model_state(model)
    with pytest.raises(error, match=needle.replace("[", r"\[").replace("]", r"\]").replace("(", r"\(")):
        pruning.apply_plan(model, plan_obj)
    assert_same_state(before, model_state(model))


def test_save_plan_replaces_both_files_together(plan, monkeypatch):
    import os

    stem, meta, _ = plan
    old = {p: p.read_bytes() for p in (stem.parent / "p.json", stem.parent / "p.safetensors")}
    torch.manual_seed(3)
    model = Model()
    pruning.prune_weights(model, "unstructured", sparsity=0.7, progress=False)
    real = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        pruning.save_plan(model, stem)
    monkeypatch.setattr(os, "replace", real)
    assert {p: p.read_bytes() for p in old} == old
    assert sorted(p.name for p in stem.parent.iterdir()) == ["p.json", "p.safetensors"]  # no temporaries left
    pruning.load_plan(stem)
