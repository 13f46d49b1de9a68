"""Logging and the progress/cancel callback convention shared by every long loop (STYLE.md 5.6)."""

from __future__ import annotations

import logging
from typing import Any, Callable, Optional

log = logging.getLogger("ffp")

OnStep = Callable[[int, int, Optional[Any]], None]
"""on_step(i, total, preview=None): called after step i (1-based) of total; preview is an optional image."""
ShouldStop = Callable[[], bool]
"""should_stop() -> True when the user asked to cancel."""

_logged: set[str] = set()


class Cancelled(RuntimeError):
    """Raised by a long loop when `should_stop()` returned True."""


def log_once(key: str, message: str, *args: Any, level: int = logging.WARNING) -> None:
    """Log a fallback reason once per process (KJNodes' `_logged` pattern)."""
    if key not in _logged:
        _logged.add(key)
        log.log(level, message, *args)


def report(on_step: OnStep | None, should_stop: ShouldStop | None, i: int, total: int, preview: Any = None) -> None:
    """Report progress for step i of total, then honour a cancel request."""
    if on_step is not None:
        on_step(i, total, preview)
    if should_stop is not None and should_stop():
        raise Cancelled(f"cancelled at step {i} of {total}")
