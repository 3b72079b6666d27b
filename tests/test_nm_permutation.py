"""Channel permutation for N:M: the search (a permutation, never worse than the identity, exact on tiny cases)
and its application through the dependency graph (the permuted, unpruned model computes the same function in
float64: CNN, BERT heads and MLP, Llama residual stream and attention, nn.MultiheadAttention)."""
import copy
import itertools

import pytest
import torch
from torch import nn

from pruning.channels.permute import PermutationError, permute_for_nm
from pruning.patterns import nm_mask, weight_matrix
from pruning.permutation import (
    SearchConfig,
    channel_rows,
    invert_permutation,
    nm_kept,
    permuted_nm_mask,
    search_permutation,
)
from sparsekernels.examples.digits import DigitsCNN
from tolerances import rel_error

FAST = SearchConfig(max_sweeps=8, time_limit=5.0)


def heavy_columns(rows, cols, gen):
    """Scores with a few heavy input channels (as activation-aware scores have)."""
    col = torch.rand(cols, generator=gen).pow(4) * 5 + 0.1
    return torch.rand(rows, cols, generator=gen) * col


def is_perm(p, cols):
    return p.dtype == torch.int64 and torch.equal(p.sort().values, torch.arange(cols))


# ------------------------------------------------------------------------------------------- the search


@pytest.mark.parametrize("rows,cols,n,m", [(1, 16, 2, 4), (3, 20, 2, 4), (13, 44, 2, 4), (67, 36, 1, 4),
                                           (5, 24, 4, 8), (7, 22, 1, 2)])
def test_search_is_a_permutation_never_worse_than_identity(rows, cols, n, m):
    gen = torch.Generator().manual_seed(rows * 1000 + cols)
    s = heavy_columns(rows, cols, gen)
    res = search_permutation(s, n, m, config=FAST)
    assert is_perm(res.perm, cols)
    assert res.kept >= res.kept_identity
    assert res.kept == pytest.approx(nm_kept(s, n, m, res.perm), rel=1e-9)
    assert res.kept_identity == pytest.approx(float((s.double() * nm_mask(s, n, m)).sum()), rel=1e-6)
    assert 0 < res.ratio <= 1 and res.gain >= 0
    assert set(res.to_dict()) >= {"kept", "kept_identity", "ratio", "seconds", "method"}


