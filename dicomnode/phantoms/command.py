"""The ``dicomnode phantom`` command: options in, a written study and a JSON summary out."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np

from dicomnode.phantoms.phantom import make_phantom, write_phantom
from dicomnode.phantoms.preview import write_preview

log = logging.getLogger(__name__)


def parse_spacing(text: str | None) -> tuple[float, ...] | None:
    """``"2.5"``, ``"2.5,0.8"`` or ``"2.5,0.8,0.8"`` (dz[,dy[,dx]] in mm) to a tuple."""
    if text is None or not text.strip():
        return None
    try:
        values = tuple(float(v) for v in text.replace("x", ",").split(",") if v.strip())
    except ValueError:
        raise ValueError(f"Invalid 'spacing' value '{text}' - must be dz, 'dz,dxy' or "
                         "'dz,dy,dx' in mm") from None
    if len(values) not in (1, 2, 3):
        raise ValueError(f"Invalid 'spacing' value '{text}' - must have 1 to 3 numbers")
    return values


def run_phantom(region: str, out: Path, *, seed: int = 0, slices: int | None = None,
                matrix: int = 512, spacing: str | None = None, noise: float | None = None,
                transfer_syntax: str | None = None, slice_order: str = "ascending",
                body_part: str | None = "default", descriptions: bool | str = True,
                preview: bool = False, resected: str | None = None) -> dict[str, Any]:
    """Make and write one phantom; return a summary (printed as JSON by the CLI).

    ``preview`` also writes ``out/preview.png``: a montage of slices with the labels
    outlined. ``resected`` names head-and-neck glands left out (comma-separated), as
    after their surgery: a case for the "organ absent" path and for training it.
    """
    started = time.perf_counter()
    left_out = [name.strip() for name in (resected or "").split(",") if name.strip()]
    phantom = make_phantom(region, seed, slices=slices, matrix=matrix,
                           spacing=parse_spacing(spacing), noise=noise, resected=left_out)
    made = time.perf_counter()
    paths = write_phantom(phantom, out, transfer_syntax=transfer_syntax,
                          slice_order=slice_order, body_part=body_part,
                          descriptions=descriptions)
    if preview:
        paths.append(write_preview(phantom, Path(out) / "preview.png"))
    present = sorted(int(v) for v in np.unique(phantom.labels) if v)
    summary: dict[str, Any] = {
        "region": region, "seed": seed, "out": str(out),
        "shape": list(phantom.hu.shape), "spacing_mm": list(phantom.spacing),
        "noise_hu": round(phantom.noise_sd, 2),
        "dicom_files": sum(1 for p in paths if p.suffix == ".dcm"),
        "files": [p.name for p in paths if p.suffix != ".dcm"],
        "labels": {phantom.label_names[v]: v for v in present},
        "generate_s": round(made - started, 2),
        "total_s": round(time.perf_counter() - started, 2),
    }
    if left_out:
        summary["resected"] = sorted(left_out)
    if phantom.lesions:
        summary["lesions"] = len(phantom.lesions)
    if phantom.truth is not None:
        summary["truth"] = phantom.truth["study"]
    return summary


def summary_json(summary: dict[str, Any]) -> str:
    """The summary as one line of JSON."""
    return json.dumps(summary)
