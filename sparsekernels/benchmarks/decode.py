"""End-to-end decode speed of a Llama-style language model, dense against 2:4: tokens per second of greedy
generation, the model built from a config (random weights: the speed of a forward pass does not depend on them).

Model: on a GPU, a 1.1-billion-parameter Llama (:data:`GPU_MODEL`: hidden 2048, MLP 5632, 22 layers, 32 query /
4 key-value heads, vocabulary 32000, float16); on the CPU, or with ``quick``, a small one (:data:`QUICK_MODEL`).
Every decoder Linear is pruned to 2:4 by magnitude (:func:`pruning.prune_weights`; ``lm_head`` stays dense, its
default) and swapped with :func:`sparsekernels.sparsify`, so each layer runs what the dispatcher measured fastest
for its shape (never slower than dense by construction, see ``docs/runtime.md``).

Per batch size: a prompt of ``prompt`` random tokens, ``new_tokens`` greedy tokens (``model.generate``,
``do_sample=False``, the default dynamic KV cache); one warm-up generation (Triton compilation, the dispatcher's
measurements), then the median of ``repeats`` timed generations. The dense and the 2:4 model are timed in
alternation. Beside the speed: the 2:4 model's logits on the prompt against the masked dense model's (the swap must
not change the function), and the weight bytes of both.

Run: ``sparsekernels bench decode [--quick] [--device cuda] [--out DIR]`` (``PYTHONPATH=. python -m sparsekernels
bench decode`` from the source tree). Writes ``decode[_quick].{json,md}`` under ``benchmarks/results/<device>/``.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch

from .report import Column, ReportFiles, results_dir, write_report

__all__ = ["GPU_MODEL", "QUICK_MODEL", "COLUMNS", "TITLE", "build_model", "tokens_per_second", "measure_decode",
           "run_decode"]

TITLE = "End-to-end decode: dense vs 2:4 Llama-style model"

GPU_MODEL = dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                 num_key_value_heads=4, vocab_size=32000, max_position_embeddings=2048)
QUICK_MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=2, num_attention_heads=8,
                   num_key_value_heads=4, vocab_size=1024, max_position_embeddings=256)
COLUMNS = (
    Column("batch", "batch"), Column("model", "model"), Column("tokens_per_s", "tokens / s", ".1f"),
    Column("ms_per_token", "ms / token", ".2f"), Column("speedup_vs_dense", "speedup vs dense", ".2f"),
    Column("weight_mb", "weights (MB)", ".1f"), Column("logits_rel_err", "logits rel. err vs masked dense", ".1e"),
)


def build_model(sizes: dict, device: torch.device, dtype: torch.dtype):
    """A ``LlamaForCausalLM`` of ``sizes`` on ``device`` in ``dtype``, eval mode, random weights (seed 0)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(**sizes, attn_implementation="sdpa")
    with torch.device(device):
        model = LlamaForCausalLM(config)
    return model.to(dtype).eval()


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _generate(model, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)


def tokens_per_second(model, ids: torch.Tensor, new_tokens: int) -> float:
    """Generated tokens (all rows) per second of one greedy generation of ``new_tokens`` after ``ids``."""
    device = ids.device
    _sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = _generate(model, ids, new_tokens)
    _sync(device)
    seconds = time.perf_counter() - start
    return (out.shape[1] - ids.shape[1]) * ids.shape[0] / seconds


def _weight_mb(model) -> float:
    return sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 1e6


