"""The architecture as written in docs/architecture.md: subpackages in layers that point one way,
no import circles, small modules, and a package folder that shows its rooms."""
from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
SUITE = ROOT / "suite"
DOC = ROOT / "docs" / "architecture.md"


def documented_layers() -> dict[str, tuple[int, set[str]]]:
    """subpackage -> (layer number, its modules), from the numbered list under '## Layers'."""
    section = DOC.read_text().split("## Layers", 1)[1]
    layers = {}
    for number, package, modules in re.findall(r"^(\d+)\. \*\*([a-z_]+)\*\*: ([a-z_, ]+?) —", section, flags=re.M):
        layers[package] = (int(number), {m.strip() for m in modules.split(",")})
    return layers


def module_name(path: Path) -> str:
    return ".".join(path.relative_to(ROOT).with_suffix("").parts)


MODULES = {module_name(p): p for p in SUITE.glob("*/*.py") if p.stem != "__init__"}


def suite_imports(path: Path) -> set[str]:
    """The suite modules (dotted, `suite.pkg.mod`) a file imports, at module level or in functions."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("suite."):
            if node.module in MODULES:
                out.add(node.module)
            else:  # `from suite.pkg import mod`
                out |= {f"{node.module}.{a.name}" for a in node.names} & set(MODULES)
        elif isinstance(node, ast.Import):
            out |= {a.name for a in node.names if a.name in MODULES}
    return out


def package_of(module: str) -> str:
    return module.split(".")[1]


def test_the_package_folder_holds_only_subpackages():
    loose = sorted(p.name for p in SUITE.glob("*.py"))
    assert loose == ["__init__.py", "__main__.py"], loose
    for package in (p for p in SUITE.iterdir() if p.is_dir() and p.name != "__pycache__"):
        assert (package / "__init__.py").exists(), f"{package} is not a package"


def test_every_module_is_in_the_documented_layers():
    layers = documented_layers()
    documented = {f"suite.{pkg}.{mod}" for pkg, (_, mods) in layers.items() for mod in mods}
    assert not set(MODULES) - documented, f"docs/architecture.md lacks {sorted(set(MODULES) - documented)}"
    assert not documented - set(MODULES), f"docs/architecture.md names missing modules {sorted(documented - set(MODULES))}"


def test_imports_point_down_the_layers():
    layers = documented_layers()
    upward = []
    for name, path in MODULES.items():
        for dep in suite_imports(path):
            if layers[package_of(dep)][0] > layers[package_of(name)][0]:
                upward.append(f"{name} ({package_of(name)}) imports {dep} ({package_of(dep)})")
    assert not upward, "imports from a higher layer:\n" + "\n".join(sorted(upward))


def test_no_import_cycles():
    graph = {name: suite_imports(path) - {name} for name, path in MODULES.items()}
    state: dict[str, int] = {}

    def visit(node: str, stack: list[str]) -> None:
        state[node] = 1
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(dep):] + [dep]))
            if dep not in state:
                visit(dep, stack + [dep])
        state[node] = 2

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_no_private_name_is_used_outside_its_module():
    borrowed = []
    for name, path in MODULES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("suite"):
                borrowed += [f"{name} imports {node.module}.{a.name}" for a in node.names
                             if a.name.startswith("_") and not a.name.startswith("__")]
    assert not borrowed, "\n".join(borrowed)


def test_modules_and_functions_stay_small():
    too_long = []
    for name, path in MODULES.items():
        text = path.read_text()
        if text.count("\n") > 400:
            too_long.append(f"{name}: {text.count(chr(10))} lines")
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1
                if length > 85:
                    too_long.append(f"{name}.{node.name}: {length} lines")
    assert not too_long, "\n".join(too_long)


def test_the_layer_parser_reads_the_list():
    """Guards the guard: a doc without the list must fail the tests above, not pass them empty."""
    layers = documented_layers()
    assert len(layers) >= 10 and sum(len(mods) for _, mods in layers.values()) >= 40
