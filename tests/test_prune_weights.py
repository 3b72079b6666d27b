"""prune_weights(): layer selection, every pattern and criterion, reports, atomicity, error paths, and the
two quality claims (digits 2:4 + fine-tune within 1 point of dense; Wanda / SparseGPT beat magnitude on a
transformer with activation outliers)."""
import copy
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruning
from pruning import PruningReport, prune_weights
from pruning.importance import SparseGPT
from pruning.patterns import pruned_count, weight_matrix

ROOT = Path(__file__).resolve().parents[1]


class Net(nn.Module):
    """Conv (3 input channels: not 2:4-eligible) -> conv -> grouped conv -> linears (one with in=6)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.conv = nn.Conv2d(8, 12, 3, stride=2, padding=1, bias=False)
        self.grouped = nn.Conv2d(12, 12, 1, groups=3)
        self.fc1 = nn.Linear(12 * 4 * 4, 20)
        self.fc2 = nn.Linear(20, 6)
        self.fc3 = nn.Linear(6, 4)

    def forward(self, x, scale=1.0):
        x = torch.relu(self.stem(x * scale))
        x = torch.relu(self.grouped(torch.relu(self.conv(x))))
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x.flatten(1))))))


def _calib(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(4, 3, 8, 8, generator=g) for _ in range(n)]


def _assert_valid_24(module):
    mat = weight_matrix(module.weight.detach())
    assert bool(((mat != 0).reshape(mat.shape[0], -1, 4).sum(-1) <= 2).all())
    mask = weight_matrix(module.weight_mask)
    assert bool((mask.reshape(mask.shape[0], -1, 4).sum(-1) == 2).all())


@pytest.mark.parametrize("criterion", ["magnitude", "taylor", "wanda", "sparsegpt"])
def test_24_every_criterion_masks_valid_and_report_complete(criterion):
    from sparsekernels import compress_24

    torch.manual_seed(0)
    model = Net()
    pairs = [(x, torch.randint(0, 4, (4,))) for x in _calib()]
    report = prune_weights(
        model,
        "2:4",
        criterion,
        calib=pairs if criterion == "taylor" else [p[0] for p in pairs],
        loss_fn=lambda m, b: F.cross_entropy(m(b[0]), b[1]),
        progress=False,
    )
    assert isinstance(report, PruningReport)
    pruned = {"conv", "fc1", "fc2"} | ({"grouped"} if criterion in ("magnitude", "taylor") else set())
    assert set(report.pruned_names) == pruned
    reasons = {s.name: s.reason for s in report.skipped}
    assert "input channels per group (3) not a multiple of m=4" in reasons["stem"]
    assert "input features (6) not a multiple of m=4" in reasons["fc3"]
    if criterion in ("wanda", "sparsegpt"):
        assert "grouped" in reasons["grouped"]
    for layer in report.layers:
        assert layer.sparsity == 0.5 and layer.pattern == "2:4" and layer.importance == criterion
        module = model.get_submodule(layer.name)
        _assert_valid_24(module)
        compress_24(weight_matrix(module.weight.detach()))  # accepted by the runtime as is
    for name in ("stem", "fc3"):
        assert pruning.masks.get_mask(model.get_submodule(name)) is None
    text = str(report)
    assert "fc3" in text and "skipped" in text and report.to_dict()["overall_sparsity"] == 0.5


def test_calib_as_dicts_and_positional_inputs_reach_forward_arguments():
    torch.manual_seed(0)
    base = Net()
    xs = _calib()
    results = []
    positional = [((x, 2.0), torch.zeros(4)) for x in xs]  # (inputs, targets) with two positional inputs
    for calib in (positional, [((x, 2.0),) for x in xs], [{"x": x, "scale": 2.0} for x in xs], [x * 2.0 for x in xs]):
        model = copy.deepcopy(base)
        prune_weights(model, "2:4", "wanda", calib=calib, progress=False)
        results.append(model.fc1.weight_mask)
    assert all(torch.equal(results[0], r) for r in results[1:])


@pytest.mark.parametrize("criterion", ["magnitude", "wanda", "sparsegpt"])
def test_unstructured_budget_exact(criterion):
    torch.manual_seed(1)
    model = Net()
    report = prune_weights(model, "unstructured", criterion, sparsity=0.37, calib=_calib(), progress=False)
    for layer in report.layers:
        mask = model.get_submodule(layer.name).weight_mask
        if criterion == "wanda":  # every output row loses the same number
            mat = weight_matrix(mask)
            assert bool(((~mat).sum(1) == pruned_count(mat.shape[1], 0.37)).all())
        else:
            assert layer.pruned == pruned_count(layer.numel, 0.37)
        assert bool((model.get_submodule(layer.name).weight[~mask] == 0).all())


def test_global_and_per_layer_and_block():
    torch.manual_seed(2)
    model = Net()
    report = prune_weights(model, "global", sparsity=0.6, progress=False)
    total = sum(layer.numel for layer in report.layers)
    assert sum(layer.pruned for layer in report.layers) == pruned_count(total, 0.6)

    model = Net()
    report = prune_weights(model, "unstructured", sparsity={"fc1": 0.9, "conv": 0.25}, progress=False)
    assert {layer.name: layer.sparsity for layer in report.layers} == {
        "fc1": pruned_count(192 * 20, 0.9) / (192 * 20),
        "conv": pruned_count(12 * 72, 0.25) / (12 * 72),
    }
    assert {s.name: s.reason for s in report.skipped}["fc2"] == "no entry in the per-layer sparsity mapping"

    lin = nn.Sequential(nn.Linear(64, 32), nn.Linear(32, 10))
    report = prune_weights(lin, "block16x16", sparsity=0.5, progress=False)
    assert report.pruned_names == ["0"] and "not divisible" in report.skipped[0].reason
    tiles = lin[0].weight_mask.reshape(2, 16, 4, 16).permute(0, 2, 1, 3).reshape(8, -1)
    assert bool((tiles.all(1) | (~tiles).all(1)).all()) and int((~tiles[:, 0]).sum()) == 4


def test_filter_fn_shared_weights_uncalled_layers_and_bare_linear():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(8, 8)
            self.b = nn.Linear(8, 8)
            self.b.weight = self.a.weight
            self.never = nn.Linear(8, 8)

        def forward(self, x):
            return self.b(self.a(x))

    model = Tied()
    report = prune_weights(model, "2:4", "wanda", calib=[torch.randn(3, 8)], progress=False)
    reasons = {s.name: s.reason for s in report.skipped}
    assert report.pruned_names == ["a"]
    assert "shares its weight with 'a'" in reasons["b"]
    assert "received no input" in reasons["never"]
    report = prune_weights(Tied(), "2:4", filter_fn=lambda name, m: name != "a", progress=False)
    assert {s.name: s.reason for s in report.skipped}["a"] == "excluded by filter_fn"
    bare = nn.Linear(8, 3)
    assert prune_weights(bare, "2:4", progress=False).pruned_names == [""]
    assert bool((bare.weight_mask.reshape(3, 2, 4).sum(-1) == 2).all())


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_unchanged(model, snapshot):
    state = model.state_dict()
    assert list(state) == list(snapshot), "buffers were added or removed"
    for k, v in snapshot.items():
        assert torch.equal(state[k], v), f"{k} changed"


@pytest.mark.parametrize(
    "criterion", ["wanda", "taylor", SparseGPT(sequential=True), SparseGPT(sequential=False)], ids=str
)
def test_failure_midway_leaves_model_exactly_as_it_was(criterion):
    torch.manual_seed(3)
    model = Net()
    model.train()
    snap = _snapshot(model)
    calls = {"n": 0}

    def fragile_loss(m, b):
        return m(b).square().mean()

    class Boom(Exception):
        pass

    def boom_hook(mod, args):
        calls["n"] += 1
        if calls["n"] == 3:  # the last batch fails (sequential SparseGPT: after conv and fc1 were pruned)
            raise Boom

    handle = model.fc2.register_forward_pre_hook(boom_hook)
    with pytest.raises(Boom):
        prune_weights(model, "2:4", criterion, calib=_calib(3), loss_fn=fragile_loss, progress=False)
    handle.remove()
    _assert_unchanged(model, snap)
    assert model.training and all(m.training for m in model.modules())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_sequential_sparsegpt_differs_from_one_pass_and_both_valid():
    torch.manual_seed(4)
    base = Net()
    a, b = copy.deepcopy(base), copy.deepcopy(base)
    prune_weights(a, "2:4", SparseGPT(sequential=True), calib=_calib(), progress=False)
    prune_weights(b, "2:4", SparseGPT(sequential=False), calib=_calib(), progress=False)
    for model in (a, b):
        for name in ("conv", "fc1", "fc2"):
            _assert_valid_24(model.get_submodule(name))
    assert torch.equal(a.conv.weight, b.conv.weight), "the first layer sees the same (dense) inputs"
    assert not torch.equal(a.fc2.weight, b.fc2.weight), "later layers calibrate on pruned inputs"


def test_prune_weights_error_paths():
    model = Net()
    snap = _snapshot(model)
    cases = [
        (TypeError, "nn.Module", dict(model="not a model")),
        (ValueError, "pattern", dict(pattern="2:5:1")),
        (ValueError, "fixes the sparsity", dict(sparsity=0.5)),
        (ValueError, "needs a sparsity", dict(pattern="unstructured")),
        (ValueError, "0 <= sparsity <= 1", dict(pattern="unstructured", sparsity=1.5)),
        (TypeError, "sparsity", dict(pattern="unstructured", sparsity="most")),
        (TypeError, "one float sparsity", dict(pattern="global", sparsity={"fc1": 0.5})),
        (ValueError, "not Linear/Conv2d", dict(pattern="unstructured", sparsity={"nope": 0.5})),
        (ValueError, r"0 <= sparsity\['fc1'\] <= 1", dict(pattern="unstructured", sparsity={"fc1": 2.0})),
        (ValueError, "expected one of", dict(importance="random")),
        (ValueError, "needs calib", dict(importance="wanda")),
        (TypeError, "wrap a single tensor", dict(importance="wanda", calib=torch.randn(4, 3, 8, 8))),
        (ValueError, "one-shot iterator", dict(importance="sparsegpt", calib=iter(_calib()))),
        (ValueError, "needs loss_fn", dict(importance="taylor", calib=_calib())),
        (ValueError, "compares scores across layers", dict(pattern="global", importance="wanda", sparsity=0.5, calib=_calib())),
        (ValueError, "supports 'n:m', 'unstructured'", dict(pattern="block4x4", importance="sparsegpt", sparsity=0.5, calib=_calib())),
        (TypeError, "filter_fn", dict(filter_fn="fc1")),
    ]
    for exc, match, kwargs in cases:
        kwargs = {"model": model, "progress": False, **kwargs}
        with pytest.raises(exc, match=match):
            prune_weights(**kwargs)
    _assert_unchanged(model, snap)


@pytest.fixture
def one_thread():
    """On a shared 2-core CI box one thread is several times faster than two oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_digits_24_after_finetune_within_one_point_of_dense(one_thread):
    from sparsekernels.examples.digits import DigitsCNN, evaluate_accuracy, load_digits_data, train_classifier

    data = load_digits_data(seed=0)
    torch.manual_seed(0)
    dense = DigitsCNN(16)
    train_classifier(dense, data, epochs=8, lr=3e-3, seed=0, progress=False)
    dense_acc = evaluate_accuracy(dense, data)
    assert dense_acc > 95.0
    calib = [x for (x, _), _ in zip(data.train_loader(128, seed=1), range(4))]
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        report = prune_weights(model, "2:4", criterion, calib=calib, progress=False)
        assert len(report.layers) == 5 and report.overall_sparsity == 0.5  # every layer but the 1-channel stem
        pruning.finetune(model, data.train_loader(64, seed=2), epochs=3, lr=3e-4, teacher=dense, seed=0, progress=False)
        for layer in report.layers:
            _assert_valid_24(model.get_submodule(layer.name))
        acc = evaluate_accuracy(model, data)
        assert acc >= dense_acc - 1.0, f"{criterion}: 2:4 + fine-tune {acc:.2f} % vs dense {dense_acc:.2f} %"


