"""The language-model side of ``sparsekernels prune``: a Hugging Face model directory in, one out.

MODEL is a folder holding ``config.json`` (a causal language model's) and, unless ``--tokenizer`` names another
folder, its tokenizer files. With safetensors weights beside them the model is loaded (``from_pretrained``); a folder
with no weight files builds the architecture from ``config.json`` with random weights (seeded), which is how the
tests run offline. Pickled weights (``.bin``, ``.pt``) are never read.

Calibration and the example the channel tracer runs are token ids: ``--calib-text`` is tokenized as one stream and
cut into ``--calib-samples`` windows of ``--seq-len`` tokens. The result is written with ``save_pretrained`` into a
temporary folder beside ``--out``, with the tokenizer and ``sparsekernels-prune.json`` (the settings and
perplexities), and renamed into place: ``--out`` holds a whole model or nothing.

Everything here that a user can get wrong raises :class:`~sparsekernels.app.UsageError` with the cause.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from . import UsageError, check_output_folder

__all__ = ["MAX_TEXT_BYTES", "REPORT_NAME", "ModelDirectory", "is_model_directory", "read_text_file",
           "check_output_directory", "open_model_directory", "build_language_model", "calibration_batches",
           "random_batch", "save_model_directory"]

# A calibration or evaluation text is read whole: 256 MiB is far more than either needs.
MAX_TEXT_BYTES = 256 << 20
REPORT_NAME = "sparsekernels-prune.json"
_PICKLED = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


@dataclass(frozen=True)
class ModelDirectory:
    """A Hugging Face model directory, opened: its ``config`` (a transformers config), ``tokenizer``, and whether it
    holds safetensors weights (``has_weights``; otherwise the model is built from the config)."""

    path: Path
    config: object
    tokenizer: object
    has_weights: bool

    @property
    def max_positions(self) -> int | None:
        """The longest sequence the model takes (``max_position_embeddings`` / ``n_positions``), or None."""
        for name in ("max_position_embeddings", "n_positions"):
            value = getattr(self.config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return None


def is_model_directory(spec: str) -> bool:
    """Whether MODEL names a folder (a Hugging Face model directory, or a mistake :func:`open_model_directory`
    explains)."""
    return Path(spec).is_dir()


def read_text_file(path: str, option: str) -> str:
    """The UTF-8 text of ``path``.

    Raises:
        UsageError: no such file, a folder, more than :data:`MAX_TEXT_BYTES`, not UTF-8, or unreadable.
    """
    p = Path(path)
    if not p.is_file():
        raise UsageError(f"{option} {path!r}: no such file")
    size = p.stat().st_size
    if size > MAX_TEXT_BYTES:
        raise UsageError(f"{option} {path!r} has {size:,} bytes; the limit is {MAX_TEXT_BYTES:,}")
    try:
        data = p.read_bytes()
    except OSError as e:
        raise UsageError(f"{option} {path!r}: cannot read it ({e.strerror or type(e).__name__})") from e
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise UsageError(f"{option} {path!r} is not UTF-8 text (byte {e.start} is {data[e.start]:#04x})") from e


def check_output_directory(out: str | os.PathLike) -> Path:
    """``--out`` for a Hugging Face model: a folder that does not exist yet or is empty, in a writable place.

    Raises:
        UsageError: a ``.safetensors`` path, an existing file, a folder holding files, or an unwritable place.
    """
    path = Path(out)
    if path.suffix == ".safetensors":
        raise UsageError(f"expected --out to be a folder for a Hugging Face model directory MODEL (the model is "
                         f"written with save_pretrained), got {str(path)!r}")
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {str(path)!r}: exists and is not a folder")
    if path.is_dir() and any(path.iterdir()):
        raise UsageError(f"--out {str(path)!r}: the folder is not empty (a model is written only into a new or "
                         "empty folder)")
    return check_output_folder(path)


def open_model_directory(spec: str, tokenizer_dir: str | None = None) -> ModelDirectory:
    """Read MODEL's ``config.json`` and tokenizer (from ``tokenizer_dir`` when given), without building the model.

    Raises:
        UsageError: no ``config.json``, a config or tokenizer that does not load, only pickled weights, or a tokenizer
            whose ids do not fit the model's vocabulary.
    """
    from transformers import AutoConfig, AutoTokenizer

    path = Path(spec)
    if not (path / "config.json").is_file():
        raise UsageError(f"MODEL {spec!r} is a folder without config.json; expected a Hugging Face model directory")
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as e:  # transformers' own error types for a config it cannot read
        raise UsageError(f"cannot read {spec}/config.json: {type(e).__name__}: {' '.join(str(e).split())[:300]}") \
            from e
    files = [f.name for f in path.iterdir() if f.is_file()]
    has_weights = any(f.endswith(".safetensors") for f in files)
    pickled = sorted(f for f in files if f.endswith(_PICKLED))
    if pickled and not has_weights:
        raise UsageError(f"MODEL {spec!r} holds pickled weights only ({', '.join(pickled[:3])}); only safetensors "
                         "files are read: convert them with save_pretrained(..., safe_serialization=True)")
    source = tokenizer_dir or spec
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except Exception as e:  # a missing or broken tokenizer: transformers raises OSError, ValueError, ...
        hint = "" if tokenizer_dir else "; give --tokenizer DIR"
        raise UsageError(f"cannot load a tokenizer from {source!r}{hint} ({type(e).__name__}: "
                         f"{' '.join(str(e).split())[:200]})") from e
    vocab = getattr(config, "vocab_size", None)
    if isinstance(vocab, int) and len(tokenizer) > vocab:
        raise UsageError(f"the tokenizer of {source!r} has {len(tokenizer):,} tokens but the model's vocab_size is "
                         f"{vocab:,}: its ids would not fit the embedding")
    return ModelDirectory(path, config, tokenizer, has_weights)


def build_language_model(source: ModelDirectory, seed: int) -> nn.Module:
    """The causal LM of ``source`` in float32 and eval mode: loaded from its safetensors weights, or built from its
    config with random weights drawn after ``torch.manual_seed(seed)``.

    Raises:
        UsageError: the config is not a causal language model's, or the weights do not load.
    """
    from transformers import AutoModelForCausalLM

    try:
        if source.has_weights:
            model = AutoModelForCausalLM.from_pretrained(source.path, dtype=torch.float32, use_safetensors=True)
        else:
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(source.config, dtype=torch.float32)
    except (ValueError, OSError, RuntimeError, KeyError) as e:
        raise UsageError(f"cannot build a causal language model from {str(source.path)!r} "
                         f"({type(source.config).__name__}): {type(e).__name__}: {' '.join(str(e).split())[:300]}") \
            from e
    return model.eval()


def calibration_batches(tokenizer, text: str, samples: int, seq_len: int, option: str) -> tuple[list[dict], str]:
    """``text`` tokenized as one stream and cut into at most ``samples`` windows of ``seq_len`` token ids, each a
    batch ``{"input_ids": int64 [1, seq_len]}``; a text shorter than one window gives one shorter window. Also
    returns a line saying what was used.

    Raises:
        UsageError: the text holds fewer than 2 tokens.
    """
    ids = list(tokenizer(text)["input_ids"])
    if len(ids) < 2:
        raise UsageError(f"{option} holds {len(ids)} token(s); calibration needs at least 2")
    windows = [ids[i:i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)][:samples] or [ids[:seq_len]]
    batches = [{"input_ids": torch.tensor([w], dtype=torch.long)} for w in windows]
    line = f"{len(batches)} sample(s) x {len(windows[0])} tokens from {option} ({len(ids):,} tokens)"
    if len(batches) < samples:
        line += f"; it holds fewer than the {samples} asked for"
    return batches, line


def random_batch(vocab_size: int, seq_len: int, seed: int) -> dict:
    """``{"input_ids": int64 [1, seq_len]}`` of random token ids below ``vocab_size`` (the example for a run without
    ``--calib-text``)."""
    gen = torch.Generator().manual_seed(seed)
    return {"input_ids": torch.randint(0, vocab_size, (1, seq_len), generator=gen)}


def save_model_directory(out: Path, model: nn.Module, tokenizer, record: dict) -> list[Path]:
    """Write ``model`` (``save_pretrained``), ``tokenizer`` and ``record`` (as :data:`REPORT_NAME`) into a temporary
    folder beside ``out`` and rename it to ``out`` (created, or empty as :func:`check_output_directory` found it);
    on any error, Ctrl-C included, the temporary folder is removed and ``out`` is left as it was. Returns the files
    written."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.", suffix=".partial"))
    existed = out.is_dir()
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        (staging / REPORT_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
        if existed:
            out.rmdir()  # empty (checked before any work): a rename cannot replace it otherwise
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        if existed and not out.exists():
            out.mkdir()
        raise
    return sorted(p for p in out.iterdir() if p.is_file())
