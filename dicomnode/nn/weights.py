"""The weights manifest (``models/manifest.json``) and checked loading of weight files.

Each manifest entry names one weight file and says what it is::

    {"name": "liver_tumor", "version": "1.0.0", "file": "liver_tumor-1.0.0.pt",
     "sha256": "...", "family": "...", "input": {...}, "training_data": "...",
     "heldout": {...}, "metrics": {...}, "model_card": "liver_tumor.md"}

:func:`load_weights` refuses a file whose SHA-256 differs from its entry, with an error
that names the file, both checksums and what to do.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

MANIFEST_NAME = "manifest.json"
REQUIRED_KEYS = ("name", "version", "file", "sha256", "input", "training_data", "metrics")


class WeightsError(RuntimeError):
    """Weights are missing, unlisted or fail their checksum."""


def models_dir() -> Path:
    """Where weights live: ``DICOMNODE_MODELS_DIR`` or the repository's ``models/``."""
    env = os.environ.get("DICOMNODE_MODELS_DIR")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2] / "models"


def sha256_of(path: Path) -> str:
    """Hex SHA-256 of a file."""
    with path.open("rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


@dataclass(frozen=True)
class ManifestEntry:
    """One manifest entry and the directory its file lives in."""

    data: dict[str, Any]
    directory: Path

    @property
    def name(self) -> str:
        """Model name."""
        return str(self.data["name"])

    @property
    def version(self) -> str:
        """Model version."""
        return str(self.data["version"])

    @property
    def sha256(self) -> str:
        """Expected SHA-256 of the weight file."""
        return str(self.data["sha256"])

    @property
    def path(self) -> Path:
        """The weight file."""
        return self.directory / str(self.data["file"])


def read_manifest(directory: Path | None = None) -> list[dict[str, Any]]:
    """Entries of ``manifest.json`` in ``directory`` (empty when there is no manifest).

    Raises
    ------
    WeightsError
        If the manifest is not valid JSON or an entry lacks a required key.
    """
    path = (directory or models_dir()) / MANIFEST_NAME
    if not path.exists():
        return []
    try:
        doc = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise WeightsError(f"weights manifest {path} is not valid JSON: {exc}") from None
    entries = doc.get("models", []) if isinstance(doc, dict) else None
    if not isinstance(entries, list):
        raise WeightsError(f"weights manifest {path} must hold {{'models': [...]}}")
    for entry in entries:
        missing = [k for k in REQUIRED_KEYS if k not in entry]
        if missing:
            raise WeightsError(f"weights manifest {path}: entry "
                               f"'{entry.get('name', '?')}' lacks {', '.join(missing)}")
    return entries


def write_entry(entry: dict[str, Any], directory: Path | None = None) -> Path:
    """Add or replace (same name) an entry in ``manifest.json``; written atomically."""
    missing = [k for k in REQUIRED_KEYS if k not in entry]
    if missing:
        raise ValueError(f"Invalid 'entry' value - lacks {', '.join(missing)}")
    directory = directory or models_dir()
    directory.mkdir(parents=True, exist_ok=True)
    entries = [e for e in read_manifest(directory) if e["name"] != entry["name"]]
    entries.append(entry)
    entries.sort(key=lambda e: e["name"])
    path = directory / MANIFEST_NAME
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"models": entries}, indent=2) + "\n")
    tmp.replace(path)
    return path


def find_entry(name: str, directory: Path | None = None) -> ManifestEntry:
    """The manifest entry of model ``name``.

    Raises
    ------
    WeightsError
        No manifest, or no entry of that name.
    """
    directory = directory or models_dir()
    for entry in read_manifest(directory):
        if entry["name"] == name:
            return ManifestEntry(entry, directory)
    raise WeightsError(f"no weights for '{name}' in {directory / MANIFEST_NAME} - train them "
                       f"with 'dicomnode train {name}' or install the models folder")


def verify(name: str, directory: Path | None = None) -> ManifestEntry:
    """Check that the weight file of ``name`` exists and matches its SHA-256.

    Raises
    ------
    WeightsError
        Missing entry, missing file or checksum mismatch (the message names the file
        and both checksums).
    """
    entry = find_entry(name, directory)
    if not entry.path.is_file():
        raise WeightsError(f"weight file {entry.path} of '{name}' {entry.version} is missing")
    actual = sha256_of(entry.path)
    if actual != entry.sha256:
        raise WeightsError(
            f"weight file {entry.path} of '{name}' {entry.version} fails its checksum: "
            f"sha256 {actual} but the manifest says {entry.sha256} - the file is corrupt or "
            "was replaced; restore it or retrain and update the manifest")
    return entry


def load_weights(name: str, directory: Path | None = None,
                 map_location: str | torch.device = "cpu") -> tuple[dict[str, Any],
                                                                    ManifestEntry]:
    """Load the checkpoint of ``name`` after verifying its checksum.

    Returns
    -------
    tuple
        The checkpoint dictionary (tensors only, loaded with ``weights_only=True``) and
        its manifest entry.

    Raises
    ------
    WeightsError
        As :func:`verify`, or when the file is not a readable checkpoint.
    """
    entry = verify(name, directory)
    try:
        checkpoint = torch.load(entry.path, map_location=map_location, weights_only=True)
    except Exception as exc:  # a torch/pickle error: report it as unusable weights
        raise WeightsError(f"weight file {entry.path} of '{name}' cannot be read: {exc}") from None
    log.info("weights.loaded", extra={"dn_fields": {"model": name, "version": entry.version,
                                                    "sha256": entry.sha256[:12]}})
    return checkpoint, entry
