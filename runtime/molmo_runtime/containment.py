"""Paths named by an artifact stay inside the artifact. Torch-free.

A manifest is data written by someone else: every path it names (files, graphs, external data,
engines) must be a plain relative POSIX path (no absolute path, no `..`, `.` or empty part, no
backslash or NUL) and, once symlinks are resolved, lie inside the artifact directory. Anything
else is an ArtifactError naming the entry.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from molmo_runtime.errors import ArtifactError

# Names the exporter keeps for itself inside an output folder; never artifact files.
RESERVED_PREFIX = ".molmo-export"


def check_relpath(rel: Any, entry: str) -> str:
    """`rel` if it is a normalised relative path, else ArtifactError naming `entry`."""
    if not isinstance(rel, str) or not rel:
        raise ArtifactError(f"manifest entry {entry}: path {rel!r} is not a non-empty string; "
                            "re-export the artifact")
    parts = rel.split("/")
    bad = ("\\" in rel or "\x00" in rel or rel.startswith("/")
           or any(p in ("", ".", "..") for p in parts) or parts[0].startswith(RESERVED_PREFIX))
    if bad:
        raise ArtifactError(
            f"manifest entry {entry}: path {rel!r} is not a normalised relative path inside the "
            "artifact (absolute paths, '..', '.', empty parts and backslashes are refused); this "
            "manifest was not written by molmo-export or was edited; re-export the artifact")
    return rel


def inside(directory: str | os.PathLike[str], rel: str, entry: str,
           root: str | None = None) -> Path:
    """directory/rel with symlinks resolved; ArtifactError if it leads out of `directory`.
    `root`: os.path.realpath(directory), when the caller already has it."""
    check_relpath(rel, entry)
    root = root or os.path.realpath(directory)
    target = os.path.realpath(os.path.join(root, rel))
    if not target.startswith(root.rstrip(os.sep) + os.sep):
        raise ArtifactError(f"manifest entry {entry}: {rel!r} resolves to {target}, outside the "
                            f"artifact {root} (a symlink leading out); refusing to read it")
    return Path(target)
