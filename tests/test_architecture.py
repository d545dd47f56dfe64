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


# -- the PEFT boundary (issue 26) -------------------------------------------------------------------

PEFT_BOUNDARY = ROOT / "inference" / "peft_internals.py"
SERVICE_PACKAGES = ("inference", "api", "handler")
# The attributes by which code reaches into a PEFT layer, a PEFT wrapper or PEFT's bookkeeping on a
# model: the adapter dicts of a LoRA layer (its weights, rank/alpha/scaling, rsLoRA/DoRA/bias flags,
# dropout), merge state, the wrapped base layer, the active-adapter fields, the per-layer verbs, the
# config dict diffusers/PEFT hang on a model, and what a `modules_to_save` wrapper holds. Each is a
# name PEFT chose and may change; reading any of them outside `inference/peft_internals.py` is a
# touch an upgrade would have to find. Left out on purpose: `r` (one letter, means other things
# elsewhere), `in_features`/`out_features` (torch's Linear has them too), and the diffusers-level
# verbs (`delete_adapters`, `set_adapters`, `add_adapter`, `load_lora_weights`: public API).
PEFT_LAYER_ATTRIBUTES = {
    "lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout",
    "lora_alpha", "scaling", "use_rslora", "use_dora", "lora_bias", "lora_variant",
    "merge", "unmerge", "merged", "merged_adapters", "base_layer", "get_base_layer",
    "active_adapter", "active_adapters", "_active_adapter", "_disable_adapters", "adapter_layer_names",
    "other_param_names", "update_layer", "set_scale", "delete_adapter", "set_adapter",
    "peft_config", "_hf_peft_config_loaded", "modules_to_save", "original_module",
}
# PEFT's modules that hold its layer classes and private helpers (`from peft import LoraConfig` is public).
PEFT_PRIVATE_MODULES = ("peft.tuners", "peft.utils", "diffusers.utils.peft_utils")


def peft_touches(source: str) -> list[str]:
    """`line: what` for every PEFT layer attribute read or written (`x.lora_A`, `getattr(x, "scaling")`)
    and every import of PEFT's layer modules in `source`."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute) and node.attr in PEFT_LAYER_ATTRIBUTES:
            found.append(f"{node.lineno}: .{node.attr}")
        elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
              and node.func.id in ("getattr", "setattr", "hasattr", "delattr") and len(node.args) > 1
              and isinstance(node.args[1], ast.Constant) and node.args[1].value in PEFT_LAYER_ATTRIBUTES):
            found.append(f"{node.lineno}: {node.func.id}(..., {node.args[1].value!r})")
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            modules = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module or ""]
            found += [f"{node.lineno}: import {m}" for m in modules if m.startswith(PEFT_PRIVATE_MODULES)]
    return sorted(found, key=lambda touch: int(touch.split(":")[0]))


def test_the_peft_rule_catches_planted_touches():
    planted = ("import torch\n"
               "def f(layer, name):\n"
               "    layer.lora_A[name].weight.zero_()\n"
               "    s = getattr(layer, 'scaling')\n"
               "    from peft.tuners.tuners_utils import BaseTunerLayer\n"
               "    layer.merge(adapter_names=[name])\n")
    assert peft_touches(planted) == ["3: .lora_A", "4: getattr(..., 'scaling')", "5: import peft.tuners.tuners_utils",
                                     "6: .merge"]
    assert peft_touches("key = 'unet.x.lora_A.weight'\nfrom peft import LoraConfig\n") == [], \
        "state-dict key strings and PEFT's public API are fine"


def test_peft_layer_internals_are_touched_in_peft_internals_alone():
    offenders = {}
    for package in SERVICE_PACKAGES:
        for path in sorted(PACKAGE_DIRS[package].rglob("*.py")):
            if path != PEFT_BOUNDARY and (touches := peft_touches(path.read_text())):
                offenders[str(path.relative_to(ROOT))] = touches
    assert not offenders, f"PEFT layer internals outside inference/peft_internals.py (wrap them there): {offenders}"
    assert peft_touches(PEFT_BOUNDARY.read_text()), "the boundary module itself is scanned by the same rule"


# -- sizes (issue 26) ------------------------------------------------------------------------------------

MAX_MODULE_LINES, MAX_CLASS_LINES, MAX_FUNCTION_LINES = 400, 250, 60
SIZED_PACKAGES = ("inference", "api", "handler", "sdxl_lora_client")
SPLIT_IN_PROGRESS: set[str] = set()  # modules exempt from the sizes while a split is under way (none now)


def own_lines(node: ast.AST) -> int:
    """Lines of a function or class, less those of the functions and classes nested in it."""
    nested = set()
    for child in ast.walk(node):
        if child is not node and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            nested.update(range(child.lineno, child.end_lineno + 1))
    return len(set(range(node.lineno, node.end_lineno + 1)) - nested)


def size_violations(source: str) -> list[str]:
    """What in `source` is over the sizes: the module's lines, a class's lines (its methods counted),
    a function's own lines (nested functions and classes not counted)."""
    found = []
    lines = len(source.splitlines())
    if lines > MAX_MODULE_LINES:
        found.append(f"module: {lines} lines > {MAX_MODULE_LINES}")
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef) and (size := node.end_lineno - node.lineno + 1) > MAX_CLASS_LINES:
            found.append(f"class {node.name}: {size} lines > {MAX_CLASS_LINES}")
        elif (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
              and (size := own_lines(node)) > MAX_FUNCTION_LINES):
            found.append(f"function {node.name}: {size} lines > {MAX_FUNCTION_LINES}")
    return found


def test_the_size_rule_catches_planted_oversizes():
    body = "".join(f"    x{i} = {i}\n" for i in range(61))
    assert size_violations(f"def long():\n{body}") == ["function long: 62 lines > 60"]
    nested = "".join(f"        y{i} = {i}\n" for i in range(61))
    assert size_violations(f"def outer():\n    def inner():\n{nested}    return inner\n") == [
        "function inner: 62 lines > 60"], "a nested function's lines are its own, not its parent's"
    methods = "".join(f"    def m{i}(self):\n        return {i}\n" for i in range(125))
    assert size_violations(f"class Big:\n{methods}") == ["class Big: 251 lines > 250"]
    assert size_violations("x = 1\n" * 401) == ["module: 401 lines > 400"]
    assert size_violations("x = 1\n" * 400) == []


@pytest.mark.parametrize("package", SIZED_PACKAGES)
def test_no_module_class_or_function_over_the_sizes(package):
    over = {}
    for path in sorted(PACKAGE_DIRS[package].rglob("*.py")):
        name = str(path.relative_to(ROOT))
        if name not in SPLIT_IN_PROGRESS and (found := size_violations(path.read_text())):
            over[name] = found
    assert not over, f"over issue 26's sizes: {over}"


def test_the_modules_being_split_exist():
    """SPLIT_IN_PROGRESS names real files (a renamed one would otherwise be exempt by accident);
    once a split lands its entry goes."""
    assert all((ROOT / name).is_file() for name in SPLIT_IN_PROGRESS)
