"""Pruning at LLM scale: one-shot 2:4 pruning time, peak memory and logits fidelity against depth, ours side by side
with llm-compressor's ``oneshot``, on the same models and the same calibration data, in one run.

Models: Hugging Face ``LlamaForCausalLM`` from a ``LlamaConfig`` at 4, 8, 16 and 32 decoder layers (hidden 256,
MLP 688, 8 heads of 32 with 4 key-value heads, vocabulary 2048; float32), small enough that 32 layers are pruned on
a CPU in minutes; random weights (seed 0) with LLM-like activation outliers (:func:`build_model`). Calibration: 16 sequences of 128 random tokens (one sequence a batch, as
llm-compressor's default ``batch_size=1``); fidelity on 4 held-out sequences. Every Linear of the decoder layers is
pruned to 2:4; ``lm_head`` stays dense in both.

Per case (method x criterion x depth), in a fresh Python process (one CPU thread) so that no allocator state or
peak of another case counts:

* **time**: wall-clock seconds of the pruning call alone (``pruning.prune_weights`` / ``llmcompressor.oneshot``);
* **peak memory**: the process's resident-set high-water mark during that call (``VmHWM``, reset through
  ``/proc/self/clear_refs`` just before it) minus the resident set before it, once the model, the data and the dense
  logits exist: what pruning costs on top of the model. Our masks are an output that grows with depth (one bool
  byte per weight, the ``weight_mask`` buffers); their size is its own column, and "working memory" is the peak
  minus them;
* **fidelity**: the pruned model's logits against the dense model's on the held-out sequences: relative error
  ``||y - y_dense|| / ||y_dense||`` and the mean cosine similarity per token.

For SparseGPT, "ours, whole model" is the route without the block pipeline (``blocks=None``: one calibration pass
from the embedding per layer), measured up to 16 layers to show the quadratic cost it replaces.

Run: ``python -m sparsekernels.benchmarks.llm_scaling [--quick] [--out DIR]`` or ``pytest
benchmarks/bench_llm_scaling.py``. Writes ``benchmarks/results/cpu/llm_scaling.{json,md}`` (``llm_scaling_quick``
for a quick run: 2, 4, 8 layers of a smaller model). Linux only (``/proc``).
"""
from __future__ import annotations

import argparse
import gc
import importlib.metadata
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from .cpu_memory import release_free_heap, resident_set_bytes
from .report import Column, ReportFiles, results_dir, write_report

__all__ = [
    "DEPTHS",
    "QUICK_DEPTHS",
    "MODEL",
    "QUICK_MODEL",
    "CASES",
    "COLUMNS",
    "build_model",
    "token_sequences",
    "llmcompressor_status",
    "measure_case",
    "measure_case_in_fresh_process",
    "measure_knobs",
    "summarize",
    "run_llm_scaling",
    "main",
]

DEPTHS = (4, 8, 16, 32)
QUICK_DEPTHS = (2, 4, 8)
MODEL = dict(hidden_size=256, intermediate_size=688, num_attention_heads=8, num_key_value_heads=4, vocab_size=2048,
             max_position_embeddings=256, calib_sequences=16, seq_len=128, test_sequences=4)
QUICK_MODEL = dict(hidden_size=128, intermediate_size=344, num_attention_heads=4, num_key_value_heads=2,
                   vocab_size=512, max_position_embeddings=128, calib_sequences=8, seq_len=64, test_sequences=2)
# (method, criterion, deepest depth it runs at)
CASES = (("ours", "sparsegpt", None), ("llm-compressor", "sparsegpt", None), ("ours", "wanda", None),
         ("llm-compressor", "wanda", None), ("ours, whole model", "sparsegpt", 16))
COLUMNS = (
    Column("layers", "layers"), Column("criterion", "criterion"), Column("method", "method"),
    Column("seconds", "time (s)", ".2f"), Column("peak_mb", "peak memory (MB)", ".1f"),
    Column("masks_mb", "of which masks (MB)", ".1f"), Column("working_mb", "working memory (MB)", ".1f"),
    Column("rel_error", "logits rel. error", ".4f"), Column("cosine", "logits cosine", ".4f"),
    Column("time_vs_llmc", "time / llm-compressor", ".2f"), Column("memory_vs_llmc", "peak / llm-compressor", ".2f"),
)
PRUNED_PER_LAYER = 7  # q, k, v, o, gate, up, down
MMAP_THRESHOLD = 65536
KNOB_CALIBRATION = (8, 16, 64)  # sequences of the model's length
QUICK_KNOB_CALIBRATION = (4, 8, 16)
KNOB_COLUMNS = (
    Column("calibration", "calibration (sequences x tokens)"), Column("criterion", "criterion"),
    Column("options", "options"), Column("seconds", "time (s)", ".2f"), Column("rel_error", "logits rel. error", ".4f"),
    Column("cosine", "logits cosine", ".4f"),
)
OUTLIERS = {"channels": (3, 17, 40, 58), "gain": 8.0, "embedding_rank": 16}


