"""Model suites under pytest-benchmark: ResNet-50, a BERT-base-sized encoder, LLaMA-sized projections, and the
demo. Each test runs one suite (see :mod:`sparsekernels.benchmarks.models`), writes its table (JSON + Markdown) and
plots under ``benchmarks/results/<device>/`` and checks that every variant was built and measured.

    pytest benchmarks/bench_models.py                              # full sizes (GPU: minutes; CPU: longer)
    SPARSEKERNELS_BENCH_QUICK=1 pytest benchmarks/bench_models.py  # about a minute on a CPU

The same suites run from the command line: ``sparsekernels bench models [--quick]``.
"""
import pytest

from sparsekernels.benchmarks import models


@pytest.fixture(scope="module")
def suite_results():
    return {}


@pytest.mark.parametrize("name", list(models.SUITES))
def test_model_suite(name, benchmark, bench_device, bench_dtype, bench_quick, results_out, suite_results):
    run = models.SUITES[name]
    result = benchmark.pedantic(run, args=(bench_device, bench_dtype), kwargs={"quick": bench_quick, "progress": False},
                                rounds=1, iterations=1)
    suite_results[name] = result
    path = models.write_suite(result, results_out, bench_device, suffix="_quick" if bench_quick else "")
    benchmark.extra_info["results"] = str(path)
    failed = [(r.get("variant") or r.get("layer"), r["status"]) for r in result.rows if r["status"].startswith("failed")]
    assert not failed, f"variants that could not be built or run: {failed}"
    for row in result.rows:
        assert row["latency_ms"] > 0 and row["speedup"] > 0
        benchmark.extra_info[f"{row.get('variant') or row.get('layer')} @{row.get('batch') or row.get('tokens')}"] = (
            round(row["speedup"], 3))


def test_model_suite_plots(suite_results, bench_device, bench_quick, results_out):
    if not suite_results:
        pytest.skip("no suite ran in this session (select them together with this test)")
    paths = models.plot_suites(list(suite_results.values()), results_out, bench_device, prefix="models_",
                               suffix="_quick" if bench_quick else "")
    assert paths and all(p.stat().st_size > 10_000 for p in paths)


def test_demo(benchmark, bench_device, bench_quick, results_out):
    """The demo's table (accuracy beside speed) on the bench device."""
    from sparsekernels.app.demo import DemoConfig, run_demo

    config = DemoConfig(epochs=3, width=16, batch=64) if bench_quick else DemoConfig()
    result = benchmark.pedantic(run_demo, args=(config,), kwargs={"device": bench_device, "out_dir": results_out,
                                                                  "progress": False}, rounds=1, iterations=1)
    rows = {r["variant"]: r for r in result.rows}
    assert len(rows) == 4 and all(r["latency_ms"] > 0 for r in rows.values())
