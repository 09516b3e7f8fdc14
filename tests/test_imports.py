"""Framework isolation: the harness imports no framework up front, and a missing one disables only its targets."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _python(code: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, text=True, capture_output=True,
                          timeout=300)


def test_importing_the_harness_imports_no_framework():
    res = _python("import sys, verify, verify.cli, verify.fuzz, verify.report, verify.memory, oracles.mp, "
                  "oracles.naive; print(sorted(m for m in ('torch', 'jax') if m in sys.modules))")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_oracles_import_no_framework():
    for path in (ROOT / "oracles").glob("*.py"):
        text = path.read_text()
        for name in ("torch", "jax"):
            assert f"import {name}" not in text and f"from {name}" not in text, f"{path.name} imports {name}"


def test_missing_torch_disables_only_torch_targets():
    code = (
        "import sys; sys.modules['torch'] = None\n"
        "from verify.targets import load, Unavailable\n"
        "try:\n    load('chunked-torch')\nexcept Unavailable as exc:\n    print('unavailable:', exc)\n"
        "print('jax ok:', load('chunked-jax').info.name)\n"
    )
    res = _python(code)
    assert res.returncode == 0, res.stderr
    assert "unavailable: target chunked-torch is unavailable" in res.stdout and "torch" in res.stdout
    assert "jax ok: chunked-jax" in res.stdout
