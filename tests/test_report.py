"""Report writers (JSON + Markdown + PNG), the README generator, the GPU suite's planning and file count, the
measurements, and the single-purpose benchmarks on tiny sizes."""
import json
import math

import pytest
import torch

from sparsekernels.benchmarks.report import (
    SCHEMA,
    Column,
    format_value,
    markdown_table,
    plot_lines,
    read_report,
    results_dir,
    write_report,
)

COLS = (("name", "model"), ("ms", "latency (ms)", ".2f"), Column("n", "count", ",d"))


def test_write_report_round_trip(tmp_path):
    rows = [{"name": "dense", "ms": 1.23456, "n": 12345, "extra": [1, 2]}, {"name": "a|b", "ms": float("nan"), "n": None}]
    files = write_report("demo_x", rows, COLS, out_dir=tmp_path / "cpu", device="cpu", title="T", notes="why",
                         meta={"dtype": torch.float16})
    data = read_report(files.json)
    assert data["schema"] == SCHEMA and data["name"] == "demo_x" and data["title"] == "T"
    assert data["rows"][0]["extra"] == [1, 2]           # every row key kept, not only the shown columns
    assert data["rows"][1]["ms"] is None                 # NaN written as null (valid JSON)
    assert data["meta"]["dtype"] == "torch.float16"
    env = data["environment"]
    assert env["device_type"] == "cpu" and env["torch"] == torch.__version__ and "date" in env
    md = files.markdown.read_text()
    assert md.startswith("# T\n") and "device: CPU" in md
    assert "| dense | 1.23 | 12,345 |" in md
    assert "| a\\|b | – | – |" in md                     # pipes escaped, missing values shown as a dash
    assert "why" in md


def test_markdown_table_and_formats():
    table = markdown_table([{"a": 1.0, "b": True}], [("a", "A", ".1f"), ("b", "B")])
    assert table.splitlines() == ["| A | B |", "|---|---|", "| 1.0 | yes |"]
    assert format_value(3.0, ",d") == "3"               # an int format given a float still formats
    assert format_value(float("inf"), ".2f") == "inf"
    assert format_value(None) == "–"


@pytest.mark.parametrize("name", ["", "a/b", "../x", "a b"])
def test_write_report_rejects_bad_names(tmp_path, name):
    with pytest.raises(ValueError, match="file stem"):
        write_report(name, [], COLS, out_dir=tmp_path)


def test_write_report_rejects_bad_columns(tmp_path):
    with pytest.raises(ValueError, match="at least one column"):
        write_report("x", [], (), out_dir=tmp_path)
    with pytest.raises(TypeError, match="Column"):
        write_report("x", [], [42], out_dir=tmp_path)


def test_read_report_rejects_other_json(tmp_path):
    p = tmp_path / "other.json"
    p.write_text(json.dumps({"rows": []}))
    with pytest.raises(ValueError, match="schema"):
        read_report(p)


def test_results_dir_uses_device_slug(tmp_path):
    assert results_dir("cpu", tmp_path) == tmp_path / "cpu"
    assert results_dir("cpu").name == "cpu" and results_dir("cpu").parent.name == "results"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plot_lines_writes_png(tmp_path):
    p = plot_lines(tmp_path / "sub" / "p.png", {"dense": [(1, 2.0), (16, 2.5)], "2:4": [(1, 1.1), (16, None)]},
                   title="t", xlabel="tokens", ylabel="ms", logx=True, hline=1.0, hline_label="dense")
    w, h = _png_size(p)
    assert w > 300 and h > 200


def test_plot_lines_needs_a_point(tmp_path):
    with pytest.raises(ValueError, match="finite point"):
        plot_lines(tmp_path / "p.png", {"a": [(1, None), (2, math.nan)]}, title="t", xlabel="x", ylabel="y")


# ------------------------------------------------------------------------------------------ README generator


def _readme(tmp_path, body="old"):
    p = tmp_path / "README.md"
    p.write_text(f"# x\n\nintro\n\n<!-- results:start -->\n{body}\n<!-- results:end -->\n\ntail\n")
    return p


