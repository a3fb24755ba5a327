"""The architecture as written in the README: layers point one way, no cycles, small modules."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
SUITE = ROOT / "suite"


def readme_layers() -> dict[str, int]:
    """module -> layer number, from the numbered list in the README's Layout section."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Layout", 1)[1]
    layers = {}
    for number, names in re.findall(r"^(\d+)\. ([a-z_, ]+?)(?:\s+[-—(:].*)?$", section, flags=re.M):
        for name in names.split(","):
            layers[name.strip()] = int(number)
    return layers


def suite_imports(path: Path) -> set[str]:
    """The suite modules a file imports, at module level or inside functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "suite":
                out |= {a.name for a in node.names}
            elif node.module.startswith("suite."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names if a.name.startswith("suite.")}
    return out


MODULES = {p.stem: p for p in SUITE.glob("*.py") if p.stem != "__init__"}


def test_every_module_has_a_layer_in_the_readme():
    layers = readme_layers()
    missing = sorted(set(MODULES) - set(layers))
    assert not missing, f"README's Layout section lacks a layer for {missing}"
    stale = sorted(set(layers) - set(MODULES))
    assert not stale, f"README's Layout section names modules that do not exist: {stale}"


def test_imports_point_down_the_layers():
    layers = readme_layers()
    upward = []
    for name, path in MODULES.items():
        for dep in suite_imports(path) & set(MODULES):
            if layers[dep] > layers[name]:
                upward.append(f"{name} (layer {layers[name]}) imports {dep} (layer {layers[dep]})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {name: suite_imports(path) & set(MODULES) for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if dep == node:
                continue
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_modules_and_functions_stay_small():
    """Modules under ~400 lines, functions under ~80 (the README's reading-order promise)."""
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > 420:
            too_long.append(f"{name}.py: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 85:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def test_the_layer_parser_reads_a_numbered_list():
    """Guards the guard: a README without the list must fail the tests above, not pass them empty."""
    assert len(readme_layers()) >= 20
