"""Transformers: Hugging Face BERT (random init, no download) loses whole attention heads and MLP width and
still equals the masked dense model (hf_config="ignore": BertConfig cannot state fewer heads, so by default they are
kept and the config is updated); nn.MultiheadAttention's channels are kept with a reason."""
import copy

import pytest
import torch
from torch import nn

from pruning.channels import DependencyGraph, mask_channels, prune_channels
from pruning.channels.attention import PrunedMultiheadAttention
from tolerances import assert_close_rel

transformers = pytest.importorskip("transformers")


def tiny_bert():
    cfg = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=128, vocab_size=97, max_position_embeddings=32,
                                  attn_implementation="eager")
    torch.manual_seed(0)
    return transformers.BertModel(cfg).eval()


def test_bert_heads_and_mlp_pruned_equal_masked_float64():
    model = tiny_bert().double()
    original = copy.deepcopy(model)
    ids = torch.randint(1, 97, (3, 11))
    mask = torch.ones(3, 11, dtype=torch.long)
    mask[0, 7:] = 0  # padding: the attention mask path must still work
    inputs = {"input_ids": ids, "attention_mask": mask}
    pruned, report = prune_channels(model, inputs, ratio=0.5, return_report=True, progress=False, hf_config="ignore")
    sd, so = model.state_dict(), original.state_dict()
    assert all(torch.equal(sd[k], so[k]) for k in sd)
    for layer in pruned.encoder.layer:
        att = layer.attention.self
        assert att.num_attention_heads == 2 and att.all_head_size == 32
        assert att.query.out_features == att.key.out_features == att.value.out_features == 32
        assert layer.attention.output.dense.in_features == 32
        assert layer.intermediate.dense.out_features == 64 and layer.output.dense.in_features == 64
    # the residual stream ends in the model's output: kept
    assert pruned.embeddings.word_embeddings.embedding_dim == 64
    masked = mask_channels(model, report)
    with torch.no_grad():
        out = pruned(**inputs).last_hidden_state
        ref = masked(**inputs).last_hidden_state
        dense = model(**inputs).last_hidden_state
    assert_close_rel(out, ref, torch.float32, factor=1e-6)
    assert (out - dense).norm() > 1e-3 * dense.norm()
    assert report.macs_after < report.macs_before


def test_bert_heads_are_units():
    g = DependencyGraph(tiny_bert(), {"input_ids": torch.randint(1, 97, (1, 5))})
    att = next(a for a in g.attachments["encoder.layer.0.attention.self.query.weight"] if a.dim == 0)
    grp = g.groups[g.root_group[int(g.root_of(att.labels)[0])]]
    assert len(grp.units) == 4 and grp.unit_channels == 16 and grp.prunable
    assert "encoder.layer.0.attention.output.dense.weight" in grp.params


def test_bert_round_to_heads():
    pruned = prune_channels(tiny_bert(), {"input_ids": torch.randint(1, 97, (2, 6))}, ratio=0.6, round_to=32,
                            progress=False, hf_config="ignore")
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == 2  # 2 heads x 16 = 32 channels
    assert pruned.encoder.layer[0].intermediate.dense.out_features == 64  # 51.2 rounded to 64


def test_bert_by_default_keeps_heads_and_updates_its_config(tmp_path):
    model = tiny_bert()
    ids = {"input_ids": torch.randint(1, 97, (2, 9))}
    pruned, report = prune_channels(model, ids, ratio=0.5, return_report=True, progress=False)
    assert pruned.encoder.layer[0].attention.self.num_attention_heads == 4
    assert pruned.encoder.layer[1].intermediate.dense.out_features == 64
    assert any("heads kept: BertConfig derives the head size" in k for k in report.kept)
    assert report.config_updates == {"intermediate_size": (128, 64)}
    assert pruned.config.intermediate_size == 64 and model.config.intermediate_size == 128
    pruned.save_pretrained(tmp_path)
    loaded = transformers.BertModel.from_pretrained(tmp_path, attn_implementation="eager").eval()
    with torch.no_grad():
        assert torch.equal(loaded(**ids).last_hidden_state, pruned(**ids).last_hidden_state)


class MHABlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(6, 16)
        self.attn = nn.MultiheadAttention(16, 4, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(16, 40), nn.GELU(), nn.Linear(40, 16))
        self.out = nn.Linear(16, 3)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        x = x + self.mlp(x)
        return self.out(x.mean(1))


def test_multihead_attention_heads_pruned_width_kept_equal_masked():
    model = MHABlock().eval().double()
    x = torch.randn(2, 5, 6, dtype=torch.float64)
    pruned, report = prune_channels(model, x, ratio=0.5, return_report=True, progress=False)
    assert isinstance(pruned.attn, PrunedMultiheadAttention) and type(model.attn) is nn.MultiheadAttention
    assert pruned.attn.embed_dim == 16 and pruned.attn.num_heads == 2 and pruned.attn.head_dim == 4
    assert pruned.attn.in_proj_weight.shape == (24, 16) and pruned.attn.out_proj.in_features == 8
    assert pruned.mlp[0].out_features == 20 and pruned.mlp[2].in_features == 20
    assert any("MultiheadAttention keeps its embedding width" in k for k in report.kept)
    masked = mask_channels(model, report)
    with torch.no_grad():
        out, ref, dense = pruned(x), masked(x), model(x)
    assert_close_rel(out, ref, torch.float32, factor=1e-6)
    assert (out - dense).norm() > 1e-3 * dense.norm()


@pytest.mark.parametrize("batch_first, separate_kdim", [(True, False), (False, True)])
def test_pruned_mha_forward_matches_pytorch_when_nothing_is_removed(batch_first, separate_kdim):
    torch.manual_seed(3)
    kw = {"kdim": 7, "vdim": 5} if separate_kdim else {}
    ref = nn.MultiheadAttention(12, 3, batch_first=batch_first, **kw).double().eval()
    ours = copy.deepcopy(ref)
    ours.__class__ = PrunedMultiheadAttention
    L, S, N = 4, 6, 2
    q = torch.randn((N, L, 12) if batch_first else (L, N, 12), dtype=torch.float64)
    k = torch.randn((N, S, 7 if separate_kdim else 12) if batch_first else (S, N, 7 if separate_kdim else 12),
                    dtype=torch.float64)
    v = torch.randn((N, S, 5 if separate_kdim else 12) if batch_first else (S, N, 5 if separate_kdim else 12),
                    dtype=torch.float64)
    kpm = torch.zeros(N, S, dtype=torch.bool)
    kpm[1, -2:] = True
    am = torch.zeros(L, S, dtype=torch.bool)
    am[0, 1] = am[2, 4] = True
    for kwargs in ({}, {"key_padding_mask": kpm, "attn_mask": am}, {"average_attn_weights": False}):
        with torch.no_grad():
            o1, w1 = ref(q, k, v, **kwargs)
            o2, w2 = ours(q, k, v, **kwargs)
            o3, w3 = ours(q, k, v, need_weights=False, **kwargs)  # the fused path
        assert_close_rel(o2, o1, torch.float32, factor=1e-6)
        assert_close_rel(w2, w1, torch.float32, factor=1e-6)
        assert_close_rel(o3, o1, torch.float32, factor=1e-6)
        assert w3 is None
    with torch.no_grad():  # unbatched
        q1 = q[0] if batch_first else q[:, 0]
        k1 = k[0] if batch_first else k[:, 0]
        v1 = v[0] if batch_first else v[:, 0]
        assert_close_rel(ours(q1, k1, v1)[0], ref(q1, k1, v1)[0], torch.float32, factor=1e-6)


def test_mha_with_bias_kv_keeps_heads():
    class B(MHABlock):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(16, 4, batch_first=True, add_bias_kv=True)

    pruned, report = prune_channels(B().eval(), torch.randn(2, 5, 6), ratio=0.5, return_report=True,
                                    progress=False)
    assert pruned.attn.num_heads == 4 and type(pruned.attn) is nn.MultiheadAttention
    assert any("add_bias_kv" in k for k in report.kept)


def test_multihead_attention_is_a_known_limit_not_a_strict_error():
    g = DependencyGraph(MHABlock().eval(), torch.randn(2, 5, 6), strict=True)
    assert any("MultiheadAttention" in r for r in g.frozen)