def test_readme_section_matches_files(tmp_path):
    from sparsekernels.benchmarks.readme import update_readme

    readme = _readme(tmp_path)
    root = tmp_path / "benchmarks" / "results"
    write_report("demo", [{"name": "dense", "ms": 2.5, "n": 3}], COLS, out_dir=root / "cpu", title="Demo table")
    (root / "cpu" / "legacy.json").write_text(json.dumps({"rows": []}))
    assert update_readme(readme, root) is True
    text = readme.read_text()
    assert text.startswith("# x\n\nintro\n") and text.endswith("<!-- results:end -->\n\ntail\n")
    assert "old" not in text
    assert "#### Demo table" in text and "Source: `benchmarks/results/cpu/demo.json`" in text
    assert "| dense | 2.50 | 3 |" in text
    assert "- [`legacy.json`](benchmarks/results/cpu/legacy.json)" in text
    write_report("design_study", [{"name": "x"}], COLS, out_dir=root / "cpu", title="A side study")
    update_readme(readme, root)
    text = readme.read_text()
    assert "- [`design_study.json`](benchmarks/results/cpu/design_study.json): A side study" in text
    assert "#### A side study" not in text  # not a headline result: a link, not a table
    write_report("models_bert_quick", [{"name": "q"}], COLS, out_dir=root / "cpu", title="Quick BERT")
    update_readme(readme, root)
    assert "#### Quick BERT" in readme.read_text()  # a quick run alone is shown
    write_report("models_bert", [{"name": "f"}], COLS, out_dir=root / "cpu", title="Full BERT")
    update_readme(readme, root)
    text = readme.read_text()
    assert "#### Full BERT" in text and "#### Quick BERT" not in text and "models_bert_quick.json`](" in text
    # a headline result in another format: its own Markdown page, headings demoted, links re-rooted
    (root / "cpu" / "pruning_quality.json").write_text(json.dumps({"rows": [1]}))
    (root / "cpu" / "pruning_quality.md").write_text("# Quality\n\n| a |\n|---|\n| 1 |\n\n![p](q.png)\n")
    update_readme(readme, root)
    text = readme.read_text()
    assert "#### Quality" in text and "![p](benchmarks/results/cpu/q.png)" in text
    assert "Source: `benchmarks/results/cpu/pruning_quality.json` (and `pruning_quality.md`)" in text
    # idempotent, and --check sees it is current
    assert update_readme(readme, root) is False
    assert update_readme(readme, root, check=True) is False
    write_report("demo", [{"name": "dense", "ms": 9.0, "n": 3}], COLS, out_dir=root / "cpu", title="Demo table")
    assert update_readme(readme, root, check=True) is True
    assert "| dense | 2.50 | 3 |" in readme.read_text()  # check mode does not write
    update_readme(readme, root)


def test_readme_without_markers_is_an_error(tmp_path):
    from sparsekernels.benchmarks.readme import update_readme

    p = tmp_path / "README.md"
    p.write_text("# nothing\n<!-- results:end -->\n<!-- results:start -->\n")
    with pytest.raises(ValueError, match="results:start"):
        update_readme(p, tmp_path)


def test_readme_main_check_exit_codes(tmp_path, capsys):
    from sparsekernels.benchmarks.readme import main

    readme = _readme(tmp_path)
    root = tmp_path / "res"
    assert main(["--readme", str(readme), "--results", str(root), "--check"]) == 1
    assert main(["--readme", str(readme), "--results", str(root)]) == 0
    assert main(["--readme", str(readme), "--results", str(root), "--check"]) == 0
    assert "(no results yet)" in readme.read_text()


# ------------------------------------------------------------------------------------------------ GPU suite


def _fake_step(name, planned, rows, clock, cost):
    from sparsekernels.benchmarks.gpu_suite import GpuStep, StepOutput

    def run(device, progress):
        clock.t += cost
        section = {"name": name, "title": name.upper(), "rows": rows, "columns": [("x", "x"), ("y", "y", ".1f")]}
        spec = dict(series={name: [(r["x"], r["y"]) for r in rows]}, title=name, xlabel="x", ylabel="y")
        return StepOutput((section,), ((f"gpu_{name}", spec),))

    return GpuStep(name, planned, run)