def brute_force(s, n, m):
    cols = s.shape[1]
    perms = torch.tensor(list(itertools.permutations(range(cols))))
    vals = s[:, perms].reshape(s.shape[0], len(perms), cols // m, m)
    return float(vals.double().topk(n, dim=-1).values.sum((0, 2, 3)).max())


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_search_matches_brute_force_on_8_columns(seed):
    gen = torch.Generator().manual_seed(seed)
    s = heavy_columns(5, 8, gen).double()
    best = brute_force(s, 2, 4)
    assert search_permutation(s).kept == pytest.approx(best, rel=1e-9)  # exhaustive
    # the heuristic alone: balanced start + swaps
    heur = search_permutation(s, config=SearchConfig(exhaustive_limit=0))
    assert heur.kept <= best * (1 + 1e-9) and heur.kept >= 0.97 * best


def test_search_exhaustive_on_12_columns_beats_every_grouping():
    gen = torch.Generator().manual_seed(3)
    s = heavy_columns(4, 12, gen).double()
    res = search_permutation(s)
    assert res.method == "exhaustive"
    for first in itertools.combinations(range(1, 12), 3):  # every first group containing column 0 ...
        rest = [c for c in range(1, 12) if c not in first]
        for second in itertools.combinations(rest[1:], 3):  # ... and second group containing the next
            third = [c for c in rest if c != rest[0] and c not in second]
            p = torch.tensor([0, *first, rest[0], *second, *third])
            assert nm_kept(s, 2, 4, p) <= res.kept * (1 + 1e-9)


def test_shared_permutation_sums_objectives():
    gen = torch.Generator().manual_seed(4)
    a, b = heavy_columns(9, 32, gen), heavy_columns(17, 32, gen)
    res = search_permutation([a, b], config=FAST)
    assert res.kept == pytest.approx(nm_kept(a, 2, 4, res.perm) + nm_kept(b, 2, 4, res.perm), rel=1e-9)
    weighted = search_permutation([a, b], weights=[2.0, 0.5], config=FAST)
    assert weighted.total == pytest.approx(2 * float(a.double().sum()) + 0.5 * float(b.double().sum()), rel=1e-6)


def test_time_limit_zero_and_identity_cases():
    gen = torch.Generator().manual_seed(5)
    s = heavy_columns(8, 64, gen)
    res = search_permutation(s, config=SearchConfig(time_limit=0.0))
    assert res.sweeps <= 1 and res.kept >= res.kept_identity and is_perm(res.perm, 64)
    assert search_permutation(s[:, :4]).method == "identity"  # one group: nothing to reorder
    assert torch.equal(search_permutation(torch.ones(3, 16)).perm, torch.arange(16))  # ties: identity kept


def test_permuted_mask_channel_rows_and_inverse():
    gen = torch.Generator().manual_seed(6)
    s = heavy_columns(6, 24, gen)
    perm = search_permutation(s, config=FAST).perm
    mask = permuted_nm_mask(s, perm)
    assert (mask[:, perm].reshape(6, -1, 4).sum(-1) == 2).all()
    assert float((s.double() * mask).sum()) == pytest.approx(nm_kept(s, 2, 4, perm), rel=1e-6)
    assert torch.equal(perm[invert_permutation(perm)], torch.arange(24))
    conv = torch.randn(5, 8, 3, 3, generator=gen)
    assert channel_rows(weight_matrix(conv), 8).shape == (45, 8)


def test_search_errors_name_what_was_expected():
    with pytest.raises(ValueError, match="multiple of m=4"):
        search_permutation(torch.rand(3, 10))
    with pytest.raises(ValueError, match="finite"):
        search_permutation(torch.tensor([[1.0, float("nan"), 0.0, 1.0]]))
    with pytest.raises(ValueError, match="real 2-D"):
        search_permutation(torch.rand(3, 4, 4))
    with pytest.raises(ValueError, match="16 columns"):
        search_permutation([torch.rand(2, 16), torch.rand(2, 8)])
    with pytest.raises(TypeError, match="integer n"):
        search_permutation(torch.rand(2, 8), n=2.0)
    with pytest.raises(ValueError, match="init"):
        SearchConfig(init="random")
    with pytest.raises(ValueError, match="max_sweeps"):
        SearchConfig(max_sweeps=-1)
    with pytest.raises(ValueError, match="permutation of 0..7"):
        nm_kept(torch.rand(2, 8), perm=torch.zeros(8, dtype=torch.long))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_search_on_gpu_matches_cpu_objective():
    gen = torch.Generator().manual_seed(7)
    s = heavy_columns(33, 64, gen)
    res = search_permutation(s.cuda(), config=FAST)
    assert res.perm.is_cuda and res.kept >= res.kept_identity
    assert nm_kept(s, 2, 4, res.perm.cpu()) == pytest.approx(res.kept, rel=1e-5)


# ------------------------------------------------------------------------------------------- runtime-carried


@pytest.mark.interpreter
def test_runtime_carried_layers_prune_in_their_order_and_swap_exactly(kernel_device):
    """A layer that reads the model input cannot have its producers reordered: permute_for_nm attaches its
    permutation as ``input_perm``, prune_weights chooses its N:M mask in that order (score and reconstructing
    criteria, whole-model and per-layer routes), and sparsify gathers the input by it on every backend."""
    import pruning
    import sparsekernels as sk
    from sparsekernels.formats.sparse24 import permute_columns
    from tolerances import assert_close_rel

    torch.manual_seed(0)
    dense = nn.Sequential(nn.Conv2d(8, 12, 3, padding=1), nn.ReLU(), nn.Conv2d(12, 8, 3), nn.Flatten(),
                          nn.Linear(8 * 4 * 4, 16))
    scale = torch.rand(1, 8, 1, 1).pow(3) * 6 + 0.1  # a few heavy input channels
    calib = [torch.randn(6, 8, 6, 6) * scale for _ in range(2)]
    x = calib[0][:3]
    ref = dense(x)
    for criterion in ("magnitude", "wanda", "sparsegpt"):
        model = copy.deepcopy(dense)
        report = permute_for_nm(model, x, "wanda", calib=calib, config=FAST, progress=False)
        # "0" reads the model input; "4" reads a flatten of conv channels (its groups of 4 are not channels)
        assert set(report.runtime_permutations) == {"0", "4"} and report.layer("0").carried_by == "runtime"
        perm = report.runtime_permutations["0"]
        assert torch.equal(model[0].input_perm, perm) and model[0].input_perm.dtype == torch.int64
        assert rel_error(model(x), ref) < 1e-6  # its rows moved for "2"; its columns stay in their order
        pruning.prune_weights(model, "2:4", criterion, calib=calib, progress=False)
        stored = permute_columns(weight_matrix(model[0].weight_mask), perm)
        assert (stored.reshape(12, -1, 4).sum(-1) == 2).all(), criterion  # N:M in the gathered order
        with torch.no_grad():
            masked = model(x)
        for backend in ("auto", "dense", "reference", "triton"):
            swapped = copy.deepcopy(model).to(kernel_device)
            rep = sk.sparsify(swapped, backend=backend)
            assert rep.swapped_names == ["0", "2", "4"] and swapped[0].permuted and swapped[4].permuted
            with torch.no_grad():
                y = swapped(x.to(kernel_device)).cpu()
            if backend == "auto" and kernel_device.type == "cpu":
                assert torch.equal(y, masked), criterion
            else:
                assert_close_rel(y, masked, torch.float32)
    with pytest.raises(ValueError, match="already run on it"):
        permute_for_nm(model, x, "magnitude", config=FAST, progress=False)


def test_an_unusable_input_perm_leaves_the_layer_dense_with_the_reason():
    import pruning

    model = nn.Sequential(nn.Linear(16, 8))
    model[0].register_buffer("input_perm", torch.arange(12))
    report = pruning.prune_weights(model, "2:4", "magnitude", progress=False)
    assert not report.layers and "expected 16" in report.skipped[0].reason
    model[0].input_perm = torch.cat([torch.arange(15), torch.zeros(1, dtype=torch.long)])
    report = pruning.prune_weights(model, "2:4", "magnitude", progress=False)
    assert not report.layers and "not a permutation" in report.skipped[0].reason


# ------------------------------------------------------------------------------------------- through the graph


def test_digits_cnn_permuted_equals_original_float64():
    torch.manual_seed(1)
    model = DigitsCNN(8).double().eval()
    for mod in model.modules():  # non-trivial BatchNorm statistics, so they must move too
        if isinstance(mod, nn.BatchNorm2d):
            mod.running_mean.normal_()
            mod.running_var.uniform_(0.5, 2)
            mod.weight.data.normal_()
            mod.bias.data.normal_()
    x = torch.randn(5, 1, 8, 8, dtype=torch.float64)
    ref = model(x)
    before = weight_matrix(model.features[3].weight).abs()
    report = permute_for_nm(model, x, "magnitude", config=FAST, progress=False)
    assert rel_error(model(x), ref) < 1e-12
    assert {r.carried_by for r in report.layers} == {"model"} and not report.runtime_permutations
    assert report.skipped == (("features.0", "input channels (1) not a multiple of m=4"),)
    rec = report.layer("features.3")  # one consumer: never below the identity
    assert rec.kept >= rec.kept_identity
    assert not torch.equal(weight_matrix(model.features[3].weight).abs(), before)
    assert "permuted in place" in str(report) and report.to_dict()["layers"][0]["name"] == "features.3"


def tiny_bert():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                                  vocab_size=97, max_position_embeddings=32, attn_implementation="eager")
    torch.manual_seed(2)
    return transformers.BertModel(cfg).double().eval()


