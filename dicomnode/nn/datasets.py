"""Training and evaluation cases for the liver/tumour network.

Three sources, one :class:`Case` type (HU ``[z, y, x]`` in the DICOM array order:
rows front to back, columns right to left of the patient, slice 0 the most inferior):

- phantom seeds, generated on the fly by :mod:`dicomnode.phantoms` (cached as ``.npz``);
- phantom folders as ``dicomnode phantom abdomen`` writes them (``*.dcm`` +
  ``labels.nii.gz`` + ``labels.json``, optionally ``lesions.nii.gz``);
- the LiTS layout: ``volume-N.nii[.gz]`` with ``segmentation-N.nii[.gz]`` (0 background,
  1 liver, 2 tumour).

Labels are reduced to 0 background, 1 liver, 2 tumour.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Names of the liver and tumour labels in phantom label tables.
LIVER_NAMES = ("Liver",)
TUMOUR_NAMES = ("Lesion_Liver", "GTV_Liver", "Liver_Tumor", "Tumor")


@dataclass
class Case:
    """One CT with liver/tumour ground truth.

    Attributes
    ----------
    name : str
        Where it came from (``phantom-1003``, ``lits-12``, a folder name).
    hu : numpy.ndarray
        ``[z, y, x]`` Hounsfield units (int16 or float32).
    labels : numpy.ndarray
        ``[z, y, x]`` uint8: 0 background, 1 liver, 2 tumour.
    spacing : tuple of float
        ``(dz, dy, dx)`` mm.
    instances : numpy.ndarray or None
        ``[z, y, x]`` one value per tumour (phantoms), else ``None`` (connected components
        are used instead).
    lesions : list of dict
        Per-tumour records (``id``, ``diameter_mm``...) where known.
    """

    name: str
    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    instances: np.ndarray | None = None
    lesions: list[dict[str, Any]] = field(default_factory=list)


def parse_seeds(text: str) -> list[int]:
    """Parse ``"1000-1063"``, ``"0,3,5-7"`` into a sorted list of seeds.

    Raises
    ------
    ValueError
        On anything else, naming the value.
    """
    seeds: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        match = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not match:
            raise ValueError(f"Invalid 'seeds' value '{text}' - use N, N-M or a comma list")
        lo = int(match.group(1))
        hi = int(match.group(2) or lo)
        if hi < lo:
            raise ValueError(f"Invalid 'seeds' value '{text}' - range {lo}-{hi} is reversed")
        seeds.update(range(lo, hi + 1))
    return sorted(seeds)


def _reduce_labels(labels: np.ndarray, names: dict[int, str]) -> np.ndarray:
    out = np.zeros(labels.shape, dtype=np.uint8)
    for value, name in names.items():
        if name in LIVER_NAMES:
            out[labels == value] = 1
    for value, name in names.items():
        if name in TUMOUR_NAMES:
            out[labels == value] = 2
    return out


def phantom_case(seed: int, *, matrix: int = 256, slices: int | None = None,
                 cache_dir: Path | None = None) -> Case:
    """Generate (or read from ``cache_dir``) the abdomen phantom of ``seed``.

    Parameters
    ----------
    seed : int
        Phantom seed.
    matrix : int
        In-plane matrix (256: 1.56 mm pixels over the 400 mm field of view).
    slices : int, optional
        Number of slices (default: the phantom's 2 mm protocol).
    cache_dir : pathlib.Path, optional
        Where generated cases are kept as ``abdomen-SEED-mMATRIX[-sSLICES].npz``.
    """
    suffix = f"-s{slices}" if slices else ""
    cached = cache_dir / f"abdomen-{seed}-m{matrix}{suffix}.npz" if cache_dir else None
    if cached is not None and cached.exists():
        with np.load(cached) as npz:
            return Case(f"phantom-{seed}", npz["hu"], npz["labels"],
                        tuple(float(v) for v in npz["spacing"]),  # type: ignore[arg-type]
                        npz["instances"], json.loads(str(npz["lesions"])))
    from dicomnode.phantoms import make_phantom

    phantom = make_phantom("abdomen", seed, matrix=matrix, slices=slices)
    labels = _reduce_labels(phantom.labels, phantom.label_names)
    instances = (phantom.instances if phantom.instances is not None
                 else np.zeros_like(labels))
    case = Case(f"phantom-{seed}", phantom.hu, labels,
                tuple(float(v) for v in phantom.spacing),  # type: ignore[arg-type]
                instances, list(phantom.lesions))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(cached.stem + ".tmp.npz")
        np.savez_compressed(tmp, hu=case.hu, labels=labels, instances=instances,
                            spacing=np.asarray(case.spacing), lesions=json.dumps(case.lesions))
        tmp.replace(cached)
    return case


def _nifti_zyx(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI image into the DICOM array order ``[z, y, x]`` and its spacing."""
    import nibabel as nib

    img = nib.as_closest_canonical(nib.load(str(path)))
    data = np.asanyarray(img.dataobj)
    if data.ndim != 3:
        raise ValueError(f"Invalid 'path' value '{path}' - expected a 3D image, got "
                         f"{data.ndim} dimensions")
    # canonical RAS: flip x and y to LPS, then [x, y, z] -> [z, y, x]
    data = np.ascontiguousarray(data[::-1, ::-1, :].transpose(2, 1, 0))
    zooms = img.header.get_zooms()[:3]
    return data, (float(zooms[2]), float(zooms[1]), float(zooms[0]))


def load_lits_case(volume: Path, segmentation: Path) -> Case:
    """Read one LiTS case (``volume-N.nii``, ``segmentation-N.nii``)."""
    hu, spacing = _nifti_zyx(volume)
    seg, _seg_spacing = _nifti_zyx(segmentation)
    if seg.shape != hu.shape:
        raise ValueError(f"Invalid 'segmentation' value '{segmentation}' - shape {seg.shape} "
                         f"differs from the volume's {hu.shape}")
    labels = np.clip(seg.astype(np.int16), 0, 2).astype(np.uint8)
    return Case(volume.name.split(".")[0].replace("volume", "lits"),
                hu.astype(np.int16), labels, spacing)


def load_phantom_dir(folder: Path) -> Case:
    """Read a phantom folder (``*.dcm`` + ``labels.nii.gz`` + ``labels.json``)."""
    from dicomnode.imaging.series import load_series

    volume = load_series(sorted(folder.glob("*.dcm")))
    raw, _ = _nifti_zyx(folder / "labels.nii.gz")
    if raw.shape != volume.hu.shape:
        raise ValueError(f"Invalid 'data' value '{folder}' - labels shape {raw.shape} differs "
                         f"from the series' {volume.hu.shape}")
    table = json.loads((folder / "labels.json").read_text())
    names = {int(k): v for k, v in table.get("labels", {}).items()}
    labels = _reduce_labels(raw, names)
    instances = None
    if (folder / "lesions.nii.gz").exists():
        instances, _ = _nifti_zyx(folder / "lesions.nii.gz")
        instances = instances.astype(np.uint8)
    return Case(folder.name, volume.hu, labels, volume.spacing, instances,
                list(table.get("lesions", [])))


def discover(data_dir: Path) -> list[Path | tuple[Path, Path]]:
    """Find cases under ``data_dir``: phantom folders and LiTS volume/segmentation pairs.

    Raises
    ------
    ValueError
        If the directory does not exist or holds no case.
    """
    if not data_dir.is_dir():
        raise ValueError(f"Invalid 'data' value '{data_dir}' - not a directory")
    found: list[Path | tuple[Path, Path]] = []
    for labels in sorted(data_dir.rglob("labels.nii.gz")):
        if any(labels.parent.glob("*.dcm")):
            found.append(labels.parent)
    for volume in sorted(data_dir.rglob("volume-*.nii*")):
        number = re.search(r"volume-(\d+)\.nii", volume.name)
        if not number:
            continue
        for ext in (".nii", ".nii.gz"):
            seg = volume.with_name(f"segmentation-{number.group(1)}{ext}")
            if seg.exists():
                found.append((volume, seg))
                break
    if not found:
        raise ValueError(f"Invalid 'data' value '{data_dir}' - no phantom folders "
                         "(*.dcm + labels.nii.gz) and no LiTS pairs (volume-N.nii + "
                         "segmentation-N.nii)")
    return found


def load(source: Path | tuple[Path, Path]) -> Case:
    """Read one discovered case."""
    if isinstance(source, tuple):
        return load_lits_case(*source)
    return load_phantom_dir(source)


def iter_cases(data_dir: Path | None = None, seeds: Iterable[int] = (), *, matrix: int = 256,
               cache_dir: Path | None = None) -> Iterator[Case]:
    """Every case of a directory, then every phantom seed."""
    if data_dir is not None:
        for source in discover(data_dir):
            yield load(source)
    for seed in seeds:
        yield phantom_case(seed, matrix=matrix, cache_dir=cache_dir)
