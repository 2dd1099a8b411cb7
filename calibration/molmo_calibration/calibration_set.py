"""Calibration sets as data: a folder of images + prompts.jsonl (+ manifest.json with hashes).

    sets/default/                  bundled: nine public-domain / CC0 photos (see its LICENSE.md)
      *.jpg  prompts.jsonl  manifest.json  LICENSE.md
    my_set/                        a user set: images + prompts.jsonl; manifest computed on load
      prompts.jsonl                one JSON object a line:
                                   {"image": "cat.jpg", "prompt": "Point to the cat.",
                                    "split": "calibration" | "heldout"}   (split is optional)

The set hash is the sha256 of the sorted (file name, file sha256) list, so it changes when any
image or prompt changes and not when files are merely touched or the folder is moved. An
artifact's manifest records the set name and this hash.

Samples without an explicit split are split by image: every third distinct image (in sorted
order) is held out with all its prompts, so the quality report measures images whose activations
never set a quantization range.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from molmo_runtime.errors import InputError
from molmo_runtime.fileio import sha256_file, write_json_atomic

Split = Literal["calibration", "heldout"]
SPLITS: tuple[Split, ...] = ("calibration", "heldout")
PROMPTS_FILE = "prompts.jsonl"
SET_MANIFEST = "manifest.json"
# Files of a set folder that are not part of its content hash.
_NOT_HASHED = (SET_MANIFEST, "LICENSE.md", "README.md")
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
BUNDLED_SETS_DIR = Path(__file__).resolve().parent / "sets"
HELDOUT_EVERY = 3  # default split: images 2, 5, 8, ... (sorted) are held out


@dataclass(frozen=True)
class CalibrationSample:
    image: Path
    prompt: str
    split: Split

    @property
    def name(self) -> str:
        return f"{self.image.name}: {self.prompt}"


@dataclass(frozen=True)
class CalibrationSet:
    name: str
    directory: Path
    samples: tuple[CalibrationSample, ...]
    files: dict[str, str]  # file name -> sha256 (every hashed file of the folder)
    sha256: str

    def split(self, which: Split) -> tuple[CalibrationSample, ...]:
        return tuple(s for s in self.samples if s.split == which)

    def to_record(self, samples_used: int) -> dict[str, object]:
        """What an artifact's manifest stores under "calibration"."""
        return {"set": self.name, "set_sha256": self.sha256, "samples": samples_used}


def set_hash(files: dict[str, str]) -> str:
    h = hashlib.sha256()
    for name in sorted(files):
        h.update(f"{name}\0{files[name]}\n".encode())
    return h.hexdigest()


def hash_set_files(directory: Path) -> dict[str, str]:
    return {p.name: sha256_file(p) for p in sorted(directory.iterdir())
            if p.is_file() and p.name not in _NOT_HASHED and not p.name.startswith(".")}


def write_set_manifest(directory: str | os.PathLike[str], name: str | None = None) -> Path:
    """(Re)write manifest.json of a set folder from its current files. Returns its path."""
    directory = Path(directory)
    _read_prompts(directory)  # refuse to bless a folder that would not load
    files = hash_set_files(directory)
    path = directory / SET_MANIFEST
    write_json_atomic(path, {"name": name or directory.name, "files": files,
                             "sha256": set_hash(files)})
    return path


def bundled_sets() -> list[str]:
    return sorted(p.name for p in BUNDLED_SETS_DIR.iterdir() if (p / PROMPTS_FILE).is_file())


def load_calibration_set(spec: str | os.PathLike[str] = "default") -> CalibrationSet:
    """A bundled set by name ("default") or a folder with images and prompts.jsonl."""
    directory = Path(spec)
    bundled = BUNDLED_SETS_DIR / str(spec)
    if not directory.is_dir() and isinstance(spec, str) and os.sep not in spec and bundled.is_dir():
        directory = bundled
    if not directory.is_dir():
        raise InputError(
            f"calibration set {str(spec)!r} not found: pass a bundled set name "
            f"({', '.join(bundled_sets())}) or a folder holding images and {PROMPTS_FILE}")
    entries = _read_prompts(directory)
    files = hash_set_files(directory)
    digest = set_hash(files)
    name = directory.name
    manifest_path = directory / SET_MANIFEST
    if manifest_path.is_file():
        recorded = json.loads(manifest_path.read_text())
        name = str(recorded.get("name", name))
        changed = sorted(k for k in set(files) | set(recorded.get("files", {}))
                         if files.get(k) != recorded.get("files", {}).get(k))
        if changed:
            raise InputError(
                f"calibration set {directory}: files differ from its {SET_MANIFEST} "
                f"({', '.join(changed)}); restore them, or re-bless an edited set with "
                f"molmo_calibration.write_set_manifest({str(directory)!r})")
    return CalibrationSet(name, directory.resolve(), _assign_splits(directory, entries), files,
                          digest)


def _read_prompts(directory: Path) -> list[dict[str, str]]:
    path = directory / PROMPTS_FILE
    if not path.is_file():
        raise InputError(f"{directory} has no {PROMPTS_FILE}: write one JSON object a line, "
                         '{"image": "photo.jpg", "prompt": "Describe this image."}')
    entries = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            entry = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not valid JSON ({e})") from e
        if not isinstance(entry, dict) or not isinstance(entry.get("image"), str) \
                or not isinstance(entry.get("prompt"), str) or not entry["prompt"].strip():
            raise InputError(f'{where}: expected {{"image": "<file>", "prompt": "<text>"}}')
        image = directory / entry["image"]
        if Path(entry["image"]).name != entry["image"] or not image.is_file():
            raise InputError(f"{where}: image {entry['image']!r} is not a file in {directory}")
        if image.suffix.lower() not in IMAGE_SUFFIXES:
            raise InputError(f"{where}: {entry['image']!r} is not an image "
                             f"({', '.join(IMAGE_SUFFIXES)})")
        if entry.get("split", "calibration") not in SPLITS:
            raise InputError(f"{where}: split must be one of {SPLITS}, got {entry['split']!r}")
        entries.append(entry)
    if not entries:
        raise InputError(f"{path} lists no samples")
    return entries


def _assign_splits(directory: Path, entries: list[dict[str, str]]) -> tuple[CalibrationSample, ...]:
    images = sorted({e["image"] for e in entries})
    heldout_images = {im for i, im in enumerate(images) if i % HELDOUT_EVERY == HELDOUT_EVERY - 1}
    explicit = any("split" in e for e in entries)
    samples = []
    for e in entries:
        if explicit:
            split: Split = "heldout" if e.get("split") == "heldout" else "calibration"
        else:
            split = "heldout" if e["image"] in heldout_images else "calibration"
        samples.append(CalibrationSample(directory / e["image"], e["prompt"], split))
    if not any(s.split == "calibration" for s in samples) or \
            not any(s.split == "heldout" for s in samples):
        raise InputError(f"calibration set {directory} needs samples in both splits (calibration "
                         "and heldout); use at least 3 distinct images or set \"split\" per line")
    return tuple(samples)
