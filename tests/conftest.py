import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
# The repository, the test helpers, the host stand-ins (A1111's ``modules`` package, Forge's
# ``backend``) and the neighbouring extensions' (see the README.md in each folder).
for path in (ROOT, ROOT / "tests", ROOT / "tests" / "a1111", ROOT / "tests" / "forge", ROOT / "tests" / "neighbours"):
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

_largest_differences: dict[str, float] = {}


@pytest.fixture
def record_difference(request):
    """Record the largest difference a test saw against its reference; printed at the end."""

    def record(value: float, label: str = "") -> None:
        key = request.node.nodeid + (f" [{label}]" if label else "")
        _largest_differences[key] = max(float(value), _largest_differences.get(key, 0.0))

    return record


@pytest.fixture
def neo_dynamic_args():
    """Forge Neo's process-global ``dynamic_args`` (its stand-in, tests/forge/backend/args.py), set back
    as they were after the test."""
    from backend.args import dynamic_args

    before = dict(dynamic_args)
    yield dynamic_args
    dynamic_args.clear()
    dynamic_args.update(before)


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)
    with torch.no_grad():
        yield


def pytest_terminal_summary(terminalreporter):
    if _largest_differences:
        terminalreporter.section("largest difference against the reference, per test")
        for key, value in sorted(_largest_differences.items()):
            terminalreporter.write_line(f"{value:.3e}  {key}")
