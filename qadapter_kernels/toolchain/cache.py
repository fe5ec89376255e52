"""Where the package keeps what it builds or converts: one rule for the compiled CPU step, the
CUDA extension's just-in-time build and the model layer's converted default model.

``$QADAPTER_CACHE``, else ``$XDG_CACHE_HOME/qadapter``, else ``~/.cache/qadapter``; each kind of
artifact in its own folder below it (``cpu``, ``cuda``, ``models``).
"""

from __future__ import annotations

import os
from pathlib import Path

KINDS = ("cpu", "cuda", "models")


def cache_dir(kind: str) -> Path:
    """The folder of one kind of cached artifact (not created here)."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    root = os.environ.get("QADAPTER_CACHE")
    base = Path(root) if root else Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "qadapter"
    return base / kind


class CacheNotWritable(OSError):
    """The cache folder cannot be made or written (a read-only home or container image)."""


def writable_cache_dir(kind: str) -> Path:
    """:func:`cache_dir`, created; :class:`CacheNotWritable`, naming it and ``QADAPTER_CACHE``, where
    it cannot be made or written."""
    folder = cache_dir(kind)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        why = "" if os.access(folder, os.W_OK) else "not writable"
    except OSError as exc:
        why = exc.strerror or str(exc)
    if why:
        raise CacheNotWritable(f"the cache folder {folder} cannot be written ({why}): set QADAPTER_CACHE to a "
                               "writable folder")
    return folder


def sources_dir() -> Path | None:
    """The C and CUDA sources: inside the installed package, else the checkout's csrc/; None if neither."""
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "csrc", package.parent / "csrc"):
        if (candidate / "binding.cpp").is_file():
            return candidate
    return None


def error_summary(message: str, limit: int = 1500) -> str:
    """The compiler's error lines (or the message's last lines) of a failed build, shortened."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    errors = [line for line in lines if "error" in line.lower()]
    return " | ".join(errors[:6] or lines[-6:])[:limit]
