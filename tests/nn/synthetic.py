"""A tiny synthetic liver case for fast tests (no phantom generator needed)."""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import numpy as np

from dicomnode.nn.datasets import Case


def tiny_case(seed: int = 0, shape: tuple[int, int, int] = (24, 48, 48),
              spacing: tuple[float, float, float] = (4.0, 4.0, 4.0)) -> Case:
    """An ellipsoid 'liver' (110 HU) with one hypodense sphere 'tumour', in water."""
    rng = np.random.default_rng(seed)
    z, y, x = np.meshgrid(*(np.arange(n) * s for n, s in zip(shape, spacing, strict=True)),
                          indexing="ij")
    cz, cy, cx = (n * s / 2 for n, s in zip(shape, spacing, strict=True))
    liver = ((z - cz) / 35) ** 2 + ((y - cy) / 50) ** 2 + ((x - cx + 20) / 45) ** 2 < 1
    tumour = ((z - cz) ** 2 + (y - cy) ** 2 + (x - cx + 20) ** 2) < 12 ** 2
    hu = np.full(shape, -1000.0)
    body = ((y - cy) / 85) ** 2 + ((x - cx) / 90) ** 2 < 1
    hu[body] = 30
    hu[liver] = 110
    hu[tumour & liver] = 50
    hu += rng.normal(0, 5, shape)
    labels = np.zeros(shape, dtype=np.uint8)
    labels[liver] = 1
    labels[tumour & liver] = 2
    return Case(f"tiny-{seed}", hu.astype(np.int16), labels, spacing)


def write_lits(case: Case, folder: Path, number: int) -> None:
    """Write a case in the LiTS layout (RAS NIfTI, [x, y, z] arrays)."""
    dz, dy, dx = case.spacing
    affine = np.diag([-dx, -dy, dz, 1.0])
    for name, data in ((f"volume-{number}.nii", case.hu),
                       (f"segmentation-{number}.nii", case.labels)):
        img = nib.Nifti1Image(np.ascontiguousarray(data.transpose(2, 1, 0)), affine)
        nib.save(img, str(folder / name))
