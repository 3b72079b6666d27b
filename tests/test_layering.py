"""The layering rules, checked by parsing every module's imports (ast) and by importing the packages.

* Inside each package, layers only look down: every module has a rank (:data:`SPARSEKERNELS_RANKS`,
  :data:`PRUNING_RANKS`) and may import only modules of a lower rank (and its own parent packages, which Python
  runs first anyway). ``docs/architecture.md`` draws the same picture.
* No module imports a private name (one leading underscore) from another module, imports a private module, or
  reads a private attribute of another module of the project.
* ``pruning`` never imports ``sparsekernels``; ``sparsekernels`` imports ``pruning`` only in its application
  layer (``app``, ``benchmarks``), and there only inside functions (lazily).
* ``import sparsekernels, pruning`` imports neither triton nor initialises CUDA; neither does running a sparse
  layer on the CPU.
* No source file is longer than :data:`MAX_LINES`.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
MAX_LINES = 600

# Ranks: a module may import modules of strictly lower rank. The longest matching prefix gives the rank.
SPARSEKERNELS_RANKS = {
    "sparsekernels._version": 0,
    "sparsekernels.timing": 1,
    "sparsekernels.environment": 1,
    "sparsekernels.tables": 1,
    "sparsekernels.schema": 1,
    "sparsekernels.formats": 2,
    "sparsekernels.formats.common": 2,
    "sparsekernels.formats.sparse24": 2.5,
    "sparsekernels.formats.blocksparse": 3,
    "sparsekernels.ops": 4,
    "sparsekernels.ops.cache": 4,
    "sparsekernels.ops.dispatch": 5,
    "sparsekernels.ops.routing": 6,
    "sparsekernels.ops.checks": 6,
    "sparsekernels.ops.sparse24_linear": 7,
    "sparsekernels.ops.blocksparse_linear": 7,
    "sparsekernels.ops.sparse24_conv2d": 8,
    "sparsekernels.ops.functional": 9,
    "sparsekernels.nn.base": 10,
    "sparsekernels.nn.walk": 10,
    "sparsekernels.nn.sparse24_module": 11,
    "sparsekernels.nn.linear": 12,
    "sparsekernels.nn.conv": 12,
    "sparsekernels.nn.blocksparse": 12,
    "sparsekernels.nn.conv1d": 12,
    "sparsekernels.nn": 13,
    "sparsekernels.swap": 14,
    "sparsekernels.checkpoint": 14,
    "sparsekernels.tuning": 14,
    "sparsekernels.huggingface.bitmask": 14.2,
    "sparsekernels.huggingface.quantizer": 14.4,
    "sparsekernels.huggingface.evaluation": 14.5,
    "sparsekernels.huggingface.pretrained": 14.6,
    "sparsekernels.huggingface": 14.8,
    "sparsekernels.examples": 15,
    "sparsekernels.benchmarks": 16,
    "sparsekernels.benchmarks.report": 16,
    "sparsekernels.benchmarks.measure": 16,
    "sparsekernels.benchmarks.kernels": 17,
    "sparsekernels.benchmarks.models": 17,
    "sparsekernels.benchmarks.cpu_memory": 17,
    "sparsekernels.benchmarks.channel_latency": 17,
    "sparsekernels.benchmarks.pruning_quality": 17,
    "sparsekernels.benchmarks.cpu_auto": 17,
    "sparsekernels.benchmarks.readme": 17,
    "sparsekernels.benchmarks.nm_quality": 17,
    "sparsekernels.benchmarks.decode": 17,
    "sparsekernels.benchmarks.layers": 18,
    "sparsekernels.benchmarks.llm_scaling": 18,
    "sparsekernels.benchmarks.gpu_suite": 19,
    "sparsekernels.benchmarks.run": 20,
    "sparsekernels.app": 21,
    "sparsekernels.app.language_model": 20.5,
    "sparsekernels.cli": 22,
    "sparsekernels.__main__": 23,
}
PRUNING_RANKS = {
    "pruning.batches": 0,
    "pruning.registry": 0,
    "pruning.patterns": 0,
    "pruning.masks": 0,
    "pruning.sparsegpt": 0,
    "pruning.transaction": 0,
    "pruning.plan_schema": 0,
    "pruning.offload": 0,
    "pruning.blocks": 0.5,
    "pruning.calibration": 1,
    "pruning.permutation": 1,
    "pruning.importance": 2,
    "pruning.nm_criteria": 2.5,
    "pruning.selection": 2.5,
    "pruning.sequential": 2.5,
    "pruning.weights": 3,
    "pruning.training": 4,
    "pruning.plan": 4,
    "pruning.sensitivity": 4,
    "pruning.channels.tracer": 5,
    "pruning.channels.report": 5,
    "pruning.channels.handlers": 6,
    "pruning.channels.attention": 6,
    "pruning.channels.hf_modules": 6,
    "pruning.channels.grouping": 6,
    "pruning.channels.shape_handlers": 7,
    "pruning.channels.graph": 8,
    "pruning.channels.importance": 9,
    "pruning.channels.permute": 9,
    "pruning.channels.hf_config": 9,
    "pruning.channels.prune": 10,
    "pruning.channels": 11,
    "pruning": 12,
}
APPLICATION_LAYER = ("sparsekernels.app", "sparsekernels.benchmarks")


def _module_name(path: Path) -> str:
    rel = path.relative_to(REPO).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _imports(name: str, source: str, is_package: bool = False):
    """Yield ``(imported module or module.attr, top_level, names bound)`` for every import in ``source``."""
    tree = ast.parse(source)
    package = name if is_package else name.rpartition(".")[0]
    top_level_nodes = {id(n) for n in tree.body}
    # imports nested in if/try at module level still run at import time
    for node in tree.body:
        if isinstance(node, (ast.If, ast.Try)):
            for sub in ast.walk(node):
                top_level_nodes.add(id(sub))
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, id(node) in top_level_nodes, alias.asname or alias.name.partition(".")[0]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                mod = ".".join(base + ([node.module] if node.module else []))
            else:
                mod = node.module or ""
            yield mod, id(node) in top_level_nodes, None
            for alias in node.names:  # "from . import app" imports the submodule app, or binds a name
                yield f"{mod}.{alias.name}", id(node) in top_level_nodes, alias.asname or alias.name


def _is(mod: str, package: str) -> bool:
    return mod == package or mod.startswith(package + ".")


def _rank(mod: str, ranks: dict):
    best = None
    for prefix, rank in ranks.items():
        if _is(mod, prefix) and (best is None or len(prefix) > len(best[0])):
            best = (prefix, rank)
    return None if best is None else best[1]


def _project_module(mod: str) -> str:
    """``mod`` with a trailing imported name dropped when it names a function or class, not a module."""
    parts = mod.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        path = REPO.joinpath(*parts[:n])
        if path.with_suffix(".py").is_file() or (path / "__init__.py").is_file():
            return candidate
    return mod


def upward_imports(name: str, source: str, ranks: dict, is_package: bool = False) -> list:
    """Imports of ``name`` (given its ``source``) that do not look down the rank table."""
    own = _rank(name, ranks)
    root = next(iter(ranks)).split(".")[0]
    bad = []
    for mod, _, _ in _imports(name, source, is_package):
        if not _is(mod, root):
            continue
        target = _project_module(mod)
        if _is(name, target):  # its own parent packages (Python imports them first anyway)
            continue
        rank = _rank(target, ranks)
        if own is None or rank is None or rank >= own:
            bad.append((name, target, own, rank))
    return sorted(set(bad))


def private_uses(name: str, source: str, is_package: bool = False) -> list:
    """Private names of other project modules that ``name`` imports or reads."""
    bad = []
    bound_modules = set()
    for mod, _, bound in _imports(name, source, is_package):
        if not (_is(mod, "sparsekernels") or _is(mod, "pruning")):
            continue
        parts = mod.split(".")
        if any(p.startswith("_") and not p.startswith("__") and p != "_version" for p in parts[1:]):
            bad.append((name, mod))
        if bound and _project_module(mod) == mod:
            bound_modules.add(bound)
    for node in ast.walk(ast.parse(source)):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound_modules
                and node.attr.startswith("_") and not node.attr.startswith("__")):
            bad.append((name, f"{node.value.id}.{node.attr}"))
    return sorted(set(bad))


def _py_files(folder: str):
    return sorted((REPO / folder).rglob("*.py"))


def _sources(folder: str):
    for p in _py_files(folder):
        yield _module_name(p), p.read_text(), p.name == "__init__.py"


# ----------------------------------------------------------------------------------------------------
# the checker itself must be able to fail


def test_checker_flags_an_upward_import():
    assert upward_imports("sparsekernels.ops.routing", "from ..nn import SparseLinear\n", SPARSEKERNELS_RANKS)
    assert upward_imports("sparsekernels.formats.sparse24", "from sparsekernels.ops import dispatch\n",
                          SPARSEKERNELS_RANKS)
    # a lazy (function-level) upward import is still upward
    assert upward_imports("sparsekernels.ops.dispatch", "def f():\n    from ..swap import sparsify\n",
                          SPARSEKERNELS_RANKS)
    # peers of one rank do not import each other
    assert upward_imports("sparsekernels.swap", "from .tuning import tune\n", SPARSEKERNELS_RANKS)
    assert not upward_imports("sparsekernels.swap", "from .nn import SparseLinear\nimport torch\n",
                              SPARSEKERNELS_RANKS)
    assert not upward_imports("sparsekernels.ops.functional", "from . import checks, routing\n",
                              SPARSEKERNELS_RANKS)


def test_checker_flags_private_names():
    assert private_uses("sparsekernels.nn.linear", "from ..ops.routing import _KERNELS\n")
    assert private_uses("sparsekernels.nn.linear", "from ..ops import _backend\n")
    assert private_uses("sparsekernels.swap", "from .ops import routing\nx = routing._KERNELS\n")
    assert private_uses("pruning.sensitivity", "from .weights import _select_layers\n")
    assert not private_uses("sparsekernels.checkpoint", "from ._version import __version__\nimport torch\n"
                            "x = torch._C\n")


# ----------------------------------------------------------------------------------------------------
# the rules


@pytest.mark.parametrize("folder, ranks", [("sparsekernels", SPARSEKERNELS_RANKS), ("pruning", PRUNING_RANKS)])
def test_layers_only_look_down(folder, ranks):
    bad = []
    for name, source, is_package in _sources(folder):
        if name == folder:  # the package root: lazy exports by name only
            continue
        assert _rank(name, ranks) is not None, f"{name} has no rank in the layering table of {folder}"
        bad += upward_imports(name, source, ranks, is_package)
    assert not bad, "imports that do not look down (module, imported, own rank, its rank):\n" + "\n".join(map(str, bad))


@pytest.mark.parametrize("folder", ["sparsekernels", "pruning"])
def test_no_private_cross_module_names(folder):
    bad = [b for name, source, is_package in _sources(folder) for b in private_uses(name, source, is_package)]
    assert not bad, f"private names used across modules: {bad}"


@pytest.mark.parametrize("folder", ["sparsekernels", "pruning", "tests", "benchmarks"])
def test_no_source_file_over_the_limit(folder):
    long = [(str(p.relative_to(REPO)), n) for p in _py_files(folder)
            if (n := len(p.read_text().splitlines())) > MAX_LINES]
    assert not long, f"files over {MAX_LINES} lines: {long}"


def test_package_roots_import_nothing_eagerly():
    for folder in ("sparsekernels", "pruning"):
        tree = ast.parse((REPO / folder / "__init__.py").read_text())
        eager = [m for m, top, _ in _imports(folder, (REPO / folder / "__init__.py").read_text(), True)
                 if top and (_is(m, folder) and m not in (f"{folder}._version", f"{folder}._version.__version__"))]
        assert not eager, f"{folder}/__init__.py imports {eager} at import time"
        assert tree.body, folder


def test_pruning_never_imports_sparsekernels():
    bad = [(name, m) for name, source, pkg in _sources("pruning") for m, _, _ in _imports(name, source, pkg)
           if _is(m, "sparsekernels")]
    assert not bad, f"pruning/ must not import sparsekernels: {bad}"


def test_sparsekernels_imports_pruning_only_lazily_in_the_application_layer():
    bad = []
    for name, source, pkg in _sources("sparsekernels"):
        in_app = any(_is(name, layer) for layer in APPLICATION_LAYER)
        for m, top, _ in _imports(name, source, pkg):
            if _is(m, "pruning") and (not in_app or top):
                bad.append((name, m, "top level" if top else "lazy"))
    assert not bad, f"only {APPLICATION_LAYER} may import pruning, and only inside functions: {bad}"


def test_cli_imports_the_application_layer_lazily():
    source = (REPO / "sparsekernels" / "cli.py").read_text()
    imports = list(_imports("sparsekernels.cli", source))
    eager = [m for m, top, _ in imports
             if top and any(_is(m, p) for p in (*APPLICATION_LAYER, "pruning"))]
    assert not eager, f"cli.py must import the application layer inside functions only, got {eager}"
    assert any(_is(m, "sparsekernels.app") and not top for m, top, _ in imports)


def _assert_runs(code: str) -> None:
    """Run ``code`` in a fresh interpreter (nothing imported yet); it must print ok."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-c", code + "print('ok')\n"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr


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
    )
    _assert_runs(code)


def test_a_sparse_model_on_the_cpu_never_imports_triton():
    # swap, run, save and load a 2:4 model on the CPU: nothing of it needs a kernel module (they import Triton)
    code = (
        "import sys, tempfile, os, torch\n"
        "import sparsekernels as sk\n"
        "m = torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))\n"
        "with torch.no_grad():\n"
        "    for l in (m[0], m[2]):\n"
        "        l.weight.view(l.out_features, -1, 4)[..., 2:] = 0\n"
        "sk.sparsify(m)\n"
        "y = m(torch.randn(3, 16))\n"
        "path = os.path.join(tempfile.mkdtemp(), 'm.safetensors')\n"
        "sk.save_sparse(m, path)\n"
        "sk.load_sparse(lambda: torch.nn.Sequential(torch.nn.Linear(16, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4)),"
        " path)\n"
        "assert 'triton' not in sys.modules, 'triton imported'\n"
    )
    _assert_runs(code)


@pytest.mark.parametrize("folder", ["pruning", "sparsekernels"])
def test_every_module_parses(folder):
    assert _py_files(folder), f"no modules found under {folder}"
    for name, source, pkg in _sources(folder):
        list(_imports(name, source, pkg))
