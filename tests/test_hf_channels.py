"""Channel pruning of Hugging Face decoders (random init from config classes, no download): whole attention heads,
whole KV groups with grouped-query attention, and MLP width. The pruned model equals the masked dense model in
float64, its config states the pruned widths, and save_pretrained -> from_pretrained gives the same logits. GPT-2's
Conv1D layers are traced through addmm; GPT-2 and OPT heads, which their configs cannot state, prune with
hf_config="ignore"."""
import copy

import pytest
import torch
from torch import nn

from pruning.channels import DependencyGraph, mask_channels, prune_channels
from tolerances import assert_close_rel

transformers = pytest.importorskip("transformers")

VOCAB = 61
IDS = torch.randint(0, VOCAB, (2, 7), generator=torch.Generator().manual_seed(3))
SMALL = {"vocab_size": VOCAB, "max_position_embeddings": 32, "num_hidden_layers": 2, "attn_implementation": "eager"}


def build(cls, config):
    torch.manual_seed(0)
    return cls(config).eval().double()


def logits(model, ids=IDS):
    with torch.no_grad():
        return model(ids).logits


def exact(out, ref):
    assert_close_rel(out, ref, torch.float32, factor=1e-6)  # 1e-11: float64 rounding only


def decoder(model_cls, config_cls, heads, kv_heads, mlp="up_proj", **config):
    """(model class, config factory, attention path, (heads, KV heads) before, after at ratio 0.5, MLP layer)."""
    def make_config():
        return config_cls(hidden_size=32, intermediate_size=48, num_attention_heads=heads,
                          num_key_value_heads=kv_heads, **config, **SMALL)

    return (model_cls, make_config, "model.layers.{}.self_attn", (heads, kv_heads), (heads // 2, kv_heads // 2),
            "model.layers.{}.mlp." + mlp)


FAMILIES = {
    "llama-gqa": decoder(transformers.LlamaForCausalLM, transformers.LlamaConfig, 4, 2),
    "mistral-gqa": decoder(transformers.MistralForCausalLM, transformers.MistralConfig, 8, 2, head_dim=8),
    "qwen2-mha": decoder(transformers.Qwen2ForCausalLM, transformers.Qwen2Config, 4, 4),
    "qwen3-gqa": decoder(transformers.Qwen3ForCausalLM, transformers.Qwen3Config, 8, 4, head_dim=8),
    "phi-gqa": decoder(transformers.PhiForCausalLM, transformers.PhiConfig, 4, 2, mlp="fc1"),
}


def heads_of(model, path, layer):
    att = model.get_submodule(path.format(layer))
    out = att.o_proj if hasattr(att, "o_proj") else att.dense
    return att.q_proj.out_features // att.head_dim, att.k_proj.out_features // att.head_dim, out.in_features


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_decoder_heads_kv_groups_and_mlp_prune_equal_masked_and_round_trip(family, tmp_path):
    cls, make_config, att_path, before, after, mlp = FAMILIES[family]
    model = build(cls, make_config())
    original = copy.deepcopy(model)
    # Phi normalises with LayerNorm, which spans the residual width: keep it to compare against the masked twin
    ignore = ["model.embed_tokens"] if family.startswith("phi") else []
    pruned, report = prune_channels(model, {"input_ids": IDS}, ratio=0.5, ignore=ignore, return_report=True,
                                    progress=False)
    for layer in (0, 1):
        assert heads_of(model, att_path, layer)[:2] == before
        q_heads, kv_heads, o_in = heads_of(pruned, att_path, layer)
        assert (q_heads, kv_heads) == after and o_in == q_heads * pruned.config.head_dim
        assert pruned.get_submodule(mlp.format(layer)).out_features == 24
        att = pruned.get_submodule(att_path.format(layer))
        assert att.num_key_value_groups == before[0] // before[1]  # whole KV groups: the grouping is unchanged
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.intermediate_size) == (*after, 24)
    assert report.config_updates["num_attention_heads"] == (before[0], after[0])
    assert model.config.num_attention_heads == before[0]  # the input model and its config are untouched
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), original.state_dict().values()))
    out = logits(pruned)
    exact(out, logits(mask_channels(model, report)))
    assert (out - logits(model)).norm() > 1e-3 * out.norm()
    pruned.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, dtype=torch.float64, attn_implementation="eager").eval()
    assert heads_of(loaded, att_path, 1) == heads_of(pruned, att_path, 1)
    exact(logits(loaded), out)


