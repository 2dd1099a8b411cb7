"""Writing an artifact directory safely: one writer at a time, crash-safe commits, and only files
this tool can prove it wrote are ever replaced or deleted. Torch-free.

Inside OUT, names starting with ".molmo-export" belong to the writer (no artifact path may use
them, see molmo_runtime.containment):

    .molmo-export.lock       flock()ed by the writer for the whole export / quantization / engine
                             build; holds its pid. The kernel releases it when the process dies.
    .molmo-export-staging/   the new artifact, built here; its .molmo-export-journal.json is
                             written just before the commit starts
    .molmo-export-work/      scratch, e.g. the fp32 intermediate of a quantized export

Ownership: a file in OUT is ours when a manifest of ours that passes the containment check (or
the journal of an interrupted commit) lists it and its size and sha256 match. Only such files
are replaced or deleted. A user's file that has an artifact file's name makes the writer refuse,
naming it, before anything is written.

Commit, each step a boundary where a kill leaves a state the next writer completes:
    journal ─► remove old manifest ─► rename each staged file into place ─► delete the old
    artifact's files the new one does not list ─► write manifest.json ─► remove staging
Before the journal exists, OUT still holds the previous artifact untouched (staging is simply
removed by the next writer). Once it exists, the next writer rolls the commit forward from it.
"""

from __future__ import annotations

import fcntl
import json
import os
import re
import shutil
import threading
from pathlib import Path
from typing import Any

from molmo_runtime.containment import check_relpath
from molmo_runtime.errors import ArtifactError, MolmoError
from molmo_runtime.fileio import write_json_atomic
from molmo_runtime.hash_cache import HashCache
from molmo_runtime.manifest import (
    FORMAT_NAME,
    MANIFEST_NAME,
    check_manifest,
    file_record,
    write_manifest,
)

LOCK = ".molmo-export.lock"
STAGING = ".molmo-export-staging"
WORK = ".molmo-export-work"
JOURNAL = ".molmo-export-journal.json"
# Top-level names every artifact may use; checked for user files before any work starts.
KNOWN_NAMES = (MANIFEST_NAME, "processor.json", "embed_tokens.npy", "tokenizer", "onnx",
               "engines", "quality_report.json", "quality_report.md")
# Left by an atomic write of manifest.json that was killed (molmo_runtime.fileio.atomic_path).
_PARTIAL_MANIFEST = re.compile(r"^\.manifest\.json\..+\.partial$")


def _boundary(step: str) -> None:
    """Called at every step of a commit. A no-op; crash-safety tests replace it to stop the
    writer there (tests/export/test_artifact_integrity.py)."""


# --- the lock ----------------------------------------------------------------------------------

class OutputLock:
    """Exclusive lock on an output folder for this thread, re-entrant within the thread (the
    exporter holds it across export, quantization and engine build, each of which takes it).

    A second writer, in another process or thread, fails at once naming the holder's pid. On
    the outermost release the lock file is removed, and so is OUT if this lock created it and
    nothing else is left in it (a failed first export leaves no empty folder behind).
    """

    _held: dict[tuple[str, int], list[Any]] = {}  # (real path, thread) -> [fd, depth, created]
    _guard = threading.Lock()

    def __init__(self, out: str | os.PathLike[str]) -> None:
        self.out = Path(out)

    def _key(self) -> tuple[str, int]:
        return os.path.realpath(self.out), threading.get_ident()

    def __enter__(self) -> OutputLock:
        if self.out.exists() and not self.out.is_dir():
            raise MolmoError(f"--out {self.out} is a file; choose a directory")
        created = not self.out.exists()
        self.out.mkdir(parents=True, exist_ok=True)
        key = self._key()
        with self._guard:
            if key in self._held:
                self._held[key][1] += 1
                return self
        path = self.out / LOCK
        while True:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC | os.O_NOFOLLOW, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
                os.close(fd)
                raise MolmoError(
                    f"{self.out} is being written by another molmo-export process (pid "
                    f"{holder}); wait for it to finish, or choose another --out") from None
            try:  # the previous holder may have removed the file between our open and flock
                same = os.stat(path, follow_symlinks=False).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        if (self.out / WORK).is_symlink():
            (self.out / WORK).unlink()
        shutil.rmtree(self.out / WORK, ignore_errors=True)  # left by a writer that died
        with self._guard:
            self._held[key] = [fd, 1, created]
        return self

    def __exit__(self, *exc: object) -> None:
        key = self._key()
        with self._guard:
            entry = self._held[key]
            entry[1] -= 1
            if entry[1]:
                return
            del self._held[key]
        fd, _, created = entry
        try:
            (self.out / LOCK).unlink(missing_ok=True)
            if (self.out / WORK).is_dir() and not any((self.out / WORK).iterdir()):
                (self.out / WORK).rmdir()
            if created and not any(self.out.iterdir()):
                self.out.rmdir()
        except OSError:
            pass
        finally:
            os.close(fd)


