"""The Hugging Face config of a channel-pruned model: what it can state, and its update to the pruned widths.

``model.save_pretrained`` writes ``config.json`` and ``from_pretrained`` rebuilds every layer from it, so a pruned
model round-trips only if its config states the pruned widths. A config states one value per width for all layers
(transformers 5 has no per-layer widths for these families), and some derive one width from others. So, for a
model whose ``config`` is a transformers config (recognised by its module, transformers is not imported):

1. before units are chosen, :func:`limit_to_config` keeps what the config cannot state and restricts head counts
   to those its checks accept;
2. after surgery, :func:`update_config` reads the pruned widths from the modules, refuses (``ValueError``) widths
   that differ across layers, and writes them into ``model.config``.

=========================  ===============  =================================================  =======================
``model_type``             MLP width field  heads                                              hidden size
=========================  ===============  =================================================  =======================
llama                      intermediate     pruned; ``num_attention_heads`` must divide         kept
                           _size            ``hidden_size`` (LlamaConfig checks it)
mistral, qwen2, qwen3      intermediate     pruned (whole KV groups); ``head_dim`` written      ``hidden_size``
                           _size
phi                        intermediate     as mistral; kept with ``qk_layernorm`` (its norms   ``hidden_size``
                           _size            are ``hidden_size // num_attention_heads`` wide)
opt                        ffn_dim          kept: ``head_dim = hidden_size // heads``          kept
gpt2                       n_inner          kept: ``head_dim = n_embd // n_head``              kept
bert                       intermediate     kept: ``head_size = hidden_size // heads``         kept
                           _size
=========================  ===============  =================================================  =======================

Where heads are pruned, ``num_attention_heads``, ``num_key_value_heads`` and ``head_dim`` are written. "Kept"
entries are kept with the reason in the report; ``prune_channels(hf_config="ignore")`` prunes them anyway and
leaves the config as it was (the model then cannot be saved with ``save_pretrained``; ``torch.save`` it).
"""
from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .attention import attention_kind
from .graph import DependencyGraph
from .hf_modules import decoder_attention_layout, is_hf_conv1d

__all__ = ["ConfigRule", "config_rule", "limit_to_config", "update_config", "HF_CONFIG_MODES"]

HF_CONFIG_MODES = ("update", "ignore")


@dataclass(frozen=True)
class ConfigRule:
    """How one model family's config states its widths (see the module docstring).

    Attributes:
        model_type: the config's ``model_type``.
        mlp_field: the config field of the MLP width; ``mlp_layer``: the name suffix of the layers whose output
            width it is.
        heads_stated: the config can state fewer heads at the same hidden size (it has, or may be given,
            ``head_dim``); otherwise heads and the hidden size are kept.
        heads_divide_hidden: the config requires ``hidden_size % num_attention_heads == 0``.
        hidden_stated: ``hidden_size`` may change.
        why_kept: the reason given where heads / the hidden size are kept.
    """

    model_type: str
    mlp_field: str
    mlp_layer: str
    heads_stated: bool
    heads_divide_hidden: bool = False
    hidden_stated: bool = True
    why_kept: str = ""


_DERIVED = "{cls} derives the head size from hidden_size // num_attention_heads, so it cannot state fewer heads " \
           "at the same width"
_RULES = {
    "llama": ConfigRule("llama", "intermediate_size", "mlp.up_proj", True, heads_divide_hidden=True,
                        hidden_stated=False, why_kept="LlamaConfig requires hidden_size % num_attention_heads == 0"),
    "mistral": ConfigRule("mistral", "intermediate_size", "mlp.up_proj", True),
    "qwen2": ConfigRule("qwen2", "intermediate_size", "mlp.up_proj", True),
    "qwen3": ConfigRule("qwen3", "intermediate_size", "mlp.up_proj", True),
    "phi": ConfigRule("phi", "intermediate_size", "mlp.fc1", True),
    "opt": ConfigRule("opt", "ffn_dim", "fc1", False, hidden_stated=False, why_kept=_DERIVED),
    "gpt2": ConfigRule("gpt2", "n_inner", "mlp.c_fc", False, hidden_stated=False, why_kept=_DERIVED),
    "bert": ConfigRule("bert", "intermediate_size", "intermediate.dense", False, hidden_stated=False,
                       why_kept=_DERIVED),
}


def hf_config_of(model: nn.Module):
    """``model.config`` if it is a transformers config, else ``None``."""
    config = getattr(model, "config", None)
    return config if config is not None and type(config).__module__.startswith("transformers.") else None


def config_rule(model: nn.Module, fn: str) -> ConfigRule | None:
    """The :class:`ConfigRule` of ``model``'s Hugging Face config, or ``None`` when it has none.

    Raises:
        ValueError: a transformers config of a family whose width fields are not known here.
    """
    config = hf_config_of(model)
    if config is None:
        return None
    model_type = getattr(config, "model_type", None)
    rule = _RULES.get(model_type)
    if rule is None:
        raise ValueError(f"{fn}: cannot update model.config ({type(config).__name__}, model_type {model_type!r}) to "
                         f"pruned widths: the config fields are known for {', '.join(sorted(_RULES))}; pass "
                         "hf_config='ignore' to prune anyway and leave model.config as it is (save the pruned model "
                         "with torch.save, not save_pretrained)")
    if model_type == "phi" and getattr(config, "qk_layernorm", False):
        return ConfigRule("phi", rule.mlp_field, rule.mlp_layer, False, hidden_stated=False,
                          why_kept="PhiConfig with qk_layernorm sizes its q / k norms hidden_size // "
                                   "num_attention_heads")
    return rule