class _Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_plan_next():
    from sparsekernels.benchmarks.gpu_suite import GpuStep, plan_next

    step = GpuStep("s", 100.0, lambda d, p: None)
    assert plan_next(step, 0.0, 200.0) is None
    reason = plan_next(step, 100.0, 200.0)
    assert reason.startswith("skipped") and "100 s of the 200 s budget left" in reason


def test_gpu_suite_respects_budget_and_file_limit(tmp_path):
    from sparsekernels.benchmarks.gpu_suite import MAX_FILES, run_gpu_suite

    clock = _Clock()
    rows = [{"x": 1, "y": 2.0}, {"x": 2, "y": 3.0}]
    steps = [_fake_step(f"s{i}", 10.0, rows, clock, cost=30.0) for i in range(12)]

    def broken(device, progress):
        raise RuntimeError("kernel exploded")

    from sparsekernels.benchmarks.gpu_suite import GpuStep

    steps.insert(1, GpuStep("broken", 1.0, broken))
    out = tmp_path / "gpu"
    result = run_gpu_suite(out, device="cpu", budget_s=100.0, steps=steps, progress=False, stream=open("/dev/null", "w"),
                           clock=clock)
    # s0 (t=30), broken, s1 (60), s2 (90); s3 would need 11.5 s with 10 left -> skipped, like every later one
    assert list(result.ran) == ["s0", "s1", "s2"]
    assert result.skipped["broken"].startswith("failed: RuntimeError: kernel exploded")
    assert all(result.skipped[f"s{i}"].startswith("skipped") for i in range(3, 12))
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= MAX_FILES and all((out / f).is_file() for f in files)  # flat, bounded
    assert {"gpu_suite.json", "gpu_suite.md"} <= set(files)
    doc = json.loads((out / "gpu_suite.json").read_text())
    assert [s["name"] for s in doc["sections"]] == ["s0", "s1", "s2"]
    assert doc["sections"][0]["rows"] == rows and doc["budget_s"] == 100.0
    md = (out / "gpu_suite.md").read_text()
    assert "## S0" in md and "kernel exploded" in md


def test_gpu_suite_rejects_bad_budget(tmp_path):
    from sparsekernels.benchmarks.gpu_suite import run_gpu_suite

    with pytest.raises(ValueError, match="budget_s > 0"):
        run_gpu_suite(tmp_path, device="cpu", budget_s=0, steps=[])


def test_default_gpu_plan_fits_nine_minutes():
    from sparsekernels.benchmarks.gpu_suite import default_steps

    steps = default_steps()
    assert [s.name for s in steps][:2] == ["kernels_fp16", "llama"]
    assert sum(1.15 * s.planned_s for s in steps) <= 540.0


def test_gpu_suite_watchdog_interrupts_an_overrunning_step(tmp_path):
    import time

    from sparsekernels.benchmarks.gpu_suite import GpuStep, run_gpu_suite

    def hangs(device, progress):
        end = time.monotonic() + 20
        while time.monotonic() < end:
            time.sleep(0.05)

    t0 = time.monotonic()
    result = run_gpu_suite(tmp_path, device="cpu", budget_s=1.0, grace_s=0.5,
                           steps=[GpuStep("hangs", 0.1, hangs), GpuStep("after", 0.1, hangs)],
                           progress=False, stream=open("/dev/null", "w"))
    assert time.monotonic() - t0 < 10
    assert result.skipped["hangs"].startswith("failed: StepTimeout")
    assert result.skipped["after"].startswith("skipped")
    assert (tmp_path / "gpu_suite.json").is_file()


def test_readme_renders_gpu_suite_sections(tmp_path):
    from sparsekernels.benchmarks.gpu_suite import run_gpu_suite
    from sparsekernels.benchmarks.readme import render_results_section

    clock = _Clock()
    out = tmp_path / "benchmarks" / "results" / "nvidia-h100"
    run_gpu_suite(out, device="cpu", budget_s=50.0, steps=[_fake_step("k", 1.0, [{"x": 1, "y": 1.5}], clock, 1.0),
                                                             _fake_step("late", 100.0, [], clock, 1.0)],
                  progress=False, stream=open("/dev/null", "w"), clock=clock)
    text = render_results_section(tmp_path / "benchmarks" / "results", tmp_path)
    assert "#### K" in text and "| 1 | 1.5 |" in text and "Not run: late: skipped" in text


