"""The package's layering, read from the code's own imports (Python's `ast`, imports inside functions and
`importlib.import_module("...")` included): every module imports only from its own layer or below, no modules
import each other in a loop, few own-module imports hide inside functions, and no source file grows past 500 lines.
docs/design.md draws the same layers."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("dropup", "analysis")
MAX_LINES = 500
MAX_FUNCTION_IMPORTS = 20

# bottom -> top; a module belongs to the first prefix that names it or a package above it
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("helpers", ("dropup.files", "dropup.paths", "dropup.rng", "dropup.routing", "dropup.cpu", "dropup.liveness")),
    ("config", ("dropup.config", "dropup.balancing", "dropup.schema")),
    ("model", ("dropup.model", "dropup.moe", "dropup.flops", "dropup.tensors", "dropup.memory")),
    ("weights", ("dropup.init", "dropup.families", "dropup.hf", "dropup.shards")),
    ("data", ("dropup.data",)),
    ("converter", ("dropup.upcycle",)),
    ("trainer", ("dropup.stages", "dropup.train", "dropup.lit", "dropup.dense_seeds", "dropup.ddp", "dropup.fsdp",
                 "dropup.export", "dropup.resume", "dropup.checkpoint_io", "dropup.evaluation")),
    ("top", ("analysis", "dropup.tools", "dropup.scaling", "dropup.cluster", "run")),
]


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def source_files() -> list[Path]:
    return sorted(p for package in PACKAGES for p in (ROOT / package).rglob("*.py")) + [ROOT / "run.py"]


MODULES = {module_name(p): p for p in source_files()}


def layer_of(module: str) -> int:
    for index, (_, prefixes) in enumerate(LAYERS):
        if any(module == p or module.startswith(p + ".") for p in prefixes):
            return index
    raise AssertionError(f"{module} belongs to no layer: add it to tests/test_layers.py's LAYERS and docs/design.md")


def resolve(name: str) -> str | None:
    """The project module an import names (a name imported from a package may be a submodule), or None."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(path: Path) -> list[tuple[str, bool, int]]:
    """(imported project module, inside a function, line) for every import in `path`."""
    return imports_in(path.read_text(), module_name(path), path.name == "__init__.py")


def imports_in(source: str, module: str, is_package: bool = False) -> list[tuple[str, bool, int]]:
    """`imports_of` for the source of `module`."""
    tree = ast.parse(source)
    package = module if is_package else module.rpartition(".")[0]
    found: list[tuple[str, bool, int]] = []

    def visit(node: ast.AST, in_function: bool) -> None:
        for child in ast.iter_child_nodes(node):
            nested = in_function or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            names: list[str] = []
            if isinstance(child, ast.Import):
                names = [a.name for a in child.names]
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    base = ".".join(package.split(".")[: len(package.split(".")) - child.level + 1] + ([base] if base else []))
                names = [f"{base}.{a.name}" for a in child.names] or [base]
            elif isinstance(child, ast.Call) and getattr(child.func, "attr", getattr(child.func, "id", "")) == \
                    "import_module" and child.args and isinstance(child.args[0], ast.Constant):
                names = [child.args[0].value]
            for name in names:
                target = resolve(name)
                if target is not None and target != module:
                    found.append((target, in_function, child.lineno))
            visit(child, nested)

    visit(tree, False)
    return found


GRAPH = {module: imports_of(path) for module, path in MODULES.items()}


def test_every_module_imports_only_from_its_layer_or_below():
    upward = [f"{MODULES[m].relative_to(ROOT)}:{line} ({LAYERS[layer_of(m)][0]}) imports {t} "
              f"({LAYERS[layer_of(t)][0]})"
              for m, edges in GRAPH.items() for t, _, line in edges if layer_of(t) > layer_of(m)]
    assert not upward, "\n".join(upward)


def test_the_data_package_imports_nothing_above_it():
    above = [f"{m} imports {t}" for m, edges in GRAPH.items() if m.startswith("dropup.data")
             for t, _, _ in edges if layer_of(t) >= layer_of("dropup.data") and not t.startswith("dropup.data")]
    assert not above, above


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One loop of `graph` (depth-first search with colours), or None."""
    colour, stack = {m: 0 for m in graph}, []

    def dfs(m: str) -> list[str] | None:
        colour[m] = 1
        stack.append(m)
        for t in sorted(graph[m]):
            if colour.get(t) == 1:
                return stack[stack.index(t):] + [t]
            if colour.get(t) == 0 and (loop := dfs(t)):
                return loop
        stack.pop()
        colour[m] = 2
        return None

    for m in sorted(graph):
        if colour[m] == 0 and (loop := dfs(m)):
            return loop
    return None


def test_no_import_cycle_counting_imports_inside_functions():
    graph = {m: {t for t, _, _ in edges} for m, edges in GRAPH.items()}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_reader_sees_imports_hidden_in_functions_and_import_module():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    source = ("import json\nfrom dropup.config import ConfigError\n\n\ndef f():\n    from dropup import train\n"
              "    return importlib.import_module('dropup.stages')\n")
    assert imports_in(source, "dropup.model") == [("dropup.config", False, 2), ("dropup.train", True, 6),
                                                  ("dropup.stages", True, 7)]
    assert imports_in("from . import loader\n", "dropup.data", is_package=True) == [("dropup.data.loader", False, 1)]


def test_few_own_module_imports_hide_inside_functions():
    inside = sorted({f"{MODULES[m].relative_to(ROOT)}:{line}" for m, edges in GRAPH.items()
                     for t, in_function, line in edges if in_function})  # one per import statement
    assert len(inside) <= MAX_FUNCTION_IMPORTS, f"{len(inside)} imports inside functions:\n" + "\n".join(inside)


def test_no_source_file_is_over_500_lines():
    long = {str(p.relative_to(ROOT)): n for p in source_files() if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"
