"""Writing an artifact directory safely.

Everything is first written under OUT/.molmo-export-staging/. Committing removes the old
manifest (so a half-updated folder never looks complete), moves each staged file into place with
an atomic rename, deletes files that the previous manifest listed and the new one does not (only
files this tool wrote), and writes manifest.json last. An interrupted export therefore leaves no
manifest, and a rerun cleans the staging folder and starts again. Files the user put in OUT are
never touched.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from molmo_runtime.errors import MolmoError
from molmo_runtime.manifest import FORMAT_NAME, MANIFEST_NAME, file_record, write_manifest

STAGING = ".molmo-export-staging"


def _previous_manifest(out: Path) -> dict[str, Any] | None:
    try:
        raw = json.loads((out / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None
    return raw if isinstance(raw, dict) and raw.get("format") == FORMAT_NAME else None


class ArtifactWriter:
    def __init__(self, out: str | os.PathLike[str], force: bool = False) -> None:
        self.out = Path(out)
        if self.out.exists() and not self.out.is_dir():
            raise MolmoError(f"--out {self.out} is a file; choose a directory")
        entries = [p.name for p in self.out.iterdir()] if self.out.is_dir() else []
        ours = _previous_manifest(self.out) is not None or entries == [STAGING]
        if entries and not ours and not force:
            raise MolmoError(
                f"--out {self.out} is not empty and holds no molmo-export artifact; choose an "
                "empty or new folder, or pass --force to write into it (files already there are "
                "never deleted)")
        self.staging = self.out / STAGING
        if self.staging.exists():  # left by an interrupted export of ours
            shutil.rmtree(self.staging)
        self.staging.mkdir(parents=True)

    def path(self, relpath: str) -> Path:
        p = self.staging / relpath
        p.parent.mkdir(parents=True, exist_ok=True)
        return p

    def staged_files(self) -> list[str]:
        return sorted(str(p.relative_to(self.staging)) for p in self.staging.rglob("*")
                      if p.is_file())

    def commit(self, manifest: dict[str, Any]) -> Path:
        """Move staged files into OUT and write the manifest (with file records) last."""
        files = self.staged_files()
        manifest = {**manifest, "files": {rel: file_record(self.staging, rel) for rel in files}}
        previous = _previous_manifest(self.out)
        (self.out / MANIFEST_NAME).unlink(missing_ok=True)
        for rel in files:
            dest = self.out / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(self.staging / rel, dest)
        if previous:
            for rel in set(previous.get("files", {})) - set(files):
                (self.out / rel).unlink(missing_ok=True)
        shutil.rmtree(self.staging)
        return write_manifest(self.out, manifest)

    def abort(self) -> None:
        shutil.rmtree(self.staging, ignore_errors=True)
