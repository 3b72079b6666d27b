"""The CLI checks before it works, and never leaves half a result: every rough edge ends in ONE line on stderr,
exit code 2 (1 for an operating-system error, 130 for Ctrl-C), nothing written, and no work started."""
import errno
import json
import os
import sys
import textwrap

import pytest
import torch

import sparsekernels.examples.digits as digits
from sparsekernels.benchmarks import report
from sparsekernels.cli import main


def run_cli(argv, capsys):
    """``main(argv)`` as the shell runs it: (exit code, stdout, the non-empty stderr lines)."""
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    lines = [line for line in out.err.splitlines() if line.strip()]
    return code, out.out, lines


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if a command starts its long work (loads the data, builds a model)."""
    def refuse(*args, **kwargs):
        raise AssertionError("the command started working before it checked its arguments")

    monkeypatch.setattr(digits, "load_digits_data", refuse)
    monkeypatch.setattr("sparsekernels.app.prune.build_model", refuse)


@pytest.fixture
def factories(tmp_path, monkeypatch):
    """Factory modules: ``ok_models:mlp``, and modules that raise, fail to parse and exit when imported."""
    (tmp_path / "ok_models.py").write_text(textwrap.dedent("""
        import torch
        from torch import nn

        def mlp():
            torch.manual_seed(0)
            return nn.Sequential(nn.Linear(12, 24), nn.ReLU(), nn.Linear(24, 8))
    """))
    (tmp_path / "raising_models.py").write_text("raise RuntimeError('no GPU driver\\nsecond line')\n")
    (tmp_path / "broken_models.py").write_text("def mlp(:\n")
    (tmp_path / "exiting_models.py").write_text("import sys\nsys.exit(3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("ok_models", "raising_models", "broken_models", "exiting_models"):
        sys.modules.pop(name, None)
    return tmp_path


def _not_a_folder(tmp_path):
    (tmp_path / "a_file").write_text("x")
    return tmp_path / "a_file" / "out"


@pytest.mark.parametrize("argv, needle", [
    (["demo", "--out", "{file}/out"], "is not a folder"),
    (["demo", "--out", "{file}"], "exists and is not a folder"),
    (["demo", "--batch", "1000000000"], "--batch: expected an integer in 1..16,384"),
    (["demo", "--width", "100000"], "--width: expected an integer in 1..512"),
    (["demo", "--epochs", "99999999"], "--epochs: expected an integer in 1..1,000"),
    (["prune", "ok_models:mlp", "--pattern", "2:4", "--input-shape", "100000000000", "--out", "{tmp}/m.safetensors"],
     "has 100,000,000,000 elements; the limit is 134,217,728"),
    (["prune", "ok_models:mlp", "--pattern", "2:4", "--input-shape", "1,2,3,4,5,6,7,8,9",
      "--out", "{tmp}/m.safetensors"],
     "at most 8 sizes"),
    (["prune", "ok_models:mlp", "--pattern", "2:4", "--importance", "wanda", "--input-shape", "64,1024,1024",
      "--calib-batches", "1000", "--out", "{tmp}/m.safetensors"], "bytes of inputs; the limit is 2,147,483,648"),
    (["prune", "ok_models:mlp", "--pattern", "2:4", "--calib-batches", "100000", "--out", "{tmp}/m.safetensors"],
     "--calib-batches: expected an integer in 1..1,024"),
    (["prune", "ok_models:mlp", "--pattern", "2:4", "--input-shape", "3,12", "--out", "{file}/m.safetensors"],
     "is not a folder"),
    (["prune", "ok_models:mlp", "--pattern", "2:4", "--input-shape", "3,12", "--out", "{tmp}/d.safetensors"],
     "is a folder, expected a file path"),
    (["bench", "memory", "--out", "{file}/out"], "is not a folder"),
    (["bench", "gpu", "--budget-s", "1e9"], "at most 86,400"),
])
def test_bad_values_are_one_line_exit_2_before_any_work(argv, needle, capsys, tmp_path, no_work, factories):
    argv = [a.format(file=tmp_path / "a_file", tmp=tmp_path) for a in argv]
    (tmp_path / "a_file").write_text("x")
    (tmp_path / "d.safetensors").mkdir()
    before = sorted(p.name for p in tmp_path.iterdir())
    code, _, lines = run_cli(argv, capsys)
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith(f"sparsekernels {argv[0]}: error: ") and needle in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written


@pytest.mark.skipif(not os.path.isdir("/sys"), reason="needs a read-only folder: /sys (Linux)")
@pytest.mark.parametrize("command", [["demo"], ["bench", "memory"], ["prune", "ok_models:mlp", "--pattern", "2:4"]])
def test_an_unwritable_out_is_found_before_any_work(command, capsys, no_work, factories):
    out = "/sys/sparsekernels-test/m.safetensors" if command[0] == "prune" else "/sys/sparsekernels-test"
    code, _, lines = run_cli([*command, "--out", out], capsys)
    assert code == 2 and len(lines) == 1 and "cannot create files in '/sys'" in lines[0], lines


@pytest.mark.parametrize("module, needle", [
    ("raising_models", "RuntimeError: no GPU driver second line"),
    ("broken_models", "SyntaxError"),
    ("exiting_models", "SystemExit: 3"),
])
def test_a_factory_module_failing_at_import_is_one_line(module, needle, capsys, tmp_path, factories):
    code, _, lines = run_cli(["prune", f"{module}:mlp", "--pattern", "2:4", "--out", str(tmp_path / "m.safetensors")],
                          capsys)
    assert code == 2 and len(lines) == 1, lines
    assert f"cannot import module '{module}'" in lines[0] and needle in lines[0], lines
    assert not (tmp_path / "m.safetensors").exists()


def test_ctrl_c_is_one_line_exit_130_and_leaves_earlier_results(capsys, tmp_path, monkeypatch):
    import sparsekernels.app.demo as demo

    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text('{"earlier": true}')

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(demo, "_prune_filters", interrupted)
    code, _, lines = run_cli(["demo", "--epochs", "1", "--width", "4", "--out", str(out), "--device", "cpu",
                           "--no-progress"], capsys)
    assert code == 130 and lines == ["sparsekernels demo: interrupted; no partial results were written"], lines
    assert sorted(p.name for p in out.iterdir()) == ["demo.json"]
    assert json.loads((out / "demo.json").read_text()) == {"earlier": True}


def test_a_failed_write_is_one_line_exit_1_and_leaves_no_file(capsys, tmp_path, monkeypatch, factories):
    out = tmp_path / "m.safetensors"

    def disk_full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(report.ResultSet, "publish", disk_full)
    code, _, lines = run_cli(["prune", "ok_models:mlp", "--pattern", "2:4", "--input-shape", "3,12", "--out", str(out),
                           "--no-progress"], capsys)
    assert code == 1 and len(lines) == 1 and "No space left on device" in lines[0], lines
    assert list(tmp_path.glob("*.safetensors")) == [] and not list(tmp_path.glob(".*partial"))


# ------------------------------------------------------------------------------------ results as one set


def _write_set(folder, value, fail=None):
    with report.publishing():
        report.plot_lines(folder / "r.png", {"s": [(1, value), (2, value)]}, title="t", xlabel="x", ylabel="y")
        if fail == "between":
            raise KeyboardInterrupt
        report.write_report("r", [{"v": value}], [("v", "v")], out_dir=folder, plots=[folder / "r.png"])


@pytest.mark.parametrize("fail", ["between", "rename"])
def test_a_set_of_results_is_published_whole_or_not_at_all(tmp_path, monkeypatch, fail):
    _write_set(tmp_path, 1.0)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    assert sorted(before) == ["r.json", "r.md", "r.png"]
    if fail == "rename":  # the second of three renames fails: the first is undone
        real, calls = os.replace, [0]

        def flaky(a, b):
            calls[0] += 1
            if calls[0] == 2:
                raise OSError(errno.EIO, "I/O error")
            return real(a, b)

        monkeypatch.setattr(os, "replace", flaky)
    with pytest.raises((KeyboardInterrupt, OSError)):
        _write_set(tmp_path, 2.0, fail)
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir()} == before  # no temporaries, old set intact
    _write_set(tmp_path, 3.0)
    assert json.loads((tmp_path / "r.json").read_text())["rows"] == [{"v": 3.0}]


def test_results_files_keep_ordinary_permissions(tmp_path):
    report.write_report("r", [{"v": 1}], [("v", "v")], out_dir=tmp_path)
    umask = os.umask(0)
    os.umask(umask)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o666 & ~umask


def test_the_readme_generator_refuses_a_bad_results_file_in_one_line(tmp_path, capsys):
    from sparsekernels.benchmarks.readme import main as readme_main

    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- results:start -->\nold\n<!-- results:end -->\n")
    results = tmp_path / "results" / "cpu"
    report.write_report("demo", [{"v": 1}], [("v", "v")], out_dir=results)
    good = json.loads((results / "demo.json").read_text())
    for bad, needle in (
        ({**good, "columns": [{"key": "v", "fmt": "{0.__class__}"}]}, "columns[0].fmt: expected a number format"),
        ({**good, "rows": [{"v": {"nested": 1}}]}, "rows[0].v: expected a string, number, boolean or null"),
        ({**good, "title": "line\n# injected heading"}, "title: expected a one-line string"),
        ({**good, "plots": ["../../etc/passwd.png"]}, "plots[0]: expected a PNG file name beside the report"),
        ({**good, "plots": ["missing.png"]}, "plots[0]: names 'missing.png', which is not in"),
        ({**good, "schema": "sparsekernels.report/9"}, "schema: expected"),
        ("[" * 100_000, "not valid JSON"),
        ({key: v for key, v in good.items() if key != "rows"}, "rows: missing"),
    ):
        (results / "demo.json").write_text(bad if isinstance(bad, str) else json.dumps(bad))
        assert readme_main(["--readme", str(readme), "--results", str(results.parent)]) == 2
        err = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(err) == 1 and "demo.json: " in err[0] and needle in err[0], (needle, err)
        assert "old" in readme.read_text()  # the README is left alone


def test_the_demo_default_folder_is_outside_the_committed_results():
    from sparsekernels.app.demo import DEMO_OUT

    assert DEMO_OUT.parts == ("sparsekernels-output", "demo")


@pytest.mark.parametrize("shape", ["3,12", "2x3x4x5x6x7x8x2"])
def test_shapes_within_the_limits_are_accepted(shape):
    from sparsekernels.app import parse_shape

    assert len(parse_shape(shape)) == len(shape.replace("x", ",").split(","))
    assert torch.Size(parse_shape(shape)).numel() > 0
