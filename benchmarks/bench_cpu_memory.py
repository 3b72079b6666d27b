"""Resident memory of a 2:4 SparseLinear on the CPU against nn.Linear (:mod:`sparsekernels.benchmarks.cpu_memory`).

    pytest benchmarks/bench_cpu_memory.py                              # 1024x1024, 4096x4096, 4096x14336
    SPARSEKERNELS_BENCH_QUICK=1 pytest benchmarks/bench_cpu_memory.py  # small layers

Writes ``cpu_memory[_quick].{json,md}`` under ``benchmarks/results/cpu/``. The same from the command line:
``sparsekernels bench memory [--quick]``.
"""
from sparsekernels.benchmarks.cpu_memory import run_cpu_memory
from sparsekernels.benchmarks.report import read_report


def test_cpu_memory(benchmark, bench_quick, cpu_results_out):
    files = benchmark.pedantic(run_cpu_memory, kwargs={"quick": bench_quick, "out_dir": cpu_results_out,
                                                       "progress": False}, rounds=1, iterations=1)
    rows = read_report(files.json)["rows"]
    for row in rows:
        benchmark.extra_info[f"{row['layer']} tensors ratio"] = round(row["tensor_mb_ratio"], 3)
        benchmark.extra_info[f"{row['layer']} RSS ratio"] = row["rss_mb_ratio"] and round(row["rss_mb_ratio"], 3)
        # one weight copy on the CPU: the module holds what nn.Linear holds, nothing cached beside it
        assert row["tensor_mb_ratio"] <= 1.0 + 1e-9, row
        assert row["sparse_state_dict_mb"] < 0.6 * row["dense_tensor_mb"], row  # the checkpoint stays compressed
        assert row["dense_ms"] > 0 and row["sparse_ms"] > 0
