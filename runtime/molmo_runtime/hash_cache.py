"""Remembered sha256 of artifact files, so that opening an artifact hashes each file state once.

An entry says "the file at this path, in this exact state, had this sha256". The state is
(device, inode, size, mtime_ns, ctime_ns): rewriting a file, replacing it by rename or copying
the artifact changes at least one of them, and ctime cannot be set back by user programs (touch
and utime set mtime, but ctime moves to now), so a file edited and then given its old mtime
still misses. An entry is only ever used to skip re-hashing; the hash it yields is compared with
the manifest exactly as a fresh one would be.

Where: $MOLMO_HASH_CACHE (a directory, or "off"), else $XDG_CACHE_HOME/molmo-export/hashes, else
~/.cache/molmo-export/hashes; one JSON file per artifact directory (named by the hash of its real
path), written atomically. The cache lives with the user, not in the artifact: nothing in an
artifact folder that the manifest does not list is read, and read-only artifacts work. A
missing, unreadable or garbled cache file is simply a miss.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path
from typing import Any

from molmo_runtime.fileio import sha256_file, write_json_atomic

CACHE_ENV = "MOLMO_HASH_CACHE"
_VERSION = 1
# A file changed within this many ns of its hashing is not cached: within one timestamp tick
# a later write could leave (size, mtime, ctime) as they were (git's "racy clean" problem).
_RACY_NS = 2_000_000_000


def cache_dir() -> Path | None:
    """The cache folder, or None when caching is off."""
    setting = os.environ.get(CACHE_ENV)
    if setting is not None:
        return None if setting.strip().lower() in ("", "off", "0", "no") else Path(setting)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "molmo-export" / "hashes"


def _state(st: os.stat_result) -> list[int]:
    return [st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns]


class HashCache:
    """The cached hashes of one artifact directory. `sha256` hashes on a miss; `save` writes."""

    def __init__(self, artifact_dir: Path) -> None:
        folder = cache_dir()
        real = os.path.realpath(artifact_dir)
        name = hashlib.sha256(real.encode("utf-8", "surrogateescape")).hexdigest()[:32]
        self.file = folder / f"{name}.json" if folder is not None else None
        self.entries: dict[str, list[Any]] = {}
        self.changed = False
        self.hits = 0
        if self.file is not None:
            self.entries = self._read(self.file)

    @staticmethod
    def _read(file: Path) -> dict[str, list[Any]]:
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(raw, dict) or raw.get("version") != _VERSION \
                or not isinstance(raw.get("entries"), dict):
            return {}
        return {k: v for k, v in raw["entries"].items()
                if isinstance(v, list) and len(v) == 6 and isinstance(v[5], str)}

    def sha256(self, rel: str, path: Path) -> str:
        """sha256 of `path` (the file `rel` of the artifact), from the cache if its state is
        unchanged. The state is taken before hashing: a file changed while it is hashed is
        stored under its old state, so the next open hashes it again."""
        started = time.time_ns()
        state = _state(os.stat(path))
        entry = self.entries.get(rel)
        if entry is not None and entry[:5] == state:
            self.hits += 1
            return str(entry[5])
        digest = sha256_file(path)
        if self.file is not None and max(state[3], state[4]) < started - _RACY_NS:
            self.entries[rel] = [*state, digest]
            self.changed = True
        return digest

    def save(self) -> None:
        if self.file is None or not self.changed:
            return
        try:
            write_json_atomic(self.file, {"version": _VERSION, "entries": self.entries})
        except OSError:
            pass  # a cache that cannot be written only costs time
