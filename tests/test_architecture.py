"""The house rules that keep the code easy to change, checked rather than hoped for."""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# import-linter cannot see packages that setuptools maps from other folders in an editable
# install, so the import direction is checked on the source itself.
FORBIDDEN = {
    "planner": ("offload.runtime", "offload.models"),
    "models": ("offload.runtime",),
}
# Each outside library has one edge.
EDGES = {
    "llama_cpp": ("runtime/runner/",),
    "click": ("runtime/cli",),
    "fastapi": ("runtime/server/",),
    "uvicorn": ("runtime/server/", "runtime/cli/main.py"),
    "pynvml": ("planner/hardware",),
}


def imports_of(path: Path) -> list[str]:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.append(node.module)
    return names


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_run_one_way(package: str) -> None:
    bad = []
    for path in (ROOT / package).rglob("*.py"):
        for name in imports_of(path):
            if name.startswith(FORBIDDEN[package]):
                bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad


def test_no_bare_package_imports() -> None:
    bad = []
    for folder in ("planner", "models", "runtime", "tests"):
        for path in (ROOT / folder).rglob("*.py"):
            for name in imports_of(path):
                if name.split(".")[0] in ("planner", "models", "runtime"):
                    bad.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not bad, "import through offload.<package>"


@pytest.mark.parametrize("library", sorted(EDGES))
def test_outside_libraries_stay_at_their_edge(library: str) -> None:
    bad = []
    for folder in ("planner", "models", "runtime"):
        for path in (ROOT / folder).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            if any(n.split(".")[0] == library for n in imports_of(path)) and not rel.startswith(
                EDGES[library]
            ):
                bad.append(rel)
    assert not bad


def _tool(name: str) -> str:
    """A command-line tool of the test extras, installed beside this Python."""
    path = Path(sys.executable).parent / name
    found = str(path) if path.exists() else shutil.which(name)
    assert found, (
        f"{name} is not installed; it comes with the test extras: pip install -e '.[test]'"
    )
    return found


def test_ruff_finds_nothing() -> None:
    r = subprocess.run([_tool("ruff"), "check", str(ROOT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout[-3000:]


def test_ruff_format_is_applied() -> None:
    r = subprocess.run(
        [_tool("ruff"), "format", "--check", str(ROOT)], capture_output=True, text=True
    )
    assert r.returncode == 0, "run `ruff format .`:\n" + r.stdout[-3000:]


def test_mypy_finds_nothing(tmp_path: Path) -> None:
    """The type checker (pyproject's [tool.mypy]) over every module we ship.

    The three folders install as ``offload.*``; mypy is pointed at that package through links in a
    temporary folder, so it checks the sources in place without an install.
    """
    pkg = tmp_path / "offload"
    pkg.mkdir()
    for folder in ("planner", "runtime", "models"):
        (pkg / folder).symlink_to(ROOT / folder, target_is_directory=True)
    r = subprocess.run(
        [_tool("mypy"), "--config-file", str(ROOT / "pyproject.toml"), "--cache-dir", str(tmp_path / ".cache"),
         "-p", "offload.planner", "-p", "offload.models", "-p", "offload.runtime"],
        capture_output=True, text=True, cwd=tmp_path,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-1000:]
    assert "no issues found in" in r.stdout
