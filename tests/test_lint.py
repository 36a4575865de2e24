import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.skipif(shutil.which("ruff") is None and not (Path(sys.executable).parent / "ruff").exists(),
                    reason="ruff is not installed (pip install '.[dev]')")
def test_ruff_finds_nothing():
    ruff = shutil.which("ruff") or str(Path(sys.executable).parent / "ruff")
    result = subprocess.run([ruff, "check", "adapruner", "service", "tests", "bench"], cwd=ROOT,
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def undocumented_classes(source: str) -> list[str]:
    """The public top-level classes of ``source`` without a docstring."""
    return [node.name for node in ast.parse(source).body
            if isinstance(node, ast.ClassDef) and not node.name.startswith("_") and not ast.get_docstring(node)]


def test_every_public_class_says_what_it_is():
    assert undocumented_classes("class A:\n    pass\nclass _B:\n    pass\nclass C:\n    '''C.'''\n") == ["A"]
    missing = [f"{path.relative_to(ROOT)}: {name}" for folder in ("adapruner", "service")
               for path in sorted((ROOT / folder).rglob("*.py")) if "migrations" not in path.parts
               for name in undocumented_classes(path.read_text())]
    assert missing == []
