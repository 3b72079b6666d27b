"""All or nothing: every pruning operation that fails -- in calibration, in the loss, while choosing masks, while
committing them, on Ctrl-C -- leaves the WHOLE model as it was: values, BatchNorm statistics, requires_grad,
.grad, every module's mode, every hook (tests/model_state.py compares all of it)."""
import pytest
import torch
from model_state import assert_same_state, model_state
from torch import nn

import pruning
from pruning.transaction import ModelSnapshot, all_or_nothing, read_only


class Boom(nn.Module):
    """Identity that raises ``error`` on its ``at``-th forward call (counting from 1), or in backward."""

    def __init__(self):
        super().__init__()
        self.plan = {"at": None, "error": RuntimeError("injected failure"), "calls": 0, "backward": False}

    def forward(self, x):
        self.plan["calls"] += 1
        if self.plan["at"] is not None and self.plan["calls"] >= self.plan["at"]:
            raise self.plan["error"]
        return _FailingBackward.apply(x, self.plan) if self.plan["backward"] else x


class _FailingBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, plan):
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        raise RuntimeError("injected failure in backward")


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.boom = Boom()
        self.fc1 = nn.Linear(8 * 4 * 4, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(self.boom(torch.relu(self.bn(self.conv(x)))).flatten(1))))


def _batches(n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(6, 4, 4, 4, generator=g), torch.randint(0, 8, (6,), generator=g)) for _ in range(n)]


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


@pytest.fixture
def net():
    """A model in an awkward state: training, with a frozen BatchNorm that has statistics, a frozen bias,
    gradients, forward / pre / backward hooks, and an earlier mask on fc2."""
    torch.manual_seed(0)
    model = Net()
    model(torch.randn(6, 4, 4, 4))  # BatchNorm statistics that are not the defaults
    model.train()
    model.bn.eval()
    model.conv.bias.requires_grad_(False)
    _loss(model, _batches(1, seed=9)[0]).backward()
    model.fc1.register_forward_hook(lambda m, a, o: None)
    model.conv.register_forward_pre_hook(lambda m, a: None)
    model.fc2.register_full_backward_hook(lambda m, gi, go: None)
    pruning.prune_weights(model, "unstructured", sparsity=0.25, filter_fn=lambda n, m: n == "fc2", progress=False)
    model.boom.plan["calls"] = 0
    return model


def _fail_on_call(monkeypatch, module, name, k=2, error=RuntimeError("injected failure")):
    """Make ``module.name`` raise ``error`` on its k-th call."""
    real = getattr(module, name)
    calls = [0]

    def wrapper(*args, **kwargs):
        calls[0] += 1
        if calls[0] == k:
            raise error
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapper)


# ------------------------------------------------------------------------------------------------ prune_weights


@pytest.mark.parametrize("importance, k, error", [
    ("wanda", 2, RuntimeError("injected failure")),
    ("sparsegpt", 3, RuntimeError("injected failure")),  # sequential: a later layer's calibration pass
    ("taylor", 2, RuntimeError("injected failure")),
    ("wanda", 2, KeyboardInterrupt()),
])
def test_prune_weights_failing_in_calibration_changes_nothing(net, importance, k, error):
    net.boom.plan.update(at=k, error=error)
    before = model_state(net)
    with pytest.raises(type(error)):
        pruning.prune_weights(net, "2:4", importance, calib=_batches(), loss_fn=_loss, progress=False)
    assert_same_state(before, model_state(net))


def test_prune_weights_failing_in_the_loss_changes_nothing(net):
    calls = [0]

    def loss(model, batch):
        calls[0] += 1
        if calls[0] == 2:
            raise ValueError("injected failure in the loss")
        return _loss(model, batch)

    before = model_state(net)
    with pytest.raises(ValueError, match="in the loss"):
        pruning.prune_weights(net, "unstructured", "taylor", sparsity=0.5, calib=_batches(), loss_fn=loss,
                              progress=False)
    assert_same_state(before, model_state(net))


@pytest.mark.parametrize("stage, importance", [
    ("scores_to_mask", "magnitude"),  # choosing the second layer's mask
    ("attach_mask", "magnitude"),     # committing the second layer
    ("attach_mask", "sparsegpt"),     # committing a reconstructed weight
])
def test_prune_weights_failing_at_a_later_layer_changes_nothing(net, monkeypatch, stage, importance):
    import pruning.weights

    _fail_on_call(monkeypatch, pruning.weights, stage)
    before = model_state(net)
    with pytest.raises(RuntimeError, match="injected"):
        pruning.prune_weights(net, "2:4", importance, calib=_batches(), progress=False)
    assert_same_state(before, model_state(net))


