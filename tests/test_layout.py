"""The house: every import of the package (function-level ones included) runs one way between the layers, and
there is no import cycle; the original import paths are re-exports; no package file is over ~400 lines."""

from __future__ import annotations

import ast
import os

import pytest

from conftest import ROOT

PACKAGE = os.path.join(ROOT, "ldm")

# layer -> the layers it may import (itself included). Applications and the benchmark sit on top; speed over
# weights I/O over the model; the samplers see only a denoiser; fileio is a leaf; compat holds the original
# import paths (re-exports), which only applications use (the yamls name them as strings, not imports).
ALLOWED = {
    "base": {"base"},
    "model": {"base", "model"},
    "samplers": {"base", "samplers"},
    "weights": {"base", "model", "weights"},
    "speed": {"base", "model", "weights", "speed"},
    "compat": {"base", "model", "samplers", "weights", "compat"},
    "apps": {"base", "model", "samplers", "weights", "speed", "compat", "apps"},
    "benchmark": {"base", "model", "samplers", "weights", "speed", "compat", "apps", "benchmark"},
}


def layer(module: str) -> str:
    parts = module.split(".")
    if module in ("ldm", "ldm.fileio"):
        return "base"
    if parts[1] in ("models", "modules", "util"):
        return "compat"
    return {"model": "model", "samplers": "samplers", "weights": "weights", "speed": "speed", "apps": "apps",
            "benchmark": "benchmark"}[parts[1]]


def modules() -> dict[str, str]:
    """Module name -> file, for every .py file of the package."""
    out = {}
    for folder, _, files in os.walk(PACKAGE):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(folder, f)
                name = os.path.relpath(path[:-3], ROOT).replace(os.sep, ".")
                out[name.removesuffix(".__init__")] = path
    return out


def imports(name: str, path: str, known: dict[str, str]) -> set[str]:
    """The ldm modules ``name`` imports anywhere in its file (module level, functions, conditionals)."""
    found = set()
    is_package = path.endswith("__init__.py")
    for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                pkg = name.split(".") if is_package else name.split(".")[:-1]
                base = ".".join(pkg[: len(pkg) - node.level + 1] + ([base] if base else []))
            targets = [base] + [f"{base}.{a.name}" for a in node.names]  # `from pkg import module`
        else:
            continue
        for t in targets:
            while t and t not in known:
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


@pytest.fixture(scope="module")
def graph() -> dict[str, set[str]]:
    known = modules()
    return {m: imports(m, p, known) for m, p in known.items()}


def test_imports_run_one_way(graph):
    wrong = [f"{m} ({layer(m)}) imports {t} ({layer(t)})" for m, ts in sorted(graph.items()) for t in sorted(ts)
             if layer(t) not in ALLOWED[layer(m)] and not m.startswith(t + ".")]
    assert not wrong, "\n".join(wrong)


def test_no_import_cycles(graph):
    # a package importing its own submodules (ldm.samplers -> ldm.samplers.ddim) is no cycle; a submodule
    # importing a name from its package's __init__ is left out as Python resolves it after the package
    edges = {m: {t for t in ts if not m.startswith(t + ".")} for m, ts in graph.items()}
    seen, stack, cycles = {}, [], []

    def visit(m: str) -> None:  # depth-first search; a grey node on the stack closes a cycle
        seen[m] = "grey"
        stack.append(m)
        for t in sorted(edges[m]):
            if seen.get(t) == "grey":
                cycles.append(" -> ".join(stack[stack.index(t):] + [t]))
            elif t not in seen:
                visit(t)
        stack.pop()
        seen[m] = "black"

    for m in sorted(edges):
        if m not in seen:
            visit(m)
    assert not cycles, "\n".join(cycles)


def test_layer_check_catches_a_wrong_import(tmp_path):
    """The walker sees imports inside functions, relative ones and `from pkg import module` forms."""
    known = {"ldm.model.unet": "", "ldm.weights.loading": "", "ldm.weights": "", "ldm.model": ""}
    src = tmp_path / "unet.py"
    src.write_text("def f():\n    from ldm.weights import loading\n\nfrom . import attention\n")
    found = imports("ldm.model.unet", str(src), known)
    assert found == {"ldm.weights", "ldm.weights.loading", "ldm.model"}
    assert layer("ldm.weights.loading") not in ALLOWED[layer("ldm.model.unet")]


def test_third_party_peers_only_in_the_benchmark():
    """No diffusers or transformers import outside ldm/benchmark (they are test and benchmark peers)."""
    wrong = []
    for name, path in modules().items():
        if layer(name) == "benchmark":
            continue
        for node in ast.walk(ast.parse(open(path, encoding="utf-8").read())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            wrong += [f"{name}: {n}" for n in names if n.split(".")[0] in ("diffusers", "transformers")]
    assert not wrong, wrong


def test_original_import_paths_are_re_exports():
    """ldm.models.*, ldm.modules.* and ldm.util hold imports and __all__ only: no real code lives there."""
    for name, path in modules().items():
        if layer(name) != "compat":
            continue
        tree = ast.parse(open(path, encoding="utf-8").read())
        body = [n for n in tree.body if not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Constant))]
        assert all(isinstance(n, (ast.Import, ast.ImportFrom)) or
                   (isinstance(n, ast.Assign) and [t.id for t in n.targets] == ["__all__"]) for n in body), name


def test_no_package_file_over_400_lines():
    long = {os.path.relpath(p, ROOT): n for p in modules().values()
            if (n := sum(1 for _ in open(p, encoding="utf-8"))) > 400}
    assert not long, long