def limit_to_config(graph: DependencyGraph, model: nn.Module, rule: ConfigRule) -> None:
    """Keep in ``graph`` what ``model``'s config cannot state, and restrict head counts to those it accepts (see the
    module docstring); reasons go to ``graph.frozen``."""
    cls = type(hf_config_of(model)).__name__
    why = rule.why_kept.format(cls=cls)
    hidden = getattr(hf_config_of(model), "hidden_size", None)
    for name, info in graph.attention.items():
        if info["kind"] == "mha":
            continue
        if not rule.heads_stated:
            graph.keep_units(info["labels"], f"{name}: heads kept: {why} (hf_config='ignore' prunes them)")
        elif rule.heads_divide_hidden and isinstance(hidden, int):
            group = info["layout"].group if "layout" in info else 1
            units = len(set(graph.root_of(info["labels"]).tolist()))
            graph.limit_keep_counts(info["labels"], [k for k in range(1, units + 1) if hidden % (k * group) == 0])
        if not rule.hidden_stated and info.get("input_labels") is not None:
            graph.keep_units(info["input_labels"], f"{name}: the hidden size is kept: {why} "
                                                   "(hf_config='ignore' prunes it)")


def _uniform(fn: str, cls: str, field: str, values: dict):
    """The one value of ``values`` (layer name -> width), or ``ValueError`` naming the layers that differ."""
    distinct = sorted(set(values.values()))
    if len(distinct) > 1:
        shown = ", ".join(f"{n} {v}" for n, v in list(values.items())[:6])
        raise ValueError(f"{fn}: {cls} states one {field} for every layer, but the pruned layers differ ({shown}); "
                         "prune every layer alike (one ratio: no per_layer or global_pruning), or pass "
                         "hf_config='ignore' to leave model.config as it is")
    return distinct[0] if distinct else None


def _out_width(layer: nn.Module):
    if isinstance(layer, nn.Linear):
        return layer.out_features
    return layer.nf if is_hf_conv1d(layer) else None


def _widths(model: nn.Module, rule: ConfigRule, fn: str) -> dict:
    """The config fields' values read from ``model``'s modules (``None`` where no module has them).

    Raises:
        ValueError: a width differs across layers.
    """
    cls = type(hf_config_of(model)).__name__
    heads, kv_heads, head_dims, hidden = {}, {}, {}, {}
    for name, m in model.named_modules():
        layout = decoder_attention_layout(m)
        if layout is not None:
            heads[name], kv_heads[name], head_dims[name] = layout.heads, layout.kv_heads, layout.head_dim
            first = getattr(m, layout.inputs[0])
            hidden[name] = first.in_features if isinstance(first, nn.Linear) else first.nx
        elif attention_kind(m) == "bert":
            heads[name] = m.num_attention_heads
    mlp = {n: _out_width(m) for n, m in model.named_modules()
           if (n == rule.mlp_layer or n.endswith("." + rule.mlp_layer)) and _out_width(m) is not None}
    embeddings = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    if isinstance(embeddings, nn.Embedding):
        hidden["the input embeddings"] = embeddings.embedding_dim
    widths = {rule.mlp_field: _uniform(fn, cls, rule.mlp_field, mlp),
              "num_attention_heads": _uniform(fn, cls, "num_attention_heads", heads),
              "hidden_size": _uniform(fn, cls, "hidden_size", hidden)}
    if rule.heads_stated:
        widths["num_key_value_heads"] = _uniform(fn, cls, "num_key_value_heads", kv_heads)
        widths["head_dim"] = _uniform(fn, cls, "head_dim", head_dims)
    return widths


def update_config(pruned: nn.Module, original: nn.Module, rule: ConfigRule, fn: str) -> dict:
    """Write the widths in which ``pruned`` differs from ``original`` into ``pruned.config`` (in place; the two
    models must not share their config).

    Returns:
        ``{config field: (before, after)}`` for every field written.

    Raises:
        ValueError: a width of ``pruned`` differs across layers (the config states one value for all).
    """
    config = hf_config_of(pruned)
    before, after = _widths(original, rule, fn), _widths(pruned, rule, fn)
    changes = {f: (getattr(config, f, None), v) for f, v in after.items()
               if f != "head_dim" and v is not None and v != before.get(f)}
    head_dim = after.get("head_dim")
    if head_dim is not None and changes and getattr(config, "head_dim", None) != head_dim:
        # the families that derive it from hidden_size // num_attention_heads read an explicit head_dim first
        changes["head_dim"] = (getattr(config, "head_dim", None), head_dim)
    for field, (_, value) in changes.items():
        setattr(config, field, value)
    return changes