def test_phi_hidden_size_prunes_and_round_trips(tmp_path):
    cls, make_config, *_ = FAMILIES["phi-gqa"]
    model = build(cls, make_config()).float()
    pruned, report = prune_channels(model, {"input_ids": IDS}, ratio=0.5, return_report=True, progress=False)
    assert report.config_updates["hidden_size"] == (32, 16) and report.config_updates["head_dim"] == (None, 8)
    assert pruned.model.embed_tokens.embedding_dim == 16 and pruned.lm_head.in_features == 16
    pruned.save_pretrained(tmp_path)
    loaded = cls.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(loaded), logits(pruned))


def test_llama_keeps_a_head_count_its_config_accepts(tmp_path):
    config = transformers.LlamaConfig(hidden_size=48, intermediate_size=40, num_attention_heads=8,
                                      num_key_value_heads=8, **SMALL)
    model = build(transformers.LlamaForCausalLM, config).float()
    pruned, report = prune_channels(model, {"input_ids": IDS}, ratio=0.4, return_report=True, progress=False)
    # 8 heads at ratio 0.4 keep 5, which does not divide hidden_size 48 (LlamaConfig refuses it): 6 are kept
    assert pruned.config.num_attention_heads == 6 and pruned.model.layers[0].self_attn.o_proj.in_features == 36
    assert pruned.config.head_dim == 6
    pruned.save_pretrained(tmp_path)
    loaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="eager").eval()
    assert torch.equal(logits(loaded), logits(pruned))


def tiny_gpt2():
    config = transformers.GPT2Config(n_embd=32, n_inner=48, n_layer=2, n_head=4, vocab_size=VOCAB, n_positions=32,
                                     bos_token_id=0, eos_token_id=0, attn_implementation="eager")
    return build(transformers.GPT2LMHeadModel, config)


def tiny_opt():
    config = transformers.OPTConfig(hidden_size=32, ffn_dim=48, num_attention_heads=4, word_embed_proj_dim=32, **SMALL)
    return build(transformers.OPTForCausalLM, config)


def test_gpt2_conv1d_heads_split_consistently_with_hf_config_ignore():
    model = tiny_gpt2()
    pruned, report = prune_channels(model, {"input_ids": IDS}, ratio=0.5, ignore=["transformer.wte"],
                                    hf_config="ignore", return_report=True, progress=False)
    for block in pruned.transformer.h:
        att = block.attn
        assert (att.num_heads, att.split_size, att.head_dim) == (2, 16, 8)
        assert att.c_attn.weight.shape == (32, 48) and (att.c_attn.nx, att.c_attn.nf) == (32, 48)
        assert att.c_proj.weight.shape == (16, 32) and att.c_proj.nx == 16
        assert block.mlp.c_fc.nf == 24 and block.mlp.c_proj.weight.shape == (24, 32)
    assert report.config_updates == {} and pruned.config.n_head == 4
    # the q, k and v columns of c_attn lose the same heads
    keep = report.param_keep["transformer.h.0.attn.c_attn.weight"][1]
    q, k, v = (tuple(i - part * 32 for i in keep if part * 32 <= i < part * 32 + 32) for part in range(3))
    assert q == k == v and len(q) == 16
    out = logits(pruned)
    exact(out, logits(mask_channels(model, report)))
    assert (out - logits(model)).norm() > 1e-3 * out.norm()


def test_gpt2_by_default_keeps_heads_and_round_trips(tmp_path):
    model = tiny_gpt2()
    pruned, report = prune_channels(model, {"input_ids": IDS}, ratio=0.5, return_report=True, progress=False)
    assert pruned.transformer.h[0].attn.num_heads == 4 and pruned.transformer.h[1].mlp.c_fc.nf == 24
    assert report.config_updates == {"n_inner": (48, 24)}
    assert any("heads kept: GPT2Config derives the head size" in k for k in report.kept)
    assert any("the hidden size is kept" in k for k in report.kept)
    exact(logits(pruned), logits(mask_channels(model, report)))
    pruned.save_pretrained(tmp_path)
    loaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path, dtype=torch.float64,
                                                          attn_implementation="eager").eval()
    exact(logits(loaded), logits(pruned))


