"""Block-sequential pruning of language models (pruning.sequential): the same answer as the whole-model sequential
path at a cost linear in depth, padding kept out of the statistics, GPT-2's Conv1D layers, Accelerate-dispatched
models (CPU and disk offload), layers before and after the stack, and all or nothing with the undo log."""
import copy
import tempfile

import pytest
import torch
from torch import nn

import pruning
from pruning import prune_weights
from pruning.importance import SparseGPT
from pruning.masks import masked_modules
from pruning.patterns import weight_matrix
from tolerances import rel_error


FLOAT64 = SparseGPT(dtype=torch.float64)


@pytest.fixture(autouse=True)
def one_thread():
    """On a shared 2-core box one thread is several times faster than two oversubscribed ones."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _llama(layers=3, seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return LlamaForCausalLM(config).double().eval()


def _calib(n=3, batch=2, seq=12, vocab=96, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [{"input_ids": torch.randint(1, vocab, (batch, seq), generator=g)} for _ in range(n)]


def _state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _assert_same_pruning(a, b, rtol=1e-10):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        if sa[k].dtype == torch.bool:
            assert torch.equal(sa[k], sb[k]), f"mask {k} differs"
        else:
            assert rel_error(sa[k], sb[k]) <= rtol, k


def _count_block_calls(model):
    counts = {"n": 0}

    def count(mod, args, kwargs):
        counts["n"] += 1

    handles = [block.register_forward_pre_hook(count, with_kwargs=True) for block in model.model.layers]
    return counts, handles


def test_true_sequential_pipeline_gives_the_whole_model_sequential_answer_at_a_linear_cost():
    """Block by block, each group of layers calibrated on the output of the groups before it, gives the masks and
    weights of the whole-model sequential path (one full pass per layer, stopped at the layer): the reordering
    changed the cost, not the answer. The cost is counted in decoder-layer calls, which do not depend on the
    machine's load: per block a constant (the capture, a discovery pass on one batch, one pass per input group --
    q/k/v, o, gate/up, down -- and one propagating pass), where the whole-model path's grows with depth."""
    calib = _calib()
    calls = {}
    for layers in (2, 4, 8):
        model = _llama(layers)
        twin = copy.deepcopy(model)
        counts, handles = _count_block_calls(model)
        report = prune_weights(model, "2:4", FLOAT64, calib=calib, progress=False)
        for h in handles:
            h.remove()
        calls[layers] = counts["n"]
        if layers == 2:
            assert report.route == "block-sequential over 'model.layers' (2 blocks, true-sequential groups)"
            counts, handles = _count_block_calls(twin)
            whole = prune_weights(twin, "2:4", FLOAT64, calib=calib, blocks=None, progress=False)
            for h in handles:
                h.remove()
            assert whole.route == "whole model (no stack of blocks)"
            _assert_same_pruning(model, twin)
            assert len(report.layers) == 14 and report.overall_sparsity == 0.5
            whole_calls = counts["n"]
    # per block and calibration batch: the capture, 4 group passes, 1 propagating pass; plus 1 discovery call
    per_block = (1 + 4 + 1) * len(calib) + 1
    assert calls[8] - calls[4] == 4 * per_block and calls[4] - calls[2] == 2 * per_block, calls
    assert whole_calls > calls[2], (whole_calls, calls)


def test_padded_and_unpadded_calibration_prune_identically():
    """The same sequences, padded into one batch with an attention_mask or given one per batch unpadded, give the
    same statistics, hence the same masks and weights, through the block pipeline (SparseGPT and Wanda)."""
    model = _llama(2, seed=1)
    g = torch.Generator().manual_seed(1)
    seqs = [torch.randint(1, 96, (n,), generator=g) for n in (5, 11, 8)]
    ids = torch.zeros(3, 11, dtype=torch.long)
    mask = torch.zeros(3, 11, dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)], mask[i, : len(s)] = s, 1
    padded = [{"input_ids": ids, "attention_mask": mask}]
    alone = [{"input_ids": s[None]} for s in seqs]
    for criterion in (SparseGPT(dtype=torch.float64), "wanda"):
        a, b = copy.deepcopy(model), copy.deepcopy(model)
        prune_weights(a, "2:4", criterion, calib=padded, progress=False)
        prune_weights(b, "2:4", criterion, calib=alone, progress=False)
        _assert_same_pruning(a, b, rtol=1e-12)