def test_transformer_wanda_and_sparsegpt_beat_magnitude_at_24(one_thread):
    from sparsekernels.benchmarks.pruning_quality import transformer_fidelity

    errors = transformer_fidelity(0, calib_batches=8, test_batches=4)
    # measurably: each step at least 1.5x lower output error
    assert errors["wanda"] * 1.5 < errors["magnitude"], errors
    assert errors["sparsegpt"] * 1.5 < errors["wanda"], errors


def test_attach_mask_errors_and_reattach():
    from pruning.masks import attach_mask, get_mask

    lin = nn.Linear(8, 4)
    with pytest.raises(TypeError, match="weight tensor"):
        attach_mask(nn.ReLU(), torch.ones(4, 8, dtype=torch.bool))
    with pytest.raises(TypeError, match="torch.bool"):
        attach_mask(lin, torch.ones(4, 8))
    with pytest.raises(ValueError, match=r"\(4, 8\)"):
        attach_mask(lin, torch.ones(8, 4, dtype=torch.bool))
    prune_weights(lin, "unstructured", sparsity=0.25, progress=False)
    prune_weights(lin, "unstructured", sparsity=0.5, progress=False)  # re-pruning replaces the mask
    assert int((~get_mask(lin)).sum()) == 16 and list(dict(lin.named_buffers())) == ["weight_mask"]


