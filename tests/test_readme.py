"""The README never lies: its test command is the one CI runs, and its results tables match the files."""
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_readme_results_section_matches_the_result_files():
    from sparsekernels.app.readme import update_readme

    changed = update_readme(ROOT / "README.md", ROOT / "benchmarks" / "results", check=True)
    assert not changed, "README results are out of date: run `python -m sparsekernels.app.readme`"


def test_ci_runs_the_readme_test_command():
    # .ci/run extracts the command between the test-command markers; check that extraction finds one.
    readme = (ROOT / "README.md").read_text()
    block = readme.split("<!-- test-command:start -->", 1)[1].split("<!-- test-command:end -->", 1)[0]
    lines = [ln for ln in block.strip().splitlines() if ln.strip() and not ln.startswith("```")]
    assert lines == ['pip install -e ".[test]" && python -m pytest -q']
    assert "test-command:start" in (ROOT / ".ci" / "run").read_text()
