"""The layering rules, checked by parsing every module's imports (ast) and by importing the packages.

* ``pruning`` never imports ``sparsekernels``;
* ``sparsekernels`` never imports ``pruning``, except the application layer ``sparsekernels/app/`` -- and even
  there only inside functions (lazily) -- and ``cli.py``, which imports ``app`` only inside functions;
* ``import sparsekernels, pruning`` imports neither triton nor initialises CUDA.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(path: Path):
    """Yield ``(absolute module name, top_level)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    top_level_nodes = {id(n) for n in tree.body}
    # imports nested in if/try at module level still run at import time
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                top_level_nodes.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top_level_nodes
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, id(node) in top_level_nodes
            for alias in node.names:  # "from . import app" imports the submodule app
                yield f"{mod}.{alias.name}", id(node) in top_level_nodes


def _py_files(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


def _is(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def test_parser_sees_relative_and_lazy_imports(tmp_path):
    # the checker itself must be able to fail: a relative import resolved, a lazy one told apart
    files = list(_imports(REPO / "sparsekernels" / "app" / "demo.py"))
    assert ("sparsekernels.app", True) in files or ("sparsekernels.app.resolve_device", True) in files
    assert any(m == "pruning" and not top for m, top in files)


def test_pruning_never_imports_sparsekernels():
    bad = [(str(p.relative_to(REPO)), m) for p in _py_files("pruning") for m, _ in _imports(p)
           if _is(m, "sparsekernels")]
    assert not bad, f"pruning/ must not import sparsekernels: {bad}"


def test_sparsekernels_imports_pruning_only_in_app():
    bad = []
    for p in _py_files("sparsekernels"):
        rel = p.relative_to(REPO).as_posix()
        in_app = rel.startswith("sparsekernels/app/")
        for m, top in _imports(p):
            if _is(m, "pruning") and (not in_app or top):
                bad.append((rel, m, "top level" if top else "lazy"))
    assert not bad, f"only sparsekernels/app/ may import pruning, and only inside functions: {bad}"


def test_cli_imports_app_lazily():
    cli = REPO / "sparsekernels" / "cli.py"
    eager = [m for m, top in _imports(cli) if top and (_is(m, "sparsekernels.app") or _is(m, "pruning"))]
    assert not eager, f"cli.py must import the application layer inside functions only, got {eager}"
    assert any(_is(m, "sparsekernels.app") and not top for m, top in _imports(cli))


def test_app_has_the_docstring_that_explains_the_exception():
    doc = ast.get_docstring(ast.parse((REPO / "sparsekernels" / "app" / "__init__.py").read_text()))
    assert doc and "only place" in doc and "pruning" in doc


def test_importing_both_packages_is_cheap():
    code = (
        "import sys, torch\n"
        "import sparsekernels, pruning\n"
        "import sparsekernels.cli\n"
        "sparsekernels.cli.build_parser()\n"
        "heavy = [m for m in ('triton', 'torchvision', 'transformers', 'matplotlib', 'sklearn', 'pruning.weights') "
        "if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert not torch.cuda.is_initialized(), 'CUDA initialised at import'\n"
        "print('ok')\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


@pytest.mark.parametrize("folder", ["pruning", "sparsekernels"])
def test_every_module_parses(folder):
    assert _py_files(folder), f"no modules found under {folder}"
    for p in _py_files(folder):
        list(_imports(p))