def test_pruning_does_not_import_sparsekernels():
    import subprocess
    import sys

    code = (
        "import sys, torch, pruning\n"
        "import pruning.patterns, pruning.importance, pruning.weights, pruning.training, pruning.plan\n"
        "import pruning.sensitivity, pruning.channels\n"
        "m = torch.nn.Sequential(torch.nn.Linear(8, 8))\n"
        "pruning.prune_weights(m, '2:4', progress=False)\n"
        "assert 'sparsekernels' not in sys.modules and 'triton' not in sys.modules\n"
        "pruning.finetune(m, [(torch.randn(2, 8), torch.tensor([0, 1]))], progress=False)\n"
        "assert 'sparsekernels' not in sys.modules  # (torch's own optimizers may import triton)\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


def test_hugging_face_model_with_dict_batches():
    """``model(**batch)`` calibration and fine-tuning on a tiny randomly initialised BERT (no download)."""
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=32, num_labels=3)
    model = BertForSequenceClassification(config).eval()
    dense = copy.deepcopy(model)
    g = torch.Generator().manual_seed(0)
    calib = [{"input_ids": torch.randint(0, 64, (4, 12), generator=g), "attention_mask": torch.ones(4, 12, dtype=torch.long)}
             for _ in range(3)]
    report = prune_weights(model, "2:4", "sparsegpt", calib=calib, progress=False)
    assert len(report.layers) == 8 and not report.skipped and report.overall_sparsity == 0.5
    data = [{**b, "labels": torch.randint(0, 3, (4,), generator=g)} for b in calib]
    losses = pruning.finetune(model, data, epochs=2, lr=1e-3, teacher=dense, progress=False)  # loss from output.loss
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    for layer in report.layers:
        _assert_valid_24(model.get_submodule(layer.name))


