"""The README never lies: its test command is the one CI runs, and its results tables match the files."""
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_section_matches_the_result_files():
    from sparsekernels.benchmarks.readme import update_readme

    changed = update_readme(ROOT / "README.md", ROOT / "benchmarks" / "results", check=True)
    assert not changed, "README results are out of date: run `python -m sparsekernels.benchmarks.readme`"


def test_ci_runs_the_readme_test_command():
    # .ci/run extracts the command between the test-command markers; check that extraction finds one.
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command:start -->", 1)[1].split("<!-- test-command:end -->", 1)[0]
    lines = [ln for ln in block.strip().splitlines() if ln.strip() and not ln.startswith("```")]
    assert lines == ['pip install -e ".[test]" && python -m pytest -q']
    assert "test-command:start" in (ROOT / ".ci" / "run").read_text()


def test_readme_example_runs(tmp_path, monkeypatch):
    """The code on the README's first screen runs as written (in a scratch folder: it saves a file)."""
    import re

    readme = (ROOT / "README.md").read_text()
    code = re.search(r"## What it does\n\n```python\n(.*?)```", readme, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    small = namespace["small"]
    assert (tmp_path / "small.safetensors").stat().st_size > 0
    # the smaller model really is smaller, and it was swapped to sparse modules
    import sparsekernels as sk

    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in namespace["model"].parameters())
    assert any(isinstance(m, sk.SparseConv2d) for m in small.modules())
