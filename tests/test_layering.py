"""The library's imports point down: every module imports on its own, lower modules never import
higher ones, and the library never imports the service (Optuna's rule: a reference upwards is for
type checking only, under ``if TYPE_CHECKING:``)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "adapruner"

# Lowest first: a module may import only modules listed before it. A package's ``__init__`` is its
# front door and sits above the modules it re-exports.
LAYERS = (
    "adapruner",  # the version only
    "adapruner.errors",
    "adapruner.quiet",
    "adapruner.cache",
    "adapruner.fetch",
    "adapruner.device",
    "adapruner.modeling_pruned",  # copied into exports: imports torch and transformers only
    "adapruner.structure",
    "adapruner.statistics",
    "adapruner.importance",
    "adapruner.plan",
    "adapruner.prune",
    "adapruner.repair",
    "adapruner.wanda_sp",
    "adapruner.to_gguf",  # llama.cpp's file format; llama-cpp-python imported where it is used
    "adapruner.export",
    "adapruner.from_gguf",
    "adapruner.models",
    "adapruner.inference_cost",
    "adapruner.evaluate",
    "adapruner.llama_runtime",
    "adapruner.decode_time",
    "adapruner.finetune",
    "adapruner.data.rdata",
    "adapruner.data.wikimarkup",
    "adapruner.data.windows",
    "adapruner.data.builtin",
    "adapruner.data.sources",
    "adapruner.data.heldout",
    "adapruner.data",
    "adapruner.tasks",  # lm-eval is imported where it is used: importing it costs seconds
    "adapruner.session",
    "adapruner.incremental",
    "adapruner.search.record",
    "adapruner.search.artifacts",
    "adapruner.search.lock",
    "adapruner.search.samplers",
    "adapruner.search.baselines",
    "adapruner.search.space",
    "adapruner.search.job",
    "adapruner.search.speed",
    "adapruner.search.storage",
    "adapruner.search.objective",
    "adapruner.search.selection",
    "adapruner.search.best",
    "adapruner.search.accuracy",
    "adapruner.search.cost",
    "adapruner.search.start",
    "adapruner.search.study",
    "adapruner.search.report",
    "adapruner.search.targets",
    "adapruner.search",
    "adapruner.cli.args",
    "adapruner.cli.evaluate",
    "adapruner.cli.prune",
    "adapruner.cli.finetune",
    "adapruner.cli.search",
    "adapruner.cli.export",
    "adapruner.cli.bench_model",
    "adapruner.cli",
)
# The bottom of the library: no late (function-level) imports of its own modules.
BOTTOM = ("structure", "device", "models", "export", "prune", "plan", "importance", "statistics", "repair")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def library_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


MODULES = library_modules()


def is_type_checking(node: ast.AST) -> bool:
    test = node.test if isinstance(node, ast.If) else None
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
        (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def runtime_imports(tree: ast.AST):
    """Every import statement, at any depth, except those under ``if TYPE_CHECKING:``."""
    for node in ast.iter_child_nodes(tree):
        for child in node.orelse if is_type_checking(node) else [node]:
            if isinstance(child, ast.Import | ast.ImportFrom):
                yield child
            yield from runtime_imports(child)


def imported_modules(node: ast.Import | ast.ImportFrom, importer: str) -> list[str]:
    """Absolute names of the modules an import statement names (``from .x import y``: ``x.y`` when
    that is a module, else ``x``)."""
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if node.level:
        package = importer.split(".") if MODULES[importer].name == "__init__.py" else importer.split(".")[:-1]
        base = ".".join(package[: len(package) - node.level + 1] + ([node.module] if node.module else []))
    else:
        base = node.module or ""
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]


def back_edges(order: tuple[str, ...], edits: dict[str, str] | None = None) -> list[str]:
    """Imports of a module placed at or above the importer; ``edits`` adds lines to modules' source."""
    rank = {name: i for i, name in enumerate(order)}
    found = []
    for name, path in MODULES.items():
        source = path.read_text() + (edits or {}).get(name, "")
        for node in runtime_imports(ast.parse(source, str(path))):
            for target in imported_modules(node, name):
                if target in rank and rank[target] >= rank[name]:
                    found.append(f"{name} imports {target}")
    return found


