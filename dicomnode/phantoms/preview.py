"""A PNG montage of a phantom: a few axial slices in a CT window with labels outlined."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageDraw
from scipy import ndimage

if TYPE_CHECKING:
    from dicomnode.phantoms.phantom import Phantom

log = logging.getLogger(__name__)

_COLOURS = np.array([
    (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
    (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
    (0, 128, 128), (220, 190, 255), (170, 110, 40),
], dtype=np.uint8)


def pick_slices(phantom: Phantom, count: int) -> list[int]:
    """Slice indices spread over the scan, biased to slices holding small labels."""
    nz = phantom.hu.shape[0]
    picks: set[int] = set()
    # first the slices where the rarest labels are largest (chiasm, nerves, lesions, bleeds)
    values, counts = np.unique(phantom.labels[phantom.labels > 0], return_counts=True)
    for v in values[np.argsort(counts)][: max(count // 2, 1)]:
        per_slice = (phantom.labels == v).sum(axis=(1, 2))
        picks.add(int(per_slice.argmax()))
    # then evenly spread slices over the scan
    for k in np.linspace(0, nz - 1, count).round().astype(int):
        if len(picks) >= min(count, nz):
            break
        if all(abs(int(k) - p) > 1 for p in picks) or len(picks) + 1 == count:
            picks.add(int(k))
    k = 0
    while len(picks) < min(count, nz):
        picks.add(k)
        k += 1
    return sorted(picks)


def render_slice(phantom: Phantom, k: int, window: tuple[float, float] | None = None,
                 outlines: bool = True) -> Image.Image:
    """One axial slice in a window, label boundaries drawn in colour."""
    centre, width = window or phantom.spec.window
    lo = centre - width / 2
    grey = np.clip((phantom.hu[k].astype(np.float32) - lo) / width * 255, 0, 255)
    grey = grey.astype(np.uint8)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    lab = phantom.labels[k]
    if outlines and lab.any():
        edge = lab != ndimage.grey_erosion(lab, size=3)
        edge |= lab != ndimage.grey_dilation(lab, size=3)
        edge &= lab > 0
        rgb[edge] = _COLOURS[(lab[edge].astype(int) - 1) % len(_COLOURS)]
    return Image.fromarray(rgb)


def write_preview(phantom: Phantom, path: str | Path, *, count: int = 8, tile: int = 384,
                  window: tuple[float, float] | None = None, outlines: bool = True) -> Path:
    """Write a montage PNG of ``count`` slices.

    Parameters
    ----------
    phantom
        The case to show.
    path
        Output PNG file.
    count
        Number of slices (2 to 32).
    tile
        Size of each tile in pixels.
    window
        ``(centre, width)`` in HU; the region's default window otherwise.
    outlines
        Draw the label boundaries (``False`` shows the bare CT).

    Returns
    -------
    pathlib.Path
        The written file.
    """
    if not 2 <= count <= 32:
        raise ValueError(f"Invalid 'count' value '{count}' - must be 2 to 32")
    slices = pick_slices(phantom, count)
    cols = 4
    rows = int(np.ceil(len(slices) / cols))
    sheet = Image.new("RGB", (cols * tile, rows * tile + 18 * rows), (0, 0, 0))
    draw = ImageDraw.Draw(sheet)
    z = phantom.slice_positions()[:, 2]
    for i, k in enumerate(slices):
        img = render_slice(phantom, k, window, outlines)
        img = img.resize((tile, tile), Image.Resampling.BILINEAR)
        x, y = (i % cols) * tile, (i // cols) * (tile + 18)
        sheet.paste(img, (x, y + 18))
        names = sorted({phantom.label_names.get(int(v), str(v))
                        for v in np.unique(phantom.labels[k]) if v})
        draw.text((x + 4, y + 3), f"#{k} z={z[k]:.1f} {' '.join(names)}"[:70],
                  fill=(255, 255, 0))
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(out)
    return out
