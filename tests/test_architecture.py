"""The package's layering: data flows one way.

The library (``memformer_fast`` outside ``app/``) never imports the command-line application, and
no two library modules import each other (directly or around a loop), even lazily inside a
function; an import for type hints only (``if TYPE_CHECKING:``) does not run and does not count.
"""

from __future__ import annotations

import ast
from pathlib import Path

import memformer_fast

PACKAGE = Path(memformer_fast.__file__).resolve().parent


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _runtime_nodes(tree: ast.AST) -> list[ast.AST]:
    """Every node of ``tree`` but those under ``if TYPE_CHECKING:`` (type hints never run)."""
    nodes: list[ast.AST] = []
    stack = [tree]
    while stack:
        node = stack.pop()
        nodes.append(node)
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))
    return nodes


def _imports(path: Path) -> set[str]:
    """Every ``memformer_fast`` module ``path`` imports at run time, anywhere in the file (a lazy
    import inside a function counts: it is a cycle all the same)."""
    name = _module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package
            for _ in range(node.level - 1):
                base = base.rpartition(".")[0]
            module = node.module or ""
            prefix = (base + ("." + module if module else "")) if node.level else module
            found.add(prefix)
            found.update(f"{prefix}.{a.name}" for a in node.names)
    return {m for m in found if m.startswith("memformer_fast")}


def _library_files() -> list[Path]:
    return [
        p
        for p in sorted(PACKAGE.rglob("*.py"))
        if "app" not in p.relative_to(PACKAGE).parts and p.name != "__main__.py"
    ]


def test_the_library_never_imports_the_application() -> None:
    offenders = {
        _module_name(p): sorted(m for m in _imports(p) if m.startswith("memformer_fast.app"))
        for p in _library_files()
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_library_modules_form_no_import_cycle() -> None:
    modules = {_module_name(p): p for p in _library_files()}
    graph = {
        name: {m for m in _imports(path) if m in modules and m != name}
        for name, path in modules.items()
    }
    # A package's __init__ imports its own modules: an edge into it from one of them is not a
    # cycle of logic (it only reaches a sibling through the package).
    for name in graph:
        graph[name] = {m for m in graph[name] if not name.startswith(m + ".")}
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = path[path.index(nxt) :] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        path.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


MAX_FUNCTION_LINES = 80


def test_every_function_outside_the_kernels_is_short() -> None:
    """Under 80 lines (decorators and docstring included); Triton kernels (``@triton.jit``) are
    exempt: a kernel is one program, and splitting it would cost registers or clarity."""
    long = []
    # An editable install keeps the kernels' sources in kernels/ beside the package.
    roots = [PACKAGE, *[d for d in [PACKAGE.parent / "kernels"] if d.is_dir()]]
    for path in sorted(p for root in roots for p in root.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            if any("jit" in ast.unparse(d) for d in node.decorator_list):
                continue
            start = min([node.lineno] + [d.lineno for d in node.decorator_list])
            lines = (node.end_lineno or node.lineno) - start + 1
            if lines >= MAX_FUNCTION_LINES:
                long.append(f"{path.relative_to(PACKAGE.parent)}:{start} {node.name} ({lines})")
    assert long == []
