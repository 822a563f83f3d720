"""The layout: import-linter's contracts (pyproject.toml) hold, and nothing hides an import between packages."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PKG = ROOT / "pyvmm"


def _lint_imports(cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd)}
    main = "from importlinter.cli import lint_imports_command; lint_imports_command()"
    return subprocess.run([sys.executable, "-c", main, "--config", str(cwd / "pyproject.toml"), "--no-cache"],
                          cwd=cwd, env=env, capture_output=True, text=True, timeout=120, check=False)


def _package_of(module: str) -> str:
    return ".".join(module.split(".")[:2])


def _sources() -> list[Path]:
    return [p for p in PKG.rglob("*.py") if "build" not in p.relative_to(PKG).parts]


def test_the_import_contracts_hold() -> None:
    r = _lint_imports(ROOT)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-2000:]
    assert "2 kept, 0 broken" in r.stdout


def test_a_policy_process_that_imports_the_vmm_breaks_the_contracts(tmp_path: Path) -> None:
    """The contracts bite: the same tree with one upward import (policy -> vmm) fails lint-imports."""
    shutil.copytree(PKG, tmp_path / "pyvmm", ignore=shutil.ignore_patterns("build", "__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    engine = tmp_path / "pyvmm" / "policy" / "engine.py"
    engine.write_text(engine.read_text() + "\nfrom pyvmm.vmm import kvm  # noqa: E402, F401\n")
    r = _lint_imports(tmp_path)
    assert r.returncode != 0 and "BROKEN" in r.stdout and "pyvmm.policy.engine -> pyvmm.vmm.kvm" in r.stdout, \
        r.stdout[-3000:]


def test_no_function_imports_another_package() -> None:
    """Imports between pyvmm's packages sit at module level, where import-linter and a reader see them."""
    hidden = []
    for path in _sources():
        mine = _package_of(".".join(path.relative_to(ROOT).with_suffix("").parts))
        for fn in ast.walk(ast.parse(path.read_text())):
            if not isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(fn):
                for target in _imported(node, path):
                    if target.startswith("pyvmm") and _package_of(target) != mine:
                        hidden.append(f"{path.relative_to(ROOT)}:{node.lineno} {target}")
    assert not hidden, hidden


def _imported(node: ast.AST, path: Path) -> list[str]:
    """The modules an import statement names, relative imports resolved against `path`'s package."""
    if isinstance(node, ast.Import):
        return [a.name for a in node.names]
    if not isinstance(node, ast.ImportFrom):
        return []
    base = node.module or ""
    if node.level:
        parts = list(path.relative_to(ROOT).with_suffix("").parts)[:-node.level]
        base = ".".join(parts + ([base] if base else []))
    return [f"{base}.{a.name}" if base == "pyvmm" else base for a in node.names]


def test_no_relative_imports_and_no_import_fallbacks() -> None:
    """Imports name their module in full, and a sibling package of this repo is never optional."""
    bad = []
    for path in _sources():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} relative import")
            if isinstance(node, ast.Try) and any(
                    isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                    for h in node.handlers) and any(
                    t.startswith("pyvmm") for stmt in node.body for n in ast.walk(stmt) for t in _imported(n, path)):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno} ImportError fallback")
    assert not bad, bad


def test_the_only_installed_top_level_package_is_pyvmm() -> None:
    setuptools = pytest.importorskip("setuptools")
    found = setuptools.find_packages(str(ROOT), include=["pyvmm*"])
    top = {p.split(".")[0] for p in setuptools.find_packages(str(ROOT), exclude=["tests*"])}
    assert top == {"pyvmm"}, top
    assert {"pyvmm.vmm", "pyvmm.device", "pyvmm.policy", "pyvmm.bench", "pyvmm.common", "pyvmm.abi"} <= set(found)


def _loaded_by(module: str, packages: tuple[str, ...]) -> list[str]:
    """The modules of `packages` (each with its submodules) that importing `module` loads in a fresh interpreter."""
    subs = tuple(p + "." for p in packages)
    code = (f"import sys, {module}; "
            f"print(' '.join(sorted(m for m in sys.modules if m in {packages!r} or m.startswith({subs!r}))))")
    out = subprocess.run([sys.executable, "-c", code], cwd="/", env={**os.environ, "PYTHONPATH": str(ROOT)},
                         capture_output=True, text=True, timeout=60, check=True).stdout
    return out.split()


def test_the_policy_process_runs_without_trio_or_ssl() -> None:
    """One policy process per VM: trio (and the ssl it loads) cost it about 5 MiB resident (docs/scale.md)."""
    loaded = _loaded_by("pyvmm.policy.process", ("trio", "ssl", "asyncio"))
    assert not loaded, f"the policy process imports {loaded}"


def test_a_vmm_does_not_import_the_bench_or_the_lab() -> None:
    """`pyvmm boot` is the VMM for its VM's life: the bench's and the lab's modules cost it 2 MiB resident."""
    loaded = _loaded_by("pyvmm.cli.main", ("pyvmm.bench", "pyvmm.lab", "matplotlib"))
    assert not loaded, f"pyvmm boot imports {loaded}"
