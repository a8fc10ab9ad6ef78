"""The package's import graph: no cycles, and imports point down the layers (README.md, Layout).

The graph is read from the source with ``ast`` (nothing is imported): an edge from module A to
module B for every ``import`` / ``from ... import`` of B in A, at module level or inside a function.
An import names the module it imports, not its parent packages (as import-linter counts them).
"""

from __future__ import annotations

import ast
import re
import pathlib

import pytest

PACKAGE = "ibmd_fast"
ROOT = pathlib.Path(__file__).resolve().parents[1] / PACKAGE

# Bottom first. A module may import its own layer and the layers below it, never one above.
# An entry names a module and everything below it (``ibmd_fast.train`` is the whole package);
# ``ibmd_fast`` itself names only the package's ``__init__``.
LAYERS = [
    (
        "kernels, their reference, plain utilities",
        [
            "ibmd_fast",
            "ibmd_fast.reference",
            "ibmd_fast.ops",
            "ibmd_fast.device",
            "ibmd_fast.paths",
            "ibmd_fast.config_io",
            "ibmd_fast.timing",
        ],
    ),
    ("seeds, noise and known pixels", ["ibmd_fast.seeds", "ibmd_fast.known_pixels"]),
    ("bridges", ["ibmd_fast.bridges"]),
    ("samplers, models, data", ["ibmd_fast.samplers", "ibmd_fast.models", "ibmd_fast.data"]),
    ("restore", ["ibmd_fast.restore"]),
    (
        "releases, importers, ONNX, evaluation",
        [
            "ibmd_fast.release",
            "ibmd_fast.importers",
            "ibmd_fast.imageio",
            "ibmd_fast.restore_files",
            "ibmd_fast.onnx",
            "ibmd_fast.onnx_program",
            "ibmd_fast.evaluate",
            "ibmd_fast.metrics",
            "ibmd_fast.paper_metrics",
            "ibmd_fast.classifier",
        ],
    ),
    ("train", ["ibmd_fast.train"]),
    ("cli", ["ibmd_fast.cli", "ibmd_fast.cli_config", "ibmd_fast.cli_errors", "ibmd_fast.__main__"]),
]


def package_modules() -> dict[str, pathlib.Path]:
    modules = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        modules[".".join(parts)] = path
    return modules


MODULES = package_modules()


class Import:
    def __init__(self, source: str, target: str, line: int, local: bool, reason: str):
        self.source, self.target, self.line, self.local, self.reason = source, target, line, local, reason

    def __repr__(self) -> str:
        where = "function-local" if self.local else "module-level"
        return f"{MODULES[self.source].relative_to(ROOT.parent)}:{self.line} {self.source} -> {self.target} ({where})"


def _comment(lines: list[str], node: ast.stmt) -> str:
    """The comment on the import's last line, else the comment lines just above it."""
    last = lines[(node.end_lineno or node.lineno) - 1]
    if "#" in last:
        return last.split("#", 1)[1].strip()
    above, i = [], node.lineno - 2
    while i >= 0 and lines[i].strip().startswith("#"):
        above.insert(0, lines[i].strip().lstrip("#").strip())
        i -= 1
    return " ".join(above)


def _targets(module: str, node: ast.stmt) -> list[str]:
    """The package modules an import statement imports (the nearest existing module for names)."""
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        if node.level:
            base = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            base = base[: len(base) - node.level + 1]
            prefix = ".".join(base + ([node.module] if node.module else []))
        else:
            prefix = node.module or ""
        names = [f"{prefix}.{alias.name}" for alias in node.names]
    found = []
    for name in names:
        while name and name not in MODULES:
            name = name.rpartition(".")[0]
        if name.startswith(PACKAGE) and name not in found:
            found.append(name)
    return found


def package_imports() -> list[Import]:
    imports = []
    for module, path in MODULES.items():
        text = path.read_text(encoding="utf-8")
        lines = text.splitlines()

        def visit(node: ast.AST, local: bool) -> None:
            for child in ast.iter_child_nodes(node):
                if isinstance(child, (ast.Import, ast.ImportFrom)):
                    for target in _targets(module, child):
                        if target != module:
                            imports.append(Import(module, target, child.lineno, local, _comment(lines, child)))
                inner = local or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
                visit(child, inner)

        visit(ast.parse(text, filename=str(path)), False)
    return imports


IMPORTS = package_imports()


