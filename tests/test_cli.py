"""The ``sparsekernels`` command line: help, every subcommand on tiny inputs, every bad argument (exit 2,
one line)."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from sparsekernels.cli import main

REPO = Path(__file__).resolve().parents[1]


def _run(argv, capsys):
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    try:
        code = main(argv)
    except SystemExit as e:  # argparse exits itself on errors and --help / --version
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def _one_line_error(err: str, command: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, f"expected a one-line error, got {err!r}"
    assert lines[0].startswith(f"sparsekernels {command}: error: ") or lines[0].startswith("sparsekernels: error: "), lines
    return lines[0]


# ------------------------------------------------------------------------------------------------ help


def test_module_entry_point_from_source_tree():
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "sparsekernels", "--help"], cwd="/", env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    for command in ("demo", "prune", "bench"):
        assert command in proc.stdout


@pytest.mark.parametrize("command", ["demo", "prune", "bench"])
def test_subcommand_help(command, capsys):
    code, out, _ = _run([command, "--help"], capsys)
    assert code == 0 and f"usage: sparsekernels {command}" in out


def test_no_command_prints_help_and_version(capsys):
    code, out, _ = _run([], capsys)
    assert code == 0 and "COMMAND" in out
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.startswith("sparsekernels ")


# ---------------------------------------------------------------------------------------------- bad args


@pytest.mark.parametrize(
    "argv, command, needle",
    [
        (["frobnicate"], "", "invalid choice"),
        (["demo", "--epochs", "0"], "demo", "an integer in 1..1,000"),
        (["demo", "--width", "x"], "demo", "an integer in 1..512"),
        (["demo", "--ratio", "1.5"], "demo", "in (0, 1)"),
        (["demo", "--seed", "-1"], "demo", ">= 0"),
        (["demo", "--device", "tpu"], "demo", "--device"),
        (["demo", "--bogus"], "", "unrecognized arguments"),
        (["prune", "resnet18", "--out", "x.safetensors"], "prune", "--pattern"),
        (["prune", "resnet18", "--pattern", "4:2", "--out", "x.safetensors"], "prune", "N:M"),
        (["prune", "resnet18", "--pattern", "2:4"], "prune", "--out"),
        (["prune", "resnet18", "--pattern", "2:4", "--ratio", "0.3", "--out", "x.safetensors"], "prune", "contradicts"),
        (["prune", "resnet18", "--pattern", "2:4", "--importance", "taylor", "--out", "x.safetensors"], "prune", "--importance"),
        (["prune", "resnet18", "--pattern", "channels", "--importance", "wanda", "--out", "x.safetensors"], "prune", "--importance"),
        (["prune", "resnet18", "--pattern", "2:4", "--round-to", "8", "--out", "x.safetensors"], "prune", "--round-to"),
        (["prune", "resnet18", "--pattern", "2:4", "--out", "x.pt"], "prune", ".safetensors"),
        (["prune", "not_a_model_xyz", "--pattern", "2:4", "--out", "x.safetensors"], "prune", "unknown torchvision"),
        (["prune", "resnet", "--pattern", "2:4", "--out", "x.safetensors"], "prune", "did you mean"),
        (["prune", "model.pt", "--pattern", "2:4", "--out", "x.safetensors"], "prune", "no pickled files"),
        (["prune", "missing.safetensors", "--pattern", "2:4", "--out", "x.safetensors"], "prune", "--factory"),
        (["prune", "missing.safetensors", "--factory", "torch.nn:Identity", "--pattern", "2:4", "--out", "x.safetensors"],
         "prune", "does not exist"),
        (["prune", "resnet18", "--factory", "torch.nn:Identity", "--pattern", "2:4", "--out", "x.safetensors"],
         "prune", "only used with a .safetensors"),
        (["prune", "no_such_module_xyz:f", "--pattern", "2:4", "--out", "x.safetensors"], "prune", "cannot import"),
        (["prune", "torch.nn:NoSuchThing", "--pattern", "2:4", "--out", "x.safetensors"], "prune", "no attribute"),
        (["prune", "torch:float32", "--pattern", "2:4", "--out", "x.safetensors"], "prune", "not callable"),
        (["prune", "torch:randn", "--pattern", "2:4", "--out", "x.safetensors"], "prune", "failed when called"),
        (["prune", "resnet18", "--pattern", "2:4", "--input-shape", "1,a", "--out", "x.safetensors"], "prune", "shape"),
        (["prune", "resnet18", "--pattern", "2:4", "--input-shape", "1,0,3", "--out", "x.safetensors"], "prune", "shape"),
        # a stray separator or letter used to be dropped silently ("1,3,x" ran as (1, 3))
        (["prune", "resnet18", "--pattern", "2:4", "--input-shape", "1,3,x", "--out", "x.safetensors"], "prune",
         "shape of positive integers"),
        (["prune", "resnet18", "--pattern", "2:4", "--input-shape", "1,,3", "--out", "x.safetensors"], "prune",
         "shape of positive integers"),
        (["bench", "everything"], "bench", "invalid choice"),
        (["bench", "--dtype", "fp8"], "bench", "invalid choice"),
        (["bench", "--budget-s", "-1"], "bench", "positive number"),
        (["bench", "models", "--budget-s", "5"], "bench", "--budget-s only applies"),
        (["bench", "kernels", "--device", "cuda:0"] if not torch.cuda.is_available() else ["bench", "--device", "xpu:9"],
         "bench", "--device"),
        (["bench", "memory", "--device", "cuda"], "bench",
         "measures the CPU" if torch.cuda.is_available() else "no CUDA GPU"),
        (["bench", "pruning-quality", "--dtype", "fp16"], "bench", "float32 only"),
        (["bench", "cpu-auto", "--dtype", "bf16"], "bench", "float32 only"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, command, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run(argv, capsys)
    assert code == 2, (argv, out, err)
    line = _one_line_error(err, argv[0] if command else "")
    assert needle in line, line


def test_parse_shape_accepts_separators_and_rejects_stray_tokens():
    from sparsekernels.app import UsageError, parse_shape

    assert parse_shape("1,3,224,224") == (1, 3, 224, 224)
    assert parse_shape(" 2 x 3 x 5 ") == (2, 3, 5)
    assert parse_shape("1, 3, 7") == (1, 3, 7)
    assert parse_shape("4 128") == (4, 128)
    assert parse_shape("2×9") == (2, 9)
    for bad in ("1,3,x", "1,,3", "x1", "1,3,", "", "1.5,2", "1,-3", "1,0"):
        with pytest.raises(UsageError, match="shape of positive integers"):
            parse_shape(bad)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_bench_gpu_without_gpu(capsys):
    code, _, err = _run(["bench", "gpu"], capsys)
    assert code == 2 and "needs a CUDA GPU" in _one_line_error(err, "bench")


# ----------------------------------------------------------------------------------------------- prune


@pytest.fixture
def factory_module(tmp_path, monkeypatch):
    """A module ``tiny_models_cli`` with ``cnn()`` and ``mlp()`` factories, importable as ``module:function``."""
    (tmp_path / "tiny_models_cli.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def cnn():
            torch.manual_seed(1)
            return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(),
                                 nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                                 nn.Linear(16, 5))

        def mlp():
            torch.manual_seed(2)
            return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 7))

        def not_a_model():
            return 3
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    return "tiny_models_cli"


def _load(path):
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), "pt") as f:
        meta = json.loads(f.metadata()["sparsekernels.prune"])
    return load_file(str(path)), meta


def test_prune_factory_24(factory_module, tmp_path, capsys):
    out = tmp_path / "mlp24.safetensors"
    code, stdout, err = _run(["prune", f"{factory_module}:mlp", "--pattern", "2:4", "--input-shape", "3,12",
                              "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    state, meta = _load(out)
    assert meta["pattern"] == "2:4" and meta["ratio"] == 0.5
    for key in ("0.weight", "2.weight"):
        w = state[key]
        groups = (w.reshape(w.shape[0], -1, 4) != 0).sum(-1)
        assert int(groups.max()) <= 2 and float((w == 0).float().mean()) == pytest.approx(0.5)
    assert "MACs (non-zero weights)" in stdout and "| 0 | 24x12 | 24x12 | 50.0% |" in stdout


def test_prune_channels_then_checkpoint_round_trip(factory_module, tmp_path, capsys):
    out = tmp_path / "cnn_ch.safetensors"
    code, stdout, err = _run(["prune", f"{factory_module}:cnn", "--pattern", "channels", "--ratio", "0.5",
                              "--input-shape", "2,3,10,10", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    state, meta = _load(out)
    assert state["0.weight"].shape == (4, 3, 3, 3) and state["3.weight"].shape == (8, 4, 3, 3)
    assert state["7.weight"].shape == (5, 8)  # the classifier keeps its 5 classes
    assert meta["shapes"]["0"] == [4, 3, 3, 3]
    assert "| MACs (dense ops) |" in stdout

    # a dense checkpoint of the same architecture, given as FILE.safetensors + --factory
    from safetensors.torch import save_file

    sys.modules.pop(factory_module, None)
    import importlib

    dense = importlib.import_module(factory_module).cnn()
    ckpt = tmp_path / "dense.safetensors"
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(ckpt))
    out2 = tmp_path / "cnn_unstructured.safetensors"
    code, stdout, err = _run([
        "prune", str(ckpt), "--factory", f"{factory_module}:cnn", "--pattern", "unstructured", "--ratio", "0.25",
        "--input-shape", "1,3,10,10", "--out", str(out2), "--no-progress"], capsys)
    assert code == 0, err
    state2, meta2 = _load(out2)
    w = state2["3.weight"]
    assert float((w == 0).float().mean()) == pytest.approx(0.25, abs=1 / w.numel())
    # the untouched values are the checkpoint's, not a fresh initialisation
    kept = w != 0
    assert torch.equal(w[kept], dense.state_dict()["3.weight"][kept])

    # a checkpoint that does not fit the factory's architecture
    code, _, err = _run(["prune", str(ckpt), "--factory", f"{factory_module}:mlp", "--pattern", "2:4",
                         "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "does not fit" in _one_line_error(err, "prune")


def test_prune_factory_errors(factory_module, tmp_path, capsys):
    code, _, err = _run(["prune", f"{factory_module}:not_a_model", "--pattern", "2:4",
                         "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "expected an nn.Module" in _one_line_error(err, "prune")
    code, _, err = _run(["prune", f"{factory_module}:mlp", "--pattern", "2:4", "--input-shape", "1,3,8,8",
                         "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "--input-shape" in _one_line_error(err, "prune")
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"not a safetensors file")
    code, _, err = _run(["prune", str(bad), "--factory", f"{factory_module}:mlp", "--pattern", "2:4",
                         "--out", str(tmp_path / "x.safetensors")], capsys)
    assert code == 2 and "cannot read" in _one_line_error(err, "prune")


def test_prune_torchvision_model(tmp_path, capsys):
    out = tmp_path / "squeeze.safetensors"
    code, stdout, err = _run(["prune", "squeezenet1_1", "--pattern", "2:4", "--input-shape", "1,3,32,32",
                              "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    state, meta = _load(out)
    assert meta["config"]["model"] == "squeezenet1_1"
    assert "left dense: features.0" in stdout  # 3 input channels: not 2:4-eligible, and said so


# ------------------------------------------------------------------------------------------------- demo


def test_demo_tiny(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # without --out the demo writes to ./sparsekernels-output/demo/, nowhere else
    out = tmp_path / "sparsekernels-output" / "demo"
    code, stdout, err = _run(["demo", "--epochs", "1", "--width", "8", "--batch", "16", "--device", "cpu",
                              "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["demo.json", "demo.md", "demo.png"]
    report = json.loads((out / "demo.json").read_text())
    rows = {r["variant"]: r for r in report["rows"]}
    assert list(rows) == ["dense", "filters -50%", "2:4", "filters + 2:4"]
    dense, filt, s24, both = rows.values()
    for r in rows.values():
        assert 0.0 <= r["accuracy"] <= 100.0 and r["latency_ms"] > 0 and r["samples"] >= 3
    assert dense["speedup"] == 1.0
    assert filt["macs"] < dense["macs"] and filt["params"] < dense["params"]
    assert s24["macs"] < dense["macs"] and s24["weight_bytes"] < dense["weight_bytes"]
    assert both["weight_bytes"] < filt["weight_bytes"]
    assert s24["swapped"].split()[0] != "0"           # the 2:4 model really runs sparse layers
    assert s24["accuracy"] == s24["accuracy_masked"]   # the swap keeps every prediction (CPU: exact)
    assert (out / "demo.md").read_text().count("\n|") >= 5
    png = (out / "demo.png").read_bytes()
    assert png[:4] == b"\x89PNG"
    assert "| dense |" in stdout and "speedup vs dense" in stdout


@pytest.mark.gpu
def test_demo_tiny_on_gpu(tmp_path, capsys):
    out = tmp_path / "demo_gpu"
    code, _, err = _run(["demo", "--epochs", "1", "--width", "8", "--batch", "64", "--out", str(out), "--device", "cuda",
                         "--no-progress"], capsys)
    assert code == 0, err
    rows = json.loads((out / "demo.json").read_text())["rows"]
    assert json.loads((out / "demo.json").read_text())["environment"]["device_type"] == "cuda"
    for r in rows[1:]:  # the sparse kernels keep the masked model's predictions (within a point)
        assert abs(r["accuracy"] - r["accuracy_masked"]) <= 1.0 and r["latency_ms"] > 0


# ------------------------------------------------------------------------------------------------ bench


def test_bench_models_tiny(tmp_path, capsys, monkeypatch):
    from sparsekernels.benchmarks import models

    tiny = models.SuiteSizes(resnet=models.ResNetSizes(arch="squeezenet1_1", batch=1, resolution=32, ratios=(0.3,)),
                             bert=models.BertSizes(layers=1, seq=8, batches=(1,), vocab=1000),
                             llama=models.LlamaSizes(shapes=(("tiny 64->32", 64, 32),), tokens=(1, 8)),
                             rounds=1, rep=1)
    monkeypatch.setattr(models, "suite_sizes", lambda device, quick: tiny)
    out = tmp_path / "b"
    code, stdout, err = _run(["bench", "models", "--quick", "--device", "cpu", "--out", str(out), "--no-progress"],
                             capsys)
    assert code == 0, err
    names = sorted(p.name for p in out.iterdir())
    for stem in ("models_resnet50", "models_bert", "models_llama"):  # --quick: a suffix, never the full names
        assert f"{stem}_quick.json" in names and f"{stem}_quick.md" in names and f"{stem}.json" not in names
    assert "models_latency_vs_tokens_quick.png" in names and "models_speedup_vs_sparsity_quick.png" in names
    llama = json.loads((out / "models_llama_quick.json").read_text())["rows"]
    assert [r["tokens"] for r in llama] == [1, 8]
    assert all(r["status"] == "ok" and r["speedup"] > 0 and r["rel_err"] < 1e-5 for r in llama)
    resnet = {r["variant"]: r for r in json.loads((out / "models_resnet50_quick.json").read_text())["rows"]}
    assert set(resnet) == {"dense", "filters -30%", "2:4", "filters -30% + 2:4"}
    for r in resnet.values():
        assert r["status"] == "ok" or "layers 2:4" in r["status"], r["status"]
        assert r["latency_ms"] > 0 and r["roofline_pct"] is None  # no roofline on a CPU
    assert resnet["filters -30%"]["mac_ratio"] < 1.0
    assert resnet["2:4"]["rel_err"] < 1e-4
    assert "wrote" in stdout


def test_bench_kernels_wrapper_writes_report(tmp_path):
    from sparsekernels.benchmarks.run import run_kernels

    rows, paths = run_kernels(torch.device("cpu"), None, quick=True, out_dir=tmp_path, progress=False,
                              layers=((64, 32),), tokens=(1, 4))
    assert {p.name for p in paths} == {"kernels_linear24.json", "kernels_linear24.md", "kernels_linear24_speedup.png"}
    assert {r["tokens"] for r in rows} == {1, 4} and {r["backend"] for r in rows} >= {"dense"}
    assert all(r["median_ms"] > 0 and r["speedup_vs_dense"] > 0 and r["roofline_pct"] is None for r in rows)
    data = json.loads((tmp_path / "kernels_linear24.json").read_text())
    assert data["schema"] == "sparsekernels.report/1" and len(data["rows"]) == len(rows)


def test_bench_memory_tiny(tmp_path, capsys, monkeypatch):
    from sparsekernels.benchmarks import cpu_memory

    monkeypatch.setattr(cpu_memory, "QUICK_LAYER_SIZES", ((32, 16),))
    out = tmp_path / "m"
    code, stdout, err = _run(["bench", "memory", "--quick", "--out", str(out), "--no-progress"], capsys)
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == ["cpu_memory_quick.json", "cpu_memory_quick.md"]
    data = json.loads((out / "cpu_memory_quick.json").read_text())
    assert [r["layer"] for r in data["rows"]] == ["32x16"] and data["rows"][0]["tensor_mb_ratio"] == 1.0
    assert "75ab588" in data["notes"] and "wrote" in stdout
