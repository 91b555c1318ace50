"""The :class:`Phantom` and :func:`make_phantom`: one synthetic CT case with ground truth.

A case is fully determined by ``(region, seed, slices, matrix, spacing, noise)``. The
seed draws the pose (a few degrees of rotation, an in-plane shift, body size), the
organ shapes and contrasts, the lesions or bleeds; the anatomy module paints tissues
and labels on a :class:`~dicomnode.phantoms.canvas.Canvas`; the
:mod:`~dicomnode.phantoms.scanner` turns tissues into blurred, noisy Hounsfield units.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.logs import fields
from dicomnode.phantoms import (
    anatomy_abdomen,
    anatomy_head,
    anatomy_headneck,
    dicom_writer,
    scanner,
    truth,
)
from dicomnode.phantoms.canvas import Canvas
from dicomnode.phantoms.geometry import ORIENTATION, Grid, Pose

log = logging.getLogger(__name__)

#: The body regions a phantom can be made of.
REGIONS: tuple[str, str, str] = ("headneck", "abdomen", "head")


@dataclass(frozen=True)
class RegionSpec:
    """Scan protocol defaults and the anatomy builder of one region."""

    build: Callable[[Canvas, np.random.Generator], dict[str, Any]]
    labels: dict[int, str]
    z_range: tuple[float, float]
    fov_mm: float
    slice_mm: float
    noise_hu: float
    body_part: str
    study_description: str
    series_description: str
    window: tuple[float, float]
    kvp: float


SPECS: dict[str, RegionSpec] = {
    "headneck": RegionSpec(anatomy_headneck.build, anatomy_headneck.LABELS,
                           anatomy_headneck.Z_RANGE, 320.0, 2.5, 10.0, "HEADNECK",
                           "CT HEAD NECK RT PLANNING", "Planning CT {thk} mm", (40.0, 400.0),
                           120.0),
    "abdomen": RegionSpec(anatomy_abdomen.build, anatomy_abdomen.LABELS,
                          anatomy_abdomen.Z_RANGE, 420.0, 2.0, 12.0, "ABDOMEN",
                          "CT ABDOMEN WITH CONTRAST", "Portal venous {thk} mm",
                          (50.0, 400.0), 120.0),
    "head": RegionSpec(anatomy_head.build, anatomy_head.LABELS, anatomy_head.Z_RANGE,
                       240.0, 5.0, 3.0, "HEAD", "CT HEAD WITHOUT CONTRAST",
                       "Axial brain {thk} mm", (40.0, 80.0), 120.0),
}


@dataclass
class Phantom:
    """A synthetic CT volume with its ground truth.

    Attributes
    ----------
    region, seed
        What was asked for.
    hu
        int16 Hounsfield units, ``[z, y, x]``; slice 0 is the most inferior.
    labels
        uint8 label map on the same grid; names in ``label_names``.
    spacing
        ``(dz, dy, dx)`` in mm; the slice thickness equals ``dz``.
    origin
        ``(x, y, z)`` of voxel ``[0, 0, 0]`` in patient coordinates (LPS, mm).
    direction
        Image Orientation (Patient) of every slice (rows along +x, columns along +y).
    truth
        Head only: study-level and per-slice haemorrhage labels (see
        :func:`dicomnode.phantoms.truth.head_truth`); ``None`` otherwise.
    lesions
        Abdomen only: one record per liver tumour (``id``, ``type``, ``diameter_mm``,
        ``mean_hu``, ``center_mm``, ``voxels``); ``instances`` holds their ids per voxel.
    """

    region: str
    seed: int
    hu: np.ndarray
    labels: np.ndarray
    label_names: dict[int, str]
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float]
    direction: tuple[float, float, float, float, float, float] = ORIENTATION
    truth: dict[str, Any] | None = None
    lesions: list[dict[str, Any]] = field(default_factory=list)
    instances: np.ndarray | None = None
    noise_sd: float = 0.0
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def spec(self) -> RegionSpec:
        """Protocol defaults of the region."""
        return SPECS[self.region]

    def slice_positions(self) -> np.ndarray:
        """``(n, 3)`` Image Position (Patient) of every slice, index order."""
        nz = self.hu.shape[0]
        pos = np.tile(np.asarray(self.origin, dtype=np.float64), (nz, 1))
        pos[:, 2] += self.spacing[0] * np.arange(nz)
        return pos


def _parse_spacing(spacing: float | Sequence[float] | None
                   ) -> tuple[float | None, float | None, float | None]:
    if spacing is None:
        return None, None, None
    if isinstance(spacing, (int, float, np.number)):
        values = [float(spacing)]
    else:
        values = [float(v) for v in spacing]
    if len(values) not in (1, 2, 3) or any(not np.isfinite(v) or v <= 0 for v in values):
        raise ValueError(f"Invalid 'spacing' value '{spacing}' - must be dz, (dz, dxy) or "
                         "(dz, dy, dx) with positive millimetres")
    if len(values) == 1:
        return values[0], None, None
    if len(values) == 2:
        return values[0], values[1], values[1]
    return values[0], values[1], values[2]


def make_grid(region: str, pose_z: float, *, slices: int | None, matrix: int,
              spacing: float | Sequence[float] | None, scale: float = 1.0) -> Grid:
    """The scan grid for a region: coverage, slice spacing and field of view.

    The scanned range follows the patient, as a radiographer sets it: the region's
    anatomical range times the case's size ``scale``, shifted by ``pose_z``.
    """
    spec = SPECS[region]
    dz, dy, dx = _parse_spacing(spacing)
    z_lo, z_hi = (v * scale for v in spec.z_range)
    coverage = z_hi - z_lo
    if slices is None:
        dz = dz or spec.slice_mm
        slices = max(1, round(coverage / dz))
    elif dz is None:
        dz = coverage / slices
    if dz > 20:
        name, value = ("spacing", spacing) if spacing is not None else ("slices", slices)
        raise ValueError(f"Invalid '{name}' value '{value}' - slice spacing {dz:.2f} mm "
                         "exceeds 20 mm")
    dy = dy or spec.fov_mm / matrix
    dx = dx or spec.fov_mm / matrix
    centre_z = (z_lo + z_hi) / 2 + pose_z
    z0 = centre_z - dz * (slices - 1) / 2
    x0 = -dx * (matrix - 1) / 2
    y0 = -dy * (matrix - 1) / 2
    return Grid((int(slices), int(matrix), int(matrix)), (float(dz), float(dy), float(dx)),
                (float(x0), float(y0), float(z0)))


def make_phantom(region: str, seed: int = 0, *, slices: int | None = None, matrix: int = 512,
                 spacing: float | Sequence[float] | None = None,
                 noise: float | None = None, resected: Sequence[str] = ()) -> Phantom:
    """Generate one synthetic CT case.

    Parameters
    ----------
    region
        ``"headneck"``, ``"abdomen"`` or ``"head"``.
    seed
        Everything random (pose, shapes, contrasts, lesions, noise) follows from it.
    slices
        Number of axial slices. The default covers the region's scan range at its
        usual slice spacing (headneck 2.5 mm, abdomen 2 mm, head 5 mm), so it varies a
        little with the patient's size; with ``slices`` alone the range is divided
        into that many slices; with both, ``slices * dz`` is centred on the range.
    matrix
        In-plane matrix (rows = columns), 16 to 1024.
    spacing
        ``dz``, ``(dz, dxy)`` or ``(dz, dy, dx)`` in mm. In-plane spacing defaults to
        the region's field of view (headneck 320, abdomen 420, head 240 mm) over
        ``matrix``. The slice thickness equals ``dz``.
    noise
        Quantum noise standard deviation in HU; the default is the region's usual
        level scaled by ``sqrt(reference thickness / dz)``.
    resected
        Head and neck only: glands left out, as after their surgery (``Parotid_L``,
        ``Parotid_R``, ``Glnd_Submand_L``, ``Glnd_Submand_R``); their bed is drawn as
        the patient's fat, everything else as without the option.

    Returns
    -------
    Phantom
    """
    if region not in REGIONS:
        raise ValueError(f"Invalid 'region' value '{region}' - must be one of {REGIONS}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"Invalid 'seed' value '{seed}' - must be a non-negative integer")
    if not isinstance(matrix, (int, np.integer)) or not 16 <= matrix <= 1024:
        raise ValueError(f"Invalid 'matrix' value '{matrix}' - must be 16 to 1024")
    if slices is not None and (not isinstance(slices, (int, np.integer))
                               or not 1 <= slices <= 2000):
        raise ValueError(f"Invalid 'slices' value '{slices}' - must be 1 to 2000")
    if noise is not None and (not np.isfinite(noise) or noise < 0):
        raise ValueError(f"Invalid 'noise' value '{noise}' - must be >= 0 HU")
    glands = {"Parotid_L", "Parotid_R", "Glnd_Submand_L", "Glnd_Submand_R"}
    if set(resected) - (glands if region == "headneck" else set()):
        raise ValueError(f"Invalid 'resected' value '{sorted(resected)}' - must name "
                         f"head-and-neck glands: {sorted(glands)}")
    started = time.perf_counter()
    spec = SPECS[region]
    rng = np.random.default_rng([int(seed), REGIONS.index(region)])
    pose = Pose.random(rng)
    pose_z = float(rng.uniform(-40, 40))
    pose = Pose(pose.rotation, pose.shift + np.array([0.0, 0.0, pose_z]), pose.scale)
    grid = make_grid(region, pose_z, slices=slices, matrix=int(matrix), spacing=spacing,
                     scale=pose.scale)
    canvas = Canvas(grid, pose)
    canvas.resected = frozenset(resected)
    info = spec.build(canvas, rng)
    _paint_table(canvas, spec)
    if noise is None:
        noise = float(np.clip(spec.noise_hu * np.sqrt(spec.slice_mm / grid.spacing[0]), 2, 60))
    hu = scanner.render(canvas, float(noise), rng)
    phantom = Phantom(
        region=region, seed=int(seed), hu=hu, labels=canvas.labels,
        label_names=dict(spec.labels), spacing=grid.spacing, origin=grid.origin,
        lesions=list(info.pop("lesions", [])), instances=canvas.instances,
        noise_sd=float(noise), info=info)
    if region == "head":
        phantom.truth = truth.head_truth(phantom)
    log.info("phantom.made", extra=fields(
        region=region, seed=int(seed), shape="x".join(map(str, hu.shape)),
        seconds=round(time.perf_counter() - started, 2)))
    return phantom


def _paint_table(canvas: Canvas, spec: RegionSpec) -> None:
    """The patient couch: a thin curved carbon-fibre shell under the body (world frame)."""
    grid = canvas.grid
    y = grid.axis("y")
    x = grid.axis("x")
    dy = grid.spacing[1]
    top = spec.fov_mm * 0.5 * (0.62 if spec.body_part == "ABDOMEN" else 0.72)
    shell = canvas.tissue("table_shell", 250.0, 20.0)
    foam = canvas.tissue("table_foam", -900.0, 15.0)
    curve = top + (x / (spec.fov_mm * 0.6)) ** 2 * 15.0
    row = np.abs(y[:, None] - curve[None, :])
    thickness = max(2.0, 1.5 * dy)
    below = (y[:, None] > curve[None, :]) & (y[:, None] < curve[None, :] + 40)
    sheet = np.where(row < thickness, shell, np.where(below, foam, 0)).astype(np.uint8)
    sheet &= np.uint8(255) * (np.abs(x)[None, :] < spec.fov_mm * 0.45)
    air = canvas.tissue_map == 0
    canvas.tissue_map[air] = np.broadcast_to(sheet, canvas.tissue_map.shape)[air]


def write_phantom(phantom: Phantom, out_dir: str | Path, *, transfer_syntax: str | None = None,
                  slice_order: str = "ascending", body_part: str | None = "default",
                  descriptions: bool | str = True, study_uid: str | None = None,
                  series_uid: str | None = None, patient_name: str | None = None,
                  patient_id: str | None = None) -> list[Path]:
    """Write a phantom as a DICOM CT series plus its ground truth.

    Parameters
    ----------
    phantom
        The case (from :func:`make_phantom`).
    out_dir
        Directory to write into (created if needed).
    transfer_syntax
        ``None``/``"explicit"`` (Explicit VR Little Endian), ``"jpegls"`` (JPEG-LS
        lossless) or ``"rle"`` (RLE lossless), or the UID.
    slice_order
        ``"ascending"``, ``"descending"`` or ``"shuffled"`` Instance Numbers.
    body_part
        ``"default"`` (the region's Body Part Examined), ``None`` (left out) or text.
    descriptions
        ``True`` (the region's Study/Series Description), ``False`` (left out) or text.
    study_uid, series_uid
        Fixed UIDs (new ones by default).
    patient_name, patient_id
        Override the synthetic ``PHANTOM^REGION`` name and ID.

    Returns
    -------
    list of pathlib.Path
        ``out_dir/NNNN.dcm`` in Instance Number order, then ``labels.nii.gz``,
        ``labels.json`` (value -> name, lesions), ``lesions.nii.gz`` (abdomen with
        tumours: one value per tumour) and ``truth.json`` (head).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths, sop_uids, numbers = dicom_writer.write_series(
        phantom, out, transfer_syntax=transfer_syntax, slice_order=slice_order,
        body_part=body_part, descriptions=descriptions, study_uid=study_uid,
        series_uid=series_uid, patient_name=patient_name, patient_id=patient_id)
    paths += truth.write_labels(phantom, out)
    if phantom.truth is not None:
        paths.append(truth.write_truth(phantom, out, sop_uids, numbers))
    return paths
