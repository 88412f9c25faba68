"""The seams of the codebase, held by tests that name the offending line:

- one module knows Flower beyond its public API (``common/flower_glue.py``);
- imports go one way: ``simulations`` -> ``deploy`` -> ``server`` / ``client`` -> ``common``, nothing
  upward, ``server`` and ``client`` never import each other, and no cycle among the modules of one
  package (an import inside a function, or only for type checking, is an edge all the same).

Read from the source with ``ast``, nothing imported: fast, and blind to what happens to be loaded.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("common", "client", "server", "deploy", "simulations")
# The project's packages each may import (itself always).
MAY_IMPORT = {
    "common": set(),
    "client": {"common"},
    "server": {"common"},
    "deploy": {"common", "client", "server"},
    "simulations": {"common", "client", "server", "deploy"},
}
GLUE = "common/flower_glue.py"
# Flower's public API: these modules and what they export. Anything else of ``flwr`` is an internal
# that may change in any release; only the glue module may touch it.
FLOWER_PUBLIC = frozenset(
    {"flwr.app", "flwr.clientapp", "flwr.clientapp.mod", "flwr.serverapp", "flwr.serverapp.strategy", "flwr.common"}
)


def source_files(root: Path, *folders: str) -> list[Path]:
    return sorted(path for folder in folders for path in (root / folder).rglob("*.py"))


def imports(path: Path, root: Path) -> list[tuple[int, str]]:
    """(line, module) for every import in the file, at any depth, relative imports resolved."""
    package = path.relative_to(root).parent.parts
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package[: len(package) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            found.append((node.lineno, base))
            for alias in node.names:  # ``from common import protocol`` imports the module common.protocol
                if is_module(f"{base}.{alias.name}", root):
                    found.append((node.lineno, f"{base}.{alias.name}"))
    return found


def is_module(name: str, root: Path) -> bool:
    path = root / name.replace(".", "/")
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def flower_internals(root: Path = ROOT) -> list[str]:
    """Every import of Flower beyond its public API outside the glue module (tests included)."""
    offending = []
    for path in source_files(root, *PACKAGES, "tests"):
        relative = path.relative_to(root).as_posix()
        if relative == GLUE:
            continue
        for line, module in imports(path, root):
            if (module == "flwr" or module.startswith("flwr.")) and module not in FLOWER_PUBLIC:
                offending.append(f"{relative}:{line} imports {module}")
    return offending


# Reaching into a Flower object's private state: a metadata field written through ``__dict__``,
# FedOpt's moments by attribute name.
PRIVATE_STATE = re.compile(r"__dict__\[|\.(m_t|v_t)\b")


def flower_private_state(root: Path = ROOT) -> list[str]:
    offending = []
    for path in source_files(root, *PACKAGES, "tests"):
        relative = path.relative_to(root).as_posix()
        if relative in (GLUE, "tests/test_seams.py"):
            continue
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if PRIVATE_STATE.search(line):
                offending.append(f"{relative}:{number}: {line.strip()}")
    return offending


def upward_imports(root: Path = ROOT) -> list[str]:
    offending = []
    for path in source_files(root, *PACKAGES):
        own = path.relative_to(root).parts[0]
        for line, module in imports(path, root):
            target = module.split(".")[0]
            if target in PACKAGES and target != own and target not in MAY_IMPORT[own]:
                offending.append(f"{path.relative_to(root).as_posix()}:{line} imports {module} ({own} -> {target})")
    return offending


def package_cycles(root: Path = ROOT) -> list[str]:
    """Each cycle among the modules of one package, as 'a -> b -> a'."""
    graph: dict[str, set[str]] = {}
    for path in source_files(root, *PACKAGES):
        name = path.relative_to(root).with_suffix("").as_posix().replace("/", ".")
        package = name.split(".")[0]
        graph[name] = {
            module
            for _, module in imports(path, root)
            if module.split(".")[0] == package and module not in (name, package) and is_module(module, root)
        }
    cycles: list[str] = []
    state = dict.fromkeys(graph, 0)  # 0 unseen, 1 on the current path, 2 done

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for target in sorted(graph.get(node, ())):
            if state.get(target) == 1:
                cycles.append(" -> ".join([*path[path.index(target) :], target]))
            elif state.get(target) == 0:
                visit(target, [*path, target])
        state[node] = 2

    for node in sorted(graph):
        if state[node] == 0:
            visit(node, [node])
    return cycles


def test_only_the_glue_module_imports_flower_internals() -> None:
    offending = flower_internals()
    assert not offending, f"Flower internals outside {GLUE} (move the use there): " + "; ".join(offending)


def test_only_the_glue_module_reaches_into_flower_objects() -> None:
    offending = flower_private_state()
    assert not offending, f"Flower's private state outside {GLUE}: " + "; ".join(offending)


def test_imports_go_one_way() -> None:
    offending = upward_imports()
    assert not offending, f"imports against the layering {MAY_IMPORT}: " + "; ".join(offending)


def test_no_import_cycle_inside_a_package() -> None:
    cycles = package_cycles()
    assert not cycles, "import cycles: " + "; ".join(cycles)


def test_each_check_names_what_breaks_it(tmp_path: Path) -> None:
    for package in PACKAGES:
        (tmp_path / package).mkdir()
        (tmp_path / package / "__init__.py").write_text("")
    (tmp_path / "tests").mkdir()
    (tmp_path / "server" / "grid.py").write_text("def f():\n    from flwr.common.constant import ErrorCode\n")
    (tmp_path / "common" / "config.py").write_text("from server.grid import f\nfrom . import engines\n")
    (tmp_path / "common" / "engines.py").write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import common.config\n"
    )
    (tmp_path / "tests" / "test_x.py").write_text("from flwr.app import Message\n")  # public: fine
    (tmp_path / "server" / "nodes.py").write_text("def f(m):\n    m.metadata.__dict__['_message_id'] = 'x'\n")
    assert flower_internals(tmp_path) == ["server/grid.py:2 imports flwr.common.constant"]
    assert flower_private_state(tmp_path) == ["server/nodes.py:2: m.metadata.__dict__['_message_id'] = 'x'"]
    assert upward_imports(tmp_path) == ["common/config.py:1 imports server.grid (common -> server)"]
    assert package_cycles(tmp_path) == ["common.config -> common.engines -> common.config"]