def test_bert_heads_and_mlp_permuted_equal_float64_and_runtime_layers_reported():
    model = tiny_bert()
    ids = torch.randint(1, 97, (3, 9))
    mask = torch.ones(3, 9, dtype=torch.long)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    ref = model(**inputs).last_hidden_state
    value = model.encoder.layer[0].attention.self.value.weight.detach().clone()
    report = permute_for_nm(model, inputs, "magnitude", config=FAST, progress=False)
    assert rel_error(model(**inputs).last_hidden_state, ref) < 1e-12
    layer0 = "encoder.layer.0."
    assert report.layer(layer0 + "attention.output.dense").how == "heads"
    assert report.layer(layer0 + "output.dense").how == "group"
    query = report.layer(layer0 + "attention.self.query")
    assert query.carried_by == "runtime" and "model output" in query.reason
    # value rows moved inside their heads only (each head's rows are a permutation of the original ones)
    new = model.encoder.layer[0].attention.self.value.weight.detach()
    for h in range(4):
        rows_old = {tuple(r.tolist()) for r in value[h * 8:(h + 1) * 8]}
        assert {tuple(r.tolist()) for r in new[h * 8:(h + 1) * 8]} == rows_old
    # the runtime permutations are attached to their layers, whose weights stay in their order
    for name, perm in report.runtime_permutations.items():
        assert torch.equal(model.get_submodule(name).input_perm, perm)


