"""Hugging Face round trip: sparse models save with ``save_pretrained`` and load with ``from_pretrained``.

Importing this package registers ``"sparsekernels"`` with transformers' quantizer plug-in mechanism
(``transformers.quantizers.register_quantization_config`` / ``register_quantizer``, the way torchao and
compressed-tensors plug in), so that, in this process::

    import sparsekernels.huggingface as skhf
    from transformers import AutoModelForCausalLM

    sparsekernels.sparsify(model)                  # 2:4 layers swapped in
    skhf.mark_sparse(model)                        # config.json will declare them
    model.save_pretrained("out")                   # compressed: 0.5625x of the dense fp16 bytes per 2:4 layer
    model = AutoModelForCausalLM.from_pretrained("out")   # sparse layers built on the meta device, no dense copy

    skhf.save_dense(model, "dense")                # an ordinary dense checkpoint, for any tool
    model = skhf.load_pretrained("llmcompressor_out")      # dense 2:4 or compressed-tensors bitmask -> sparse
    skhf.perplexity(model, tokenizer, text, seq_len=512)   # the number sparsekernels prune reports

``sparsekernels`` itself never imports transformers; this package does (importing it is the registration).

    bitmask     compressed-tensors' sparse-24-bitmask layers -> the 2:4 format (pure PyTorch)
    quantizer   SparseKernelsConfig, SparseKernelsHfQuantizer, register()
    pretrained  mark_sparse, load_pretrained, save_dense, dense_state_dict, resize_token_embeddings
    evaluation  perplexity of a causal language model on text (sliding windows, padding masked out)

Needs transformers 5 (its weight-conversion loader, ``transformers.core_model_loading``); tested with 5.24. See
``docs/huggingface.md``.
"""
import transformers

if int(transformers.__version__.split(".")[0]) < 5:
    raise ImportError(f"sparsekernels.huggingface needs transformers >= 5 (transformers.core_model_loading and its "
                      f"quantizer hooks), found {transformers.__version__}")

from .bitmask import sparse24_from_bitmask  # noqa: E402
from .evaluation import perplexity  # noqa: E402
from .pretrained import (  # noqa: E402
    dense_state_dict,
    load_pretrained,
    mark_sparse,
    resize_token_embeddings,
    save_dense,
)
from .quantizer import (  # noqa: E402
    FORMAT_VERSION,
    QUANT_METHOD,
    SparseKernelsConfig,
    SparseKernelsHfQuantizer,
    register,
    sparse_module_records,
)

register()

__all__ = [
    "QUANT_METHOD",
    "FORMAT_VERSION",
    "SparseKernelsConfig",
    "SparseKernelsHfQuantizer",
    "register",
    "mark_sparse",
    "load_pretrained",
    "save_dense",
    "dense_state_dict",
    "resize_token_embeddings",
    "sparse_module_records",
    "sparse24_from_bitmask",
    "perplexity",
]
