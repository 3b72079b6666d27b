"""Filter-pruned ResNet-50 at 2x fewer MACs against dense (:mod:`sparsekernels.benchmarks.channel_latency`).

    pytest benchmarks/bench_channel_latency.py                              # CPU: batch 8, 224x224, fp32
    SPARSEKERNELS_BENCH_QUICK=1 pytest benchmarks/bench_channel_latency.py  # fewer search steps and rounds
    SPARSEKERNELS_BENCH_DEVICE=cuda pytest benchmarks/bench_channel_latency.py

Writes ``channel_latency[_quick].{json,md}`` under ``benchmarks/results/<device>/``. The same from the command
line: ``sparsekernels bench channel-latency [--quick]``.
"""
from sparsekernels.benchmarks.channel_latency import run_channel_latency
from sparsekernels.benchmarks.report import read_report


def test_channel_latency(benchmark, bench_device, bench_dtype, bench_quick, results_out):
    files = benchmark.pedantic(run_channel_latency, args=(bench_device,),
                               kwargs={"dtype": bench_dtype, "quick": bench_quick, "out_dir": results_out,
                                       "progress": False}, rounds=1, iterations=1)
    dense, pruned = read_report(files.json)["rows"]
    benchmark.extra_info.update(mac_reduction=pruned["mac_reduction"], speedup=pruned["speedup"])
    assert 1.8 < pruned["mac_reduction"] < 2.2, pruned  # the search found the 2x target
    assert dense["median_ms"] > 0 and pruned["median_ms"] > 0
