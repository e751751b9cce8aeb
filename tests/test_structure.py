"""The package's shape: no import cycle among oel_ray's modules, lazy (function-level) imports
included, so every module can be read, imported and tested from its dependencies up."""

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "oel_ray"


def imports(path: Path, modules: set[str]) -> set[str]:
    """The oel_ray modules `path` imports anywhere in its body."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module == "oel_ray":
            found |= {alias.name for alias in node.names if alias.name in modules}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("oel_ray."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("oel_ray.")}
    return found - {path.stem}


def cycle(graph: dict[str, set[str]]) -> list[str]:
    """One import cycle as a path of module names (first == last), or [] when there is none."""
    state: dict[str, str] = {}  # module -> "open" while on the current path, "done" after

    def visit(module: str, path: list[str]) -> list[str]:
        state[module] = "open"
        for dep in sorted(graph.get(module, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (found := visit(dep, path + [dep])):
                return found
        state[module] = "done"
        return []

    for module in sorted(graph):
        if module not in state and (found := visit(module, [module])):
            return found
    return []


def test_the_walk_finds_a_cycle_through_a_lazy_import(tmp_path):
    (tmp_path / "a.py").write_text("from oel_ray import b\n")
    (tmp_path / "b.py").write_text("def f():\n    from oel_ray.a import x\n")
    modules = {"a", "b"}
    graph = {p.stem: imports(p, modules) for p in tmp_path.glob("*.py")}
    assert cycle(graph) in (["a", "b", "a"], ["b", "a", "b"])


def test_no_import_cycle_among_the_package_modules():
    paths = list(PACKAGE.glob("*.py"))
    modules = {p.stem for p in paths}
    graph = {p.stem: imports(p, modules) for p in paths}
    assert cycle(graph) == [], " -> ".join(cycle(graph))


def test_every_module_stays_small():
    """A few hundred lines each: a module that grows past 400 holds more than one role or stage."""
    sizes = {p.name: len(p.read_text().splitlines()) for p in PACKAGE.glob("*.py")}
    assert {name: n for name, n in sizes.items() if n > 400} == {}