def test_llama_residual_stream_shared_and_attention_pattern_float64():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, vocab_size=61, max_position_embeddings=32)
    torch.manual_seed(3)
    model = transformers.LlamaForCausalLM(cfg).double().eval()
    ids = {"input_ids": torch.randint(0, 61, (2, 7))}
    ref = model(**ids).logits
    attn = model.model.layers[1].self_attn
    q_rows, v_rows = attn.q_proj.weight.detach().sort(1).values, attn.v_proj.weight.detach().sort(1).values
    report = permute_for_nm(model, ids, "magnitude", config=FAST, progress=False)
    # q rows stay in order (rotary embeddings pair their channels); v rows move, only inside their kv head
    assert torch.equal(attn.q_proj.weight.detach().sort(1).values, q_rows)
    new_v = attn.v_proj.weight.detach().sort(1).values
    assert not torch.equal(new_v, v_rows)
    for h in range(2):
        rows = slice(h * 8, (h + 1) * 8)
        assert {tuple(r.tolist()) for r in new_v[rows]} == {tuple(r.tolist()) for r in v_rows[rows]}
    # LlamaRMSNorm computes in float32 whatever the model's dtype: summation order shows at 1e-8
    assert rel_error(model(**ids).logits, ref) < 1e-6
    assert all(r.carried_by == "model" for r in report.layers)
    assert report.layer("model.layers.0.self_attn.q_proj").reason.startswith("one permutation shared by 11")
    # o_proj: v rows and o_proj columns move inside each key / value head; q / k rows (rotary) stay in place
    assert report.layer("model.layers.1.self_attn.o_proj").how == "heads"
    down = report.layer("model.layers.0.mlp.down_proj")
    assert down.how == "group" and down.kept >= down.kept_identity


def test_multihead_attention_in_proj_rows_move_inside_heads():
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(6, 16)
            self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
            self.out = nn.Linear(16, 3)

        def forward(self, x):
            x = self.inp(x)
            return self.out(x + self.attn(x, x, x, need_weights=False)[0])

    torch.manual_seed(4)
    model = Block().double().eval()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    ref = model(x)
    report = permute_for_nm(model, x, "magnitude", config=FAST, progress=False)
    assert rel_error(model(x), ref) < 1e-12
    assert report.layer("attn.out_proj").how == "heads"
    assert report.layer("out").carried_by == "runtime"


def test_all_or_nothing_and_errors(monkeypatch):
    import pruning.channels.permute as permute

    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4))
    x = torch.randn(3, 8)
    state = copy.deepcopy(model.state_dict())
    monkeypatch.setattr(permute, "_rel_error", lambda before, after: 1.0)
    with pytest.raises(PermutationError, match="model was restored"):
        permute_for_nm(model, x, "magnitude", config=FAST, progress=False)
    monkeypatch.undo()
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="1 <= n < m"):
        permute_for_nm(model, x, n=4, m=4)
    with pytest.raises(ValueError, match="GEMM view"):
        permute_for_nm(model, x, {"2": torch.rand(8, 8)}, progress=False)
    with pytest.raises(ValueError, match="chooses masks itself"):
        permute_for_nm(model, x, "sparsegpt", calib=[x], progress=False)
    with pytest.raises(TypeError, match="nn.Module"):
        permute_for_nm("model", x)
    report = permute_for_nm(model, x, {"2": torch.rand(8, 16), "4": torch.rand(4, 8)}, config=FAST, progress=False)
    assert [r.name for r in report.layers] == ["2", "4"]
    assert ("0", "no score matrix given") in report.skipped


def test_masks_of_an_already_pruned_model_move_with_their_weights():
    import pruning

    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 4)).double()
    x = torch.randn(3, 8, dtype=torch.float64)
    pruning.prune_weights(model, "2:4", progress=False)
    ref = model(x)
    permute_for_nm(model, x, config=FAST, progress=False)
    assert rel_error(model(x), ref) < 1e-12
    for layer in (model[0], model[2], model[4]):
        assert torch.equal(layer.weight != 0, layer.weight_mask & (layer.weight != 0))
        assert int(layer.weight_mask.sum()) == layer.weight.numel() // 2
