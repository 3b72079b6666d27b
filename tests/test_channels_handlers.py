"""The op-handler registry of the channel tracer: a user teaches it an op it does not know, through the public
handler API only, and the channels through that op become prunable (the pruned model equal to the masked one)."""
import copy

import pytest
import torch
from torch import nn

import pruning
from pruning.channels import DependencyGraph, OpCall, TraceError, mask_channels, prune_channels, register_op_handler
from pruning.channels.handlers import unary
from pruning.channels.tracer import Channels
from tolerances import assert_close_rel


@torch.library.custom_op("pruning_tests::soft_gate", mutates_args=())
def soft_gate(x: torch.Tensor) -> torch.Tensor:
    """``x * sigmoid(x)`` as one opaque op: the tracer sees ``soft_gate``, not the ops inside."""
    return x * torch.sigmoid(x)


@soft_gate.register_fake
def _(x):
    return torch.empty_like(x)


GATE = torch.ops.pruning_tests.soft_gate


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Conv2d(3, 10, 3, padding=1)
        self.b = nn.Conv2d(10, 12, 3, padding=1)
        self.c = nn.Conv2d(12, 4, 1)

    def forward(self, x):
        return self.c(torch.relu(self.b(GATE(self.a(x))))).mean((2, 3))


def group_of(graph, param):
    att = next(a for a in graph.attachments[param] if a.dim == 0)
    return graph.groups[graph.root_group[int(graph.root_of(att.labels)[0])]]


def test_unknown_op_keeps_its_channels():
    graph = DependencyGraph(Gated(), torch.randn(1, 3, 6, 6))
    assert not group_of(graph, "a.weight").prunable
    assert "op 'soft_gate' is not supported" in group_of(graph, "a.weight").frozen_reason
    assert group_of(graph, "b.weight").prunable
    with pytest.raises(TraceError, match="soft_gate"):
        DependencyGraph(Gated(), torch.randn(1, 3, 6, 6), strict=True)


def test_registered_handler_makes_the_channels_prunable_and_pruned_equals_masked():
    calls = []

    def soft_gate_handler(call: OpCall) -> None:
        calls.append(call.where)
        # elementwise: the output carries the input's channels, on the same dims
        call.trace.set_state(call.out, call.trace.state(call.args[0]))

    model = Gated().double().eval()
    x = torch.randn(2, 3, 7, 7, dtype=torch.float64)
    with register_op_handler(GATE, soft_gate_handler):
        graph = DependencyGraph(model, x)
        assert group_of(graph, "a.weight").prunable and calls == [""]  # called in the model's own forward
        pruned, report = prune_channels(model, x, ratio=0.5, return_report=True, progress=False)
        assert DependencyGraph(model, x, strict=True).groups  # strict mode no longer objects
    assert pruned.a.out_channels == 5 and pruned.b.in_channels == 5
    masked = mask_channels(model, report).eval()
    with torch.no_grad():
        out, ref, dense = pruned.eval()(x), masked(x), model(x)
    assert_close_rel(out, ref, torch.float32, factor=1e-6)
    assert (out - dense).norm() > 1e-6 * dense.norm()
    # the registration was undone on leaving the block
    assert not group_of(DependencyGraph(model, x), "a.weight").prunable


def test_handler_registered_by_name_and_the_builtin_unary_handler():
    model = Gated().eval()
    x = torch.randn(1, 3, 6, 6)
    registration = pruning.register_op_handler("soft_gate", unary)
    try:
        assert group_of(DependencyGraph(model, x), "a.weight").prunable
    finally:
        registration.remove()
    registration.remove()  # idempotent
    assert not group_of(DependencyGraph(model, x), "a.weight").prunable


def test_handler_can_unite_and_freeze():
    """A handler for an op that mixes channel ``i`` with channel ``i + n/2`` unites them, so they go together."""

    @torch.library.custom_op("pruning_tests::fold_halves", mutates_args=())
    def fold_halves(x: torch.Tensor) -> torch.Tensor:
        h = x.shape[1] // 2
        return torch.cat([x[:, :h] + x[:, h:], x[:, :h] - x[:, h:]], 1)

    def fold_handler(call: OpCall) -> None:
        st = call.trace.state(call.args[0])
        if not (isinstance(st, Channels) and st.start == 1 and st.labels.ndim == 1):
            call.freeze_inputs(f"{call.where}: fold_halves needs the channels on dim 1")
            return
        half = st.labels.size // 2
        call.trace.unite(st.labels[:half], st.labels[half:])
        call.trace.set_state(call.out, st)

    class Folded(Gated):
        def forward(self, x):
            return self.c(torch.relu(self.b(torch.ops.pruning_tests.fold_halves(self.a(x))))).mean((2, 3))

    model = Folded().double().eval()
    x = torch.randn(2, 3, 5, 5, dtype=torch.float64)
    with register_op_handler(torch.ops.pruning_tests.fold_halves, fold_handler):
        graph = DependencyGraph(model, x)
        group = group_of(graph, "a.weight")
        assert group.prunable and len(group.units) == 5
        pruned, report = prune_channels(model, x, ratio=0.4, return_report=True, progress=False)
    kept = report.param_keep["a.weight"][0]
    assert len(kept) == 6 and {i % 5 for i in kept} == {i for i in kept if i < 5}  # halves go together
    with torch.no_grad():
        assert_close_rel(pruned.eval()(x), mask_channels(model, report).eval()(x), torch.float32, factor=1e-6)


def test_register_op_handler_errors():
    with pytest.raises(TypeError, match="torch function or a name"):
        register_op_handler(3, unary)
    with pytest.raises(TypeError, match="handler"):
        register_op_handler("soft_gate", "not callable")


def test_handler_error_keeps_channels_instead_of_corrupting_the_graph():
    def broken(call: OpCall) -> None:
        raise RuntimeError("bug in a handler")

    with register_op_handler(GATE, broken):
        graph = DependencyGraph(copy.deepcopy(Gated()), torch.randn(1, 3, 6, 6))
    reason = group_of(graph, "a.weight").frozen_reason
    assert "internal error while tracing soft_gate" in reason and "bug in a handler" in reason