def build_model(depth: int, quick: bool = False):
    """The ``LlamaForCausalLM`` of one case: ``depth`` decoder layers, float32, eval mode; random weights (seed 0)
    given the activation outliers of trained LLMs (:data:`OUTLIERS`): a low-rank token embedding, and the RMSNorm
    gains of a few channels at 8, so that a few input features of every projection are large -- the case where
    activation-aware criteria (Wanda, SparseGPT) matter."""
    from transformers import LlamaConfig, LlamaForCausalLM

    sizes = QUICK_MODEL if quick else MODEL
    config = LlamaConfig(num_hidden_layers=depth, attn_implementation="sdpa",
                         **{k: v for k, v in sizes.items() if k not in ("calib_sequences", "seq_len", "test_sequences")})
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        rank = OUTLIERS["embedding_rank"]
        low = torch.randn(emb.shape[0], rank, generator=g) @ torch.randn(rank, emb.shape[1], generator=g)
        emb.copy_(0.02 * (low / rank**0.5 + 0.3 * torch.randn(emb.shape, generator=g)))
        for layer in model.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[list(OUTLIERS["channels"])] = OUTLIERS["gain"]
    return model


def token_sequences(count: int, length: int, vocab: int, seed: int) -> list[torch.Tensor]:
    """``count`` sequences of ``length`` random tokens, each ``[1, length]``."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(0, vocab, (1, length), generator=g) for _ in range(count)]


def llmcompressor_status() -> tuple[bool, str]:
    """Whether llm-compressor's ``oneshot`` and its pruning modifiers import here, and its version or why not."""
    try:
        import llmcompressor.modifiers.pruning  # noqa: F401
        from llmcompressor import oneshot  # noqa: F401
    except Exception as e:  # any import failure is a reason to report, not to stop the run
        return False, f"llm-compressor could not be imported: {type(e).__name__}: {e}"
    return True, importlib.metadata.version("llmcompressor")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current resident set (Linux >= 4.0)


