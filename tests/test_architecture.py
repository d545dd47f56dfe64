"""The house stays as DESIGN.md draws it: which top-level package may import which, and no cycles.

The graph is derived from the code itself: every `import` and `from ... import` in every module,
inside functions too (the lazy ones are where such edges hide), read with `ast`.
"""

from __future__ import annotations

import ast
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE_DIRS = {
    "inference": ROOT / "inference",
    "api": ROOT / "api",
    "handler": ROOT / "handler",
    "sdxl_lora_client": ROOT / "client" / "sdxl_lora_client",
    "sdxl_lora_tools": ROOT / "sdxl_lora_tools",
}
CONTRACT = "sdxl_lora_client.contract"
# What each package may import of ours (DESIGN.md, "Layout"): the core and both deployments reach
# the client's distribution only for the wire contract; the tools may import everything.
ALLOWED = {
    "inference": {CONTRACT},
    "api": {"inference", CONTRACT},
    "handler": {"inference", CONTRACT},
    "sdxl_lora_client": set(),
    "sdxl_lora_tools": {"inference", "api", "handler", "sdxl_lora_client"},
}
CLIENT_THIRD_PARTY = {"pydantic", "httpx", "sqlalchemy"}


def imported_modules(path: Path) -> set[str]:
    """Every module name `path` imports, anywhere in the file (relative imports resolved)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1]).removeprefix("client.")
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import module`
    return names


def edges() -> dict[str, set[str]]:
    """Top-level package -> the names of ours it imports (`sdxl_lora_client.contract` kept apart)."""
    graph: dict[str, set[str]] = {}
    for package, directory in PACKAGE_DIRS.items():
        found = set()
        for path in directory.rglob("*.py"):
            for name in imported_modules(path):
                top = name.split(".")[0]
                if top == package or top not in PACKAGE_DIRS:
                    continue
                found.add(CONTRACT if name.startswith(CONTRACT) else top)
        graph[package] = found
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """A cycle between packages as a path [a, b, ..., a], or None (the contract counts as its package)."""
    packages = {node: {target.split(".")[0] for target in targets} for node, targets in graph.items()}
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for target in sorted(packages.get(node, ())):
            if state.get(target) == "open":
                return path[path.index(target):] + [target]
            if target not in state and (cycle := visit(target, path + [target])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(packages):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None
    assert find_cycle({"inference": {CONTRACT}, "sdxl_lora_client": {"inference"}}) is not None


def test_the_import_scanner_sees_lazy_imports():
    module = ROOT / "sdxl_lora_tools" / "cli.py"
    assert "inference.synthetic" in imported_modules(module), "imports inside functions count"


def test_no_cycle_between_top_level_packages():
    cycle = find_cycle(edges())
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


@pytest.mark.parametrize("package", sorted(PACKAGE_DIRS))
def test_each_package_imports_only_what_the_design_allows(package):
    forbidden = edges()[package] - ALLOWED[package]
    assert not forbidden, f"{package} imports {sorted(forbidden)}; DESIGN.md allows only {sorted(ALLOWED[package])}"


def test_the_client_imports_only_its_three_dependencies_and_the_standard_library():
    third_party = set()
    for path in PACKAGE_DIRS["sdxl_lora_client"].rglob("*.py"):
        for name in imported_modules(path):
            top = name.split(".")[0]
            if top and top not in sys.stdlib_module_names and top != "sdxl_lora_client" and top != "__future__":
                third_party.add(top)
    assert third_party <= CLIENT_THIRD_PARTY, f"the client imports {sorted(third_party - CLIENT_THIRD_PARTY)}"


def test_the_contract_imports_pydantic_alone():
    """The service imports the wire contract; that must not pull in the client's HTTP and SQL layers."""
    import subprocess

    code = ("import sys, sdxl_lora_client.contract; loaded = {m.split('.')[0] for m in sys.modules}; "
            "extra = loaded & {'sqlalchemy', 'httpx', 'torch', 'fastapi'}; assert not extra, extra; "
            "from sdxl_lora_client import SqlStore, AsyncLoraApplicator")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
