"""The layers of the tree, held by their imports (read with `ast`, nothing imported).

Each package of `runner/` says in its `__init__` docstring what it owns and what it
may import; this test is that rule as code. A failure names the file, the line and
the import that breaks it.
"""

from __future__ import annotations

import ast
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

SHARED = "shared"  # runner/{domain,errors,settings,units,client}.py
# What each layer may import from the project (a layer may always import itself).
ALLOWED: dict[str, set[str]] = {
    SHARED: set(),
    "manifest": {SHARED},
    "observability": {SHARED, "manifest"},
    "sandbox": {SHARED, "manifest", "observability"},
    "control": {SHARED, "manifest", "observability"},
    "execution": {SHARED, "manifest", "observability", "sandbox", "control"},
    "authoring": {SHARED, "manifest", "observability", "sandbox", "control", "execution"},
    "api": {SHARED, "manifest", "observability", "control"},
    "cli": {SHARED, "manifest", "observability", "sandbox", "control", "execution",
            "authoring", "cli", "api"},
    "migrations": {SHARED, "control"},
}
# Third-party packages a layer must never import.
FORBIDDEN_LIBRARIES: dict[str, set[str]] = {
    "api": {"docker"},
    "sandbox": {"fastapi", "starlette", "sqlalchemy", "redis", "rq"},
    "manifest": {"docker", "fastapi", "sqlalchemy", "redis", "rq"},
}
# SQL belongs to the control layer (and the schema's migrations) only.
SQL_LAYERS = {"control", "migrations"}


def layer_of(path: Path) -> str:
    parts = path.relative_to(ROOT).parts
    if parts[:2] == ("runner", "__main__.py"):
        return "cli"  # `python -m runner` is the command line
    if parts[0] in ("api", "migrations"):
        return parts[0]
    if parts[0] == "runner":
        return parts[1] if len(parts) > 2 else SHARED
    raise ValueError(path)


def module_layer(module: str) -> str | None:
    """The project layer a dotted module name belongs to (None: not ours)."""
    parts = module.split(".")
    if parts[0] == "api":
        return "api"
    if parts[0] != "runner":
        return None
    if len(parts) == 1:
        return SHARED
    return parts[1] if parts[1] in ALLOWED else SHARED


def sources() -> list[Path]:
    return sorted([*ROOT.joinpath("runner").rglob("*.py"), *ROOT.joinpath("api").rglob("*.py"),
                   *ROOT.joinpath("migrations").rglob("*.py")])


def imports(path: Path) -> Iterator[tuple[int, str, list[str]]]:
    """(line, module, names) of every import in a file, nested ones included."""
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, []
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            yield node.lineno, node.module, [a.name for a in node.names]


def problems_of(path: Path) -> list[str]:
    layer = layer_of(path)
    where = path.relative_to(ROOT)
    found = []
    for line, module, names in imports(path):
        top = module.split(".")[0]
        target = module_layer(module)
        text = f"{where}:{line}: import of {module}"
        if target is not None and target != layer and target not in ALLOWED[layer]:
            found.append(f"{text}: the {layer} layer may not import the {target} layer")
        if top in FORBIDDEN_LIBRARIES.get(layer, set()):
            found.append(f"{text}: the {layer} layer never imports {top}")
        if top == "sqlalchemy" and layer not in SQL_LAYERS:
            found.append(f"{text}: SQL lives in runner/control/ (and migrations/) only")
        private = [n for n in names if n.startswith("_") and not n.startswith("__")]
        if private:
            found.append(f"{text}: private name(s) {', '.join(private)} used across modules")
    return found


def test_every_layer_imports_only_what_it_may() -> None:
    problems = [p for path in sources() for p in problems_of(path)]
    assert problems == [], "\n".join(problems)


def test_tests_and_benchmarks_import_no_private_names() -> None:
    problems = []
    scripts = [*ROOT.joinpath("tests").rglob("*.py"), *ROOT.joinpath("bench").rglob("*.py")]
    for path in sorted(scripts):
        for line, module, names in imports(path):
            private = [n for n in names if n.startswith("_") and not n.startswith("__")]
            if private:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {module} {private}")
    assert problems == [], "\n".join(problems)


def test_every_package_says_what_it_owns_and_may_import() -> None:
    for package in sorted(p for p in ROOT.joinpath("runner").iterdir()
                          if p.joinpath("__init__.py").exists() and p.name != "__pycache__"):
        doc = ast.get_docstring(ast.parse(package.joinpath("__init__.py").read_text()))
        assert doc and "import" in doc, f"{package.name}/__init__.py: no docstring of its rules"


@pytest.mark.parametrize(("layer", "source", "expected"), [
    ("api", "import docker\n", "the api layer never imports docker"),
    ("api", "from runner.sandbox import Sandbox\n", "may not import the sandbox layer"),
    ("api", "def f():\n    from runner.execution.worker import perform\n",
     "may not import the execution layer"),
    ("sandbox", "from sqlalchemy import select\n", "SQL lives in runner/control/"),
    ("sandbox", "import fastapi\n", "never imports fastapi"),
    ("control", "from runner.execution.executor import Executor\n", "may not import"),
    ("cli", "from runner.control.store import _hidden\n", "private name(s) _hidden"),
])
def test_a_forbidden_import_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                     layer: str, source: str, expected: str) -> None:
    # The same checks on a file planted in a copy of the layout.
    fake_root = tmp_path
    folder = fake_root / ("api" if layer == "api" else f"runner/{layer}")
    folder.mkdir(parents=True)
    planted = folder / "planted.py"
    planted.write_text(source)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", fake_root)
    problems = problems_of(planted)
    assert any(expected in p and "planted.py:" in p for p in problems), problems


def test_the_layers_picture_draws_these_rules() -> None:
    """docs/layers.dot: what an arrow reaches, directly or through others, is what
    ALLOWED lets a layer import, so the picture cannot drift from the rules."""
    source = ROOT.joinpath("docs", "layers.dot").read_text()
    edges: dict[str, set[str]] = {}
    for origin, targets in re.findall(r"^\s*(\w+)\s*->\s*\{?([\w ]+)\}?", source, re.M):
        edges.setdefault(origin, set()).update(targets.split())

    def reach(layer: str) -> set[str]:
        seen: set[str] = set()
        todo = [layer]
        while todo:
            for target in edges.get(todo.pop(), set()) - seen:
                seen.add(target)
                todo.append(target)
        return seen

    for layer, allowed in ALLOWED.items():
        if layer == "migrations":
            continue  # not drawn: the schema's scripts, beside the control layer
        assert reach(layer) == allowed - {layer}, f"{layer}: drawn {sorted(reach(layer))}"
