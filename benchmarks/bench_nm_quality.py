"""One-shot 2:4 quality of every criterion, with and without channel permutation, on the CPU
(:mod:`sparsekernels.benchmarks.nm_quality`): a pretrained sentence encoder, the digits CNN and a Llama-style model.

    pytest benchmarks/bench_nm_quality.py                              # full: tens of minutes on one thread
    SPARSEKERNELS_BENCH_QUICK=1 pytest benchmarks/bench_nm_quality.py  # fewer sentences, shorter searches

Writes ``nm_quality[_quick].{json,md}`` under ``benchmarks/results/cpu/``. The same from the command line:
``sparsekernels bench nm-quality [--quick]``.
"""
from sparsekernels.benchmarks.nm_quality import run_nm_quality


def test_nm_quality(benchmark, bench_quick, cpu_results_out):
    rows, meta, files = benchmark.pedantic(
        run_nm_quality, kwargs={"quick": bench_quick, "out_dir": cpu_results_out}, rounds=1, iterations=1)
    assert {r["model"] for r in rows} >= {"digits"} and files.json.is_file()
    for row in rows:
        benchmark.extra_info[f"{row['model']} {row['criterion']} {row['permutation']}"] = round(row["value"], 4)
