"""The package's layering, read from the source: every import of every module (module level and
inside functions) goes down the layers or stays inside its own package; no cycles; function-level
imports only of optional third-party dependencies, each with its reason on the line."""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent / "cvvae_core"

#: Lowest first. A module may import its own package and anything in a lower layer.
LAYERS = [
    {"_version", "errors"},
    {"spec", "devices", "progress", "metrics", "distributed"},
    {"model"},
    {"tiling"},
    {"io"},
    {"data"},
    {"train"},
    {"cli"},
]
TOP = {"__init__", "__main__"}  # the package's front door may import any layer


def modules() -> dict[str, Path]:
    return {".".join(p.relative_to(ROOT).with_suffix("").parts): p for p in ROOT.rglob("*.py")}


def unit(module: str) -> str:
    """The layering unit of a dotted module name inside cvvae_core: its top-level name."""
    return module.split(".")[0]


def layer_of(module: str) -> int:
    u = unit(module)
    if u in TOP:
        return len(LAYERS)
    for i, names in enumerate(LAYERS):
        if u in names:
            return i
    raise AssertionError(f"cvvae_core.{module} is in no layer: add it to LAYERS in {__file__}")


def resolve(module: str, node: ast.ImportFrom, known: set[str]) -> list[str]:
    """The cvvae_core modules an ``from ... import`` names (a name that is a submodule counts as one)."""
    if node.level == 0:
        if not (node.module or "").startswith("cvvae_core"):
            return []
        base = (node.module or "").split(".")[1:]
    else:
        package = module.split(".")
        if not (ROOT / Path(*package)).is_dir() or package[-1] == "__init__":
            package = package[:-1]
        base = package[: len(package) - (node.level - 1)] + (node.module.split(".") if node.module else [])
    out = []
    for alias in node.names:
        candidate = ".".join(base + [alias.name])
        out.append(candidate if candidate in known or candidate + ".__init__" in known else ".".join(base))
    return [m for m in out if m]


def imports(module: str, path: Path, known: set[str]):
    """(imported cvvae_core module, is it inside a function, line, source line) for each import."""
    tree = ast.parse(path.read_text())
    lines = path.read_text().splitlines()
    nested = set()
    for fn in ast.walk(tree):
        if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
            nested.update(id(n) for n in ast.walk(fn) if isinstance(n, (ast.Import, ast.ImportFrom)))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            targets = resolve(module, node, known)
            if not targets and id(node) in nested:
                yield None, True, node.lineno, lines[node.lineno - 1]
            for t in targets:
                yield t, id(node) in nested, node.lineno, lines[node.lineno - 1]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                internal = alias.name.startswith("cvvae_core")
                yield (".".join(alias.name.split(".")[1:]) if internal else None), id(node) in nested, \
                    node.lineno, lines[node.lineno - 1]


def graph():
    mods = modules()
    known = set(mods)
    return {m: list(imports(m, p, known)) for m, p in mods.items()}


def test_every_module_is_in_a_layer():
    for m in modules():
        layer_of(m)


def test_imports_go_down_the_layers():
    wrong = []
    for m, found in graph().items():
        for target, _, line, _ in found:
            if target is None or unit(target) == unit(m) or m.split(".")[-1] in TOP and "." not in m:
                continue
            if layer_of(target) >= layer_of(m):
                wrong.append(f"cvvae_core.{m}:{line} imports cvvae_core.{target} (layer {layer_of(target)} "
                             f">= {layer_of(m)})")
    assert not wrong, "\n".join(wrong)


def test_function_level_imports_are_optional_dependencies_with_a_reason():
    wrong = []
    for m, found in graph().items():
        for target, in_function, line, source in found:
            if not in_function:
                continue
            if target is not None:
                wrong.append(f"cvvae_core.{m}:{line} imports cvvae_core.{target} inside a function")
            elif "#" not in source:
                wrong.append(f"cvvae_core.{m}:{line} imports inside a function with no reason given: {source.strip()}")
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles():
    g = graph()
    edges = {m: {t for t, *_ in found if t in g} for m, found in g.items()}
    state, stack, cycles = {}, [], []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for t in sorted(edges[m]):
            if state.get(t) == "open":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t)
        stack.pop()
        state[m] = "done"

    for m in sorted(edges):
        if m not in state:
            visit(m)
    assert not cycles, "\n".join(cycles)


@pytest.mark.parametrize("bad", ["from ..cli.main import DTYPES", "from ..train.trainer import TrainConfigError"])
def test_the_checker_sees_an_upward_import(tmp_path, bad):
    """The checker itself: an upward import written into a data-layer module is found."""
    tree = ast.parse(f"def f():\n    {bad}\n")
    node = next(n for n in ast.walk(tree) if isinstance(n, ast.ImportFrom))
    (target,) = resolve("data.encode", node, set(modules()))
    assert layer_of(target) > layer_of("data.encode")
