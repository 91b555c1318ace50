"""The study page's picture of a result: a PNG made from the result objects themselves.

A SEG result is drawn by ``results/preview.render_montage`` (the slices with the most
segmented tissue, each structure outlined) from the SEG file and the CT slices it
references; a haemorrhage result shows the key slices its Key Object Selection
references, in the brain window. The PNG is written once beside the result files.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from sqlalchemy import select

from dicomnode.config import Settings
from dicomnode.logs import fields
from dicomnode.store.db import Database
from dicomnode.store.models import Instance, Job

log = logging.getLogger(__name__)

#: The brain window (centre, width) in HU, the first of the haemorrhage model's three.
BRAIN_WINDOW = (40.0, 80.0)
#: Slices shown, and tile edge in pixels.
TILES, TILE_SIZE = 4, 256


class PreviewError(ValueError):
    """No picture can be made for this job (no SEG or KOS, or its CT is gone)."""


def _sources(db: Database, settings: Settings, sop_uids: set[str]) -> list[Dataset]:
    """The referenced CT slices from the spool, in slice order."""
    with db.session() as session:
        rows = session.execute(
            select(Instance.path, Instance.slice_position, Instance.instance_number)
            .where(Instance.sop_uid.in_(sop_uids))).all()
    if not rows:
        raise PreviewError("the CT slices the result refers to are no longer stored")
    rows = sorted(rows, key=lambda r: (r.slice_position if r.slice_position is not None
                                       else float(r.instance_number or 0)))
    return [dcmread(settings.spool_dir / r.path) for r in rows]


def _seg_montage(db: Database, settings: Settings, seg_path: Path) -> bytes:
    import highdicom as hd

    from dicomnode.results.codes import CATALOGUE, table_from_labels
    from dicomnode.results.preview import render_montage

    seg = hd.seg.segread(seg_path)
    uids = {str(sop) for _, _, sop in seg.get_source_image_uids()}
    images = _sources(db, settings, uids)
    ordered = [str(ds.SOPInstanceUID) for ds in images]
    names = {int(item.SegmentNumber): str(item.SegmentLabel)
             for item in seg.SegmentSequence if str(item.SegmentLabel) in CATALOGUE}
    if not names:
        raise PreviewError("the SEG names no structure this node knows")
    numbers = sorted(names)
    pixels = seg.get_pixels_by_source_instance(
        source_sop_instance_uids=ordered, segment_numbers=numbers, combine_segments=False,
        ignore_spatial_locations=True)
    masks = {names[n]: pixels[..., i] > 0 for i, n in enumerate(numbers)}
    return render_montage(images, masks, table_from_labels(names), tiles=TILES,
                          columns=TILES, tile_size=TILE_SIZE)


def _kos_montage(db: Database, settings: Settings, kos_path: Path) -> bytes:
    from dicomnode.results.preview import hounsfield, overlay_slice

    kos = dcmread(kos_path)
    uids = {str(sop.ReferencedSOPInstanceUID)
            for study in kos.get("CurrentRequestedProcedureEvidenceSequence", [])
            for series in study.get("ReferencedSeriesSequence", [])
            for sop in series.get("ReferencedSOPSequence", [])}
    if not uids:
        raise PreviewError("the key object selection references no slice")
    images = _sources(db, settings, uids)
    if len(images) > TILES:
        picks = np.linspace(0, len(images) - 1, TILES).round().astype(int)
        images = [images[i] for i in sorted(set(picks.tolist()))]
    tiles = [Image.fromarray(overlay_slice(hounsfield(ds), [], BRAIN_WINDOW)).resize(
        (TILE_SIZE, TILE_SIZE), Image.Resampling.BILINEAR) for ds in images]
    sheet = Image.new("RGB", (TILE_SIZE * len(tiles), TILE_SIZE))
    for n, tile in enumerate(tiles):
        sheet.paste(tile, (n * TILE_SIZE, 0))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG")
    return buffer.getvalue()


def job_preview(db: Database, settings: Settings, job_id: int) -> bytes:
    """The PNG preview of one job's results, made once and kept beside them.

    Parameters
    ----------
    db : Database
    settings : Settings
        Where the spool lies.
    job_id : int

    Returns
    -------
    bytes
        PNG content.

    Raises
    ------
    PreviewError
        No such job, no SEG or KOS among its results, or its CT slices are gone.
    """
    with db.session() as session:
        job = session.get(Job, job_id)
        files = [Path(f) for f in ((job.result or {}).get("files") or [])] if job else []
    by_kind = {f.stem: f for f in files if f.is_file()}
    if "seg" not in by_kind and "kos" not in by_kind:
        raise PreviewError(f"job {job_id} has no SEG or key object selection to draw")
    cached = next(iter(by_kind.values())).parent / "preview.png"
    if cached.is_file():
        return cached.read_bytes()
    if "seg" in by_kind:
        data = _seg_montage(db, settings, by_kind["seg"])
    else:
        data = _kos_montage(db, settings, by_kind["kos"])
    tmp = cached.with_suffix(".tmp")
    tmp.write_bytes(data)
    tmp.replace(cached)
    log.info("web.preview_written", extra=fields(job=job_id, bytes=len(data)))
    return data
