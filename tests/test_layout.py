"""The package's shape, read from the source (no imports): the layers only import downwards, no
import circle (module-level or inside functions), no private name taken from another module, and
no Python file over 500 lines in sbpet/, kernels/ and benchmarks/ (docs/architecture.md)."""

import ast
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MAX_LINES = 500

# Bottom up; a module may import its own layer and the ones below. The root package (the public
# facade) and the benchmarks sit on top.
LAYERS = ["sbpet.core", "sbpet.kernels", "sbpet.backends", "sbpet.modules", "sbpet.hf", "sbpet.cli",
          "sbpet", "benchmarks"]


def _source_files():
    """module name -> path, for sbpet/ (with kernels/ as sbpet.kernels) and benchmarks/."""
    roots = {"sbpet": os.path.join(REPO, "sbpet"), "sbpet.kernels": os.path.join(REPO, "kernels"),
             "benchmarks": os.path.join(REPO, "benchmarks")}
    modules = {}
    for package, root in roots.items():
        for folder, dirs, files in os.walk(root):
            dirs[:] = [d for d in dirs if d != "__pycache__" and d != "results"]
            rel = os.path.relpath(folder, root)
            parts = [package] + ([] if rel == "." else rel.split(os.sep))
            for name in files:
                if name.endswith(".py"):
                    stem = name[:-3]
                    modules[".".join(parts if stem == "__init__" else parts + [stem])] = os.path.join(folder, name)
    return modules


MODULES = _source_files()


def _is_package(module):
    return MODULES[module].endswith("__init__.py")


def _imports(module):
    """(imported module, names taken from it, line) for every import statement in ``module``."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    package = module if _is_package(module) else module.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, (), node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module
            names = tuple(alias.name for alias in node.names)
            submodules = [f"{target}.{n}" for n in names if f"{target}.{n}" in MODULES]
            found += [(sub, (), node.lineno) for sub in submodules]
            rest = tuple(n for n in names if f"{target}.{n}" not in MODULES)
            if rest or not submodules:
                found.append((target, rest, node.lineno))
    return [(t, names, line) for t, names, line in found if t in MODULES]


def _layer(module):
    return max((i for i, layer in enumerate(LAYERS) if module == layer or module.startswith(layer + ".")),
               key=lambda i: len(LAYERS[i]))


def _edges():
    return {m: _imports(m) for m in MODULES}


def test_the_layout_was_read():
    """Guards the tests below against passing on nothing."""
    for module in ("sbpet.core.bridges", "sbpet.backends.dispatch", "sbpet.kernels.fused_bridge",
                   "sbpet.modules.regularizer", "sbpet.hf.trainer", "sbpet.cli.main", "benchmarks.suite"):
        assert module in MODULES
    assert ("sbpet.core.bridges", ("get_bridge",)) in [(t, n) for t, n, _ in _imports("sbpet.modules.regularizer")]


def test_imports_only_point_down_the_layers():
    bad = [f"{m} (layer {LAYERS[_layer(m)]}) imports {t} (layer {LAYERS[_layer(t)]}), line {line}"
           for m, targets in _edges().items() for t, _, line in targets if _layer(t) > _layer(m)]
    assert not bad, "\n".join(bad)


def test_no_import_circle():
    # a package's __init__ importing its own submodules is how packages work, not a circle
    graph = {m: {t for t, _, _ in targets if not (_is_package(t) and m.startswith(t + "."))}
             for m, targets in _edges().items()}
    state, stack, circles = {}, [], []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                circles.append(" -> ".join(stack[stack.index(nxt):] + [nxt]))
            elif nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = "done"

    for node in sorted(graph):
        if node not in state:
            visit(node)
    assert not circles, "\n".join(circles)


def _private(name):
    return name.startswith("_") and not name.startswith("__")


def _module_aliases(module):
    """Local name -> sbpet/benchmarks module, for names that an import binds to a module."""
    tree = ast.parse(open(MODULES[module], encoding="utf-8").read())
    package = module if _is_package(module) else module.rpartition(".")[0]
    aliases = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.asname and alias.name in MODULES:
                    aliases[alias.asname] = alias.name
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            target = ".".join(base + ([node.module] if node.module else []))
            for alias in node.names:
                if f"{target}.{alias.name}" in MODULES:
                    aliases[alias.asname or alias.name] = f"{target}.{alias.name}"
    return tree, aliases


def test_no_private_name_imported_across_modules():
    """Neither ``from x import _helper`` nor ``x._helper`` on an imported module: a helper used by
    two modules lives in the lower one, public there."""
    bad = []
    for module, targets in _edges().items():
        for target, names, line in targets:
            private = [n for n in names if _private(n)]
            if private and target != module:
                bad.append(f"{module} takes {', '.join(private)} from {target}, line {line}")
        tree, aliases = _module_aliases(module)
        for node in ast.walk(tree):
            if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name)
                    and node.value.id in aliases and _private(node.attr) and aliases[node.value.id] != module):
                bad.append(f"{module} uses {aliases[node.value.id]}.{node.attr}, line {node.lineno}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("module", sorted(MODULES))
def test_file_fits_in_a_head(module):
    with open(MODULES[module], encoding="utf-8") as f:
        count = sum(1 for _ in f)
    assert count <= MAX_LINES, f"{os.path.relpath(MODULES[module], REPO)} has {count} lines (> {MAX_LINES})"


def test_tests_mirror_the_package():
    """Every test folder is named after a layer; each layer's tests live in its folder."""
    here = os.path.dirname(os.path.abspath(__file__))
    folders = sorted(d for d in os.listdir(here) if os.path.isdir(os.path.join(here, d)) and not d.startswith("__"))
    assert folders == ["backends", "bench", "cli", "core", "hf", "kernels", "modules"]
    for folder in folders:
        package = "benchmarks" if folder == "bench" else f"sbpet.{folder}"
        assert any(m == package or m.startswith(package + ".") for m in MODULES), folder
