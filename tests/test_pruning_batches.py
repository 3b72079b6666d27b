"""The batch contract (pruning.batches), and that every consumer reads batches by it: calibration, finetune,
sensitivity analysis, gradual pruning and channel Taylor importance."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruning
from pruning.batches import (
    call_model,
    check_batches,
    default_loss,
    eval_mode,
    input_args,
    iter_tensors,
    loss_from_output,
    move_batch,
    output_tensor,
    restoring_modes,
    split_batch,
)


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(6, 8)
        self.b = nn.Linear(8, 3)

    def forward(self, x, scale=1.0):
        return self.b(torch.relu(self.a(x * scale)))


def test_split_batch_follows_the_contract():
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    assert split_batch(x)[0] is x and split_batch(x)[1] is None
    inputs, targets = split_batch((x, y))
    assert inputs is x and targets is y
    assert split_batch([x, y])[1] is y
    inputs, targets = split_batch((x,))
    assert inputs is x and targets is None
    d = {"input_ids": x, "labels": y}
    inputs, targets = split_batch(d)
    assert inputs is d and targets is y  # the model gets the labels too, and computes its own loss
    assert split_batch({"input_ids": x})[1] is None
    inputs, targets = split_batch(((x, 2.0), y))
    assert inputs == (x, 2.0) and targets is y
    for bad in ((x, y, y), (), [x, y, y, y]):
        with pytest.raises(TypeError, match=r"expected \(inputs, targets\) or \(inputs,\).*\(\(a, b\), targets\)"):
            split_batch(bad, "calibration batch")
    with pytest.raises(TypeError, match="my batch: expected a Tensor, a Mapping or a tuple/list, got int"):
        split_batch(3, "my batch")


def test_call_model_and_input_args():
    model = TwoInputs()
    x = torch.randn(2, 6)
    ref = model(x)
    assert torch.equal(call_model(model, x), ref)
    assert torch.equal(call_model(model, (x,)), ref)
    assert torch.equal(call_model(model, [x, 2.0]), model(x, 2.0))
    assert torch.equal(call_model(model, {"x": x, "scale": 2.0}), model(x, scale=2.0))
    assert input_args({"x": x}) == ((), {"x": x})
    with pytest.raises(TypeError, match="example_inputs: expected a Tensor"):
        input_args("image", "example_inputs")


def test_move_iter_and_output_helpers():
    x = torch.randn(3)
    moved = move_batch({"a": (x, [x]), "b": 3}, torch.device("cpu"))
    assert torch.equal(moved["a"][1][0], x) and moved["b"] == 3
    assert [t is x for t in iter_tensors({"a": (x, [x]), "b": 3, "c": {"d": x}})] == [True, True, True]
    logits, hidden = torch.randn(2, 3), torch.randn(2, 5)
    assert output_tensor(logits) is logits
    assert output_tensor({"loss": torch.tensor(1.0), "logits": logits}) is logits
    assert output_tensor({"loss": torch.tensor(1.0), "last_hidden_state": hidden}) is hidden
    assert output_tensor((hidden, logits)) is hidden
    with pytest.raises(TypeError, match="cannot find an output tensor"):
        output_tensor({"loss": torch.tensor(1.0)})


def test_default_loss():
    model = TwoInputs()
    x, y = torch.randn(4, 6), torch.tensor([0, 1, 2, 0])
    assert torch.allclose(default_loss(model, (x, y)), F.cross_entropy(model(x), y))
    own = torch.tensor(3.0)
    assert loss_from_output({"loss": own, "logits": model(x)}, None) is own
    with pytest.raises(TypeError, match="default loss needs.*loss_fn"):
        default_loss(model, x)
    with pytest.raises(TypeError, match="default loss needs.*loss_fn"):
        default_loss(model, (x,))


def test_check_batches_and_modes():
    check_batches("f()", [torch.randn(2)])
    with pytest.raises(TypeError, match="f\\(\\): expected calib as an iterable of batches"):
        check_batches("f()", torch.randn(2))
    with pytest.raises(ValueError, match="two passes needs a re-iterable data"):
        check_batches("f()", iter([1]), label="data", reiterated_by="two passes")
    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout())
    model.train()
    model[1].eval()
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert model.training and model[0].training and not model[1].training
    with pytest.raises(RuntimeError), restoring_modes(model, None):
        model.eval()
        raise RuntimeError
    assert model.training and not model[1].training


def _classification(n=4, seed=0):
    """``n`` ``(inputs, targets)`` batches of a linear 3-class problem."""
    g = torch.Generator().manual_seed(seed)
    xs = torch.randn(n, 8, 6, generator=g)
    targets = (xs @ torch.randn(6, 3, generator=g)).argmax(-1)
    return list(zip(xs, targets))


def test_every_consumer_takes_inputs_targets_batches():
    torch.manual_seed(0)
    data = _classification()
    # calibration ignores the targets: the same masks as the inputs alone
    a, b = TwoInputs(), TwoInputs()
    b.load_state_dict(a.state_dict())
    pruning.prune_weights(a, "unstructured", "wanda", sparsity=0.5, calib=data, progress=False)
    pruning.prune_weights(b, "unstructured", "wanda", sparsity=0.5, calib=[x for x, _ in data], progress=False)
    assert torch.equal(a.a.weight_mask, b.a.weight_mask)
    # several positional inputs: ((x, scale), y), for finetune's default loss and for calibration
    losses = pruning.finetune(a, [((x, 0.5), y) for x, y in data], epochs=2, lr=1e-2, progress=False)
    assert len(losses) == 2 and losses[1] < losses[0]
    # sensitivity: the output error of (inputs, targets) batches, and with a loss on them
    result = pruning.sensitivity_analysis(TwoInputs(), data, sparsities=(0.5,), progress=False)
    assert set(result.curves) == {"a", "b"}
    result = pruning.sensitivity_analysis(TwoInputs(), data, sparsities=(0.5,), loss_fn=default_loss, progress=False)
    assert result.metric == "loss_increase"
    # gradual pruning's calibration, and channel Taylor importance with its default loss
    model = TwoInputs()
    pruner = pruning.GradualPruner(model, 0.5, total_steps=2, frequency=1, importance="wanda", calib=data)
    pruning.finetune(model, data, epochs=1, lr=1e-3, pruner=pruner, progress=False)
    assert pruner.reports[-1][1].overall_sparsity == pytest.approx(0.5, abs=0.02)
    pruned = pruning.prune_channels(TwoInputs(), data[0][0], ratio=0.5, importance="taylor", calib=data, progress=False)
    assert pruned.a.out_features == 4
    with pytest.raises(TypeError, match=r"got a tuple of 3"):
        pruning.finetune(TwoInputs(), [(x, y, y) for x, y in data], progress=False)
