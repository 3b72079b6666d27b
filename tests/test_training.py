"""Mask enforcement during training, the cubic schedule, gradual pruning, finetune() and the penalties."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import pruning
from pruning import (
    FinetuneConfig,
    GradualPruner,
    cubic_sparsity_schedule,
    enforce_masks,
    finetune,
    l1_penalty,
    l2_penalty,
    prune_weights,
)
from pruning.training import DEFAULT_FINETUNE_LR, attach_mask_hooks


def _mlp():
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _data(n_batches=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(12, 3, generator=g)
    out = []
    for _ in range(n_batches):
        x = torch.randn(16, 12, generator=g)
        out.append((x, (x @ w).argmax(1)))
    return out


def _train_steps(model, opt, data, steps=8):
    for _, (x, y) in zip(range(steps), data * 3):
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_mask_hooks_keep_zeros_and_optimizer_state_clean():
    torch.manual_seed(0)
    model = _mlp()
    prune_weights(model, "2:4", progress=False)
    masks = {n: m.weight_mask.clone() for n, m in pruning.masks.masked_modules(model)}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    with attach_mask_hooks(opt, model):
        _train_steps(model, opt, _data())
    for name, mask in masks.items():
        module = model.get_submodule(name)
        assert bool((module.weight[~mask] == 0).all()), f"{name}: a pruned weight came back"
        assert bool((opt.state[module.weight]["exp_avg"][~mask] == 0).all()), "Adam moments built up on pruned weights"
    # the same loop without the hooks revives pruned weights: the check above can fail
    _train_steps(model, opt, _data(seed=1))
    assert any(bool((model.get_submodule(n).weight[~m] != 0).any()) for n, m in masks.items())
    assert enforce_masks(model) == len(masks)
    for name, mask in masks.items():
        assert bool((model.get_submodule(name).weight[~mask] == 0).all())


def test_enforce_masks_zeroes_gradients_and_errors():
    model = _mlp()
    prune_weights(model, "unstructured", sparsity=0.5, progress=False)
    F.cross_entropy(model(torch.randn(4, 12)), torch.tensor([0, 1, 2, 0])).backward()
    enforce_masks(model)
    assert bool((model[0].weight.grad[~model[0].weight_mask] == 0).all())
    with pytest.raises(TypeError, match="nn.Module"):
        enforce_masks("model")
    with pytest.raises(TypeError, match="Optimizer"):
        attach_mask_hooks("opt", model)
    with pytest.raises(TypeError, match="nn.Module"):
        attach_mask_hooks(torch.optim.SGD(model.parameters(), lr=0.1), None)


def test_cubic_schedule_matches_zhu_gupta():
    assert cubic_sparsity_schedule(0, 100, 0.0, 0.8) == 0.0
    assert cubic_sparsity_schedule(100, 100, 0.0, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity_schedule(250, 100, 0.1, 0.8) == pytest.approx(0.8)
    assert cubic_sparsity_schedule(5, 100, 0.1, 0.8, begin_step=10) == pytest.approx(0.1)
    for t in (1, 17, 50, 99):
        assert cubic_sparsity_schedule(t + 10, 100, 0.1, 0.8, begin_step=10) == pytest.approx(
            0.8 + (0.1 - 0.8) * (1 - t / 100) ** 3
        )
    values = [cubic_sparsity_schedule(t, 37, 0.2, 0.9) for t in range(40)]
    assert values == sorted(values)
    # front-loaded: half way through, more than 3/4 of the increase is done
    assert cubic_sparsity_schedule(50, 100, 0.0, 1.0) == pytest.approx(0.875)
    for kwargs, exc in [
        (dict(step=1, total_steps=0), ValueError),
        (dict(step=-1, total_steps=5), ValueError),
        (dict(step=1.5, total_steps=5), TypeError),
        (dict(step=1, total_steps=5, initial=0.9, final=0.5), ValueError),
        (dict(step=1, total_steps=5, final=1.5), ValueError),
        (dict(step=1, total_steps=5, begin_step=-2), ValueError),
    ]:
        with pytest.raises(exc):
            cubic_sparsity_schedule(**kwargs)


def test_gradual_pruner_reaches_final_sparsity_on_schedule():
    torch.manual_seed(1)
    model = _mlp()
    pruner = GradualPruner(model, 0.8, total_steps=12, begin_step=2, frequency=4, initial_sparsity=0.1)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    hooks = attach_mask_hooks(opt, model)
    handle = pruner.attach(opt)
    previous_zero = None
    for _, (x, y) in zip(range(20), _data() * 4):
        F.cross_entropy(model(x), y).backward()
        opt.step()
        opt.zero_grad()
        zero = model[0].weight == 0
        if previous_zero is not None:
            assert bool((zero | ~previous_zero).all()) and bool(zero[previous_zero].all()), "pruned weights came back"
        previous_zero = zero if pruning.masks.get_mask(model[0]) is not None else None
    handle.remove()
    hooks.remove()
    steps = [s for s, _ in pruner.reports]
    assert steps == [2, 6, 10, 14]
    for step, report in pruner.reports:
        target = pruner.sparsity_at(step)
        for layer in report.layers:
            assert layer.pruned == round(target * layer.numel)
    assert pruner.reports[-1][1].overall_sparsity == pytest.approx(0.8, abs=1e-2)
    assert pruner.sparsity_at(100) == pytest.approx(0.8)
    with pytest.raises(ValueError, match="fixed sparsity"):
        GradualPruner(model, 0.5, 10, pattern="2:4")
    with pytest.raises(ValueError, match="frequency"):
        GradualPruner(model, 0.5, 10, frequency=0)
    with pytest.raises(ValueError, match="initial <= final"):
        GradualPruner(model, 0.5, 10, initial_sparsity=0.7)
    with pytest.raises(TypeError, match="nn.Module"):
        GradualPruner("model", 0.5, 10)
    with pytest.raises(TypeError, match="Optimizer"):
        pruner.attach("opt")


def test_finetune_learns_keeps_masks_and_restores_modes():
    torch.manual_seed(2)
    model = _mlp()
    prune_weights(model, "2:4", progress=False)
    mask = model[0].weight_mask.clone()
    model.eval()
    data = _data()
    losses = finetune(model, data, epochs=6, lr=3e-2, schedule="constant", progress=False)
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]
    assert not model.training
    assert bool((model[0].weight[~mask] == 0).all())
    assert torch.equal(model[0].weight_mask, mask)


def test_finetune_with_teacher_custom_loss_penalties_and_dict_batches():
    torch.manual_seed(3)
    teacher = _mlp()
    student = _mlp()
    student.load_state_dict(teacher.state_dict())
    prune_weights(student, "unstructured", sparsity=0.6, progress=False)
    data = _data()
    before = sum(F.kl_div(F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1), log_target=True, reduction="batchmean") for x, _ in data)
    finetune(student, data, epochs=5, lr=3e-3, teacher=teacher, distill_weight=1.0, progress=False)
    after = sum(F.kl_div(F.log_softmax(student(x), -1), F.log_softmax(teacher(x), -1), log_target=True, reduction="batchmean") for x, _ in data)
    assert float(after) < 0.5 * float(before), "distillation must pull the student toward the teacher"

    # custom loss + teacher (extra student forward) + L1: weights shrink
    model = _mlp()
    norm0 = float(l1_penalty(model))
    calls = {"n": 0}

    def loss_fn(m, batch):
        calls["n"] += 1
        return F.cross_entropy(m(batch[0]), batch[1])

    config = FinetuneConfig(epochs=2, lr=1e-2, l1=1e-2, optimizer="sgd", schedule="constant")
    finetune(model, data, loss_fn, config=config, teacher=teacher, progress=False)
    assert calls["n"] == 2 * len(data) and float(l1_penalty(model)) < norm0

    class HFStyle(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = _mlp()

        def forward(self, input_ids, labels=None):
            logits = self.body(input_ids)
            out = {"logits": logits}
            if labels is not None:
                out["loss"] = F.cross_entropy(logits, labels)
            return out

    hf = HFStyle()
    losses = finetune(hf, [{"input_ids": x, "labels": y} for x, y in data], epochs=3, lr=1e-2, max_steps=10, progress=False)
    assert len(losses) == 2 and losses[-1] < losses[0]


def test_penalties_match_manual_sums():
    model = _mlp()
    weights = [model[i].weight for i in (0, 2, 4)]
    assert float(l1_penalty(model)) == pytest.approx(float(sum(w.abs().sum() for w in weights)), rel=1e-6)
    assert float(l2_penalty(model)) == pytest.approx(float(sum(w.square().sum() for w in weights)), rel=1e-6)
    only_first = l2_penalty(model, filter_fn=lambda name, m: name == "0")
    assert float(only_first) == pytest.approx(float(weights[0].square().sum()), rel=1e-6)
    only_first.backward()
    assert model[0].weight.grad is not None and model[2].weight.grad is None
    assert float(l1_penalty(nn.ReLU())) == 0.0
    with pytest.raises(TypeError, match="nn.Module"):
        l1_penalty([1, 2])
    with pytest.raises(TypeError, match="filter_fn"):
        l2_penalty(model, filter_fn=3)


def test_finetune_error_paths_and_defaults():
    model = _mlp()
    assert FinetuneConfig().lr == DEFAULT_FINETUNE_LR == 1e-4
    data = _data(2)
    cases = [
        (TypeError, "nn.Module", dict(model=None)),
        (TypeError, "unexpected keyword", dict(learning_rate=1e-3)),
        (TypeError, "FinetuneConfig", dict(config={"lr": 1})),
        (TypeError, "iterable of batches", dict(data=torch.randn(3, 12))),
        (ValueError, "re-iterable", dict(data=iter(data), epochs=2)),
        (TypeError, "loss_fn", dict(loss_fn="ce")),
        (TypeError, "teacher", dict(teacher="big model")),
        (TypeError, "GradualPruner", dict(pruner=object())),
        (ValueError, "no batches", dict(data=[])),
        (TypeError, "default loss", dict(data=[torch.randn(4, 12)])),
        (TypeError, "scalar", dict(loss_fn=lambda m, b: m(b[0]))),
        (ValueError, "epochs", dict(epochs=0)),
        (ValueError, "lr", dict(lr=0.0)),
        (ValueError, "optimizer", dict(optimizer="lbfgs")),
        (ValueError, "schedule", dict(schedule="step")),
        (ValueError, "distill_weight", dict(distill_weight=1.5)),
        (ValueError, "temperature", dict(temperature=0)),
        (ValueError, "max_steps", dict(max_steps=0)),
        (TypeError, "seed", dict(seed="0")),
        (TypeError, "lr", dict(lr="fast")),
    ]
    for exc, match, kwargs in cases:
        kwargs = {"model": model, "data": data, "progress": False, **kwargs}
        with pytest.raises(exc, match=match):
            finetune(**kwargs)
    frozen = _mlp().requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        finetune(frozen, data, progress=False)
    assert math.isfinite(finetune(model, data, max_grad_norm=0.5, progress=False)[0])