def test_output_head_left_dense_by_default_and_tied_head_never_pruned():
    """A Hugging Face model's output head (``get_output_embeddings()``) is left dense unless ``prune_head=True``, and
    the report says why; GPT-2's head is also tied to the token embedding, so even then it stays dense (pruning it
    would zero embedding entries). Its ``Conv1D`` projections are pruned (tests/test_pruning_llm.py checks them)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=4, vocab_size=64, n_positions=16)).eval()
    calib = [{"input_ids": torch.randint(0, 64, (2, 8))}]
    conv1d = ["transformer.h.0.attn.c_attn", "transformer.h.0.attn.c_proj", "transformer.h.0.mlp.c_fc",
              "transformer.h.0.mlp.c_proj"]
    report = prune_weights(copy.deepcopy(model), "2:4", "wanda", calib=calib, progress=False)
    assert report.pruned_names == conv1d and all(layer.kind == "Conv1D" for layer in report.layers)
    reasons = {s.name: s.reason for s in report.skipped}
    assert list(reasons) == ["lm_head"] and "output head (get_output_embeddings())" in reasons["lm_head"]
    assert "prune_head=True" in reasons["lm_head"]
    report = prune_weights(copy.deepcopy(model), "2:4", "wanda", calib=calib, prune_head=True, progress=False)
    assert "shares its weight with 'transformer.wte' (Embedding)" in report.skipped[0].reason
    # an untied head is pruned when asked for
    model.lm_head.weight = nn.Parameter(model.lm_head.weight.detach().clone())
    report = prune_weights(model, "2:4", "magnitude", prune_head=True, progress=False)
    assert "lm_head" in report.pruned_names and not report.skipped
    # a mapping may name a Conv1D layer; filter_fn governs the head entry like any other
    report = prune_weights(model, "unstructured", sparsity={"transformer.h.0.mlp.c_fc": 0.5}, progress=False)
    assert report.pruned_names == ["transformer.h.0.mlp.c_fc"]
    report = prune_weights(model, "2:4", filter_fn=lambda n, m: "mlp" in n, progress=False)
    assert [s.reason for s in report.skipped if s.name == "lm_head"] == ["excluded by filter_fn"]
    with pytest.raises(ValueError, match="not Linear/Conv2d/Conv1D"):
        prune_weights(model, "unstructured", sparsity={"transformer.wte": 0.5}, progress=False)


def test_other_conv_kinds_reported_and_untied_head_pruned():
    model = nn.Sequential(nn.Conv1d(4, 8, 3), nn.Flatten(), nn.Linear(8 * 6, 8))
    report = prune_weights(model, "2:4", progress=False)
    assert report.pruned_names == ["2"]
    assert [(s.name, s.kind) for s in report.skipped] == [("0", "Conv1d")]
    assert "Conv1d is not supported" in report.skipped[0].reason
    assert int((model[0].weight == 0).sum()) == 0

    emb, head = nn.Embedding(16, 8), nn.Linear(8, 16, bias=False)
    head.weight = nn.Parameter(emb.weight.detach().clone())   # untied copy: pruned, embedding untouched
    report = prune_weights(nn.ModuleDict({"emb": emb, "head": head}), "2:4", progress=False)
    assert report.pruned_names == ["head"] and int((emb.weight == 0).sum()) == 0


@pytest.mark.parametrize("criterion", ["wanda", "sparsegpt"])
def test_classification_loader_works_as_calib_and_bad_batches_are_explained(criterion):
    """A classification DataLoader yields (inputs, targets): calibration uses the inputs and ignores the
    targets, so it gives the masks of the inputs alone; a batch of three is rejected with the contract, and
    the model is untouched."""
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 4))
    twin = copy.deepcopy(model)
    before = copy.deepcopy(model.state_dict())
    loader = DataLoader(TensorDataset(torch.randn(24, 16), torch.randint(0, 4, (24,))), batch_size=8)
    triples = [(x, y, y) for x, y in loader]
    with pytest.raises(TypeError, match=r"expected \(inputs, targets\) or \(inputs,\), got a tuple of 3.*dict"):
        prune_weights(model, "2:4", criterion, calib=triples, progress=False)
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[k], before[k]) for k in before)
    report = prune_weights(model, "2:4", criterion, calib=loader, progress=False)
    assert report.overall_sparsity == 0.5 and len(report.layers) == 2
    prune_weights(twin, "2:4", criterion, calib=[x for x, _ in loader], progress=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), twin.state_dict().values()))
