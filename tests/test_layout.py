"""The package layout's rules (docs/ARCHITECTURE.md): imports point down only, no cycles, and the
product never imports tools/. Read from the sources with ast, function-level imports included."""
import ast
import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
P = "pagedkv."
# What each layer may import from the project (itself always allowed). "pagedkv" alone is the
# public API's lazy re-exports, which the ablation tool uses as any user would.
ALLOWED = {
    P + "kvcache": {P + "kernels"},  # CacheEngine drives the swap and copy kernels; block_manager stays pure
    P + "preemption": {P + "kvcache"},
    P + "kernels": set(),
    P + "runtime.models": {P + "kernels"},
    P + "runtime.engine": {P + "runtime.models", P + "preemption", P + "kvcache", P + "kernels"},
    P + "runtime.serving": {P + "runtime.engine", P + "runtime.models", P + "kvcache"},
    P + "runtime.serving.http": {P + "runtime.serving", P + "runtime.engine"},  # the client, never the server
    P + "ablation": {"pagedkv", P + "runtime.engine", P + "runtime.models", P + "preemption", P + "kvcache"},
    P + "runtime.cli": {P + "runtime.serving", P + "runtime.serving.http", P + "runtime.engine",
                        P + "runtime.models", P + "ablation"},
    P + "runtime": set(),
    "pagedkv": {P + "runtime.cli"},  # __main__
}
TOP = ("pagedkv", "tools")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_imports(path: Path) -> set[str]:
    """Every project module this file imports, at any depth of the file."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + ([base] if base else []))
            # `from x import y` imports the module x.y where there is one, else x (for y)
            found |= {f"{base}.{a.name}" if f"{base}.{a.name}" in KNOWN else base for a in node.names}
    return {m for m in found if m.split(".")[0] in TOP}


FILES = [p for top in TOP for p in (ROOT / top).rglob("*.py")]
KNOWN = {module_name(p) for p in FILES}


def modules() -> dict[str, set[str]]:
    return {module_name(p): {m for m in project_imports(p) if m in KNOWN} for p in FILES}


def layer(module: str) -> str:
    for name in sorted(ALLOWED, key=len, reverse=True):
        if module == name or module.startswith(name + "."):
            return name
    return module.split(".")[0]


def test_the_product_never_imports_tools():
    offenders = {m: sorted(i for i in imps if i.split(".")[0] == "tools")
                 for m, imps in modules().items() if m.split(".")[0] == "pagedkv"}
    assert {m: i for m, i in offenders.items() if i} == {}


def test_imports_point_down_only():
    wrong = {}
    for module, imports in modules().items():
        if module.split(".")[0] != "pagedkv":
            continue
        own = layer(module)
        bad = sorted(i for i in imports if layer(i) != own and layer(i) not in ALLOWED[own])
        if bad:
            wrong[module] = bad
    assert wrong == {}


def test_no_import_cycles():
    graph = modules()
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, path: list[str]) -> bool:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if nxt == node or nxt == node.rpartition(".")[0]:
                continue  # a package's own __init__
            if state.get(nxt) == 1:
                cycle.extend(path[path.index(nxt):] + [nxt] if nxt in path else [node, nxt])
                return True
            if nxt not in state and visit(nxt, path + [nxt]):
                return True
        state[node] = 2
        return False

    for start in sorted(graph):
        if start not in state and visit(start, [start]):
            break
    assert cycle == []


def test_block_manager_needs_only_the_standard_library():
    path = ROOT / "pagedkv" / "kvcache" / "block_manager.py"
    imports = project_imports(path)
    tree = ast.parse(path.read_text())
    third_party = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    third_party |= {n.module.split(".")[0] for n in ast.walk(tree)
                    if isinstance(n, ast.ImportFrom) and n.module and not n.level}
    assert not third_party & {"torch", "numpy"}
    assert all(i.startswith(P + "kvcache") for i in imports), imports


@pytest.mark.parametrize("names", ["LLM, SamplingParams, LLMEngine, EngineConfig, Client, AsyncClient"])
def test_public_api(names):
    import subprocess
    import sys

    code = f"import pagedkv; from pagedkv import {names}; print(pagedkv.__version__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().count(".") == 2
