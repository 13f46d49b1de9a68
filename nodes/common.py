"""Logging and the progress/cancel callback convention shared by every long loop (STYLE.md 5.6)."""

from __future__ import annotations

import logging
import os
import re
import secrets
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

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


@contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[Path]:
    """Write `path` atomically: `with atomic_write(p) as tmp: save(tmp)`.

    Yields a new empty temp file in the target's folder (hidden name, same suffix, so writers that go by the
    suffix still work); when the block succeeds it is renamed over `path` in one step. On any error, Ctrl-C
    included, the temp file is removed and an existing `path` is left as it was. The file gets the usual mode
    for new files (0o666 minus the umask, so 0644 under umask 022), not tempfile.mkstemp's 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(100):
        tmp = path.with_name(f".{path.stem}.{secrets.token_hex(4)}.tmp{path.suffix}")
        try:
            os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))  # open(2) applies the umask
            break
        except FileExistsError:
            continue
        except OSError as e:
            raise OSError(e.errno, f"cannot write into folder '{path.parent}': {e.strerror}", str(path)) from None
    else:
        raise FileExistsError(f"could not create a temporary file next to '{path}'.")
    mode = os.stat(tmp).st_mode & 0o7777
    try:
        yield tmp
        if os.stat(tmp).st_mode & 0o7777 != mode:   # some writers (safetensors) recreate the file as 0600
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except OSError as e:                              # name the user's file in the error, not the temp one
        if str(tmp) in (str(e.filename), str(e.filename2)):
            raise OSError(e.errno, e.strerror, str(path)) from None
        raise
    finally:
        tmp.unlink(missing_ok=True)


_NAME_PART = re.compile(r"[\w\-. ]+")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}
MAX_NAME = 200


def safe_output_path(folder: str | os.PathLike, name: str, suffix: str, overwrite: bool = False) -> Path:
    """The file a node writes for a user-typed `name`: `folder/<name><suffix>`, never outside `folder`.

    name: letters, digits, '-', '_', '.', spaces, and '/' between subfolder names; a trailing `suffix` is
    optional (it is always forced). ValueError (what is wrong + what to type) for an empty name, an absolute
    path, a backslash or drive, '.' / '..' / empty parts, hidden names, Windows device names (CON, NUL, COM1, ...)
    and names over MAX_NAME characters. An existing file is kept: with overwrite=False the name gets _2, _3, ...
    (the caller reports the path it returns); overwrite=True returns the existing file's path. A folder of
    that name is an error either way. Write the returned path with `atomic_write`."""
    text = name.strip()
    stem = text[:-len(suffix)] if suffix and text.lower().endswith(suffix.lower()) else text
    parts = stem.split("/")
    rule = (f"use letters, digits, '-', '_', '.' and spaces, with '/' only between subfolder names, e.g. "
            f"'my_edits/clip1' (saved as <folder>/my_edits/clip1{suffix}).")
    problem = None
    if not stem:
        problem = "it is empty"
    elif stem.startswith("/") or "\\" in stem or ":" in stem or os.path.isabs(stem):
        problem = "absolute paths, drives and backslashes are not allowed"
    elif any(p in ("", ".", "..") for p in parts):
        problem = "'..', '.' and empty folder names are not allowed"
    elif not all(_NAME_PART.fullmatch(p) for p in parts):
        problem = "it contains characters other than letters, digits, '-', '_', '.', spaces and '/'"
    elif any(p.startswith(".") or p != p.rstrip(". ") for p in parts):
        problem = "a part starts with '.' (hidden) or ends with '.' or a space"
    elif any(p.split(".")[0].strip().lower() in _RESERVED for p in parts):
        problem = "CON, PRN, AUX, NUL, COM0-9 and LPT0-9 are reserved device names on Windows"
    elif len(stem) > MAX_NAME:
        problem = f"it is {len(stem)} characters long (at most {MAX_NAME})"
    if problem:
        raise ValueError(f"file name {name!r} is not allowed: {problem}; {rule}")
    root = Path(folder)
    path = root.joinpath(*parts[:-1], parts[-1] + suffix)
    n = 2
    while path.exists() and not path.is_dir() and not overwrite:
        path = path.with_name(f"{parts[-1]}_{n}{suffix}")
        n += 1
    if path.is_dir():
        raise ValueError(f"'{path}' is a folder; choose another file name than {name!r}.")
    return path
