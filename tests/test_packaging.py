"""What the package declares about itself holds."""

import ast
import configparser
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