def test_gpt2_conv1d_layers_are_pruned_24_and_the_masked_model_is_the_dense_one_with_masked_weights():
    """GPT-2's Conv1D layers (weight [in, out]) are pruned in their GEMM view with no conversion: the masks sit on
    the [in, out] weights, keep 2 of every 4 input features, and the pruned model's output is the dense model's
    with every projection replaced by a Linear of weight (W * M)^T."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from sparsekernels import compress_24

    torch.manual_seed(0)
    dense = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=64, n_positions=32)).double().eval()
    calib = _calib(vocab=64)
    for criterion in ("wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        report = prune_weights(model, "2:4", criterion, calib=calib, progress=False)
        assert report.route.startswith("block-sequential over 'transformer.h' (2 blocks")
        assert len(report.layers) == 8 and {layer.kind for layer in report.layers} == {"Conv1D"}
        assert report.overall_sparsity == 0.5 and [s.name for s in report.skipped] == ["lm_head"]
        reference = copy.deepcopy(dense)
        for layer in report.layers:
            module = model.get_submodule(layer.name)
            keep = module.weight_mask
            assert keep.shape == module.weight.shape and bool((keep.T.reshape(keep.shape[1], -1, 4).sum(-1) == 2).all())
            compress_24(weight_matrix(module).detach().float())  # the GEMM view is what the runtime takes
            source = dense if criterion == "wanda" else model   # Wanda keeps the dense values; SparseGPT rewrites
            weight = source.get_submodule(layer.name).weight.detach() * keep
            linear = nn.Linear(weight.shape[0], weight.shape[1]).double()
            linear.weight.data = weight.T.clone()
            linear.bias.data = module.bias.detach().clone()
            parent, _, child = layer.name.rpartition(".")
            setattr(reference.get_submodule(parent), child, linear)
        x = torch.randint(0, 64, (2, 9))
        with torch.no_grad():
            assert rel_error(model(x).logits, reference(x).logits) <= 1e-12


def _dispatched(model, how, folder):
    """``model`` dispatched by Accelerate: ``cpu_offload`` (weights in a CPU state dict), ``disk`` (blocks 1-2 in
    ``.dat`` files), ``checkpoint`` (saved, then loaded by ``from_pretrained`` with blocks 1-2 read from the
    safetensors checkpoint itself)."""
    from accelerate import cpu_offload, dispatch_model

    if how == "cpu_offload":
        cpu_offload(model, execution_device="cpu")
        return model
    device_map = {"model.embed_tokens": "cpu", "model.layers.0": "cpu", "model.layers.1": "disk",
                  "model.layers.2": "disk", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    if how == "disk":
        return dispatch_model(model, device_map=device_map, offload_dir=folder)
    model.save_pretrained(f"{folder}/checkpoint")
    return type(model).from_pretrained(f"{folder}/checkpoint", device_map=device_map, dtype=torch.float64,
                                       offload_folder=f"{folder}/offload")


def _checkpoint_bytes(folder):
    from pathlib import Path

    return {p.name: p.read_bytes() for p in Path(folder, "checkpoint").glob("*")}


@pytest.mark.parametrize("how", ["cpu_offload", "disk", "checkpoint"])
def test_accelerate_dispatched_model_is_pruned_through_its_hooks_and_rolled_back_on_failure(how):
    """A model dispatched by Accelerate (weights offloaded to a CPU state dict, to disk, or read from its
    checkpoint) is pruned block by block through its own hooks, with the answer of the same model undispatched,
    and the checkpoint file is never written; a failure in the last block puts every offloaded weight back and
    removes the masks."""
    pytest.importorskip("accelerate")
    calib = _calib()
    model = _llama(3)
    plain = copy.deepcopy(model)
    prune_weights(plain, "2:4", "sparsegpt", calib=calib, progress=False)
    x = torch.randint(1, 96, (2, 7))
    with tempfile.TemporaryDirectory() as folder:
        dispatched = _dispatched(copy.deepcopy(model), how, folder)
        checkpoint = _checkpoint_bytes(folder)
        report = prune_weights(dispatched, "2:4", "sparsegpt", calib=calib, progress=False)
        assert _checkpoint_bytes(folder) == checkpoint
        assert report.route.startswith("block-sequential") and len(report.layers) == 21
        assert dispatched.model.layers[1].mlp.up_proj.weight.device.type == "meta"   # still offloaded
        with torch.no_grad():
            assert rel_error(dispatched(x).logits, plain(x).logits) <= 1e-12
        for name, module in masked_modules(plain):
            assert torch.equal(dispatched.get_submodule(name).weight_mask, module.weight_mask), name
    with tempfile.TemporaryDirectory() as folder:
        failing = _dispatched(copy.deepcopy(model), how, folder)
        with torch.no_grad():
            before = failing(x).logits
        seen = {"n": 0}

        def boom(mod, args):
            seen["n"] += 1
            if seen["n"] > 2:  # block 2's down_proj, on its own calibrating pass
                raise RuntimeError("boom")

        handle = failing.model.layers[2].mlp.down_proj.register_forward_pre_hook(boom)
        with pytest.raises(RuntimeError, match="boom"):
            prune_weights(failing, "2:4", "sparsegpt", calib=calib, progress=False)
        handle.remove()
        with torch.no_grad():
            assert torch.equal(failing(x).logits, before)
        assert not list(masked_modules(failing))
    with tempfile.TemporaryDirectory() as folder:
        with pytest.raises(ValueError, match="device=None"):
            prune_weights(_dispatched(copy.deepcopy(model), how, folder), "2:4", "sparsegpt", calib=calib,
                          device="cpu", progress=False)
        with pytest.raises(ValueError, match="offloaded \\(meta\\) weights"):
            prune_weights(_dispatched(copy.deepcopy(model), how, folder), "2:4", "taylor", calib=calib,
                          loss_fn=lambda m, b: m(**b).logits.square().mean(), progress=False)


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.up = nn.Linear(d, 2 * d)
        self.gate = nn.Linear(d, 2 * d)
        self.down = nn.Linear(2 * d, d)

    def forward(self, x, scale=1.0):
        return x + self.down(torch.relu(self.up(x)) * torch.sigmoid(self.gate(x))) * scale


class _Stacked(nn.Module):
    """An input projection, a stack of blocks each called with its own keyword argument, a classifier; with
    ``between`` the forward changes the hidden states between blocks (not a chain)."""

    def __init__(self, d=16, depth=3, between=False):
        super().__init__()
        self.proj = nn.Linear(8, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))
        self.head = nn.Linear(d, 4)
        self.between = between

    def forward(self, x):
        h = self.proj(x)
        for i, block in enumerate(self.blocks):
            h = block(h, scale=1.0 / (i + 1))
            if self.between:
                h = h * 0.5
        return self.head(h)


def _stacked_calib(n=3):
    g = torch.Generator().manual_seed(5)
    return [torch.randn(4, 6, 8, generator=g, dtype=torch.float64) for _ in range(n)]


@pytest.mark.parametrize("criterion", [SparseGPT(), SparseGPT(sequential=False), "wanda"], ids=str)
def test_layers_before_and_after_the_stack_and_per_block_arguments(criterion):
    """A layer the model runs before its stack is pruned first, a layer after it last (from whole-model passes),
    each block runs with its own captured keyword arguments; for sequential SparseGPT that is the whole-model
    sequential answer, and on every route a valid 2:4 of every layer. device= and offload= (here the CPU) change
    where the work runs, not the answer."""
    torch.manual_seed(0)
    model = _Stacked().double().eval()
    calib = _stacked_calib()
    a, b, c = copy.deepcopy(model), copy.deepcopy(model), copy.deepcopy(model)
    report = prune_weights(a, "2:4", criterion, calib=calib, progress=False)
    assert report.route.startswith("block-sequential over 'blocks' (3 blocks")
    assert report.pruned_names[0] == "proj" and report.pruned_names[-1] == "head" and len(report.layers) == 11
    prune_weights(c, "2:4", criterion, calib=calib, device="cpu", offload=True, undo="memory", progress=False)
    _assert_same_pruning(a, c, rtol=0)
    if isinstance(criterion, SparseGPT) and criterion.sequential:
        prune_weights(b, "2:4", criterion, calib=calib, blocks=None, progress=False)
        _assert_same_pruning(a, b)
    with pytest.raises(ValueError, match="re-iterable"):
        prune_weights(copy.deepcopy(model), "2:4", "wanda", calib=iter(calib), progress=False)


def test_a_stack_that_is_not_a_chain_is_pruned_whole_or_refused_when_named():
    torch.manual_seed(0)
    model = _Stacked(between=True).double().eval()
    calib = _stacked_calib()
    before = _state(model)
    report = prune_weights(copy.deepcopy(model), "2:4", "sparsegpt", calib=calib, progress=False)
    assert report.route == "whole model ('blocks' is not run as a chain of blocks)" and len(report.layers) == 11
    with pytest.raises(ValueError, match="changes the hidden states between its blocks"):
        prune_weights(model, "2:4", "sparsegpt", calib=calib, blocks="blocks", progress=False)
    with pytest.raises(ValueError, match="changes the hidden states"):
        prune_weights(model, "2:4", "sparsegpt", calib=calib, blocks=list(model.blocks), progress=False)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert "forward" not in model.blocks[0].__dict__


def test_block_pipeline_argument_errors_leave_the_model_alone():
    model = _Stacked().double().eval()
    before = _state(model)
    calib = _stacked_calib()
    cases = [
        (ValueError, "nn.ModuleList of the model, got nothing", dict(blocks="nope")),
        (ValueError, "got Linear at 'proj'", dict(blocks="proj")),
        (TypeError, "wrap a single block in a list", dict(blocks=model.blocks[0])),
        (ValueError, "submodules of the model", dict(blocks=[nn.Linear(2, 2)])),
        (ValueError, "'disk', 'memory' or an existing folder", dict(undo="tape")),
        (TypeError, "offload= as a bool", dict(offload="yes")),
        (TypeError, "device=", dict(device=3.5)),
        (ValueError, "apply to block-sequential pruning", dict(blocks=None, device="cpu")),
    ]
    for exc, match, kwargs in cases:
        with pytest.raises(exc, match=match):
            prune_weights(model, "2:4", "wanda", calib=calib, progress=False, **kwargs)
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())


@pytest.mark.parametrize("undo", ["disk", "memory"])
@pytest.mark.parametrize("criterion, failure", [("sparsegpt", "interrupt"), ("wanda", "interrupt"),
                                                ("sparsegpt", "write"), ("magnitude", "write")])
def test_failure_late_in_the_run_leaves_the_model_exactly_as_it_was(criterion, failure, undo):
    """Layers are committed block by block; Ctrl-C in the last pass, or an error writing the last layer, writes
    back every weight already changed (from the undo log on disk or in memory) and removes the masks; modes,
    hooks and forwards are restored."""
    torch.manual_seed(0)
    model = _Stacked().double()
    model.train()
    if failure == "write":  # a weight no value can be copied into (every row the same memory)
        model.head.weight = nn.Parameter(torch.randn(4, 1, dtype=torch.float64).expand(4, 16))
    before = _state(model)
    seen = {"n": 0}

    def interrupt(mod, args):
        seen["n"] += 1
        if seen["n"] > 1:
            raise KeyboardInterrupt

    handle = model.head.register_forward_pre_hook(interrupt) if failure == "interrupt" else None
    with pytest.raises(KeyboardInterrupt if failure == "interrupt" else RuntimeError):
        prune_weights(model, "2:4", criterion, calib=_stacked_calib(), undo=undo, progress=False)
    if handle is not None:
        handle.remove()
    after = model.state_dict()
    assert list(after) == list(before) and all(torch.equal(after[k], v) for k, v in before.items())
    assert model.training and all(m.training for m in model.modules())
    assert not any("forward" in m.__dict__ or m._forward_pre_hooks for m in model.modules())


def test_taylor_scores_the_whole_model_then_commits_layer_by_layer():
    """Taylor needs the full model's loss gradient: its scores come from the whole-model gradient pass, and the
    chosen masks are committed layer by layer with the bounded undo log; same masks as the whole-model route."""
    model = _llama(2)
    calib = [{**b, "labels": b["input_ids"]} for b in _calib()]
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    report = prune_weights(a, "2:4", "taylor", calib=calib, loss_fn=lambda m, batch: m(**batch).loss, progress=False)
    assert report.route == "layer by layer (no calibration pass)"
    prune_weights(b, "2:4", "taylor", calib=calib, loss_fn=lambda m, batch: m(**batch).loss, blocks=None,
                  progress=False)
    _assert_same_pruning(a, b, rtol=0)
    report = prune_weights(copy.deepcopy(model), "global", "magnitude", sparsity=0.6, progress=False)
    total = sum(layer.numel for layer in report.layers)
    assert report.route == "layer by layer (no calibration pass)"
    assert sum(layer.pruned for layer in report.layers) == round(0.6 * total)


def test_the_undo_log_holds_nothing_in_memory_on_disk():
    from pruning.blocks import find_block_stack
    from pruning.sequential import SequentialConfig, prune_sequentially
    from pruning.patterns import parse_pattern

    held = {}
    for undo in ("disk", "memory"):
        model = _llama(2)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and n.startswith("model.layers")}
        stack = find_block_stack(model, layers)
        weight_bytes = sum(m.weight.numel() * m.weight.element_size() for m in layers.values())
        result = prune_sequentially(model, layers, pruning.Wanda(), parse_pattern("2:4"), dict.fromkeys(layers),
                                    _calib(), stack, config=SequentialConfig(undo=undo), progress=False)
        held[undo] = result.undo_bytes
    assert held == {"disk": 0, "memory": weight_bytes}


def test_the_stack_is_the_list_that_holds_the_most_selected_layers():
    """Counting the layers held, not the list's length, picks the decoder layers over a longer list of experts
    inside one of them; a list whose modules differ in class is never a stack."""
    from pruning.blocks import find_block_stack

    class Experts(nn.Module):
        def __init__(self):
            super().__init__()
            self.experts = nn.ModuleList(nn.Linear(8, 8) for _ in range(6))
            self.attn = nn.Linear(8, 8)

    model = nn.Module()
    model.layers = nn.ModuleList(Experts() for _ in range(2))
    model.mixed = nn.ModuleList([nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8)])
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    stack = find_block_stack(model, names)
    assert stack.label == "layers" and stack.names == ("layers.0", "layers.1")
    assert stack.index_of("layers.1.experts.3") == 1 and stack.index_of("mixed.0") is None
    assert find_block_stack(model, ["mixed.0"]) is None


@pytest.mark.parametrize("criterion", ["wanda", FLOAT64])
def test_block_pipeline_chooses_masks_in_a_carried_input_order(criterion):
    """A layer carrying ``input_perm`` (a channel permutation the sparse runtime gathers by) gets its N:M mask in
    that order on the block route too; for true-sequential SparseGPT the whole-model route agrees (Wanda's block
    route calibrates each block on the pruned ones before it, its whole-model route on the dense model)."""
    calib = _calib()
    models = []
    for blocks in ("auto", None):
        model = _llama(layers=2)
        for i, layer in enumerate(model.model.layers):
            perm = torch.randperm(64, generator=torch.Generator().manual_seed(i))
            layer.mlp.down_proj.register_buffer("input_perm", perm)
        report = prune_weights(model, "2:4", criterion, calib=calib, blocks=blocks, progress=False)
        assert report.route.startswith("block-sequential") == (blocks == "auto")
        for layer in model.model.layers:
            down = layer.mlp.down_proj
            stored = weight_matrix(down.weight_mask)[:, down.input_perm]
            assert (stored.reshape(32, -1, 4).sum(-1) == 2).all()
            assert not (weight_matrix(down.weight_mask).reshape(32, -1, 4).sum(-1) == 2).all()
        models.append(model)
    if criterion is FLOAT64:
        _assert_same_pruning(*models, rtol=1e-8)


def test_alps_and_ria_run_block_by_block():
    """ALPS (sequential, with a per-layer rule) gives the whole-model sequential answer on the block route; RIA's
    per-layer rule gives 2:4 masks there."""
    from pruning.nm_criteria import ALPS

    calib = _calib()
    models = []
    for blocks in ("auto", None):
        model = _llama(layers=2)
        report = prune_weights(model, "2:4", ALPS(dtype=torch.float64, iters=40, refit_iters=20), calib=calib,
                               blocks=blocks, progress=False)
        assert report.route.startswith("block-sequential") == (blocks == "auto")
        models.append(model)
    _assert_same_pruning(*models, rtol=1e-7)
    model = _llama(layers=2)
    report = prune_weights(model, "2:4", "ria", calib=calib, progress=False)
    assert report.route.startswith("block-sequential") and len(report.layers) == 14
    for _, module in masked_modules(model):
        assert (weight_matrix(module.weight_mask).reshape(module.weight.shape[0], -1, 4).sum(-1) == 2).all()
