"""How s2i writes and reads its own files: every file is replaced whole (a reader never sees half of
one, and an interrupted write leaves the old one in place), and JSON headers name their format and
version, so that a file of another kind or of a newer s2i is refused with a clear error."""
from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any


def replace_file(path: str | Path, write: Callable[[Path], object]) -> None:
    """``write(tmp)`` into a temporary sibling of ``path``, then move it over ``path``."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def write_text(path: str | Path, text: str) -> None:
    """Replace ``path`` with ``text`` (UTF-8), whole."""
    replace_file(path, lambda p: p.write_text(text, encoding="utf-8"))


def read_header(path: str | Path, fmt: str, version: int, error: type[Exception], what: str,
                remedy: str = "", oldest: int = 0) -> dict[str, Any]:
    """The JSON object in ``path``, checked to be of format ``fmt`` at a version from ``oldest`` to
    ``version`` (a header without one is version 0); anything else raises ``error`` that says so
    (``what`` names the kind of file, e.g. "gallery"; ``remedy``, if given, ends each message with what
    to do)."""
    path = Path(path)
    then = f": {remedy}" if remedy else ""
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise error(f"{path} is not valid JSON ({exc}){then}") from None
    if not isinstance(meta, dict) or meta.get("format") != fmt:
        found = meta.get("format") if isinstance(meta, dict) else type(meta).__name__
        raise error(f"{path} is not an s2i {what} (format {found!r}, expected {fmt!r}){then}")
    try:
        found = int(meta.get("version", 0))
    except (TypeError, ValueError):
        found = None
    if found is None or found > version:
        raise error(f"{path} has version {meta['version']!r}; this s2i reads up to {version}{then}")
    if found < oldest:
        raise error(f"{path} has version {meta.get('version')!r}; this s2i reads versions {oldest} to {version}{then}")
    return meta
