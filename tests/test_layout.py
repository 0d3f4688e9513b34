"""The package's layout as the README draws it: every module listed, imports pointing one way, no circle."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.support import README, ROOT

PACKAGE = ROOT / "petsage_grpc"
#: What each part may not import: the health model knows nothing of the server, and so on.
NEVER = {
    "petsage_grpc.health": ("petsage_grpc.server", "petsage_grpc.logs", "petsage_grpc.cli", "petsage_grpc.client"),
    "petsage_grpc.logs": ("petsage_grpc.server", "petsage_grpc.cli", "petsage_grpc.client"),
    "petsage_grpc.server": ("petsage_grpc.cli", "petsage_grpc.client"),
    "petsage_grpc.client": ("petsage_grpc.server", "petsage_grpc.cli", "petsage_grpc.health", "petsage_grpc.logs"),
    "petsage_grpc.cli.probe": ("petsage_grpc.server", "petsage_grpc._proto", "petsage_grpc.client"),
}


def modules() -> dict[str, Path]:
    """Every hand-written module of the package, by dotted name."""
    found = {}
    for path in PACKAGE.rglob("*.py"):
        relative = path.relative_to(ROOT).with_suffix("")
        if "_proto" in relative.parts:
            continue
        parts = relative.parts[:-1] if relative.name == "__init__" else relative.parts
        found[".".join(parts)] = path
    return found


def imports(path: Path, name: str) -> list[tuple[str, list[str]]]:
    """Each module ``path`` imports (at any depth, lazily too), with the names it takes from it."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: list[tuple[str, list[str]]] = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, []) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join([*package.split(".")[: len(package.split(".")) - node.level + 1], base]).strip(".")
            found.append((base, [alias.name for alias in node.names]))
    return found


def graph() -> dict[str, set[str]]:
    """Module -> the package's modules it imports (``from pkg import module`` counts as the module)."""
    every = modules()
    edges: dict[str, set[str]] = {}
    for name, path in every.items():
        targets = set()
        for module, names in imports(path, name):
            for candidate in [f"{module}.{n}" for n in names] + [module]:
                if candidate in every:
                    targets.add(candidate)
                    break
        edges[name] = targets - {name}
    return edges


def test_the_import_graph_has_no_circle() -> None:
    edges = graph()
    state: dict[str, str] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for target in sorted(edges[node]):
            assert state.get(target) != "open", " -> ".join([*trail, node, target])
            if target not in state:
                visit(target, [*trail, node])
        state[node] = "done"

    for node in sorted(edges):
        if node not in state:
            visit(node, [])


def test_every_dependency_points_the_way_the_architecture_says() -> None:
    broken = [
        f"{name} imports {target}"
        for name, targets in graph().items()
        for part, forbidden in NEVER.items()
        if name == part or name.startswith(part + ".")
        for target in targets
        if target.startswith(forbidden)
    ]
    broken += [f"{name} imports {module}" for name, path in modules().items()
               if name.startswith("petsage_grpc.cli.probe")
               for module, _ in imports(path, name) if module.startswith("google.protobuf")]

    assert broken == []


def test_no_module_imports_a_private_name_of_another() -> None:
    private = [
        f"{name}: from {module} import {taken}"
        for name, path in modules().items()
        for module, names in imports(path, name)
        if module.startswith("petsage_grpc")
        for taken in names
        if taken.startswith("_") and taken != "__version__"
    ]

    assert private == []


def layout_entries() -> set[str]:
    """The paths the README's layout block lists, made whole from their indentation."""
    block = README.read_text().split("### Layout")[1].split("```text")[1].split("```")[0]
    stack: list[tuple[int, str]] = []
    entries = set()
    for line in block.splitlines():
        if not line.strip() or line.startswith("  " * 20):
            continue
        indent = len(line) - len(line.lstrip())
        entry = line.split()[0]
        if not entry.endswith(("/", ".py", ",")):
            continue  # a description continued on the next line
        while stack and stack[-1][0] >= indent:
            stack.pop()
        whole = "".join(part for _, part in stack) + entry
        entries.add(whole)
        if entry.endswith("/"):
            stack.append((indent, entry))
    return entries


def test_readme_layout_lists_every_module_and_nothing_else() -> None:
    listed = {entry for entry in layout_entries() if entry.startswith("petsage_grpc/") and entry.endswith(".py")}
    actual = {
        str(path.relative_to(ROOT)) for path in PACKAGE.rglob("*.py")
        if "_proto" not in path.parts and (path.name != "__init__.py" or path.parent == PACKAGE)
    }

    assert listed == actual


def test_readme_layout_names_folders_that_exist() -> None:
    for entry in layout_entries():
        if entry.endswith("/") or entry.endswith(".py"):
            assert (ROOT / entry).exists(), entry
