"""The README never lies: its test command is the one CI runs, and its results tables match the files."""
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_section_matches_the_result_files():
    from sparsekernels.benchmarks.readme import update_readme

    changed = update_readme(ROOT / "README.md", ROOT / "benchmarks" / "results", check=True)
    assert not changed, "README results are out of date: run `python -m sparsekernels.benchmarks.readme`"


def _readme_block(readme: str, marker: str) -> list[str]:
    block = readme.split(f"<!-- {marker}:start -->", 1)[1].split(f"<!-- {marker}:end -->", 1)[0]
    return [ln for ln in block.strip().splitlines() if ln.strip() and not ln.startswith("```")]


def test_ci_runs_the_readme_commands_in_order():
    # .ci/run extracts the main job and the test command from the README and runs them in that order; --print
    # shows what it would run, so the two can be compared here without running them.
    readme = (ROOT / "README.md").read_text()
    main_job = _readme_block(readme, "main-job")
    tests = _readme_block(readme, "test-command")
    assert main_job == ['pip install -e ".[demo]" && sparsekernels demo']
    assert tests == ['pip install -e ".[test]" && python -m pytest -q']
    assert readme.index("<!-- main-job:start -->") < readme.index("<!-- test-command:start -->")
    proc = subprocess.run(["bash", str(ROOT / ".ci" / "run"), "--print"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines() == main_job + tests


def test_the_main_job_writes_outside_the_committed_results():
    # the README's first command must leave a fresh clone clean: its default output folder is ignored by git
    from sparsekernels.app.demo import DEMO_OUT

    readme = (ROOT / "README.md").read_text()
    first_screen = readme.split("## What it does", 1)[0]
    assert f"./{DEMO_OUT.as_posix()}/" in first_screen
    assert not DEMO_OUT.is_absolute() and "benchmarks" not in DEMO_OUT.parts
    proc = subprocess.run(["git", "check-ignore", "-q", f"{DEMO_OUT.as_posix()}/demo.json"], cwd=ROOT,
                          capture_output=True, timeout=60)
    if proc.returncode == 128:
        pytest.skip("not a git checkout")
    assert proc.returncode == 0, f"{DEMO_OUT}/ is not ignored by git (.gitignore)"


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