# ------------------------------------------------------------------------------------------ measurements


def test_peak_table_and_roofline():
    from sparsekernels.benchmarks.measure import peak_for_name, roofline_columns

    assert peak_for_name("NVIDIA H100 80GB HBM3").name == "H100 SXM"
    assert peak_for_name("NVIDIA H200").tbps == 4.8
    assert peak_for_name("NVIDIA A100-SXM4-80GB").tflops_fp16 == 312.0
    assert peak_for_name("Tesla T4") is None
    h100 = peak_for_name("H100")
    compute = roofline_columns(2e12, 1e9, 4.0, h100)          # intensity 2000 FLOP/B: compute-bound
    assert compute["tflops"] == pytest.approx(500.0) and compute["gbps"] == pytest.approx(250.0)
    assert compute["roofline_pct"] == pytest.approx(100 * 500 / 989)
    memory = roofline_columns(1e9, 1e9, 1.0, h100)            # intensity 1 FLOP/B: bandwidth-bound
    assert memory["roofline_pct"] == pytest.approx(100 * 1e12 / 3.35e12)
    assert roofline_columns(1e9, 1e9, 1.0, None)["roofline_pct"] is None  # unknown device: no roofline


def test_count_macs_nonzero_and_stored_bytes():
    from torch import nn

    from sparsekernels.benchmarks.measure import count_macs, nonzero_params, stored_bytes

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 4), nn.ReLU(), nn.Linear(4, 3, bias=False))
    macs = count_macs(model, torch.randn(3, 8))
    assert macs.total == 3 * (8 * 4 + 4 * 3) and macs.effective == macs.total
    with torch.no_grad():
        model[0].weight.view(4, 2, 4)[..., :2] = 0  # 2:4: half of the first layer's weights
    macs = count_macs(model, torch.randn(3, 8))
    assert macs.per_layer["0"] == (96, 48) and macs.effective == 48 + 36
    assert nonzero_params(model) == 16 + 4 + 12
    assert stored_bytes(model) == (32 + 4 + 12) * 4
    tied = nn.Sequential(nn.Linear(4, 4, bias=False), nn.Linear(4, 4, bias=False))
    tied[1].weight = tied[0].weight  # tied weights are stored once
    assert stored_bytes(tied) == 16 * 4


def test_gpu_suite_real_steps_tiny_on_cpu(tmp_path, monkeypatch):
    """The real kernel-sweep and LLaMA steps, shrunk to toy sizes, through the suite's glue and writers."""
    from sparsekernels.benchmarks import kernels, models
    from sparsekernels.benchmarks.gpu_suite import MAX_FILES, default_steps, run_gpu_suite

    monkeypatch.setattr(kernels, "TOKENS", (1, 4))
    monkeypatch.setattr(kernels, "LAYERS", ((64, 32),))
    tiny = models.SuiteSizes(models.ResNetSizes("resnet50", 1, 32, (0.3,)), models.BertSizes(1, 8, (1,)),
                             models.LlamaSizes((("tiny 64->32", 64, 32),), (1, 8)), rounds=1, rep=1)
    monkeypatch.setattr(models, "suite_sizes", lambda device, quick: tiny)
    steps = {s.name: s for s in default_steps()}
    result = run_gpu_suite(tmp_path, device="cpu", budget_s=300.0, steps=[steps["kernels_fp16"], steps["llama"]],
                           progress=False, stream=open("/dev/null", "w"))
    assert list(result.ran) == ["kernels_fp16", "llama"], result.skipped
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["gpu_kernels_speedup.png", "gpu_latency_vs_tokens.png", "gpu_suite.json", "gpu_suite.md"]
    assert len(names) <= MAX_FILES
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    kernels, llama = doc["sections"]
    assert kernels["name"] == "kernels_linear24_float16" and {r["tokens"] for r in kernels["rows"]} == {1, 4}
    assert [r["tokens"] for r in llama["rows"]] == [1, 8] and all(r["dtype"] == "fp16" for r in llama["rows"])


