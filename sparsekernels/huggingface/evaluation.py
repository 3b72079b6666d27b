"""Perplexity of a causal language model on text, the number ``sparsekernels prune`` reports before and after pruning.

A long text is scored in windows of ``seq_len`` tokens that move by ``stride``; each token is predicted once, by
the first window that holds it with some context before it: ``stride == seq_len`` gives disjoint windows (the first
token of each is not scored), a smaller stride gives every prediction at least ``seq_len - stride`` tokens of
context and costs more forward passes. Windows are run ``batch_size`` at a time, right-padded to the longest one;
padded positions are masked out of the attention and out of the loss, so the result does not depend on the batch
size. A list of texts is scored document by document (no window spans two documents) and pooled: ``exp(total NLL /
predicted tokens)``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["perplexity", "token_windows"]


def _positive(fn: str, name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{fn}: expected {name} to be a positive integer, got {value!r}")
    return value


def token_windows(ids: list[int], seq_len: int, stride: int) -> list[tuple[list[int], int]]:
    """The windows that score the token stream ``ids``: ``(window token ids, number of tokens at its end that it
    predicts)``. No token is predicted twice; a token is left out only where it starts a window and the window
    before did not reach it (the first token, and with ``stride == seq_len`` the first of every window)."""
    windows, prev_end = [], 0
    for begin in range(0, len(ids), stride):
        end = min(begin + seq_len, len(ids))
        predicted = min(end - prev_end, end - begin - 1)  # a window's first token has no context in it
        if predicted > 0:
            windows.append((ids[begin:end], predicted))
        prev_end = end
        if end == len(ids):
            break
    return windows


def _max_positions(model: nn.Module):
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def perplexity(model: nn.Module, tokenizer, text: str | list[str], *, seq_len: int | None = None,
               stride: int | None = None, batch_size: int = 1) -> float:
    """Perplexity of the causal language model ``model`` on ``text`` (see the module docstring).

    Args:
        model: a causal LM called as ``model(input_ids=, attention_mask=)`` returning ``.logits`` ``[batch, tokens,
            vocab]`` (a transformers ``...ForCausalLM``), on any device; it runs in eval mode, without gradients, and
            its mode is restored.
        tokenizer: a transformers tokenizer (``tokenizer(text)["input_ids"]``; its ``pad_token_id``, else its
            ``eos_token_id``, else 0 pads, always masked out).
        text: one text, or a list of texts scored separately and pooled.
        seq_len: tokens per window (default: the model's ``max_position_embeddings`` / ``n_positions``, at most 1024).
        stride: tokens the window moves by (default ``seq_len``), at most ``seq_len``.
        batch_size: windows per forward pass.

    Returns:
        ``exp(mean negative log-likelihood per predicted token)``, a float >= 1.

    Raises:
        TypeError: ``text`` is neither a string nor a list of strings.
        ValueError: bad sizes, ``seq_len`` beyond the model's positions, or a text with fewer than 2 tokens in all.
    """
    fn = "perplexity()"
    if isinstance(text, str):
        texts = [text]
    elif isinstance(text, (list, tuple)) and all(isinstance(t, str) for t in text):
        texts = list(text)
    else:
        raise TypeError(f"{fn}: expected text as a string or a list of strings, got {type(text).__name__}")
    limit = _max_positions(model)
    seq_len = _positive(fn, "seq_len", seq_len if seq_len is not None else min(limit or 1024, 1024))
    if limit is not None and seq_len > limit:
        raise ValueError(f"{fn}: expected seq_len <= {limit} (the model's positions), got {seq_len}")
    stride = _positive(fn, "stride", stride if stride is not None else seq_len)
    if stride > seq_len:
        raise ValueError(f"{fn}: expected stride <= seq_len ({seq_len}), got {stride}")
    batch_size = _positive(fn, "batch_size", batch_size)
    windows = [w for t in texts for w in token_windows(list(tokenizer(t)["input_ids"]), seq_len, stride)]
    if not windows:
        raise ValueError(f"{fn}: the text holds fewer than 2 tokens; there is nothing to predict")
    pad = next((p for p in (getattr(tokenizer, "pad_token_id", None), getattr(tokenizer, "eos_token_id", None))
                if isinstance(p, int)), 0)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                batch = windows[start:start + batch_size]
                width = max(len(ids) for ids, _ in batch)
                input_ids = torch.full((len(batch), width), pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                labels = torch.full((len(batch), width), -100, dtype=torch.long)
                for row, (ids, predicted) in enumerate(batch):
                    input_ids[row, :len(ids)] = torch.tensor(ids)
                    mask[row, :len(ids)] = 1
                    labels[row, len(ids) - predicted:len(ids)] = torch.tensor(ids[len(ids) - predicted:])
                logits = model(input_ids=input_ids.to(device), attention_mask=mask.to(device)).logits
                target = labels[:, 1:].to(device)
                nll += float(F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.shape[-1]), target.reshape(-1),
                                             ignore_index=-100, reduction="sum"))
                count += int((target != -100).sum())
    finally:
        model.train(was_training)
    return math.exp(nll / count)
