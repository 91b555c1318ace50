"""Pictures of a result: slices with the structures drawn, and a PNG overlay montage.

The montage (for the dashboard and notifications) shows the slices with the most
segmented tissue, windowed CT with each structure filled translucently and outlined in
its colour. The same drawing, outlines only, makes the burned-in Secondary Capture
series of :mod:`dicomnode.results.burned_in`.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom.dataset import Dataset
from scipy import ndimage

from dicomnode.results.codes import Structure
from dicomnode.results.source import (
    check_source_images,
    structure_masks,
)

log = logging.getLogger(__name__)

#: Default CT window (centre, width) in HU: soft tissue.
SOFT_TISSUE = (40.0, 400.0)


def hounsfield(image: Dataset) -> np.ndarray:
    """Pixel data of one CT slice in HU (rescale slope and intercept applied)."""
    pixels = image.pixel_array.astype(np.float32)
    return pixels * float(image.get("RescaleSlope", 1)) + float(image.get("RescaleIntercept", 0))


def _windowed(hu: np.ndarray, window: tuple[float, float]) -> np.ndarray:
    centre, width = window
    if width <= 0:
        raise ValueError(f"Invalid 'window' value '{window}' - width must be positive")
    scaled = (hu - (centre - width / 2)) / width
    return (np.clip(scaled, 0.0, 1.0) * 255).astype(np.uint8)


def overlay_slice(hu: np.ndarray, masks: Sequence[tuple[Structure, np.ndarray]],
                  window: tuple[float, float] = SOFT_TISSUE, fill_alpha: float = 0.3
                  ) -> np.ndarray:
    """Render one slice as RGB with structures filled translucently and outlined.

    Parameters
    ----------
    hu
        2D slice in HU.
    masks
        ``(structure, 2D boolean mask)`` pairs.
    window
        CT window ``(centre, width)`` in HU.
    fill_alpha
        Opacity of the fill (0 = outline only).

    Returns
    -------
    numpy.ndarray
        ``(rows, columns, 3)`` ``uint8``.
    """
    grey = _windowed(hu, window).astype(np.float32)
    rgb = np.repeat(grey[..., None], 3, axis=-1)
    for structure, mask in masks:
        if not mask.any():
            continue
        colour = np.asarray(structure.color, np.float32)
        rgb[mask] = (1 - fill_alpha) * rgb[mask] + fill_alpha * colour
        outline = mask & ~ndimage.binary_erosion(mask)
        rgb[outline] = colour
    return rgb.astype(np.uint8)


def choose_slices(masks: Sequence[tuple[Structure, np.ndarray]], count: int) -> list[int]:
    """Indices of up to ``count`` slices spread evenly over those with segmented tissue."""
    if count < 1:
        raise ValueError(f"Invalid 'count' value '{count}' - must be >= 1")
    if not masks:
        return []
    area = np.zeros(masks[0][1].shape[0], np.int64)
    for _, mask in masks:
        area += mask.reshape(mask.shape[0], -1).sum(axis=1)
    candidates = np.nonzero(area)[0]
    if candidates.size == 0:
        return []
    if candidates.size <= count:
        return candidates.tolist()
    picks = np.linspace(0, candidates.size - 1, count).round().astype(int)
    return sorted(set(candidates[picks].tolist()))


def render_montage(
    source_images: Sequence[Dataset],
    masks: np.ndarray | Mapping[str, np.ndarray],
    structures: Sequence[Structure],
    *,
    tiles: int = 12,
    columns: int = 4,
    tile_size: int = 256,
    window: tuple[float, float] = SOFT_TISSUE,
    path: str | os.PathLike[str] | None = None,
) -> bytes:
    """Render a PNG montage of the slices with the most segmented tissue.

    Parameters
    ----------
    source_images
        CT slices sorted in the order of the masks' axis 0.
    masks
        Label map ``[z, y, x]`` or mapping from structure name to boolean mask.
    structures
        Structure table (colours).
    tiles, columns, tile_size
        Number of slices shown, tiles per row, and tile edge in pixels.
    window
        CT window ``(centre, width)`` in HU.
    path
        Where to write the PNG as well (optional).

    Returns
    -------
    bytes
        The PNG file content.
    """
    geometry = check_source_images(source_images)
    pairs = structure_masks(masks, structures, geometry)
    if columns < 1 or tile_size < 16:
        raise ValueError(f"Invalid 'columns'/'tile_size' value '{columns}/{tile_size}'")
    chosen = choose_slices(pairs, tiles) or [geometry.shape[0] // 2]
    aspect = geometry.spacing[0] * geometry.shape[1] / (geometry.spacing[1] * geometry.shape[2])
    tile_w, tile_h = tile_size, max(16, round(tile_size * aspect))
    rows = (len(chosen) + columns - 1) // columns
    sheet = Image.new("RGB", (min(columns, len(chosen)) * tile_w, rows * tile_h))
    for n, z in enumerate(chosen):
        rgb = overlay_slice(hounsfield(source_images[z]),
                            [(s, m[z]) for s, m in pairs], window)
        tile = Image.fromarray(rgb).resize((tile_w, tile_h), Image.Resampling.BILINEAR)
        sheet.paste(tile, ((n % columns) * tile_w, (n // columns) * tile_h))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    data = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(data)
    return data