def test_opt_heads_prune_with_hf_config_ignore_and_ffn_by_default(tmp_path):
    model = tiny_opt()
    pruned, report = prune_channels(model, {"input_ids": IDS}, ratio=0.5, ignore=["model.decoder.embed_tokens"],
                                    hf_config="ignore", return_report=True, progress=False)
    att = pruned.model.decoder.layers[1].self_attn
    assert (att.num_heads, att.head_dim, att.q_proj.out_features, att.out_proj.in_features) == (2, 8, 16, 16)
    exact(logits(pruned), logits(mask_channels(model, report)))
    pruned, report = prune_channels(model, {"input_ids": IDS}, ratio=0.5, return_report=True, progress=False)
    assert pruned.model.decoder.layers[0].self_attn.num_heads == 4 and report.config_updates == {"ffn_dim": (48, 24)}
    exact(logits(pruned), logits(mask_channels(model, report)))
    pruned.save_pretrained(tmp_path)
    loaded = transformers.OPTForCausalLM.from_pretrained(tmp_path, dtype=torch.float64,
                                                         attn_implementation="eager").eval()
    exact(logits(loaded), logits(pruned))


def test_kv_groups_are_the_units_of_grouped_query_attention():
    cls, make_config, *_ = FAMILIES["mistral-gqa"]
    graph = DependencyGraph(build(cls, make_config()), {"input_ids": IDS})
    att = next(a for a in graph.attachments["model.layers.0.self_attn.q_proj.weight"] if a.dim == 0)
    group = graph.groups[graph.root_group[int(graph.root_of(att.labels)[0])]]
    assert len(group.units) == 2 and group.unit_channels == 32 and group.prunable  # 2 KV groups of 4 heads x 8
    params = set(group.params)
    for proj, dim in (("q_proj", 0), ("k_proj", 0), ("v_proj", 0), ("o_proj", 1)):
        assert f"model.layers.0.self_attn.{proj}.weight" in params
        assert any(a.dim == dim for a in graph.attachments[f"model.layers.0.self_attn.{proj}.weight"])


def test_widths_that_differ_across_layers_are_refused_unless_ignored():
    cls, make_config, *_ = FAMILIES["llama-gqa"]
    model = build(cls, make_config())
    inputs = {"input_ids": IDS}
    with pytest.raises(ValueError, match="LlamaConfig states one intermediate_size for every layer, but the pruned "
                                         r"layers differ \(model.layers.0.mlp.up_proj 24, model.layers.1.mlp.up_proj "
                                         "48\\).*hf_config='ignore'"):
        prune_channels(model, inputs, ratio=0.5, per_layer={"model.layers.1.mlp.up_proj": 0.0}, progress=False)
    pruned = prune_channels(model, inputs, ratio=0.5, per_layer={"model.layers.1.mlp.up_proj": 0.0},
                            hf_config="ignore", progress=False)
    assert pruned.model.layers[1].mlp.up_proj.out_features == 48 and pruned.config.intermediate_size == 48


def test_a_config_of_an_unknown_family_is_refused_with_the_way_out():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.config = transformers.PreTrainedConfig()
            self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 2)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match=r"cannot update model.config \(PreTrainedConfig.*hf_config='ignore'"):
        prune_channels(Net(), x, ratio=0.5, progress=False)
    assert prune_channels(Net(), x, ratio=0.5, hf_config="ignore", progress=False).a.out_features == 4
    with pytest.raises(ValueError, match="expected hf_config to be one of update, ignore, got 'keep'"):
        prune_channels(Net(), x, hf_config="keep", progress=False)


def test_an_attention_with_a_per_head_parameter_keeps_its_heads():
    cls, make_config, *_ = FAMILIES["qwen2-mha"]
    model = build(cls, make_config())
    model.model.layers[0].self_attn.sinks = nn.Parameter(torch.zeros(4, dtype=torch.float64))  # one per head
    pruned, report = prune_channels(model, {"input_ids": IDS}, ratio=0.5, hf_config="ignore", return_report=True,
                                    progress=False)
    assert pruned.model.layers[0].self_attn.q_proj.out_features == 32
    assert pruned.model.layers[1].self_attn.q_proj.out_features == 16
    assert any("sinks of shape (4,) may hold per-head values" in k for k in report.kept)


def test_addmm_handler_traces_a_conv1d_mlp():
    from transformers.pytorch_utils import Conv1D

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.up, self.down = Conv1D(24, 8), Conv1D(8, 24)

        def forward(self, x):
            return self.down(torch.nn.functional.gelu(self.up(x)))

    model = MLP().double().eval()
    x = torch.randn(2, 5, 8, dtype=torch.float64)
    pruned, report = prune_channels(model, x, ratio=0.5, return_report=True, progress=False)
    assert (pruned.up.nx, pruned.up.nf, pruned.down.nx, pruned.down.nf) == (8, 12, 12, 8)
    assert pruned.up.weight.shape == (8, 12) and pruned.down.weight.shape == (12, 8)
    exact(pruned(x), mask_channels(model, report)(x))