def layer_of(module: str) -> int:
    for index, (_, entries) in enumerate(LAYERS):
        for entry in entries:
            if module == entry or (entry != PACKAGE and module.startswith(entry + ".")):
                return index
    raise KeyError(module)


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One cycle of the directed graph as a path ``[a, b, ..., a]``, or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_the_graph_is_read():
    """The walker sees the imports it must see (guards the test itself against reading nothing)."""
    edges = {(imp.source, imp.target) for imp in IMPORTS}
    assert ("ibmd_fast.bridges", "ibmd_fast.ops") in edges
    assert ("ibmd_fast.restore", "ibmd_fast.samplers") in edges
    assert ("ibmd_fast.cli", "ibmd_fast.cli_config") in edges
    assert any(imp.local for imp in IMPORTS)


def test_no_import_cycle():
    """Every import counts, function-local ones too: a lazy import hides a cycle, it does not break it."""
    edges: dict[str, set[str]] = {}
    for imp in IMPORTS:
        edges.setdefault(imp.source, set()).add(imp.target)
    cycle = find_cycle(edges)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_find_cycle_finds_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_every_module_has_a_layer():
    missing = [module for module in MODULES if not _has_layer(module)]
    assert not missing, f"modules in no layer (add them to LAYERS here and to README.md's Layout): {missing}"


def _has_layer(module: str) -> bool:
    try:
        layer_of(module)
    except KeyError:
        return False
    return True


def test_imports_point_down_the_layers():
    """No import of a higher layer at module level; a function-local one only with a comment saying why."""
    upward = [
        imp
        for imp in IMPORTS
        if _has_layer(imp.source) and _has_layer(imp.target) and layer_of(imp.target) > layer_of(imp.source)
    ]
    wrong = [imp for imp in upward if not imp.local or not imp.reason or imp.reason.startswith("noqa")]
    message = "\n".join(
        f"{imp!r}: {LAYERS[layer_of(imp.source)][0]} imports {LAYERS[layer_of(imp.target)][0]}" for imp in wrong
    )
    assert not wrong, "imports pointing up the layers:\n" + message


def test_function_local_imports_say_why():
    """An import of a package module inside a function carries a comment saying why it is not at
    module level (start-up time of the CLI, an optional part such as the compiled extension)."""
    silent = [imp for imp in IMPORTS if imp.local and (not imp.reason or imp.reason.startswith("noqa"))]
    assert not silent, (
        "function-local imports without a reason comment (move them to module level, or say why):\n"
        + "\n".join(repr(imp) for imp in silent)
    )


@pytest.mark.parametrize("source", ["ibmd_fast.samplers", "ibmd_fast.train.batches"])
def test_the_two_former_cycles_stay_broken(source):
    """samplers and train/batches import their helpers from a module below them, at module level."""
    targets = {imp.target for imp in IMPORTS if imp.source == source}
    assert {"ibmd_fast.restore", "ibmd_fast.train.common"}.isdisjoint(targets)


# Package __init__ files that gather their package's public API from its modules (a re-export is
# their job). Every other module defines what it lists in __all__ and is imported from where it is.
API_PACKAGES = {"ibmd_fast.models", "ibmd_fast.data", "ibmd_fast.train", "ibmd_fast.importers"}


def _dunder_all(tree: ast.Module) -> set[str]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            return {elt.value for elt in node.value.elts if isinstance(elt, ast.Constant)}
    return set()


def _module_level(node: ast.AST):
    """The statements run when the module is imported (not those inside functions or classes)."""
    for child in ast.iter_child_nodes(node):
        if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        yield child
        yield from _module_level(child)


def _keeps_unused(line: str) -> bool:
    return re.search(r"#\s*noqa:[^#]*\bF401\b", line) is not None


def re_exports() -> list[str]:
    """Module-level ``from ibmd_fast... import X`` whose X is in the module's ``__all__`` or kept by
    ``noqa: F401`` (imported only so that others can import it from here)."""
    found = []
    for module, path in MODULES.items():
        if module in API_PACKAGES:
            continue
        text = path.read_text(encoding="utf-8")
        lines, tree = text.splitlines(), ast.parse(text, filename=str(path))
        exported = _dunder_all(tree)
        for node in _module_level(tree):
            if not isinstance(node, ast.ImportFrom) or not _targets(module, node):
                continue
            statement = lines[node.lineno - 1 : (node.end_lineno or node.lineno)]
            for alias in node.names:
                name = alias.asname or alias.name
                line = next((line for line in statement if re.search(rf"\b{re.escape(alias.name)}\b", line)), "")
                if name in exported or _keeps_unused(line) or _keeps_unused(statement[0]):
                    found.append(f"{path.relative_to(ROOT.parent)}:{node.lineno} {module} re-exports {name}")
    return found


def test_no_re_exports():
    """A name is imported from the module that defines it; no module forwards another's names
    (the package ``__init__`` files in API_PACKAGES excepted)."""
    found = re_exports()
    assert not found, "re-exports (import the name from where it is defined):\n" + "\n".join(found)
