"""Non-contrast brain CT with 0-2 intracranial haemorrhage subtypes.

The head (scalp, skull, brain, ventricles, orbits) comes from
:mod:`dicomnode.phantoms.anatomy_cranium`; the scan runs from the skull base to the
vertex. Half the cases have no bleed; the others have one or two subtypes, each with
its characteristic shape and place (acute blood, 50-90 HU):

* epidural: a biconvex lens against the inner table, temporal or parietal;
* subdural: a crescent along one convexity, thickest in the middle, never across the
  falx;
* intraparenchymal: a lobulated blob in the basal ganglia, thalamus or a lobe, with a
  rim of hypodense oedema;
* intraventricular: blood layering in the dependent (posterior) ventricles;
* subarachnoid: thin hyperdensity filling sulci and the basal cisterns in a region.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

import numpy as np

from dicomnode.phantoms.anatomy_cranium import VAULT_CENTER, Cranium, paint_cranium, skull_floor
from dicomnode.phantoms.canvas import Canvas
from dicomnode.phantoms.shapes import Blob, random_harmonics

log = logging.getLogger(__name__)

#: The five haemorrhage subtypes, in the order of the RSNA 2019 outputs.
SUBTYPES: tuple[str, ...] = ("epidural", "intraparenchymal", "intraventricular",
                             "subarachnoid", "subdural")

#: Label values of the head phantom.
LABELS: dict[int, str] = {
    1: "Brain",
    2: "Ventricles",
    3: "Skull",
    4: "ICH_Epidural",
    5: "ICH_Intraparenchymal",
    6: "ICH_Intraventricular",
    7: "ICH_Subarachnoid",
    8: "ICH_Subdural",
}
#: Label value of each subtype.
SUBTYPE_LABELS: dict[str, int] = {s: 4 + i for i, s in enumerate(SUBTYPES)}

#: Scanned range in anatomical z (mm): skull base to vertex.
Z_RANGE: tuple[float, float] = (-42.0, 128.0)

Mask3 = Callable[[np.ndarray, np.ndarray, np.ndarray, np.ndarray], np.ndarray]


def _surface_point(shape: Blob, direction: np.ndarray) -> np.ndarray:
    """Where the ray from the vault centre along ``direction`` leaves ``shape``."""
    t = np.linspace(0, 140, 561, dtype=np.float32)
    pts = np.asarray(VAULT_CENTER, dtype=np.float32) + t[:, None] * direction[None, :]
    d = shape.depth(pts[:, 0], pts[:, 1], pts[:, 2])
    inside = np.nonzero(d > 0)[0]
    return pts[inside[-1]] if inside.size else pts[0]


def _frame(normal: np.ndarray) -> np.ndarray:
    """Orthonormal axes (columns) whose third axis is ``normal``."""
    n = normal / np.linalg.norm(normal)
    a = np.array([0.0, 0.0, 1.0]) if abs(n[2]) < 0.9 else np.array([1.0, 0.0, 0.0])
    e1 = np.cross(a, n)
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(n, e1), n], axis=1)


def _convexity_direction(rng: np.random.Generator, side: float, z_lo: float,
                         z_hi: float) -> np.ndarray:
    """A unit direction from the vault centre to a lateral convexity of one side."""
    azimuth = rng.uniform(np.deg2rad(-60), np.deg2rad(60))  # 0 = straight lateral
    elevation = np.arctan2(rng.uniform(z_lo, z_hi) - VAULT_CENTER[2], 70.0)
    d = np.array([side * np.cos(azimuth) * np.cos(elevation), np.sin(azimuth) *
                  np.cos(elevation), np.sin(elevation)])
    return d / np.linalg.norm(d)


def _apply(c: Canvas, lo: np.ndarray, hi: np.ndarray, tissue: int, label: int,
           mask_fn: Mask3) -> int:
    """Paint voxels selected by ``mask_fn(x, y, z, current_tissue)`` in a box."""
    found = c.block(lo, hi)
    if found is None:
        return 0
    sl, ax, ay, az = found
    mask = mask_fn(ax, ay, az, c.tissue_map[sl])
    c.tissue_map[sl][mask] = tissue
    c.labels[sl][mask] = label
    return int(mask.sum())


def _paint_bleed(c: Canvas, rng: np.random.Generator, cr: Cranium, kind: str) -> dict[str, Any]:
    u = rng.uniform
    t = cr.tissues
    soft = np.array([t["csf"], t["gm"], t["wm"], t["deep_gm"], t["falx"], t["cereb"]],
                    dtype=np.uint8)
    hu = u(55, 85) if kind != "subarachnoid" else u(50, 70)
    blood = c.tissue(f"blood_{kind}", hu, 4.0)
    label = SUBTYPE_LABELS[kind]
    side = float(rng.choice([-1.0, 1.0]))
    record: dict[str, Any] = {"subtype": kind, "mean_hu": round(hu, 1)}

    def above_floor(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return z > skull_floor(x, y) + 1

    if kind == "epidural":
        d = _convexity_direction(rng, side, 15, 70)
        p = _surface_point(cr.inner_skull, d)
        thick = u(6, 16)
        blob = Blob(p + d * 1.5, (u(20, 34), u(20, 34), thick), axes=_frame(d),
                    harmonics=random_harmonics(rng, 2, 0.04))
        lo, hi = blob.bounds()
        n = _apply(c, lo, hi, blood, label, lambda x, y, z, cur: (
            (blob.depth(x, y, z) > 0) & np.isin(cur, soft) & above_floor(x, y, z)))
        record.update(side="left" if side > 0 else "right", thickness_mm=round(thick, 1))
    elif kind == "subdural":
        d0 = _convexity_direction(rng, side, 25, 60)
        thick = u(4, 14)
        spread = u(0.55, 0.8)
        inner = cr.inner_skull
        lo, hi = inner.bounds()

        def crescent(x: np.ndarray, y: np.ndarray, z: np.ndarray, cur: np.ndarray
                     ) -> np.ndarray:
            px, py, pz = (x - VAULT_CENTER[0], y - VAULT_CENTER[1], z - VAULT_CENTER[2])
            r = np.sqrt(px * px + py * py + pz * pz) + 1e-3
            cosang = (px * d0[0] + py * d0[1] + pz * d0[2]) / r
            w = np.clip((cosang - (1 - spread)) / spread, 0, 1)
            depth = inner.depth(x, y, z)
            return ((depth > 0) & (depth < thick * np.sqrt(w)) & (x * side > 2.5)
                    & np.isin(cur, soft) & above_floor(x, y, z))

        n = _apply(c, lo, hi, blood, label, crescent)
        record.update(side="left" if side > 0 else "right", thickness_mm=round(thick, 1))
    elif kind == "intraparenchymal":
        if rng.random() < 0.5:
            centre = np.array([side * u(15, 28), u(-12, 12), u(22, 34)])
            where = "deep"
        else:
            d = _convexity_direction(rng, side, 20, 75)
            centre = np.asarray(VAULT_CENTER) + d * u(25, 45)
            where = "lobar"
        r = u(6, 22)
        harm = random_harmonics(rng, 3, 0.1)
        oedema = c.tissue("oedema", c.tissues[t["wm"]].hu - u(6, 12), 2.5)
        edema_blob = Blob(centre, (r + u(3, 7),) * 3, (0, 0, 0), harm)
        c.paint(edema_blob, oedema, None, within=[t["gm"], t["wm"], t["deep_gm"]])
        blob = Blob(centre, r * rng.uniform(0.8, 1.2, 3), tuple(rng.uniform(-40, 40, 3)), harm)
        lo, hi = blob.bounds()
        parench = np.array([t["gm"], t["wm"], t["deep_gm"], oedema], dtype=np.uint8)
        n = _apply(c, lo, hi, blood, label, lambda x, y, z, cur: (
            (blob.depth(x, y, z) > 0) & np.isin(cur, parench)))
        record.update(site=where, diameter_mm=round(2 * r, 1))
    elif kind == "intraventricular":
        vent = cr.ventricles
        level = u(0, 40)
        lo, hi = vent.bounds()
        csf = t["csf"]
        n = _apply(c, lo, hi, blood, label, lambda x, y, z, cur: (
            (vent.depth(x, y, z) > 0) & (cur == csf) & (y > level)))
        record.update(level_mm=round(level, 1))
    else:  # subarachnoid
        vent = cr.ventricles
        if rng.random() < 0.5:
            centre = np.array([0.0, u(-5, 15), u(-10, 10)])
            where = "basal cisterns"
        else:
            centre = np.asarray(VAULT_CENTER) + _convexity_direction(rng, side, 30, 80) * 60
            where = "convexity"
        region = Blob(centre, (u(30, 50),) * 3, (0, 0, 0), random_harmonics(rng, 3, 0.1))
        lo, hi = region.bounds()
        csf = t["csf"]
        n = _apply(c, lo, hi, blood, label, lambda x, y, z, cur: (
            (region.depth(x, y, z) > 0) & (cur == csf) & (vent.depth(x, y, z) <= 0)
            & (cr.brain.depth(x, y, z) > -1.0)))
        record.update(site=where)
    record["voxels"] = n
    return record


def build(canvas: Canvas, rng: np.random.Generator) -> dict[str, Any]:
    """Paint one head case; return the bleeds it holds."""
    labels = {"Brain": 1, "Ventricles": 2, "Skull": 3}
    cr = paint_cranium(canvas, rng, labels, neck=False)  # type: ignore[arg-type]
    bleeds: list[dict[str, Any]] = []
    if rng.random() >= 0.5:
        count = 1 if rng.random() < 0.7 else 2
        kinds = rng.choice(len(SUBTYPES), size=count, replace=False)
        for k in sorted(kinds):
            record = _paint_bleed(canvas, rng, cr, SUBTYPES[int(k)])
            if record["voxels"] > 0:
                bleeds.append(record)
    return {"bleeds": bleeds, "atrophy": round(cr.atrophy, 2)}