def test_every_module_is_placed_in_the_layers():
    assert sorted(MODULES) == sorted(LAYERS)


def test_lower_modules_never_import_higher_ones():
    assert back_edges(LAYERS) == []


@pytest.mark.parametrize(("module", "added", "edge"), [
    ("adapruner.structure", "from .models import load_model\n", "adapruner.structure imports adapruner.models"),
    ("adapruner.prune", "def f():\n    from .export import save_pruned\n", "adapruner.prune imports adapruner.export"),
    ("adapruner.data.windows", "import adapruner.session\n", "adapruner.data.windows imports adapruner.session"),
    ("adapruner.plan", "from . import prune\n", "adapruner.plan imports adapruner.prune"),
    ("adapruner.search.space", "from . import study\n", "adapruner.search.space imports adapruner.search.study"),
])
def test_an_added_back_edge_is_found(module, added, edge):
    assert back_edges(LAYERS, {module: added}) == [edge]


def test_a_back_reference_for_type_checking_only_is_allowed():
    added = "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .models import load_model\n"
    assert back_edges(LAYERS, {"adapruner.structure": added}) == []


def test_the_library_never_imports_the_service():
    offenders = [f"{name} line {node.lineno}" for name, path in MODULES.items()
                 for node in runtime_imports(ast.parse(path.read_text()))
                 for target in imported_modules(node, name) if target.split(".")[0] == "service"]
    assert offenders == []


def search_submodule_imports(path: Path, name: str) -> list[str]:
    """Imports of ``adapruner.search.<module>`` (not of the package itself) in one file."""
    return [f"{path.name} line {node.lineno}: {target}" for node in runtime_imports(ast.parse(path.read_text()))
            for target in (imported_modules(node, name) if name in MODULES else
                           [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names])
            if target.startswith("adapruner.search.")]


def test_the_cli_and_the_service_enter_the_search_by_its_one_door():
    users = {**{name: path for name, path in MODULES.items() if name.startswith("adapruner.cli")},
             **{f"service.{p.stem}": p for p in sorted((ROOT / "service").glob("*.py"))}}
    assert [hit for name, path in users.items() for hit in search_submodule_imports(path, name)] == []


def test_an_import_through_a_side_door_is_found(tmp_path):
    module = tmp_path / "worker.py"
    module.write_text("def f():\n    from adapruner.search.study import run_search\n")
    assert search_submodule_imports(module, "service.worker") == ["worker.py line 2: adapruner.search.study"]


@pytest.mark.parametrize("name", BOTTOM)
def test_no_late_imports_at_the_bottom(name):
    tree = ast.parse(MODULES[f"adapruner.{name}"].read_text())
    late = [f"line {node.lineno}" for function in ast.walk(tree)
            if isinstance(function, ast.FunctionDef | ast.AsyncFunctionDef)
            for node in ast.walk(function)
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("adapruner"))
            or isinstance(node, ast.Import) and any(a.name.split(".")[0] == "adapruner" for a in node.names)]
    assert late == []


# Each module is imported first in an interpreter that has imported no other module of the library
# (one process; the library's modules are dropped between imports, the third-party ones kept).
IMPORT_EACH = """
import importlib, json, sys, traceback
failures = {}
for name in json.loads(sys.argv[1]):
    for loaded in [m for m in sys.modules if m == "adapruner" or m.startswith("adapruner.")]:
        del sys.modules[loaded]
    try:
        importlib.import_module(name)
    except Exception:
        failures[name] = traceback.format_exc(limit=-3)
print(json.dumps(failures))
"""


def test_every_module_imports_first_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, "-c", IMPORT_EACH, json.dumps(list(MODULES))], cwd=ROOT,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout.splitlines()[-1]) == {}


def test_the_package_docstring_maps_every_top_level_module():
    """The data-flow map in ``adapruner/__init__.py`` names each module and package of the top level."""
    import adapruner

    top = {name.split(".")[1] for name in MODULES if name.count(".") >= 1}
    assert sorted(m for m in top if f"``{m}``" not in adapruner.__doc__) == []
