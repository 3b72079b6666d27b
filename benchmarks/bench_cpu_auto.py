"""The CPU design study behind backend="auto" for SparseConv2d and BlockSparseLinear
(:mod:`sparsekernels.benchmarks.cpu_auto`).

    pytest benchmarks/bench_cpu_auto.py                              # 6 ResNet-50 convs, 24 block-sparse cases
    SPARSEKERNELS_BENCH_QUICK=1 pytest benchmarks/bench_cpu_auto.py  # 2 convs, 12 block-sparse cases

Writes ``sparse24_conv2d_cpu_auto[_quick].{json,md}`` and ``blocksparse_cpu_auto[_quick].{json,md}`` under
``benchmarks/results/cpu/``. The same from the command line: ``sparsekernels bench cpu-auto [--quick]``.
"""
from sparsekernels.benchmarks.cpu_auto import run_cpu_auto
from sparsekernels.benchmarks.report import read_report


def test_cpu_auto(benchmark, bench_quick, cpu_results_out):
    conv, block = benchmark.pedantic(run_cpu_auto, kwargs={"quick": bench_quick, "out_dir": cpu_results_out,
                                                           "progress": False}, rounds=1, iterations=1)
    conv_rows, block_rows = read_report(conv.json)["rows"], read_report(block.json)["rows"]
    benchmark.extra_info["worst conv auto / dense"] = round(max(r["auto_vs_dense"] for r in conv_rows), 3)
    assert conv_rows and all(r["auto_ms"] > 0 and r["conv2d_ms"] > 0 for r in conv_rows)
    assert block_rows and all(r["auto_speedup"] > 0 for r in block_rows)
