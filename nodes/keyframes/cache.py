"""A content-hashed, size-bounded cache of computed spans on disk.

The key hashes everything a span's result depends on: the engine's identity (name, settings, model identity),
the span's kind, its source frames, its keyframe(s) and its slice of the edit mask, so any change of any input
is a miss. Each entry is one safetensors file `<key>.safetensors` written atomically (a cancelled or failed span
writes nothing); a missing, unreadable or foreign file is a miss, so the folder is safe to delete at any time.
After each write the oldest entries (by last use) are removed until the folder is under max_bytes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch import Tensor

from ..common import atomic_write, log

FORMAT = "ffp-keyframe-span-1"
SUFFIX = ".safetensors"
DEFAULT_MAX_BYTES = 2 << 30


def span_key(identity: str, kind: str, tensors: Sequence[Optional[Tensor]]) -> str:
    """sha256 hex of the format, engine identity, span kind and every tensor's dtype, shape and bytes
    (None counts as its own value, so 'no mask' and an all-zero mask differ)."""
    h = hashlib.sha256(f"{FORMAT}\0{identity}\0{kind}".encode())
    for t in tensors:
        if t is None:
            h.update(b"\0none")
            continue
        a = np.ascontiguousarray(t.detach().cpu().numpy())
        h.update(f"\0{a.dtype}{a.shape}".encode())
        h.update(a.data)
    return h.hexdigest()


class SpanCache:
    """folder: where entries live (created on first write); max_bytes: size bound of the folder's entries."""

    def __init__(self, folder: str | os.PathLike, max_bytes: int = DEFAULT_MAX_BYTES):
        self.folder = Path(folder)
        self.max_bytes = int(max_bytes)

    def _path(self, key: str) -> Path:
        return self.folder / f"{key}{SUFFIX}"

    def get(self, key: str) -> Optional[dict[str, Tensor]]:
        """The stored tensors of `key`, or None (absent, unreadable, or written under another key)."""
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = self._path(key)
        try:
            with safe_open(str(path), "pt") as f:
                if (f.metadata() or {}).get("key") != key:
                    raise ValueError("key mismatch")
                out = {name: f.get_tensor(name) for name in f.keys()}
            os.utime(path)                                    # last use, for the size bound
            return out
        except FileNotFoundError:
            return None
        except (OSError, ValueError, SafetensorError) as e:
            log.warning("FFP keyframes: span cache entry '%s' is unreadable (%s); recomputing it", path, e)
            path.unlink(missing_ok=True)
            return None

    def put(self, key: str, tensors: dict[str, Tensor]) -> Path:
        """Store tensors under key (atomically), then trim the folder to max_bytes. Returns the file."""
        from safetensors.torch import save_file

        path = self._path(key)
        with atomic_write(path) as tmp:
            save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                      metadata={"key": key, "format": FORMAT})
        self.trim(keep=path)
        return path

    def entries(self) -> list[Path]:
        return sorted(self.folder.glob(f"*{SUFFIX}")) if self.folder.is_dir() else []

    def trim(self, keep: Optional[Path] = None) -> list[Path]:
        """Delete least recently used entries (never `keep`) until the total is <= max_bytes; returns them."""
        stats = []
        for p in self.entries():
            try:
                st = p.stat()
            except FileNotFoundError:
                continue
            stats.append((st.st_mtime, p, st.st_size))
        total = sum(s for _, _, s in stats)
        removed = []
        for _, p, size in sorted(stats, key=lambda x: (x[0], x[1].name)):
            if total <= self.max_bytes:
                break
            if keep is not None and p == keep:
                continue
            p.unlink(missing_ok=True)
            total -= size
            removed.append(p)
        return removed