# --- ownership ---------------------------------------------------------------------------------

def _previous_manifest(out: Path) -> dict[str, Any] | None:
    """OUT's manifest if it is ours; ArtifactError if it claims to be ours but names a path
    outside OUT or is malformed (a planted manifest makes the writer delete nothing)."""
    path = out / MANIFEST_NAME
    if path.is_symlink() or not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT_NAME:
        return None
    check_manifest(raw, path)
    return raw


def _is_ours(out: Path, rel: str, record: dict[str, Any], cache: HashCache) -> bool:
    """OUT/rel is a regular file, reached without symlinks, with the record's size and sha256."""
    p = out / rel
    if os.path.realpath(p) != os.path.join(os.path.realpath(out), *rel.split("/")):
        return False
    if p.is_symlink() or not p.is_file() or p.stat().st_size != record.get("bytes"):
        return False
    return cache.sha256(rel, p) == record.get("sha256")


def _remove_empty_parents(out: Path, rel: str) -> None:
    parent = (out / rel).parent
    while parent != out:
        try:
            parent.rmdir()
        except OSError:
            return
        parent = parent.parent


class ArtifactWriter:
    """Stage an artifact under OUT/.molmo-export-staging and commit it (see the module doc).

    Holds OUT's lock from construction until commit or abort.
    """

    def __init__(self, out: str | os.PathLike[str], force: bool = False) -> None:
        self.out = Path(out)
        self.staging = self.out / STAGING
        self._lock = OutputLock(self.out)
        self._lock.__enter__()
        self._records: dict[str, dict[str, Any]] | None = None
        self._open = True
        try:
            self._cache = HashCache(self.out)
            self._recover()
            previous = _previous_manifest(self.out)
            self.owned: dict[str, dict[str, Any]] = dict(previous["files"]) if previous else {}
            entries = [p.name for p in self.out.iterdir() if not p.name.startswith(STAGING)
                       and p.name not in (LOCK, WORK)]
            if entries and previous is None and not force:
                raise MolmoError(
                    f"--out {self.out} is not empty and holds no molmo-export artifact; choose "
                    "an empty or new folder, or pass --force to write beside the files there "
                    "(they are never replaced or deleted)")
            self._refuse_user_files([n for n in KNOWN_NAMES if n in entries])
            self.staging.mkdir()
        except BaseException:
            self._lock.__exit__()
            raise

    # -- staging --------------------------------------------------------------------------------

    def path(self, relpath: str) -> Path:
        check_relpath(relpath, relpath)
        p = self.staging / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def staged_files(self) -> list[str]:
        return sorted(p.relative_to(self.staging).as_posix() for p in self.staging.rglob("*")
                      if p.is_file() and p.name not in (MANIFEST_NAME, JOURNAL)
                      and not p.name.endswith(".partial"))

    def stage_manifest(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Write the manifest (with file records) into staging, so that the staged artifact can
        be opened and verified before it is committed. Returns the manifest as written."""
        self._records = {rel: file_record(self.staging, rel) for rel in self.staged_files()}
        manifest = {**manifest, "files": self._records}
        write_manifest(self.staging, manifest)
        return manifest

    def record_staged(self, relpaths: list[str]) -> None:
        """Add files written into staging after stage_manifest to its records (the files it
        recorded are not hashed again)."""
        if self._records is None:
            raise MolmoError("ArtifactWriter: record_staged before stage_manifest")
        self._records.update({rel: file_record(self.staging, rel) for rel in relpaths})

    # -- commit ---------------------------------------------------------------------------------

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Move the staged files into OUT and write the manifest last; releases the lock."""
        if not self._open:
            raise MolmoError("ArtifactWriter: commit after commit or abort")
        try:
            _boundary("staged")
            files = self.staged_files()
            records = self._records if self._records is not None and \
                sorted(self._records) == files else \
                {rel: file_record(self.staging, rel) for rel in files}
            manifest = {**manifest, "files": records}
            self._refuse_user_files(files)
            stale = [rel for rel in sorted(set(self.owned) - set(files))
                     if _is_ours(self.out, rel, self.owned[rel], self._cache)]
            (self.staging / MANIFEST_NAME).unlink(missing_ok=True)
            write_json_atomic(self.staging / JOURNAL, {"manifest": manifest, "stale": stale,
                                                       "previous": self.owned})
            _boundary("journal written")
            self._roll_forward(manifest, stale, self.owned)
        except BaseException:
            if not (self.staging / JOURNAL).exists():  # refused before the commit began
                shutil.rmtree(self.staging, ignore_errors=True)
            raise
        finally:
            self._close()
        return self.out / MANIFEST_NAME

    def abort(self) -> None:
        """Remove the staging folder, unless a commit already started (its journal exists: the
        next writer rolls it forward); OUT keeps what it held. Releases the lock."""
        if not self._open:
            return
        try:
            if not (self.staging / JOURNAL).exists():
                shutil.rmtree(self.staging, ignore_errors=True)
        finally:
            self._close()

    def _close(self) -> None:
        self._open = False
        self._cache.save()
        self._lock.__exit__()

    def _refuse_user_files(self, rels: list[str]) -> None:
        """Refuse, naming them, paths in OUT that we would replace but cannot prove we wrote."""
        theirs = []
        for rel in rels:
            p = self.out / rel
            if not (p.exists() or p.is_symlink()):
                continue
            if p.is_dir() and not p.is_symlink():
                owned_inside = any(r.startswith(rel + "/") for r in self.owned)
                if owned_inside or rel in ("tokenizer", "onnx", "engines"):
                    continue  # a folder: its files are checked one by one at commit
            rec = self.owned.get(rel)
            if rec is None or not _is_ours(self.out, rel, rec, self._cache):
                if rel != MANIFEST_NAME or _previous_manifest(self.out) is None:
                    theirs.append(rel)
        if theirs:
            raise MolmoError(
                f"--out {self.out} holds files that molmo-export did not write (or that changed "
                f"since) with the names of artifact files: {', '.join(theirs)}; move them away "
                "or choose another --out. Nothing was written")

    def _roll_forward(self, manifest: dict[str, Any], stale: list[str],
                      previous: dict[str, Any]) -> None:
        (self.out / MANIFEST_NAME).unlink(missing_ok=True)
        _boundary("old manifest removed")
        for rel in sorted(manifest["files"]):
            src = self.staging / rel
            if src.is_file():
                dest = self.out / rel
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.replace(src, dest)
                _boundary(f"renamed {rel}")
        for rel in stale:
            if (self.out / rel).exists() and _is_ours(self.out, rel, previous[rel], self._cache):
                (self.out / rel).unlink()
                _remove_empty_parents(self.out, rel)
            _boundary(f"deleted {rel}")
        missing = [rel for rel, rec in manifest["files"].items()
                   if not _is_ours(self.out, rel, rec, self._cache)]
        if missing:
            raise ArtifactError(
                f"{self.out}: cannot complete an interrupted commit, these files are missing or "
                f"changed: {', '.join(sorted(missing))}; move the folder away and export again")
        write_manifest(self.out, {k: v for k, v in manifest.items()
                                  if k not in ("schema_version", "format")})
        _boundary("manifest written")
        shutil.rmtree(self.staging)
        _boundary("staging removed")

    def _recover(self) -> None:
        """Finish what an interrupted writer left: roll a journaled commit forward, remove a
        staging folder that never reached its commit, and stray temporary manifests."""
        for p in self.out.iterdir():
            if _PARTIAL_MANIFEST.match(p.name) and p.is_file():
                p.unlink()
        if self.staging.is_symlink():
            self.staging.unlink()
        if not self.staging.exists():
            return
        journal = self.staging / JOURNAL
        if journal.is_file():
            try:
                raw = json.loads(journal.read_text(encoding="utf-8"))
                manifest, stale, previous = raw["manifest"], raw["stale"], raw["previous"]
                check_manifest(manifest, journal)
                for rel in [*stale, *previous]:
                    check_relpath(rel, f"{JOURNAL} entry")
            except (ValueError, KeyError, TypeError) as e:
                raise ArtifactError(f"{journal} is unreadable ({e}); move {self.out} away and "
                                    "export again") from e
            self._roll_forward(manifest, [r for r in stale if r in previous], previous)
        else:
            shutil.rmtree(self.staging)
