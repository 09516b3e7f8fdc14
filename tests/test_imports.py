"""Layering: no framework up front, none in oracles, no import cycle, and the library never imports the command line."""

from __future__ import annotations

import ast
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FRAMEWORK_MODULES = {"verify.targets.chunked_jax", "verify.targets.chunked_torch", "verify.targets.paper_jax",
                     "verify.targets.torch_sdpa", "verify.targets.jax_dpa", "verify.targets.mea_torch",
                     "verify.targets.mea_jax", "verify.targets.torch_sdpa_flash", "verify.targets.torch_flex",
                     "verify.targets.triton_flash", "verify.targets.triton_flash_kernels"}


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=300)


def _modules(package: str) -> dict[str, Path]:
    out = {}
    for path in sorted((ROOT / package).rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


def _runtime_imports(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports when it runs (anywhere in it, but not under ``if TYPE_CHECKING``)."""
    tree = ast.parse(path.read_text())
    skip = {id(n) for node in ast.walk(tree) if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)
            for n in ast.walk(node)}
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(tree):
        if id(node) in skip:
            continue
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            subs = {f"{base}.{a.name}" for a in node.names} & known
            found |= subs if len(subs) == len(node.names) else subs | {base}  # `from pkg import sub` needs only sub
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    mods = {**_modules("verify"), **_modules("oracles")}
    return {name: _runtime_imports(path, name, set(mods)) for name, path in mods.items()}


def test_no_import_cycle_among_project_modules():
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                cycle = stack[stack.index(nxt):] + [nxt]
                raise AssertionError("import cycle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt)
        stack.pop()
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node)


def test_the_library_never_imports_the_command_line():
    for name, deps in _graph().items():
        if not name.startswith("verify.commands"):
            assert not any(d.startswith("verify.commands") for d in deps), f"{name} imports {sorted(deps)}"


def test_each_module_imports_alone_in_a_fresh_interpreter():
    names = [n for n in _graph() if n not in FRAMEWORK_MODULES and not n.endswith("__main__")]

    def one(name: str) -> tuple[str, subprocess.CompletedProcess]:
        return name, _python(f"import {name}")

    with ThreadPoolExecutor(2) as pool:
        for name, res in pool.map(one, names):
            assert res.returncode == 0, f"import {name}: {res.stderr[-2000:]}"


def test_importing_the_harness_imports_no_framework():
    res = _python("import sys, verify, verify.commands, verify.fuzz, verify.accuracy, verify.memory, "
                  "verify.pytest_plugin, oracles.mp, oracles.naive; "
                  "print(sorted(m for m in ('torch', 'jax', 'triton') if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_oracles_import_no_framework():
    for name in _graph():
        if name.startswith("oracles"):
            text = (ROOT / (name.replace(".", "/") + ("/__init__.py" if name == "oracles" else ".py"))).read_text()
            imported = {a.name.split(".")[0] for n in ast.walk(ast.parse(text)) if isinstance(n, ast.Import)
                        for a in n.names}
            imported |= {(n.module or "").split(".")[0] for n in ast.walk(ast.parse(text))
                         if isinstance(n, ast.ImportFrom)}
            assert not imported & {"torch", "jax", "jaxlib", "triton", "verify"}, f"{name} imports {imported}"


def test_missing_torch_disables_only_torch_targets():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from verify.targets import load, Unavailable\n"
        "try:\n    load('chunked-torch')\nexcept Unavailable as exc:\n    print('unavailable:', exc)\n"
        "print('jax ok:', load('chunked-jax').info.name)\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr
    line = next(x for x in res.stdout.splitlines() if x.startswith("unavailable:"))
    assert "target chunked-torch is unavailable" in line and "import of torch halted" in line, line
    assert "jax ok: chunked-jax" in res.stdout