def test_time_rounds_and_its_reductions():
    from sparsekernels.benchmarks.measure import least_disturbed, median_of_rounds, middle_round, time_rounds
    from sparsekernels.timing import Timing

    calls = []
    per = time_rounds({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, rounds=3, warmup=0, rep=1,
                      max_time_s=0.0)
    assert [len(ts) for ts in per.values()] == [3, 3] and calls[:2] == ["a", "b"]  # round-robin, a before b
    ts = [Timing(m, m - 1, m + 1, m - 2, 5) for m in (3.0, 1.0, 2.0, 9.0)]
    assert least_disturbed(ts).median_ms == 1.0
    assert middle_round(ts).median_ms == 3.0  # the upper middle of an even count
    combined = median_of_rounds(ts)
    assert (combined.median_ms, combined.p25_ms, combined.min_ms, combined.n) == (2.5, 1.5, -1.0, 20)
    with pytest.raises(ValueError, match="rounds >= 1"):
        time_rounds({"a": lambda: None}, rounds=0)


def test_resident_bytes_counts_cached_values_and_storages_once():
    from torch import nn

    from sparsekernels.benchmarks.measure import add_roofline, relative_error, resident_bytes
    from sparsekernels.ops.cache import cached

    layer = nn.Linear(8, 4)  # 32 + 4 floats
    layer.register_buffer("view_of_weight", layer.weight.detach()[:2])  # shares the weight's storage
    assert resident_bytes(layer) == (32 + 4) * 4
    copy = cached(layer.weight, "test_dense_copy", (), lambda: torch.zeros(3, 5))
    assert resident_bytes(layer) == (32 + 4 + 15) * 4
    del copy
    rows = [{"median_ms": 1.0, "tflop_per_s": 1.0, "gb_per_s": 1.0}]
    add_roofline(rows, "cpu")
    assert rows[0]["roofline_pct"] is None  # no known peak on a CPU
    assert relative_error(torch.ones(4), torch.ones(4)) == 0.0
    assert relative_error(torch.ones(4), torch.zeros(4)) > 1e20  # a zero reference does not divide by zero


def test_cpu_memory_tiny():
    from sparsekernels.benchmarks.cpu_memory import MEMORY_COLUMNS, measure_cpu_memory

    (row,) = measure_cpu_memory(((64, 32),), repeats=1, rounds=1, rep=1, progress=False)
    assert row["layer"] == "64x32" and row["dense_tensor_mb"] == pytest.approx((64 * 32 + 32) * 4 / 1e6)
    assert row["tensor_mb_ratio"] == 1.0  # the CPU keeps one weight copy: what nn.Linear keeps
    assert row["sparse_state_dict_mb"] < row["dense_tensor_mb"]  # the state dict stays compressed
    assert row["dense_rss_mb"] is not None and row["sparse_rss_mb"] is not None
    assert row["dense_ms"] > 0 and row["sparse_ms"] > 0 and row["ms_ratio"] > 0
    assert all(c[0] in row for c in MEMORY_COLUMNS)


def test_benchmark_argument_errors():
    from sparsekernels.benchmarks.channel_latency import run_channel_latency
    from sparsekernels.benchmarks.cpu_auto import run_cpu_auto
    from sparsekernels.benchmarks.cpu_memory import build_layer, measure_cpu_memory
    from sparsekernels.benchmarks.pruning_quality import run_pruning_quality

    with pytest.raises(ValueError, match="kind in"):
        build_layer("Conv2d", 8, 8)
    with pytest.raises(ValueError, match="multiple of 4, got 6"):
        build_layer("SparseLinear", 6, 8)
    with pytest.raises(ValueError, match="repeats, rounds and rep >= 1"):
        measure_cpu_memory(((8, 8),), repeats=0)
    with pytest.raises(ValueError, match="only to be None, 'conv' or 'block'"):
        run_cpu_auto(only="linear")
    with pytest.raises(ValueError, match="threads, rounds and rep >= 1"):
        run_cpu_auto(rounds=0)
    with pytest.raises(ValueError, match="target > 1"):
        run_channel_latency("cpu", target=1.0)
    with pytest.raises(ValueError, match="threads >= 1"):
        run_pruning_quality(threads=0)
