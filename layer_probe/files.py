"""Atomic file output: write to a temporary file beside the target, then rename.

An interruption (Ctrl-C, SIGTERM, an exception, a full disk) leaves either the old file
or the new one, never a half-written one.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from .errors import LayerProbeError

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write; on success it replaces `path`, on failure it is removed.

    The temporary file is flushed to disk before the rename, so a full disk that only shows
    at flush time still leaves the old file. An OSError (no space, no permission) becomes a
    `LayerProbeError` that names `path`; anything else, Ctrl-C included, passes through.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        try:
            yield Path(tmp)
            with open(tmp, "r+b") as f:
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)  # after the rename there is nothing left to remove
    except OSError as e:
        raise LayerProbeError(f"cannot write {path}: {e.strerror or e}; any earlier version is unchanged") from None


def write_text(path: str | Path, text: str) -> None:
    """Write `text` to `path` atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def check_writable(directory: str | Path) -> Path:
    """Create `directory` if needed and make sure files can be written there, before any work starts."""
    directory = Path(directory)
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as e:
        raise LayerProbeError(f"cannot write to {directory}: {e.strerror or e}") from None
    return directory


def sha256(path: Path) -> str:
    """sha256 of a file's bytes, or of a folder's listing (relative names, sizes, mtimes)."""
    h = hashlib.sha256()
    if path.is_file():
        with open(path, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return h.hexdigest()
    for p in sorted(path.rglob("*")):
        if p.is_file():
            st = p.stat()
            h.update(f"{p.relative_to(path)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()