def _peak_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _prune_llmcompressor(model, criterion: str, calib: list[torch.Tensor], seq_len: int, vocab: int) -> None:
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from tokenizers import Tokenizer, models
    from torch.utils.data import DataLoader
    from transformers import PreTrainedTokenizerFast

    # oneshot reads the model's config from disk and needs a processor; neither does any work here.
    folder = tempfile.mkdtemp(prefix="llm-scaling-")
    model.config.save_pretrained(folder)
    model.config._name_or_path = folder
    processor = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(
        models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t0")))
    loader = DataLoader([{"input_ids": ids[0], "attention_mask": torch.ones_like(ids[0])} for ids in calib],
                        batch_size=1)
    modifier = SparseGPTModifier if criterion == "sparsegpt" else WandaPruningModifier
    recipe = modifier(sparsity=0.5, mask_structure="2:4", targets=["Linear"], ignore=["re:.*lm_head"])
    oneshot(model=model, dataset=loader, processor=processor, recipe=recipe, num_calibration_samples=len(calib),
            max_seq_length=seq_len, shuffle_calibration_samples=False, pipeline="sequential")


def measure_case(method: str, criterion: str, depth: int, quick: bool = False) -> dict:
    """One case, in this process (meant for a fresh one: :func:`measure_case_in_fresh_process`)."""
    torch.set_num_threads(1)
    sizes = QUICK_MODEL if quick else MODEL
    model = build_model(depth, quick)
    vocab, seq_len = sizes["vocab_size"], sizes["seq_len"]
    calib = token_sequences(sizes["calib_sequences"], seq_len, vocab, seed=1)
    test = token_sequences(sizes["test_sequences"], seq_len, vocab, seed=2)
    with torch.no_grad():
        dense = torch.cat([model(ids).logits for ids in test]).double()
    # imports outside the measured call
    if method == "llm-compressor":
        import llmcompressor.entrypoints.oneshot  # noqa: F401
        import llmcompressor.modifiers.pruning  # noqa: F401
    else:
        import pruning.weights
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    gc.collect()
    release_free_heap()
    baseline = resident_set_bytes()
    _reset_peak()
    t0 = time.perf_counter()
    if method == "llm-compressor":
        _prune_llmcompressor(model, criterion, calib, seq_len, vocab)
    else:
        pruning.weights.prune_weights(model, "2:4", criterion, calib=[{"input_ids": ids} for ids in calib],
                              blocks=None if method == "ours, whole model" else "auto", progress=False)
    seconds = time.perf_counter() - t0
    peak = _peak_bytes() - baseline
    masks = sum(b.numel() * b.element_size() for n, b in model.named_buffers() if n.endswith("weight_mask"))
    with torch.no_grad():
        logits = torch.cat([model(ids).logits for ids in test]).double()
    flat, ref = logits.reshape(-1, logits.shape[-1]), dense.reshape(-1, dense.shape[-1])
    pruned_layers = [m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and ".layers." in n]
    exact_24 = sum(int(bool(((m.weight.reshape(m.weight.shape[0], -1, 4) != 0).sum(-1) <= 2).all()))
                   for m in pruned_layers)
    return {
        "layers": depth, "criterion": criterion, "method": method, "seconds": seconds,
        "peak_mb": peak / 1e6, "masks_mb": masks / 1e6, "working_mb": (peak - masks) / 1e6,
        "model_mb": model_bytes / 1e6,
        "rel_error": float((flat - ref).norm() / ref.norm()),
        "cosine": float(torch.nn.functional.cosine_similarity(flat, ref, dim=-1).mean()),
        "layers_24": exact_24, "layers_expected": depth * PRUNED_PER_LAYER,
        "lm_head_dense": bool((model.lm_head.weight != 0).all()),
    }


def measure_case_in_fresh_process(method: str, criterion: str, depth: int, quick: bool = False, *,
                                  timeout_s: float = 3600.0) -> dict:
    """:func:`measure_case` in a fresh Python process (this interpreter, this copy of ``sparsekernels``; glibc's mmap
    threshold fixed at :data:`MMAP_THRESHOLD`).

    Raises:
        RuntimeError: the process failed (its last stderr lines are in the message).
    """
    return _in_fresh_process(f"measure_case({method!r}, {criterion!r}, {depth}, {quick})", timeout_s)


def measure_knobs(quick: bool = False) -> list[dict]:
    """The knobs of SparseGPT and Wanda on one model (8 layers; 4 in a quick run), in this process: calibration
    size, the true-sequential ordering against one calibrating pass per block, ``damp``, and SparseGPT's ``dtype``.
    Each row: time, logits relative error and cosine against dense."""
    import pruning.weights
    from pruning.importance import SparseGPT

    torch.set_num_threads(1)
    sizes = QUICK_MODEL if quick else MODEL
    depth = 4 if quick else 8
    model = build_model(depth, quick)
    vocab, seq_len = sizes["vocab_size"], sizes["seq_len"]
    test = token_sequences(sizes["test_sequences"], seq_len, vocab, seed=2)
    with torch.no_grad():
        dense = torch.cat([model(ids).logits for ids in test]).double().reshape(-1, sizes["vocab_size"])
    counts = QUICK_KNOB_CALIBRATION if quick else KNOB_CALIBRATION
    settings = []
    for count in counts:
        for sequential in (True, False):
            for damp in (0.01, 0.1):
                settings.append((count, f"sparsegpt, {'true-sequential' if sequential else 'one pass per block'}",
                                 f"damp={damp}", SparseGPT(sequential=sequential, damp=damp)))
        settings.append((count, "wanda", "", "wanda"))
    settings.append((counts[1], "sparsegpt, true-sequential", "damp=0.01, dtype=float64",
                     SparseGPT(dtype=torch.float64)))
    rows = []
    for count, criterion, options, crit in settings:
        calib = [{"input_ids": ids} for ids in token_sequences(count, seq_len, vocab, seed=1)]
        pruned = build_model(depth, quick)
        t0 = time.perf_counter()
        pruning.weights.prune_weights(pruned, "2:4", crit, calib=calib, progress=False)
        seconds = time.perf_counter() - t0
        with torch.no_grad():
            logits = torch.cat([pruned(ids).logits for ids in test]).double().reshape(-1, sizes["vocab_size"])
        rows.append({"layers": depth, "calibration": f"{count} x {seq_len}", "criterion": criterion,
                     "options": options, "seconds": seconds,
                     "rel_error": float((logits - dense).norm() / dense.norm()),
                     "cosine": float(torch.nn.functional.cosine_similarity(logits, dense, dim=-1).mean())})
    return rows


def _in_fresh_process(call: str, timeout_s: float) -> object:
    import sparsekernels

    source_root = str(Path(sparsekernels.__file__).resolve().parents[1])
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([source_root, *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    # A fixed glibc mmap threshold: a freed tensor's memory goes back to the OS, so the high-water mark counts live
    # memory rather than how the heap fragmented (the same for both methods).
    env["MALLOC_MMAP_THRESHOLD_"] = str(MMAP_THRESHOLD)
    code = f"import json\nfrom sparsekernels.benchmarks import llm_scaling\nprint(json.dumps(llm_scaling.{call}))\n"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
    if proc.returncode != 0:
        tail = " | ".join(proc.stderr.strip().splitlines()[-3:])
        raise RuntimeError(f"llm_scaling.{call} failed in its process with exit code {proc.returncode}: {tail}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(rows: list[dict], depths) -> dict:
    """Growth of time and working memory from the smallest to each larger depth, per method and criterion."""
    out = {}
    lo = depths[0]
    for method, criterion, _ in CASES:
        mine = {r["layers"]: r for r in rows if r["method"] == method and r["criterion"] == criterion
                and r.get("seconds") is not None}
        if lo not in mine:
            continue
        out[f"{method} / {criterion}"] = {
            f"{lo}->{depth}": {"time": mine[depth]["seconds"] / mine[lo]["seconds"],
                               "working_memory_mb": [round(mine[lo]["working_mb"], 1), round(mine[depth]["working_mb"], 1)]}
            for depth in depths[1:] if depth in mine}
    return out


def _best_of(runs: list[dict]) -> dict:
    """One row from repeated runs of a case: the least time and the least peak (the machine is shared)."""
    row = dict(runs[0])
    for key in ("seconds", "peak_mb", "working_mb"):
        row[key] = min(r[key] for r in runs)
    row["repeats"] = len(runs)
    return row


def _notes(quick, sizes, growth, available, lc, versions, knobs) -> str:
    from .report import markdown_table

    lines = [
        f"LlamaForCausalLM, hidden {sizes['hidden_size']}, MLP {sizes['intermediate_size']}, "
        f"{sizes['num_attention_heads']} heads / {sizes['num_key_value_heads']} KV heads, vocabulary "
        f"{sizes['vocab_size']}, float32, random weights with LLM-like activation outliers (RMSNorm gain "
        f"{OUTLIERS['gain']:g} on {len(OUTLIERS['channels'])} channels, rank-{OUTLIERS['embedding_rank']} token "
        f"embedding); {sizes['calib_sequences']} calibration sequences of {sizes['seq_len']} random tokens (batch 1), "
        f"{sizes['test_sequences']} held-out. Defaults of both libraries (ours: SparseGPT true-sequential, float32 "
        "Hessians, damp 0.01, blocksize 128; llm-compressor: its sequential pipeline, one calibrating pass per "
        "decoder layer). One CPU thread, a fresh process per case, best of the repeats (the machine is shared). "
        "Peak memory: resident-set high-water mark during the pruning call minus the resident set before it (model, "
        f"data and dense logits already there), with glibc's mmap threshold fixed at {MMAP_THRESHOLD} bytes in every "
        "measuring process so that freed tensors leave the count. Our masks (the bool `weight_mask` buffers: an "
        "output, one byte per pruned weight; `pruning.remove_masks` drops them) are counted in it and shown apart; "
        "working memory = peak - masks, what pruning holds beyond the model. lm_head is dense in every case.",
        "Growth from the smallest depth (time ratio; working memory in MB at both ends): "
        + "; ".join(f"{k}: " + ", ".join(f"{d} x{v['time']:.2f} ({v['working_memory_mb'][0]} -> "
                                         f"{v['working_memory_mb'][1]} MB)" for d, v in g.items())
                    for k, g in growth.items()) + ".",
    ]
    if available:
        lines.append(f"llm-compressor {lc} (compressed-tensors {versions['compressed-tensors']}), installed with "
                     "`pip install --no-deps` because it pins torch<=2.14.0 and transformers<=5.17.0; it ran here "
                     f"against torch {torch.__version__} and transformers {versions['transformers']}. oneshot with "
                     "SparseGPTModifier / WandaPruningModifier(sparsity=0.5, mask_structure='2:4', "
                     "targets=['Linear'], ignore=['re:.*lm_head']), pipeline='sequential'.")
    else:
        lines.append(f"llm-compressor was not measured: {lc}.")
    if knobs:
        lines.append(f"Knobs, on the {knobs[0]['layers']}-layer model (ours; time in one process, so only the "
                     "ratios between rows mean something):\n\n" + markdown_table(knobs, KNOB_COLUMNS))
    return "\n\n".join(lines)


def run_llm_scaling(*, quick: bool = False, out_dir: str | os.PathLike | None = None, repeats: int | None = None,
                    knobs: bool = True, progress: bool = False) -> tuple[list[dict], ReportFiles]:
    """Measure every case (``repeats`` rounds, each case in its own fresh process, the methods interleaved) and the
    knob study, and write ``llm_scaling[_quick].{json,md}`` as one set.

    Returns:
        ``(rows, files)``.
    """
    from ..environment import environment_stamp

    depths = QUICK_DEPTHS if quick else DEPTHS
    repeats = repeats if repeats is not None else (1 if quick else 2)
    available, lc = llmcompressor_status()
    t0 = time.perf_counter()
    runs: dict[tuple, list[dict]] = {}
    for _ in range(repeats):
        for depth in depths:
            for method, criterion, deepest in CASES:
                if (deepest is not None and depth > deepest) or (method == "llm-compressor" and not available):
                    continue
                row = _in_fresh_process(f"measure_case({method!r}, {criterion!r}, {depth}, {quick})", 3600.0)
                runs.setdefault((depth, method, criterion), []).append(row)
                if progress:
                    print(json.dumps(row), file=sys.stderr)
    rows = []
    for depth in depths:
        for method, criterion, deepest in CASES:
            if deepest is not None and depth > deepest:
                continue
            if (depth, method, criterion) in runs:
                rows.append(_best_of(runs[(depth, method, criterion)]))
            else:
                rows.append({"layers": depth, "criterion": criterion, "method": method, "note": lc})
    for row in rows:
        ref = next((r for r in rows if r["method"] == "llm-compressor" and r["criterion"] == row["criterion"]
                    and r["layers"] == row["layers"] and r.get("seconds")), None)
        if ref is not None and row.get("seconds") is not None:
            row["time_vs_llmc"] = row["seconds"] / ref["seconds"]
            row["memory_vs_llmc"] = row["peak_mb"] / ref["peak_mb"] if ref["peak_mb"] > 0 else None
    knob_rows = _in_fresh_process(f"measure_knobs({quick})", 3600.0) if knobs else []
    growth = summarize(rows, depths)
    sizes = QUICK_MODEL if quick else MODEL
    versions = {}
    for package in ("transformers", "accelerate", "llmcompressor", "compressed-tensors"):
        try:
            versions[package] = importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            versions[package] = None
    files = write_report(
        "llm_scaling_quick" if quick else "llm_scaling", rows, COLUMNS,
        out_dir=out_dir if out_dir is not None else results_dir("cpu"), device="cpu",
        title="Pruning at LLM scale: 2:4 one-shot against depth, ours vs llm-compressor",
        notes=_notes(quick, sizes, growth, available, lc, versions, knob_rows), environment=environment_stamp("cpu"),
        meta={"quick": quick, "depths": list(depths), "repeats": repeats, "model": sizes, "outliers": OUTLIERS,
              "versions": versions, "llmcompressor_available": available, "growth": growth, "knobs": knob_rows,
              "total_seconds": time.perf_counter() - t0},
    )
    return rows, files


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekernels.benchmarks.llm_scaling",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2, 4, 8 layers of a smaller model (a few minutes)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/cpu/)")
    parser.add_argument("--repeats", type=int, default=None, help="rounds of every case (default: 2; 1 with --quick)")
    parser.add_argument("--no-knobs", action="store_true", help="skip the study of the knobs")
    parser.add_argument("--progress", action="store_true", help="print each case as it is measured")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error(f"expected --repeats >= 1, got {args.repeats}")
    rows, files = run_llm_scaling(quick=args.quick, out_dir=args.out, repeats=args.repeats, knobs=not args.no_knobs,
                                  progress=args.progress)
    print(files.markdown.read_text())
    print(f"wrote {files.json} and {files.markdown}")
    return 0 if all(not math.isnan(r.get("seconds", 0.0) or 0.0) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
