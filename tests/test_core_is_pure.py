"""The core (every module directly in lib_nag) imports no WebUI or ldm code."""

import ast
import subprocess
import sys
from pathlib import Path

CORE = [p for p in (Path(__file__).resolve().parents[1] / "lib_nag").glob("*.py")]
HOST_PACKAGES = {"modules", "ldm", "sgm", "backend", "ldm_patched", "modules_forge", "gradio"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


def test_core_sources_import_no_host_package():
    assert len(CORE) >= 4
    for path in CORE:
        assert not imported_roots(path) & HOST_PACKAGES, path.name


def test_importing_the_core_loads_no_host_package():
    modules = [f"lib_nag.{p.stem}" for p in CORE if p.stem != "__init__"]
    code = f"import sys; import {', '.join(modules)}; print(sorted(m for m in sys.modules if m.split('.')[0] in {HOST_PACKAGES!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=CORE[0].parents[1])
    assert out.stdout.strip() == "[]"