def measure_decode(device: torch.device, *, quick: bool = False, batches=(1, 8), prompt: int = 32,
                   new_tokens: int = 128, repeats: int = 3, progress: bool = False) -> tuple[list[dict], str, dict]:
    """Time greedy decoding, dense against 2:4, on ``device`` (the CPU always runs the small model); ``quick``: the
    small model (:data:`QUICK_MODEL`), 16 new tokens, batch 1 only.

    Returns:
        ``(rows, notes, meta)`` of the report.
    """
    import copy

    import pruning

    from ..swap import sparsify

    sizes = QUICK_MODEL if quick or device.type != "cuda" else GPU_MODEL
    dtype = torch.float16 if device.type == "cuda" else torch.float32
    if quick:
        batches, new_tokens, repeats = (1,), 16, 1
    dense = build_model(sizes, device, dtype)
    params = sum(p.numel() for p in dense.parameters())
    sparse = copy.deepcopy(dense)
    pruning.prune_weights(sparse, "2:4", "magnitude", progress=progress)
    pruning.remove_masks(sparse)  # the masked dense model: plain weights with zeros
    gen = torch.Generator().manual_seed(1)
    check_ids = torch.randint(0, sizes["vocab_size"], (1, prompt), generator=gen).to(device)
    with torch.inference_mode():
        reference = sparse(check_ids).logits.double()
    swap = sparsify(sparse)
    with torch.inference_mode():
        err = float((sparse(check_ids).logits.double() - reference).norm() / reference.norm())
    rows = []
    for batch in batches:
        ids = torch.randint(0, sizes["vocab_size"], (batch, prompt), generator=gen).to(device)
        for model in (dense, sparse):  # warm-up: compilation, the dispatcher's measurements
            tokens_per_second(model, ids, new_tokens)
        speeds = {"dense": [], "2:4": []}
        for _ in range(repeats):
            speeds["dense"].append(tokens_per_second(dense, ids, new_tokens))
            speeds["2:4"].append(tokens_per_second(sparse, ids, new_tokens))
        base = statistics.median(speeds["dense"])
        for name, model in (("dense", dense), ("2:4", sparse)):
            tps = statistics.median(speeds[name])
            rows.append({"batch": batch, "model": name, "tokens_per_s": tps, "ms_per_token": 1e3 * batch / tps,
                         "speedup_vs_dense": tps / base, "weight_mb": _weight_mb(model),
                         "logits_rel_err": err if name == "2:4" else None, "runs": speeds[name]})
        if progress:
            print(rows[-2:], file=sys.stderr)
    count = f"{params / 1e9:.2f} B" if params >= 1e9 else f"{params / 1e6:.1f} M"
    notes = (f"LlamaForCausalLM from a config, {count} parameters (hidden {sizes['hidden_size']}, MLP "
             f"{sizes['intermediate_size']}, {sizes['num_hidden_layers']} layers, {sizes['num_attention_heads']} / "
             f"{sizes['num_key_value_heads']} heads, vocabulary {sizes['vocab_size']}), {str(dtype).replace('torch.', '')}"
             f", random weights. 2:4: every decoder Linear pruned by magnitude and swapped ({len(swap.swapped)} "
             f"layers); lm_head dense. Greedy generate: {prompt}-token prompt, {new_tokens} new tokens, dynamic KV "
             f"cache; median of {repeats} timed runs after one warm-up, dense and 2:4 alternating.")
    meta = {"quick": quick, "model": sizes, "params": params, "prompt": prompt, "new_tokens": new_tokens,
            "repeats": repeats, "swapped": len(swap.swapped)}
    return rows, notes, meta


def run_decode(device: torch.device | str | None = None, *, quick: bool = False, out_dir=None,
               progress: bool = False) -> tuple[list[dict], ReportFiles]:
    """:func:`measure_decode` on ``device`` (default: the GPU if there is one, else the CPU), written as
    ``decode[_quick].{json,md}`` in ``out_dir`` (default ``benchmarks/results/<device>/``).

    Returns:
        ``(rows, files)``.
    """
    from ..environment import environment_stamp

    device = torch.device(device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu"))
    rows, notes, meta = measure_decode(device, quick=quick, progress=progress)
    files = write_report("decode_quick" if quick else "decode", rows, COLUMNS,
                         out_dir=out_dir if out_dir is not None else results_dir(device), device=device,
                         title=TITLE, notes=notes, environment=environment_stamp(device), meta=meta)
    return rows, files
