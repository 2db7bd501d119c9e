"""The light-agent rule: ``agent`` and ``shared`` never pull in the server's heavy dependencies.

Two independent checks:

1. a fresh interpreter imports every module of both packages and then looks
   at ``sys.modules`` (catches transitive imports, e.g. via a third party);
2. an ``ast`` scan of every source file (catches lazy imports inside
   functions, which the first check cannot see).

Neither check may skip: a missing ``agent`` package is a failure.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIGHT_PACKAGES = ("shared", "agent")
FORBIDDEN = ("tensorflow", "tf_keras", "keras", "sqlalchemy", "alembic", "server")

# Where a forbidden package may be *named* in a dynamic import: the runtime
# adapter's last-resort fallback (development only). Static imports are never allowed.
DYNAMIC_IMPORT_ALLOWED = {("shared/backends.py", "tensorflow.lite"), ("shared/backends.py", "tensorflow")}

_PROBE = textwrap.dedent(
    """
    import importlib, json, pkgutil, sys

    packages, forbidden = {packages!r}, {forbidden!r}
    imported, problems = [], []

    def on_error(name):
        problems.append(f"cannot import package {{name}}: {{sys.exc_info()[1]!r}}")

    for package_name in packages:
        try:
            package = importlib.import_module(package_name)
        except Exception as exc:
            problems.append(f"cannot import {{package_name}}: {{exc!r}}")
            continue
        imported.append(package_name)
        file = getattr(package, "__file__", None)
        if not file:
            problems.append(f"{{package_name}} is not a regular package (no __init__.py): {{package.__path__}}")
            continue
        for info in pkgutil.walk_packages(package.__path__, package_name + ".", onerror=on_error):
            try:
                importlib.import_module(info.name)
            except Exception as exc:
                problems.append(f"cannot import {{info.name}}: {{exc!r}}")
                continue
            imported.append(info.name)

    files = {{name: getattr(sys.modules[name], "__file__", None) for name in imported}}
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in forbidden)
    print(json.dumps({{"files": files, "forbidden": heavy, "problems": problems}}))
    """
)


def _module_files(package: str) -> list[Path]:
    return sorted(p for p in (ROOT / package).rglob("*.py") if "__pycache__" not in p.parts)


def _run_probe(packages: tuple[str, ...], forbidden: tuple[str, ...]) -> dict[str, object]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(packages=packages, forbidden=forbidden)],
        cwd=ROOT,  # sys.path[0] == "" -> the packages of this checkout win
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, f"probe crashed:\n{result.stdout}\n{result.stderr}"
    report: dict[str, object] = json.loads(result.stdout.strip().splitlines()[-1])
    return report


@pytest.fixture(scope="module")
def probe() -> dict[str, object]:
    return _run_probe(LIGHT_PACKAGES, FORBIDDEN)


def test_probe_reports_missing_packages_and_forbidden_modules() -> None:
    """Guards the guard: a missing package is a problem, and imported forbidden modules are seen."""
    report = _run_probe(("shared", "no_such_agent_package"), ("json", "shared"))
    problems = report["problems"]
    assert isinstance(problems, list) and len(problems) == 1 and "no_such_agent_package" in problems[0]
    forbidden = report["forbidden"]
    assert isinstance(forbidden, list) and "json" in forbidden and "shared.messages" in forbidden


def test_light_packages_exist_as_regular_packages() -> None:
    for package in LIGHT_PACKAGES:
        init = ROOT / package / "__init__.py"
        assert init.is_file(), f"{package}/ is missing or has no __init__.py"


def test_every_light_module_imports_cleanly(probe: dict[str, object]) -> None:
    assert probe["problems"] == []


def test_importing_every_light_module_pulls_no_heavy_dependency(probe: dict[str, object]) -> None:
    files = probe["files"]
    assert isinstance(files, dict)
    assert {"shared", "agent"} <= set(files), "both packages must have been imported"
    assert "shared.interpreter" in files  # imported, never called: its runtime import is lazy
    assert probe["forbidden"] == [], f"heavy modules imported: {probe['forbidden']}"


def test_walk_found_every_module_of_this_checkout(probe: dict[str, object]) -> None:
    """Guards the probe itself: it imported exactly the files on disk, from this checkout."""
    files = probe["files"]
    assert isinstance(files, dict)
    imported = {Path(f).resolve() for f in files.values() if f}
    for package in LIGHT_PACKAGES:
        on_disk = set(_module_files(package))
        assert on_disk, f"no modules found under {package}/"
        missing = sorted(str(p.relative_to(ROOT)) for p in on_disk - imported)
        assert not missing, f"modules never imported by the probe: {missing}"
        assert Path(str(files[package])).resolve() == ROOT / package / "__init__.py"


def _forbidden(module: str) -> bool:
    return module.split(".")[0] in FORBIDDEN


def _violations_in_file(path: Path) -> list[str]:
    return _static_violations(path.read_text(encoding="utf-8"), path.relative_to(ROOT).as_posix())


def _static_violations(source: str, rel: str) -> list[str]:
    """Forbidden static imports (anywhere, including inside functions) and literal dynamic imports."""
    tree = ast.parse(source, filename=rel)
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, f"import {a.name}") for a in node.names if _forbidden(a.name)]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module and _forbidden(node.module):
                found.append((node.lineno, f"from {node.module} import ..."))
        elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant):
            # importlib.import_module("x") / import_module("x") / __import__("x") with a literal name
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            target = node.args[0].value
            dynamic = name in ("import_module", "__import__") and isinstance(target, str) and _forbidden(target)
            if dynamic and (rel, target) not in DYNAMIC_IMPORT_ALLOWED:
                found.append((node.lineno, f"{name}({target!r})"))
    return [f"{rel}:{line}: {what}" for line, what in sorted(found)]


@pytest.mark.parametrize("package", LIGHT_PACKAGES)
def test_no_source_file_imports_a_heavy_dependency(package: str) -> None:
    files = _module_files(package)
    assert files, f"{package}/ has no Python files"
    violations = [v for path in files for v in _violations_in_file(path)]
    assert not violations, "forbidden imports:\n" + "\n".join(violations)


def test_ast_scan_sees_lazy_and_dynamic_imports() -> None:
    """The scanner itself must catch what the import probe cannot."""
    source = textwrap.dedent(
        """
        import os
        from . import server
        from .server import x
        def f():
            import tensorflow as tf
            from sqlalchemy.orm import Session
            import keras.layers, numpy
            from server.db import models
            importlib.import_module("alembic.command")
            __import__("tf_keras")
            importlib.import_module("tensorflow.lite")
        """
    )
    found = _static_violations(source, "agent/fake.py")
    assert [v.split(": ", 1)[1] for v in found] == [
        "import tensorflow",
        "from sqlalchemy.orm import ...",
        "import keras.layers",
        "from server.db import ...",
        "import_module('alembic.command')",
        "__import__('tf_keras')",
        "import_module('tensorflow.lite')",
    ]
    # The one allowed dynamic name, in the one allowed file.
    assert _static_violations('importlib.import_module("tensorflow.lite")', "shared/backends.py") == []


def test_runtime_adapter_names_tensorflow_only_dynamically() -> None:
    """shared/backends.py (the runtime adapter) may name tensorflow.lite as its last back-end, never import it
    statically."""
    path = ROOT / "shared" / "backends.py"
    assert path.is_file()
    assert _violations_in_file(path) == []
    assert "tensorflow.lite" in path.read_text(encoding="utf-8")
