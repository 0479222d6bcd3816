"""Built-in processors and exporters are written against the public plugin API: the
``collector`` package root and the modules ``docs/plugins.md`` declares public."""

from __future__ import annotations

import ast
import re

import pytest

import collector
from tests.support import ROOT


def public_modules() -> set[str]:
    """The modules of the guide's "module | what it holds" table."""
    guide = (ROOT / "docs" / "plugins.md").read_text()
    table = guide.split("| module | what it holds |", 1)[1].split("\n\n", 1)[0]
    return {name for row in table.splitlines() for name in re.findall(r"`(collector\.\w+)`", row)}


def collector_imports(path) -> list[tuple[str, list[str]]]:
    """(module, names) of each ``from collector... import`` in a file."""
    tree = ast.parse(path.read_text())
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "collector":
            found.append((node.module or "", [alias.name for alias in node.names]))
        elif isinstance(node, ast.Import):
            found += [(a.name, []) for a in node.names if a.name.split(".")[0] == "collector"]
    return found


BUILT_INS = sorted(
    path for folder in ("processors", "exporters") for path in (ROOT / folder).rglob("*.py")
)


def test_the_guide_declares_public_modules_that_exist():
    modules = public_modules()
    assert "collector.storage" in modules and "collector.calls" in modules
    for module in modules:
        __import__(module)


@pytest.mark.parametrize("path", BUILT_INS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_a_built_in_imports_only_the_public_api(path):
    allowed = public_modules()
    for module, names in collector_imports(path):
        if module == "collector":
            assert set(names) <= set(collector.__all__), (path.name, names)
        else:
            assert module in allowed, f"{path.name} imports {module}, not public API"
