"""Benchmark machinery shared by ``benchmarks/`` (pytest-benchmark files) and ``sparsekernels bench``:
timers, environment stamps, suites and report writers."""
