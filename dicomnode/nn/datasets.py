"""Training and evaluation cases: one :class:`Case` type for every model, and its sources.

A case is HU ``[z, y, x]`` in the DICOM array order (rows front to back, columns right
to left of the patient, slice 0 the most inferior) with a label map on the same grid,
whose values each model defines. Sources shared by every model:

- phantom seeds, generated on the fly by :mod:`dicomnode.phantoms` (cached as ``.npz``);
- phantom folders as ``dicomnode phantom REGION`` writes them (``*.dcm`` +
  ``labels.nii.gz`` + ``labels.json``);
- NIfTI files of the public datasets' layouts, read into the same array order.

A model's recipe (``dicomnode.nn.<model>``) says which layout of a site's data it reads
and how the phantom's labels map onto its own.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

#: Maps a phantom's label map and its value -> name table onto a model's labels.
Relabel = Callable[[np.ndarray, Mapping[int, str]], np.ndarray]


@dataclass
class Case:
    """One CT with ground truth.

    Attributes
    ----------
    name : str
        Where it came from (``phantom-1003``, ``lits-12``, a folder name).
    hu : numpy.ndarray
        ``[z, y, x]`` Hounsfield units (int16 or float32).
    labels : numpy.ndarray
        ``[z, y, x]`` uint8 in the model's label values.
    spacing : tuple of float
        ``(dz, dy, dx)`` mm.
    instances : numpy.ndarray or None
        ``[z, y, x]`` one value per lesion (phantoms), else ``None`` (connected components
        are used instead).
    lesions : list of dict
        Per-lesion records (``id``, ``diameter_mm``...) where known.
    present : tuple of int or None
        Label values annotated in this case; ``None``: all of the model's labels. Real
        planning data is incompletely contoured, and a structure nobody drew must not be
        taught as background.
    truth : dict or None
        Findings without a label map (a classifier's): per study and per slice, as the
        model defines them; ``None`` where the labels say it all.
    """

    name: str
    hu: np.ndarray
    labels: np.ndarray
    spacing: tuple[float, float, float]
    instances: np.ndarray | None = None
    lesions: list[dict[str, Any]] = field(default_factory=list)
    present: tuple[int, ...] | None = None
    truth: dict[str, Any] | None = None


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


def format_seeds(values: Any) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"`` (the inverse of :func:`parse_seeds`)."""
    out: list[str] = []
    items = sorted(set(int(v) for v in values))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


def phantom_case(region: str, seed: int, relabel: Relabel, *, matrix: int,
                 slices: int | None = None, spacing: float | None = None,
                 cache_dir: Path | None = None) -> Case:
    """Generate (or read from ``cache_dir``) the phantom of ``region`` and ``seed``.

    Parameters
    ----------
    region : str
        ``"abdomen"``, ``"headneck"`` or ``"head"``.
    seed : int
        Phantom seed.
    relabel : callable
        The model's mapping of the phantom's labels onto its own (applied after the
        cache, which keeps the phantom's labels).
    matrix : int
        In-plane matrix.
    slices : int, optional
        Number of slices (default: the region's protocol).
    spacing : float, optional
        Slice spacing in mm (default: the region's protocol).
    cache_dir : pathlib.Path, optional
        Where generated cases are kept, with the phantom's own labels, as
        ``phantom-REGION-SEED-mMATRIX[-sSLICES][-zSPACING].npz``.
    """
    suffix = (f"-s{slices}" if slices else "") + (f"-z{spacing:g}" if spacing else "")
    cached = (cache_dir / f"phantom-{region}-{seed}-m{matrix}{suffix}.npz" if cache_dir
              else None)
    if cached is not None and cached.exists():
        with np.load(cached) as npz:
            table = {int(k): v for k, v in json.loads(str(npz["label_names"])).items()}
            instances = (npz["instances"] if npz["instances"].shape == npz["labels"].shape
                         else None)
            return Case(f"phantom-{seed}", npz["hu"], relabel(npz["labels"], table),
                        tuple(float(v) for v in npz["spacing"]),  # type: ignore[arg-type]
                        instances, json.loads(str(npz["lesions"])))
    from dicomnode.phantoms import make_phantom

    phantom = make_phantom(region, seed, matrix=matrix, slices=slices, spacing=spacing)
    case = Case(f"phantom-{seed}", phantom.hu, relabel(phantom.labels, phantom.label_names),
                tuple(float(v) for v in phantom.spacing),  # type: ignore[arg-type]
                phantom.instances, list(phantom.lesions))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        # a name of this process's own: two trainings may fill one cache at once
        tmp = cached.with_name(f"{cached.stem}.{os.getpid()}.tmp.npz")
        instances = (phantom.instances if phantom.instances is not None
                     else np.zeros((0,), dtype=np.uint8))
        np.savez_compressed(tmp, hu=phantom.hu, labels=phantom.labels, instances=instances,
                            spacing=np.asarray(case.spacing), lesions=json.dumps(case.lesions),
                            label_names=json.dumps(phantom.label_names))
        tmp.replace(cached)
    return case


def relabel_by_name(names: Mapping[str, int]) -> Relabel:
    """A :data:`Relabel` that gives each named structure its model label (others 0).

    Parameters
    ----------
    names : mapping
        Structure name -> model label; later entries are painted over earlier ones
        (a tumour inside its organ).
    """
    def relabel(labels: np.ndarray, table: Mapping[int, str]) -> np.ndarray:
        out = np.zeros(labels.shape, dtype=np.uint8)
        for name, target in names.items():
            values = [v for v, n in table.items() if n == name]
            if values:
                out[np.isin(labels, values)] = target
        return out

    return relabel


def nifti_zyx(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read a NIfTI (or NRRD) image into the DICOM array order ``[z, y, x]`` and its spacing.

    NIfTI is read with nibabel (reoriented to RAS, then flipped to LPS); NRRD, the
    PDDCA layout, with SimpleITK (its LPS direction applied the same way).
    """
    if path.name.endswith(".nrrd"):
        return _itk_zyx(path)
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


def _itk_zyx(path: Path) -> tuple[np.ndarray, tuple[float, float, float]]:
    """Read an image with SimpleITK, axes flipped so that it runs along +x, +y, +z (LPS)."""
    import SimpleITK as sitk  # noqa: N813 - the name every ITK reader knows

    image = sitk.ReadImage(str(path))
    if image.GetDimension() != 3:
        raise ValueError(f"Invalid 'path' value '{path}' - expected a 3D image, got "
                         f"{image.GetDimension()} dimensions")
    direction = np.asarray(image.GetDirection(), dtype=float).reshape(3, 3)
    if not np.allclose(np.abs(direction), np.eye(3), atol=1e-3):
        raise ValueError(f"Invalid 'path' value '{path}' - only axis-aligned images are "
                         "read (resample oblique ones first)")
    data = sitk.GetArrayFromImage(image)  # [z, y, x]
    flips = tuple(axis for axis, sign in zip((2, 1, 0), np.diag(direction), strict=True)
                  if sign < 0)
    if flips:
        data = np.flip(data, axis=flips)
    sx, sy, sz = image.GetSpacing()
    return np.ascontiguousarray(data), (float(sz), float(sy), float(sx))


def load_phantom_dir(folder: Path, relabel: Relabel) -> Case:
    """Read a phantom folder (``*.dcm`` + ``labels.nii.gz`` + ``labels.json``)."""
    from dicomnode.imaging.series import load_series

    volume = load_series(sorted(folder.glob("*.dcm")))
    raw, _ = nifti_zyx(folder / "labels.nii.gz")
    if raw.shape != volume.hu.shape:
        raise ValueError(f"Invalid 'data' value '{folder}' - labels shape {raw.shape} differs "
                         f"from the series' {volume.hu.shape}")
    table = json.loads((folder / "labels.json").read_text())
    names = {int(k): v for k, v in table.get("labels", {}).items()}
    instances = None
    if (folder / "lesions.nii.gz").exists():
        instances, _ = nifti_zyx(folder / "lesions.nii.gz")
        instances = instances.astype(np.uint8)
    return Case(folder.name, volume.hu, relabel(raw, names), volume.spacing, instances,
                list(table.get("lesions", [])))


def phantom_dirs(data_dir: Path) -> list[Path]:
    """Phantom folders under ``data_dir`` (a ``labels.nii.gz`` beside ``*.dcm`` files)."""
    return [labels.parent for labels in sorted(data_dir.rglob("labels.nii.gz"))
            if any(labels.parent.glob("*.dcm"))]


def check_data_dir(data_dir: Path) -> None:
    """Raise ``ValueError`` naming ``data_dir`` when it is not a directory."""
    if not data_dir.is_dir():
        raise ValueError(f"Invalid 'data' value '{data_dir}' - not a directory")
