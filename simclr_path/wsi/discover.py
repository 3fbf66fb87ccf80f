"""Finding slides: files, folders searched recursively, or paths read from stdin."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Iterable, TextIO

from simclr_path.errors import SimclrPathError
from simclr_path.wsi.slide import IMAGE_EXTENSIONS, SLIDE_EXTENSIONS


def find_slides(inputs: Iterable[str], stdin: TextIO | None = None) -> list[str]:
    """Expand ``inputs`` into a sorted, de-duplicated list of slide paths.

    A file is taken as given (so an unreadable one is reported, not skipped). A folder is searched
    recursively for files with an OpenSlide extension; a folder holding none is searched for plain
    images instead (PNG, JPEG, BMP: tiled as one-level slides), so the thumbnails, label masks and
    outputs that sit beside whole-slide images are never taken for slides. ``-`` reads one path per line from
    ``stdin``. Raises when a path does not exist or nothing is found.
    """
    found: dict[str, None] = {}
    for item in inputs:
        if item == "-":
            lines = (stdin or sys.stdin).read().splitlines()
            paths = [line.strip() for line in lines if line.strip()]
            if not paths:
                raise SimclrPathError("stdin: no slide paths were given on standard input")
            for path in find_slides(paths):
                found[path] = None
            continue
        path = Path(item)
        if path.is_dir():
            hits = _files_with(path, SLIDE_EXTENSIONS) or _files_with(path, IMAGE_EXTENSIONS)
            if not hits:
                raise SimclrPathError(
                    f"{item}: no slides found (looked for {', '.join(dict.fromkeys(SLIDE_EXTENSIONS + IMAGE_EXTENSIONS))}); "
                    "check the folder"
                )
            for hit in hits:
                found[hit] = None
        elif path.exists():
            found[str(path)] = None
        else:
            raise SimclrPathError(f"{item}: no such file or folder")
    return sorted(found, key=lambda p: (Path(p).name, p))


def _files_with(folder: Path, extensions: tuple[str, ...]) -> list[str]:
    return sorted(str(p) for p in folder.rglob("*")
                  if p.suffix.lower() in extensions and p.is_file() and not p.name.startswith("."))


def parse_shard(text: str | None) -> tuple[int, int] | None:
    """``"K/N"`` -> ``(K, N)`` with 0 <= K < N (matches ``$SLURM_ARRAY_TASK_ID`` from 0)."""
    if text is None:
        return None
    try:
        k, n = (int(part) for part in text.split("/"))
    except ValueError:
        raise SimclrPathError(f"--shard {text!r}: expected K/N, e.g. 0/8") from None
    if not (n >= 1 and 0 <= k < n):
        raise SimclrPathError(f"--shard {text!r}: need 0 <= K < N")
    return k, n


def take_shard(paths: list[str], shard: tuple[int, int] | None) -> list[str]:
    if shard is None:
        return paths
    k, n = shard
    return paths[k::n]


def slide_names(paths: list[str], fingerprints: dict[str, str]) -> dict[str, str]:
    """Group name per slide: the file stem, or ``stem-<fingerprint[:8]>`` when stems repeat."""
    stems: dict[str, int] = {}
    for p in paths:
        stem = _stem(p)
        stems[stem] = stems.get(stem, 0) + 1
    return {
        p: _stem(p) if stems[_stem(p)] == 1 else f"{_stem(p)}-{fingerprints[p][:8]}" for p in paths
    }


def _stem(path: str) -> str:
    return os.path.splitext(os.path.basename(path))[0].replace("/", "_") or "slide"
