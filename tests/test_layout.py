"""The package is laid out as the pipeline (README, Development): stages, engine, math.

Read from the source with ``ast`` (imports inside functions count too): a stage imports no other
stage, the engine imports no stage, the math imports nothing of the package but ``errors`` and
never touches the file system; every stage is a command and a rule file of the same name.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import scd_pipeline
from scd_pipeline.cli import app
from scd_pipeline.stages import COMMANDS, module_name

PACKAGE = Path(scd_pipeline.__file__).resolve().parent
REPO = PACKAGE.parent
FACE = {"__init__", "__main__", "cli", "errors"}  # top-level modules outside the three rooms
# Modules and calls that reach the file system; none may appear in the math.
FILE_SYSTEM_MODULES = {"os", "pathlib", "shutil", "io", "tempfile", "glob", "fcntl", "pickle", "sqlite3",
                       "pyarrow", "safetensors", "h5py", "zipfile", "tarfile"}
FILE_SYSTEM_CALLS = {"open", "read_parquet", "to_parquet", "read_csv", "to_csv", "read_json", "to_json",
                     "read_text", "write_text", "read_bytes", "write_bytes", "savefig", "save", "load",
                     "save_pretrained", "from_pretrained", "mkdir", "unlink", "rmtree"}


def module_of(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path, root: Path) -> list[tuple[str, int]]:
    """Every module ``path`` imports (absolute or relative, at any depth), with its line; a
    ``from package import name`` also counts ``package.name`` when that is a module of the tree."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    here = module_of(path, root).split(".")
    is_package = path.name == "__init__.py"
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = here if is_package else here[:-1]
                base = base[: len(base) - (node.level - 1)]
                name = ".".join(base + ([node.module] if node.module else []))
            else:
                name = node.module or ""
            found.append((name, node.lineno))
            for alias in node.names:
                candidate = root.parent.joinpath(*f"{name}.{alias.name}".split("."))
                if candidate.with_suffix(".py").is_file() or (candidate / "__init__.py").is_file():
                    found.append((f"{name}.{alias.name}", node.lineno))
    return found


def file_system_calls(path: Path) -> list[tuple[str, int]]:
    calls = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Call):
            name = (node.func.id if isinstance(node.func, ast.Name)
                    else node.func.attr if isinstance(node.func, ast.Attribute) else None)
            if name in FILE_SYSTEM_CALLS:
                calls.append((name, node.lineno))
    return calls


def room(module: str, package: str) -> tuple[str, str]:
    """``(room, unit)``: ('stages', 'distill'), ('engine', 'training'), ('math', 'losses'),
    ('face', 'cli'), ('stages', '') for the stages package itself, ('outside', name)."""
    parts = module.split(".")
    if parts[0] != package:
        return "outside", parts[0]
    if len(parts) == 1:
        return "face", "__init__"
    if parts[1] in ("stages", "engine", "math"):
        return parts[1], parts[2] if len(parts) > 2 else ""
    return "face", parts[1]


def layout_violations(root: Path) -> list[str]:
    """Every break of the layout rules in the package at ``root``, one line each."""
    package = root.name
    problems = []
    for path in sorted(root.rglob("*.py")):
        where = path.relative_to(root.parent)
        kind, unit = room(module_of(path, root), package)
        if kind == "face" and unit not in FACE:
            problems.append(f"{where}: a top-level module outside stages/, engine/ and math/")
        for name, line in imported(path, root):
            target_kind, target_unit = room(name, package)
            if kind == "stages" and unit and target_kind == "stages" and target_unit != unit:
                what = f"stage {target_unit}" if target_unit else "the stages package"
                problems.append(f"{where}:{line}: stage {unit} imports {what} ({name})")
            if kind == "engine" and (target_kind == "stages" or (target_kind == "face" and target_unit == "cli")):
                problems.append(f"{where}:{line}: the engine imports {name}")
            if kind == "math":
                if target_kind in ("stages", "engine") or (target_kind == "face" and target_unit != "errors"):
                    problems.append(f"{where}:{line}: the math imports {name}")
                if target_kind == "outside" and target_unit in FILE_SYSTEM_MODULES:
                    problems.append(f"{where}:{line}: the math imports {name} (file system)")
            if kind == "face" and unit == "errors" and target_kind != "outside":
                problems.append(f"{where}:{line}: errors imports {name}")
        if kind == "math":
            problems += [f"{where}:{line}: the math calls {call}() (file system)"
                         for call, line in file_system_calls(path)]
    return problems


def test_the_package_keeps_its_layout():
    assert layout_violations(PACKAGE) == []


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / "pkg" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
    return root / "pkg"


def test_the_layout_check_finds_each_kind_of_break(tmp_path):
    package = write_tree(tmp_path, {
        "__init__.py": "", "cli.py": "from pkg.stages import a\n", "errors.py": "",
        "helpers.py": "",
        "stages/__init__.py": "", "stages/a.py": "def f():\n    from pkg.stages.b import g\n",
        "stages/b.py": "from pkg.engine import run\nfrom . import a\n",
        "stages/c/__init__.py": "from .inner import x\n", "stages/c/inner.py": "from pkg.stages.c import y\n",
        "engine/__init__.py": "", "engine/run.py": "import pkg.stages.a\n",
        "engine/fine.py": "from pkg.math.loss import f\nfrom pkg.errors import E\n",
        "math/__init__.py": "", "math/loss.py": "from pathlib import Path\nfrom pkg.engine import run\n",
        "math/stat.py": "import numpy as np\nfrom pkg.errors import E\ndef f(x):\n    return np.load(x)\n",
        "math/pure.py": "import math\nfrom pkg.math.stat import f\n",
    })
    problems = layout_violations(package)
    assert problems == [
        "pkg/engine/run.py:1: the engine imports pkg.stages.a",
        "pkg/helpers.py: a top-level module outside stages/, engine/ and math/",
        "pkg/math/loss.py:1: the math imports pathlib (file system)",
        "pkg/math/loss.py:2: the math imports pkg.engine",
        "pkg/math/loss.py:2: the math imports pkg.engine.run",
        "pkg/math/stat.py:4: the math calls load() (file system)",
        "pkg/stages/a.py:2: stage a imports stage b (pkg.stages.b)",
        "pkg/stages/b.py:2: stage b imports the stages package (pkg.stages)",
        "pkg/stages/b.py:2: stage b imports stage a (pkg.stages.a)",
    ]


def test_every_stage_is_a_command_and_a_rule_file_of_its_name():
    import importlib

    registered = {command.name for command in app.registered_commands}
    rule_files = {path.stem for path in (REPO / "workflow" / "rules").glob("*.smk")}
    for command in COMMANDS:
        assert command in registered
        module = importlib.import_module(module_name(command))
        assert callable(module.artifacts), command
        assert command.replace("-", "_") in rule_files
    assert rule_files - {c.replace("-", "_") for c in COMMANDS} == {"common"}
    assert {path.stem for path in (PACKAGE / "stages").iterdir()
            if path.suffix == ".py" or (path / "__init__.py").is_file()} - {"__init__"} \
        == {c.replace("-", "_") for c in COMMANDS}


def test_an_unknown_command_has_no_stage():
    with pytest.raises(ValueError, match="no stage named 'cache'"):
        module_name("cache")
