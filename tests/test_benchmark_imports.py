"""Every name a benchmark script imports exists: memsvc's modules and names, and the script's sibling modules.

The benchmarks are scripts, run for hours and rarely, so a renamed memsvc function would otherwise show only
when someone runs one. This reads each file under benchmarks/ (imports inside functions included) and checks
each `from memsvc... import name` against the real module, and each import of a sibling file (served.py,
benchmarks/peers/cells.py, ...) against the names that file defines. Other packages (torch, the peers' kvpress)
are not checked here.
"""
from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
SCRIPTS = sorted(p for p in BENCH.rglob("*.py") if "history" not in p.parts and ".venv" not in str(p))


def _defined(path: Path) -> set[str]:
    """Top-level names a module file defines (functions, classes, assignments, imports)."""
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(t) if isinstance(n, ast.Name)}
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
    return names


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in the file; names is empty for `import module`."""
    out = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module != "__future__":
            out.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            out += [(a.name, []) for a in node.names]
    return out


def test_the_scripts_are_found():
    names = {p.relative_to(BENCH).as_posix() for p in SCRIPTS}
    assert {"codecs.py", "load.py", "served.py", "peers/run.py", "peers/worker.py"} <= names


@pytest.mark.parametrize("path", SCRIPTS, ids=lambda p: p.relative_to(BENCH).as_posix())
def test_every_imported_name_exists(path):
    missing = []
    for module, names in _imports(path):
        sibling = path.parent / f"{module}.py"
        if module.split(".")[0] == "memsvc":
            mod = importlib.import_module(module)
            for name in names:
                if not hasattr(mod, name):
                    try:
                        importlib.import_module(f"{module}.{name}")
                    except ModuleNotFoundError:
                        missing.append(f"{module}.{name}")
        elif sibling.exists():
            defined = _defined(sibling)
            missing += [f"{module}.{n}" for n in names if n not in defined]
    assert not missing, f"{path.name} imports names that do not exist: {missing}"
