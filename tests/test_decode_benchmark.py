"""The end-to-end decode benchmark (sparsekernels.benchmarks.decode) on its small CPU model: both models generate,
the 2:4 model computes the masked dense model's logits, and the report is written."""
import json

import pytest
import torch

pytest.importorskip("transformers")

from sparsekernels.benchmarks.decode import run_decode  # noqa: E402


def test_decode_quick_on_the_cpu(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows, files = run_decode("cpu", quick=True, out_dir=tmp_path)
    finally:
        torch.set_num_threads(threads)
    assert [(r["batch"], r["model"]) for r in rows] == [(1, "dense"), (1, "2:4")]
    dense, sparse = rows
    assert dense["tokens_per_s"] > 0 and sparse["tokens_per_s"] > 0 and dense["speedup_vs_dense"] == 1.0
    assert sparse["logits_rel_err"] == 0.0  # on the CPU the swapped layers run the dense op on their one copy
    assert sparse["weight_mb"] < dense["weight_mb"]  # the state dict is compressed
    report = json.loads(files.json.read_text())
    assert report["meta"]["swapped"] == 14 and files.markdown.read_text().startswith("# End-to-end decode")
