"""What the package declares about itself holds."""

import ast
import configparser
import graphlib
import re
from pathlib import Path

ROOT = Path(__file__).parents[1]
# Standard-library modules added after Python 3.8, with the release that added them.
NEWER_STDLIB = {"zoneinfo": (3, 9), "graphlib": (3, 9), "tomllib": (3, 11)}


def test_the_declared_python_floor_has_every_standard_module_the_package_imports():
    setup = configparser.ConfigParser()
    setup.read(ROOT / "setup.cfg")
    declared = setup["options"]["python_requires"].strip()
    floor = tuple(int(part) for part in re.fullmatch(r">=\s*(\d+)\.(\d+)", declared).groups())
    imported = set()
    for path in (ROOT / "argonne_dt").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                imported.update(alias.name.split(".")[0] for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                imported.add(node.module.split(".")[0])
    assert "tomllib" in imported  # config.py reads TOML with it
    for module, since in NEWER_STDLIB.items():
        if module in imported:
            assert floor >= since, f"argonne_dt imports {module} (Python {since[0]}.{since[1]}), setup.cfg says {declared}"



def _package_imports() -> dict[str, set[str]]:
    """Each module of the package (``data.loader``, ``trainer``; its ``__init__`` files as ``""`` and
    ``data``) and the package modules it imports."""
    package = ROOT / "argonne_dt"
    modules = {".".join(path.relative_to(package).with_suffix("").parts).removesuffix("__init__").strip("."): path
               for path in package.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        here = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.level:
                parts = [part for part in here[: len(here) - node.level + 1] + [node.module or ""] if part]
                target = ".".join(parts)
                imported.add(target if target in modules else ".".join(parts[:-1]))
        graph[name] = imported - {name}
    return graph


def test_the_package_imports_one_way_in_the_readmes_layers():
    graph = _package_imports()
    tuple(graphlib.TopologicalSorter(graph).static_order())  # raises CycleError on a cycle
    stack = ["data.files", "data.shares", "data.nodes", "data.loader"]
    for lower, upper in zip(stack, stack[1:]):
        assert lower in graph[upper] and upper not in graph[lower]
    # The README lists the modules in layers: each imports only from the layers above its own.
    layers = re.search(r"```text\n(# imports one way.*?)```", (ROOT / "README.md").read_text(), re.S).group(1)
    level = {module: depth for depth, line in enumerate(layers.splitlines()[1:])
             for module in re.findall(r"[a-z_.]+", line.split("  ")[0])}
    modules = set(graph) - {"", "data"}
    assert set(level) == modules, "the README's layers name every module of the package"
    level["data"] = max(level[module] for module in stack)  # the package's __init__ gathers all four
    for module in modules:
        for target in graph[module] - {""}:
            assert level[target] < level[module], f"{module} imports {target}: the README puts it at or below"
