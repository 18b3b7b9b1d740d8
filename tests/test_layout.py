"""The rooms of ARCHITECTURE.md and what each may import, checked on the source: a rule
that only lives in a document is broken by the next change."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.daemon import REPO

PACKAGE = REPO / "governor"


def imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


def room(name: str) -> list[Path]:
    return sorted((PACKAGE / name).rglob("*.py"))


#: room -> the governor modules it must not import (prefixes)
FORBIDDEN = {
    # what a job imports: nothing of the daemon's (tests/test_client_imports.py also runs
    # it with the daemon's libraries blocked)
    "client": ("governor.actuators", "governor.api", "governor.cli", "governor.config",
               "governor.control", "governor.host", "governor.jobs", "governor.policy",
               "governor.safety", "governor.sampling", "governor.service",
               "governor.catalog", "governor.snapshot"),
    # pure: no host, no actuators, no service
    "policy": ("governor.actuators", "governor.api", "governor.cli", "governor.control",
               "governor.host", "governor.safety", "governor.sampling", "governor.service"),
    # acting never depends on sampling; both go through governor.host
    "actuators": ("governor.sampling", "governor.api", "governor.cli", "governor.service",
                  "governor.control.controller"),
    "sampling": ("governor.actuators", "governor.api", "governor.cli", "governor.control",
                 "governor.safety", "governor.service"),
}


@pytest.mark.parametrize("name", sorted(FORBIDDEN))
def test_each_room_imports_only_what_it_may(name: str) -> None:
    broken = [f"{path.relative_to(REPO)} imports {module}"
              for path in room(name) for module in sorted(imports(path))
              if any(module == f or module.startswith(f + ".") for f in FORBIDDEN[name])]
    assert not broken, "\n".join(broken)


def test_no_test_module_imports_another() -> None:
    """Shared helpers live in tests/support/."""
    broken = [f"{path.name} imports {module}"
              for path in sorted((REPO / "tests").glob("test_*.py"))
              for module in sorted(imports(path)) if module.startswith("tests.test_")]
    assert not broken, "\n".join(broken)


def test_the_status_model_is_the_standard_library_only() -> None:
    """`governor status` and `governor top` draw one model of the status JSON; it must not
    reach for the daemon's side (its pydantic models, fastapi) to describe what came over
    HTTP."""
    import sys

    path = PACKAGE / "cli" / "status_model.py"
    broken = [module for module in sorted(imports(path))
              if module.split(".")[0] not in sys.stdlib_module_names | {"__future__"}]
    assert not broken, f"{path.relative_to(REPO)} imports {broken}"