# ----------------------------------------------------------------------------------- plans, remove, gradual


def test_apply_plan_failing_at_a_later_layer_changes_nothing(net, monkeypatch, tmp_path):
    import pruning.plan

    pruning.prune_weights(net, "2:4", "sparsegpt", calib=_batches(), progress=False)
    pruning.save_plan(net, tmp_path / "p", include_weights=True)
    torch.manual_seed(5)
    fresh = Net()
    fresh.fc1.register_forward_hook(lambda m, a, o: None)
    _fail_on_call(monkeypatch, pruning.plan, "attach_mask")
    before = model_state(fresh)
    with pytest.raises(RuntimeError, match="injected"):
        pruning.apply_plan(fresh, tmp_path / "p")
    assert_same_state(before, model_state(fresh))


def test_remove_masks_failing_at_a_later_layer_changes_nothing(net, monkeypatch):
    import pruning.plan

    pruning.prune_weights(net, "2:4", progress=False)
    _fail_on_call(monkeypatch, pruning.plan, "detach_mask")
    before = model_state(net)
    with pytest.raises(RuntimeError, match="injected"):
        pruning.remove_masks(net)
    assert_same_state(before, model_state(net))


def test_gradual_pruner_step_failing_changes_nothing_and_can_be_retried(net, monkeypatch):
    import pruning.weights

    pruner = pruning.GradualPruner(net, 0.5, total_steps=4, frequency=2)
    assert pruner.step() is not None  # step 0 prunes
    pruner.step()
    _fail_on_call(monkeypatch, pruning.weights, "attach_mask", k=2)
    before = model_state(net)
    with pytest.raises(RuntimeError, match="injected"):
        pruner.step()  # step 2 prunes, and fails on its second layer
    assert_same_state(before, model_state(net))
    assert pruner.current_step == 2 and len(pruner.reports) == 1
    assert pruner.step() is not None and pruner.current_step == 3  # the same step, tried again


# ----------------------------------------------------------------------------------------------- finetune


def _loss_failing_after_the_forward(model, batch):
    model(batch[0])  # the forward ran (BatchNorm statistics moved), then the loss fails
    raise ValueError("injected failure in the loss")


@pytest.mark.parametrize("where", ["forward", "backward", "loss", "optimizer", "interrupt", "nan loss"])
def test_finetune_failing_before_its_first_step_changes_nothing(net, monkeypatch, where):
    data = _batches()
    loss_fn = _loss
    if where == "forward":
        net.boom.plan.update(at=1)
    elif where == "backward":
        net.boom.plan.update(backward=True)
    elif where == "loss":
        loss_fn = _loss_failing_after_the_forward
    elif where == "optimizer":
        monkeypatch.setattr(torch.optim.AdamW, "step", lambda self, closure=None: (_ for _ in ()).throw(
            RuntimeError("injected failure in the optimizer")))
    elif where == "interrupt":
        net.boom.plan.update(at=1, error=KeyboardInterrupt())
    else:
        data = [(torch.full_like(x, float("nan")), y) for x, y in data]
    net.bn.train()  # a BatchNorm that learns: the first forward moves its statistics
    before = model_state(net)
    with pytest.raises((RuntimeError, ValueError, KeyboardInterrupt)):
        pruning.finetune(net, data, loss_fn, epochs=1, progress=False)
    assert_same_state(before, model_state(net))


def test_finetune_failing_after_its_first_step_keeps_the_steps_and_restores_modes(net):
    net.boom.plan.update(at=2)
    modes = [m.training for m in net.modules()]
    weight = net.fc1.weight.detach().clone()
    with pytest.raises(RuntimeError, match="injected"):
        pruning.finetune(net, _batches(), epochs=1, lr=1e-2, progress=False)
    assert [m.training for m in net.modules()] == modes
    assert not torch.equal(net.fc1.weight, weight)  # the first step is kept
    assert bool((net.fc2.weight[~net.fc2.weight_mask] == 0).all())  # and the masks are still enforced


# ----------------------------------------------------------------------------------------------- channels


def _bn_net():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 4, 3), nn.ReLU(),
                          nn.Flatten(), nn.Linear(4 * 4 * 4, 5))
    model.train()
    model[1].eval()
    model[0].register_forward_hook(lambda m, a, o: None)
    return model


