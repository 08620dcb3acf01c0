"""The shape of the source tree, checked from its AST: no module over 500 lines, no function
over 70, no import cycle (imports under TYPE_CHECKING and inside functions included), and no
import from jitlaunch/backends/ up into jitlaunch/lifecycle/."""

from __future__ import annotations

import ast
from pathlib import Path

MAX_MODULE_LINES = 500
MAX_FUNCTION_LINES = 70
PACKAGE = Path(__file__).resolve().parent.parent / "jitlaunch"


def module_names(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py under ``root`` (a package directory)."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = [root.name, *path.relative_to(root).with_suffix("").parts]
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> set[str]:
    """The modules of ``modules`` that ``name`` imports, wherever the import statement is.
    ``from pkg import sub`` imports ``pkg`` and, when it is a module, ``pkg.sub``."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            targets = [target] + [f"{target}.{a.name}" for a in node.names]
        for target in targets:
            # importing a.b.c runs a/__init__ and a/b/__init__ first
            parts = target.split(".")
            for i in range(1, len(parts) + 1):
                candidate = ".".join(parts[:i])
                if candidate in modules and candidate != name:
                    found.add(candidate)
    return found


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def problems(root: Path) -> list[str]:
    modules = module_names(root)
    found = []
    graph = {}
    for name, path in modules.items():
        text = path.read_text()
        lines = len(text.splitlines())
        if lines > MAX_MODULE_LINES:
            found.append(f"{path.relative_to(root.parent)}: {lines} lines (at most {MAX_MODULE_LINES})")
        for node in ast.walk(ast.parse(text, str(path))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = (node.end_lineno or node.lineno) - node.lineno + 1
                if size > MAX_FUNCTION_LINES:
                    found.append(f"{path.relative_to(root.parent)}:{node.lineno}: {node.name} is "
                                 f"{size} lines (at most {MAX_FUNCTION_LINES})")
        graph[name] = imports_of(name, path, modules)
        backends, lifecycle = f"{root.name}.backends", f"{root.name}.lifecycle"
        if name.startswith(backends):
            for dep in sorted(graph[name]):
                if dep == lifecycle or dep.startswith(lifecycle + "."):
                    found.append(f"{name} imports {dep}: backends/ never imports lifecycle/")
    # A package's __init__ importing its own submodules is how packages work, not a cycle.
    for name in graph:
        graph[name] = {d for d in graph[name]
                       if not (modules[name].name == "__init__.py" and d.startswith(name + "."))
                       and not (modules[d].name == "__init__.py" and name.startswith(d + "."))}
    found += [f"import cycle: {' -> '.join(c)}" for c in cycles(graph)]
    return found


def test_the_tree_keeps_its_shape() -> None:
    assert problems(PACKAGE) == []


def _tree(tmp_path: Path, files: dict[str, str]) -> Path:
    root = tmp_path / "pkg"
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    return root


def test_the_check_finds_each_kind_of_problem(tmp_path: Path) -> None:
    long_function = "def f():\n" + "    x = 1\n" * 75
    root = _tree(tmp_path, {
        "__init__.py": "",
        "a.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from .b import B\n",
        "b.py": "def g():\n    from . import a\n",
        "big.py": "x = 1\n" * 501,
        "long.py": long_function,
        "backends/__init__.py": "",
        "backends/x.py": "from ..lifecycle.state import State\n",
        "lifecycle/__init__.py": "",
        "lifecycle/state.py": "State = 1\n",
    })
    found = problems(root)
    assert "import cycle: pkg.a -> pkg.b" in found
    assert any(p.startswith("pkg/big.py: 501 lines") for p in found)
    assert any("long.py:1: f is 76 lines" in p for p in found)
    assert "pkg.backends.x imports pkg.lifecycle: backends/ never imports lifecycle/" in found
    assert len(found) == 5, found  # (and pkg.lifecycle.state, reported with it)


def test_a_package_importing_its_own_modules_is_no_cycle(tmp_path: Path) -> None:
    root = _tree(tmp_path, {
        "__init__.py": "from .m import x\n",
        "m.py": "x = 1\n",
        "sub/__init__.py": "from .n import y\n",
        "sub/n.py": "from ..m import x\ny = x\n",
    })
    assert problems(root) == []
