"""The shape of the package tree: no import cycles anywhere, no module over 400 lines, and nothing outside
memsvc/cache asks which policy or cache class a session has.

The modules are the .py files of memsvc/, store/, kernels/, proto/ (generated *_pb2* stubs left out) and
clients/, named as they import (`kernels/codec.py` is `memsvc.kernels.codec`). An edge a -> b is an import
statement in a (at any depth: a function-level import counts too) that loads b: `import x.y`, `from x import y`
(y a module: x.y; otherwise the package x itself), relative forms resolved against a's package.
"""
from __future__ import annotations

import ast
import re
from pathlib import Path


ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"memsvc": "memsvc", "store": "memsvc.store", "kernels": "memsvc.kernels",
            "proto": "memsvc.proto", "clients": "memsvc.clients"}
GENERATED = re.compile(r"_pb2(_grpc)?\.py$")
MAX_LINES = 400


def modules(root: Path = ROOT) -> dict[str, Path]:
    """Dotted module name -> file, for every module of the tree."""
    found = {}
    for folder, package in PACKAGES.items():
        for path in sorted((root / folder).rglob("*.py")):
            if GENERATED.search(path.name):
                continue
            parts = list(path.relative_to(root / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([package, *parts])] = path
    return found


def _absolute(node: ast.ImportFrom, package: str) -> str:
    """The module a `from ... import` statement reads from, relative levels resolved against `package`."""
    if not node.level:
        return node.module or ""
    parts = package.split(".")
    if node.level - 1 > len(parts) - 1:
        raise ValueError(f"relative import beyond the top package {package!r}")
    base = parts[: len(parts) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imports_of(name: str, path: Path, known: set[str]) -> set[str]:
    """The modules of `known` that the module `name` (its source at `path`) imports."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            out.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, package)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                out.add(sub if sub in known else base)
    return {m for m in out if m in known and m != name}


def import_graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    return {name: imports_of(name, path, set(mods)) for name, path in mods.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (each a set of mutually importing
    modules), sorted; Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                found.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_cycle_finder_on_a_small_graph():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a", "d"}, "d": set(), "e": {"d", "f"}, "f": {"e"}, "g": {"g"}}
    assert cycles(graph) == [["a", "b", "c"], ["e", "f"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_the_graph_resolves_absolute_and_relative_imports():
    graph = import_graph()
    assert "memsvc.kernels.codec" in graph["memsvc.cache.tiered.cold"]          # from memsvc.kernels.codec import Packed
    assert "memsvc.kernels.dispatch" in graph["memsvc.kernels.uniform_codec"]  # from .dispatch import ...
    assert "memsvc.kernels.lloyd_max" in graph["memsvc.kernels.turboquant"]   # from . import lloyd_max
    assert "memsvc.kernels.uniform_triton" in graph["memsvc.kernels.dispatch"]  # an import inside a function
    assert not any(GENERATED.search(str(p)) for p in modules().values())


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


def _lines(path: Path) -> int:
    return len(path.read_text(encoding="utf-8").splitlines())


def test_no_module_over_400_lines():
    """The packages, and the tests, benchmarks and tools beside them."""
    long = {name: _lines(path) for name, path in modules().items() if _lines(path) > MAX_LINES}
    for folder in ("tests", "benchmarks", "tools"):
        long |= {str(p.relative_to(ROOT)): _lines(p) for p in (ROOT / folder).rglob("*.py")
                 if not any(x.startswith(".") for x in p.relative_to(ROOT).parts)  # a venv beside the peers
                 and _lines(p) > MAX_LINES}
    assert not long, f"modules over {MAX_LINES} lines: " + ", ".join(f"{k} ({v})" for k, v in sorted(long.items()))


# A policy switch: code that decides by a policy's name, its cache class name, a cache's type or a stored
# layout's form. Only memsvc/cache (its factory and policies) may; this is the pattern the check greps for.
POLICY_NAMES = "full|tiered|tiered-v8|k8v8|k6v4|kivi2|kivi4|turbo3|streaming|h2o|snapkv|pyramidkv"
SWITCH = re.compile(
    r"""isinstance\([^)]*(KV|Cache|Tier|Full)"""  # a cache's type
    r"""|\bpolicy(\.name|\.cache)?\s*(==|!=|\bin\b)"""  # a policy compared
    r"""|\.cache\s*(==|!=)\s*["']"""  # a policy's cache class name compared
    rf"""|["']({POLICY_NAMES})["']\s*(==|!=)|(==|!=)\s*["']({POLICY_NAMES})["']"""  # a name compared
    r"""|\.get\(\s*["']form["']\)"""  # a stored layout's form
)


def switches(root: Path = ROOT) -> list[str]:
    out = []
    for name, path in modules(root).items():
        if name == "memsvc.cache" or name.startswith("memsvc.cache."):
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if re.search(r"""\w+\[["']policy["']\]""", line):
                continue  # a report picking its rows by their policy label (the `full` baseline's rows) decides nothing
            if SWITCH.search(line):
                out.append(f"{path.relative_to(root)}:{i}: {line.strip()}")
    return out


def test_no_policy_switch_outside_the_cache():
    found = switches()
    assert not found, "code outside memsvc/cache asks which policy a session has:\n" + "\n".join(found)


def test_the_switch_pattern_finds_the_switches_the_tree_had():
    for line in ('if policy.name == "full":', "if isinstance(kv, TierKV):", 'if rec.policy == "full":',
                 'if lay.get("form") != "tiered":', 'return cache.stats() if isinstance(cache, TierCache) else 0',
                 'if self.name == "full":', 'if policy.cache == "tiered":'):
        assert SWITCH.search(line), line
    for line in ('policy = record_policy(rec)', 'run.policy.plan(i, n)', 'name = "tiered"'):
        assert not SWITCH.search(line), line