@pytest.mark.parametrize("failure", ["bad example", "importance", "finetune", "interrupt"])
def test_prune_channels_never_touches_its_input(monkeypatch, failure):
    import pruning.channels.prune as prune_module

    model = _bn_net()
    example = torch.randn(2, 3, 8, 8)
    kwargs = {}
    if failure == "bad example":
        example = torch.randn(2, 5, 8, 8)
    elif failure == "importance":
        _fail_on_call(monkeypatch, prune_module, "group_importance", k=1)
    elif failure == "finetune":
        kwargs = {"finetune_data": [(torch.randn(2, 3, 8, 8), torch.tensor([0, 9]))]}  # target out of range
    else:
        _fail_on_call(monkeypatch, prune_module, "apply_channel_pruning", k=1, error=KeyboardInterrupt())
    before = model_state(model)
    with pytest.raises((ValueError, RuntimeError, IndexError, KeyboardInterrupt)):
        pruning.prune_channels(model, example, ratio=0.5, progress=False, **kwargs)
    assert_same_state(before, model_state(model))


def test_prune_channels_keeps_each_modules_mode_and_its_input(monkeypatch):
    model = _bn_net()
    before = model_state(model)
    small = pruning.prune_channels(model, torch.randn(2, 3, 8, 8), ratio=0.5, progress=False)
    assert_same_state(before, model_state(model))
    assert [m.training for m in small.modules()] == [m.training for m in model.modules()]
    assert small[0].out_channels == 4 and not small[1].training  # the frozen BatchNorm stays frozen


# --------------------------------------------------------------------------------- non-finite calibration


@pytest.mark.parametrize("importance, needle", [
    ("wanda", "layer 'conv' received NaN or inf inputs in calibration batch 1"),
    ("sparsegpt", "layer 'conv' received NaN or inf inputs"),
    ("taylor", "the loss of calibration batch 1 is nan"),
])
def test_non_finite_calibration_is_refused_naming_the_layer(net, importance, needle):
    calib = [(torch.full((6, 4, 4, 4), float("nan")), torch.zeros(6, dtype=torch.long))] * 2
    before = model_state(net)
    with pytest.raises(ValueError, match=needle):
        pruning.prune_weights(net, "unstructured", importance, sparsity=0.5, calib=calib, loss_fn=_loss,
                              progress=False)
    assert_same_state(before, model_state(net))


def test_non_finite_weights_are_refused_naming_the_layer_or_parameter(net):
    with torch.no_grad():
        net.fc1.weight[0, 0] = float("nan")
    before = model_state(net)
    with pytest.raises(ValueError, match="layer 'fc1' has 1 NaN/inf score"):
        pruning.prune_weights(net, "2:4", progress=False)
    with pytest.raises(ValueError, match="layer 'fc1' has 1 NaN/inf score"):
        pruning.sensitivity_analysis(net, _batches(1), progress=False)
    assert_same_state(before, model_state(net))
    model = _bn_net()
    with torch.no_grad():
        model[3].weight[1, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="parameter '3.weight'"):
        pruning.prune_channels(model, torch.randn(2, 3, 8, 8), ratio=0.5, progress=False)


# --------------------------------------------------------------------------------------- the helper itself


def test_snapshot_restores_structure_hooks_and_gradients(net):
    before = model_state(net)
    with pytest.raises(RuntimeError, match="stop"):
        with all_or_nothing(net):
            net.fc1.weight.data.mul_(0)  # a write the version counter does not see
            net.fc1.bias = nn.Parameter(torch.ones(16))
            net.fc1.register_buffer("extra", torch.ones(1))
            net.fc1.out_features = 3
            net._forward_hooks.clear()
            net.fc1._forward_hooks.clear()
            net.conv.bias.requires_grad_(True)
            net.fc1.weight.grad.add_(1.0)
            net.conv.weight.grad = None
            net.fc2.__class__ = nn.Identity
            net.bn.train()
            del net.boom
            raise RuntimeError("stop")
    assert_same_state(before, model_state(net))


def test_watched_tensors_are_named_when_they_cannot_be_restored(net):
    with pytest.raises(RuntimeError) as info:
        with all_or_nothing(net, tensors=[net.fc1.weight]):
            with torch.no_grad():
                net.fc1.weight.mul_(2)
                net.bn.running_mean.add_(1)  # watched, not copied
            raise RuntimeError("stop")
    assert "bn.running_mean" in "".join(getattr(info.value, "__notes__", ["bn.running_mean"]))
    with read_only(net) as snapshot:
        net.eval()
    assert net.training and snapshot.restorable
    snapshot = ModelSnapshot(net)
    snapshot.release()
    with pytest.raises(RuntimeError, match="released"):
        snapshot.restore()
