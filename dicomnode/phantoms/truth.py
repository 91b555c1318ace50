"""Ground truth files: ``labels.nii.gz``, its label table, and the head ``truth.json``.

``labels.nii.gz`` holds the label map on exactly the voxel grid of the DICOM series:
NIfTI stores RAS, so the affine flips ``x`` and ``y`` of the LPS patient coordinates;
any reader that honours the affine (SimpleITK, nibabel, 3D Slicer) puts every label
voxel on the centre of the matching DICOM pixel. ``labels.json`` maps label values to
names. For the head, ``truth.json`` gives the six RSNA 2019 outputs (``any`` and the
five subtypes) for the study and for every slice.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

import nibabel as nib
import numpy as np

if TYPE_CHECKING:
    from dicomnode.phantoms.phantom import Phantom

log = logging.getLogger(__name__)

#: Output names of the head truth, in the RSNA 2019 order.
HEAD_OUTPUTS: tuple[str, ...] = ("any", "epidural", "intraparenchymal", "intraventricular",
                                 "subarachnoid", "subdural")

#: A slice is positive for a subtype when its bleed covers at least this area (mm^2).
MIN_SLICE_AREA_MM2 = 4.0


def head_truth(phantom: Phantom) -> dict[str, Any]:
    """Study- and slice-level haemorrhage labels of a head phantom.

    Returns
    -------
    dict
        ``{"study": {output: 0|1}, "slices": [{"index", "z", output: 0|1...}],
        "bleeds": [...], "min_slice_area_mm2": ...}``; slice ``index`` is the position
        in ``phantom.hu`` (0 = most inferior). :func:`write_truth` adds the SOP Instance
        UID and Instance Number of each slice once the series is written.
    """
    from dicomnode.phantoms.anatomy_head import SUBTYPE_LABELS

    _, dy, dx = phantom.spacing
    min_voxels = max(1, int(np.ceil(MIN_SLICE_AREA_MM2 / (dy * dx))))
    counts = {s: (phantom.labels == v).sum(axis=(1, 2)) for s, v in SUBTYPE_LABELS.items()}
    z = phantom.slice_positions()[:, 2]
    slices = []
    for k in range(phantom.hu.shape[0]):
        row: dict[str, Any] = {"index": k, "z": round(float(z[k]), 3)}
        for s in HEAD_OUTPUTS[1:]:
            row[s] = int(counts[s][k] >= min_voxels)
        row["any"] = int(any(row[s] for s in HEAD_OUTPUTS[1:]))
        slices.append({key: row[key] for key in ("index", "z", *HEAD_OUTPUTS)})
    study = {s: int(any(r[s] for r in slices)) for s in HEAD_OUTPUTS}
    return {"study": study, "slices": slices, "bleeds": phantom.info.get("bleeds", []),
            "min_slice_area_mm2": MIN_SLICE_AREA_MM2}


def nifti_affine(phantom: Phantom) -> np.ndarray:
    """RAS affine of the phantom grid for a NIfTI array indexed ``[x, y, z]``."""
    dz, dy, dx = phantom.spacing
    x0, y0, z0 = phantom.origin
    aff = np.diag([-dx, -dy, dz, 1.0])
    aff[:3, 3] = (-x0, -y0, z0)
    return aff


def write_labels(phantom: Phantom, out_dir: Path) -> list[Path]:
    """Write ``labels.nii.gz`` and ``labels.json`` (value -> name) into ``out_dir``."""
    img = nib.Nifti1Image(np.ascontiguousarray(phantom.labels.transpose(2, 1, 0)),
                          nifti_affine(phantom))
    img.set_qform(img.affine, code=1)
    img.set_sform(img.affine, code=1)
    img.header.set_xyzt_units("mm")
    nii = out_dir / "labels.nii.gz"
    nib.save(img, str(nii))
    table = out_dir / "labels.json"
    doc: dict[str, Any] = {"labels": {str(k): v for k, v in sorted(phantom.label_names.items())},
                           "region": phantom.region, "seed": phantom.seed}
    if phantom.lesions:
        doc["lesions"] = phantom.lesions
    table.write_text(json.dumps(doc, indent=2))
    paths = [nii, table]
    if phantom.instances is not None and phantom.lesions:
        inst = nib.Nifti1Image(np.ascontiguousarray(phantom.instances.transpose(2, 1, 0)),
                               nifti_affine(phantom))
        inst.set_qform(inst.affine, code=1)
        inst.set_sform(inst.affine, code=1)
        path = out_dir / "lesions.nii.gz"
        nib.save(inst, str(path))
        paths.append(path)
    return paths


def write_truth(phantom: Phantom, out_dir: Path, sop_uids: list[str],
                instance_numbers: list[int]) -> Path:
    """Write ``truth.json`` for a head phantom, with the UIDs of the written slices.

    ``sop_uids[k]`` and ``instance_numbers[k]`` belong to slice index ``k``.
    """
    if phantom.truth is None:
        raise ValueError(f"Invalid 'phantom' value '{phantom.region}' - it has no truth")
    doc = json.loads(json.dumps(phantom.truth))
    for row in doc["slices"]:
        row["sop_instance_uid"] = sop_uids[row["index"]]
        row["instance_number"] = instance_numbers[row["index"]]
    path = out_dir / "truth.json"
    path.write_text(json.dumps(doc, indent=2))
    return path
