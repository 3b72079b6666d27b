"""Accuracy and output fidelity of 2:4 pruning per importance criterion, on the CPU
(:mod:`sparsekernels.benchmarks.pruning_quality`).

    pytest benchmarks/bench_pruning_quality.py                              # full: minutes
    SPARSEKERNELS_BENCH_QUICK=1 pytest benchmarks/bench_pruning_quality.py  # smaller model, fewer seeds

Writes ``pruning_quality[_quick].{json,md}`` under ``benchmarks/results/cpu/``. The same from the command line:
``sparsekernels bench pruning-quality [--quick]``.
"""
from sparsekernels.benchmarks.pruning_quality import CRITERIA, run_pruning_quality


def test_pruning_quality(benchmark, bench_quick, cpu_results_out):
    result, json_path, md_path = benchmark.pedantic(
        run_pruning_quality, kwargs={"quick": bench_quick, "out_dir": cpu_results_out}, rounds=1, iterations=1)
    digits, transformer = result["digits"], result["transformer"]
    assert [r["criterion"] for r in digits["rows"]] == list(CRITERIA)
    for row in digits["rows"]:
        benchmark.extra_info[f"{row['criterion']} fine-tuned - dense"] = round(row["finetuned_minus_dense"], 2)
        assert abs(row["overall_sparsity"] - 0.5) < 1e-9
    benchmark.extra_info.update({f"{c} output error": round(v, 4) for c, v in transformer["mean"].items()})
    assert json_path.is_file() and md_path.read_text().startswith("# Pruning quality")
