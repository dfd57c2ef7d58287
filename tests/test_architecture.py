"""The package's shape: imports go one way, down the data flow (docs/architecture.md).

The import graph is built with ``ast`` from every module of ``factory`` (imports inside functions
and under ``TYPE_CHECKING`` included), so a cycle hidden behind a function-level import fails here.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "factory"

#: Layers, lowest first: a module may import modules of its own layer or below, never above.
#: Each entry is a module or a package prefix; docs/architecture.md lists the same order.
LAYERS: list[list[str]] = [
    ["factory", "factory.errors", "factory.fsutil", "factory.imageio", "factory.ray_session", "factory.ray_watchdog", "factory.toy", "factory.toy.world", "factory.feedback"],
    ["factory.manifest"],
    ["factory.plan"],
    ["factory.sample", "factory.sampler", "factory.matte", "factory.score", "factory.metrics"],
    ["factory.finish"],
    ["factory.worker"],
    ["factory.store"],
    ["factory.selection", "factory.integrity", "factory.dedup"],
    ["factory.filter"],
    ["factory.export"],
    ["factory.train"],
    ["factory.generate", "factory.distribute", "factory.matte_folder", "factory.evaluate", "factory.caption", "factory.toy.dataset",
     "factory.composite", "factory.toy.recipe", "factory.check"],
]

MAX_LINES = 700


def module_name(path: Path, root: Path = ROOT) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules(root: Path = ROOT) -> dict[str, Path]:
    return {module_name(p, root): p for p in sorted((root / "factory").rglob("*.py"))}


def imports_of(path: Path, known: set[str], root: Path = ROOT) -> set[str]:
    """The ``factory`` modules a file imports, anywhere in it (``from a import b`` counts ``a.b``
    when ``a.b`` is a module, else ``a``)."""
    name = module_name(path, root)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.add(full if full in known else base)
    return {m for m in found if m in known and m != name}


def graph(root: Path = ROOT) -> dict[str, set[str]]:
    mods = modules(root)
    known = set(mods)
    return {name: imports_of(path, known, root) for name, path in mods.items()}


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt) :], nxt]
            if nxt not in state:
                found = visit(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state:
            found = visit(node)
            if found:
                return found
    return None


def layer_of(name: str) -> int:
    best = (-1, -1)  # (prefix length, layer)
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if (name == prefix or name.startswith(prefix + ".")) and len(prefix) > best[0]:
                best = (len(prefix), i)
    if best[1] < 0:
        raise AssertionError(f"{name} is in no layer: add it to LAYERS and to docs/architecture.md")
    return best[1]


def test_no_import_cycles() -> None:
    cycle = find_cycle(graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_finder_sees_a_cycle_hidden_in_a_function(tmp_path: Path) -> None:
    package = tmp_path / "factory"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("import factory.b\n")
    (package / "b.py").write_text("def f():\n    from .a import x\n    return x\n")
    (package / "c.py").write_text("from factory import a\n")
    edges = graph(tmp_path)
    assert edges["factory.b"] == {"factory.a"} and edges["factory.c"] == {"factory.a"}
    assert find_cycle(edges) == ["factory.a", "factory.b", "factory.a"]
    (package / "b.py").write_text("X = 1\n")
    assert find_cycle(graph(tmp_path)) is None


def test_imports_go_down_the_layers() -> None:
    wrong = []
    for name, targets in graph().items():
        for target in targets:
            if layer_of(target) > layer_of(name):
                wrong.append(f"{name} imports {target}")
    assert not wrong, "imports against the data flow: " + "; ".join(sorted(wrong))


@pytest.mark.parametrize("name", sorted(modules()))
def test_module_is_small(name: str) -> None:
    lines = len(modules()[name].read_text(encoding="utf-8").splitlines())
    assert lines <= MAX_LINES, f"{name} has {lines} lines (more than {MAX_LINES}): split it by job"


def test_cli_reaches_only_commands() -> None:
    """cli.py parses and calls: it imports the package's entry points, not its internals' helpers."""
    tree = ast.parse((ROOT / "cli.py").read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("factory"):
            assert not any(alias.name.startswith("_") for alias in node.names), f"cli.py imports a private name from {node.module}"


def _table_rows(doc: str) -> dict[str, str]:
    """docs/architecture.md's module table: the module cell (``store/``, ``toy/world``) -> its row."""
    rows = {}
    for line in doc.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("|") and len(cells) == 3 and cells[1].startswith("`"):
            rows[cells[1].strip("`")] = line
    return rows


def test_every_module_is_in_the_architecture_table() -> None:
    """Each module of the package is named in docs/architecture.md: a top-level module in its own
    row (``filter``), a package's module in its package's row (``run`` in the ``store/`` row) or
    in a row of its own (``toy/world``)."""
    rows = _table_rows((ROOT / "docs" / "architecture.md").read_text(encoding="utf-8"))
    missing = []
    for name in sorted(modules()):
        parts = name.split(".")[1:]
        if not parts:
            continue
        path = "/".join(parts)
        if path in rows or f"{path}/" in rows or any(row.startswith(f"{path}/") for row in rows):
            continue  # its own row, or a package whose modules have rows (toy/)
        if len(parts) == 2 and f"`{parts[1]}`" in rows.get(f"{parts[0]}/", ""):
            continue
        missing.append(path)
    assert not missing, "modules missing from docs/architecture.md's table: " + ", ".join(missing)
    named = [cell for cell in rows if not (PACKAGE / cell).is_dir() and not (PACKAGE / f"{cell}.py").is_file()]
    assert not named, "docs/architecture.md's table names modules that do not exist: " + ", ".join(named)
