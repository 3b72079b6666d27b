"""Pruning at LLM scale: 2:4 one-shot time, peak memory and fidelity against depth, ours vs llm-compressor, on the
CPU (:mod:`sparsekernels.benchmarks.llm_scaling`).

    pytest benchmarks/bench_llm_scaling.py                              # 4, 8, 16, 32 layers: tens of minutes
    SPARSEKERNELS_BENCH_QUICK=1 pytest benchmarks/bench_llm_scaling.py  # 2, 4, 8 layers of a smaller model

Writes ``llm_scaling[_quick].{json,md}`` under ``benchmarks/results/cpu/``. The same from the command line:
``python -m sparsekernels.benchmarks.llm_scaling [--quick] [--out DIR]``.
"""
from sparsekernels.benchmarks.llm_scaling import QUICK_DEPTHS, DEPTHS, run_llm_scaling


def test_llm_scaling(benchmark, bench_quick, cpu_results_out):
    rows, files = benchmark.pedantic(
        run_llm_scaling, kwargs={"quick": bench_quick, "out_dir": cpu_results_out}, rounds=1, iterations=1)
    depths = QUICK_DEPTHS if bench_quick else DEPTHS
    ours = {r["layers"]: r for r in rows if r["method"] == "ours" and r["criterion"] == "sparsegpt"}
    assert sorted(ours) == list(depths)
    for row in ours.values():
        assert row["layers_24"] == row["layers_expected"] and row["lm_head_dense"]
    benchmark.extra_info["time growth, ours sparsegpt"] = round(ours[depths[-1]]["seconds"] / ours[depths[0]]["seconds"], 2)
    # linear in depth: 4x the layers, at most ~4.5x the time; working memory flat
    lo, hi = depths[0], depths[-2] if len(depths) > 3 else depths[-1]
    assert ours[hi]["seconds"] / ours[lo]["seconds"] <= 1.15 * hi / lo, ours
    assert ours[depths[-1]]["working_mb"] <= 1.5 * ours[depths[0]]["working_mb"] + 5, ours
    assert files.json.is_file() and files.markdown.read_text().startswith("# Pruning at LLM scale")
