"""Mirrors modules/errors.py (v1.10.1): report errors to stderr and keep going."""

from __future__ import annotations

import sys
import traceback

reported: list[tuple[str, BaseException | None]] = []
"""Stand-in only: every (message, exception or None) passed to ``report``/``display``, in order."""


def report(message: str, *, exc_info: bool = False) -> None:
    """Mirrors modules/errors.py report (v1.10.1): print ``*** message`` (and the traceback); never raise."""
    error = sys.exc_info()[1] if exc_info else None
    reported.append((message, error))
    print(f"*** {message}", file=sys.stderr)
    if error is not None:
        traceback.print_exc(file=sys.stderr)


def display(e: BaseException, task: str, *, full_traceback: bool = False) -> None:
    """Mirrors modules/errors.py display (v1.10.1): print the task and the exception."""
    reported.append((task, e))
    print(f"{task or 'error'}: {type(e).__name__}: {e}", file=sys.stderr)
