"""Portal-venous abdominal CT: liver with lobes, vessels and 0-6 tumours, plus distractors.

Anatomical frame: ``z = 0`` at the top of the right hemidiaphragm, the scan runs from
the lung bases (``z = +45``) to the iliac wings (``z = -255``); the body centre is the
origin of ``x``/``y``. Label values are TG-263 style names (see :data:`LABELS`).

Contrast is portal-venous (about 70 s): liver 95-135 HU, portal vein above the liver,
aorta 140-200 HU, kidneys nephrographic. Tumours are hypodense (most), cystic,
hyperdense or rim-enhancing, 5-60 mm, lobulated, always inside the liver; each one is
kept as an instance with its centre, diameter, type and volume for lesion-level
evaluation.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from dicomnode.logs import fields
from dicomnode.phantoms.canvas import Canvas
from dicomnode.phantoms.shapes import (
    Blob,
    Box,
    Difference,
    Outline,
    Tube,
    Union,
    WaveNoise,
    random_harmonics,
    smooth_curve,
)

log = logging.getLogger(__name__)

#: Label values of the abdomen phantom.
LABELS: dict[int, str] = {
    1: "Liver",
    2: "Lesion_Liver",
    3: "Spleen",
    4: "Kidney_L",
    5: "Kidney_R",
    6: "A_Aorta",
    7: "Vertebrae",
    8: "Gallbladder",
    9: "Pancreas",
    10: "Stomach",
    11: "V_Venacava_I",
}
_L = {v: k for k, v in LABELS.items()}

#: Scanned range in anatomical z (mm): lung bases to iliac wings.
Z_RANGE: tuple[float, float] = (-265.0, 35.0)


def _dome(x: np.ndarray, y: np.ndarray, right: float, left: float) -> np.ndarray:
    """Height of the diaphragm: two domes, lower at the back and the sides."""
    r = right - ((x + 65) ** 2 + 0.6 * (y - 5) ** 2) / 150.0
    lt = left - ((x - 70) ** 2 + 0.6 * (y - 5) ** 2) / 150.0
    return np.maximum(r, lt).astype(np.float32)


def build(canvas: Canvas, rng: np.random.Generator) -> dict[str, Any]:
    """Paint one abdominal case and return its lesion list and parameters."""
    c = canvas
    u = rng.uniform
    # --- tissues with per-case contrast -------------------------------------------
    fat = c.tissue("fat", u(-110, -90), 14)
    skin = c.tissue("skin", u(20, 50), 8)
    muscle = c.tissue("muscle", u(48, 62), 9)
    vfat = c.tissue("visceral_fat", u(-105, -85), 16)
    lung = c.tissue("lung", u(-870, -820), 35)
    cortical = c.tissue("cortical_bone", u(650, 950), 60)
    marrow = c.tissue("cancellous_bone", u(180, 300), 45)
    disc = c.tissue("disc", u(80, 100), 8)
    csf = c.tissue("csf", u(5, 15), 4)
    liver_hu = u(95, 135)
    liver = c.tissue("liver", liver_hu, u(5, 9))
    portal = c.tissue("portal_vein", liver_hu + u(35, 70), 5)
    hepatic = c.tissue("hepatic_vein", liver_hu + u(15, 45), 5)
    aorta_t = c.tissue("aorta", u(140, 200), 5)
    ivc_t = c.tissue("ivc", u(110, 150), 6)
    spleen_t = c.tissue("spleen", liver_hu + u(0, 20), 7)
    cortex = c.tissue("kidney_cortex", u(160, 200), 8)
    medulla = c.tissue("kidney_medulla", u(120, 160), 8)
    sinus_fat = c.tissue("renal_sinus_fat", u(-100, -70), 12)
    urine = c.tissue("urine", u(0, 15), 3)
    bile = c.tissue("bile", u(0, 15), 3)
    panc = c.tissue("pancreas", u(85, 110), 14)
    wall = c.tissue("bowel_wall", u(70, 100), 8)
    fluid = c.tissue("bowel_fluid", u(5, 30), 6)
    oral = c.tissue("oral_contrast", u(180, 320), 25)
    gas = c.tissue("gas", -1000.0, 0.0)
    stool = c.tissue("stool", u(-40, 40), 45)
    blood = c.tissue("blood_pool", u(140, 190), 5)
    myo = c.tissue("myocardium", u(90, 120), 8)
    positive_oral = rng.random() < 0.35

    # --- body outline, subcutaneous fat, abdominal wall -----------------------------
    sx, sy = u(0.85, 1.08), u(0.85, 1.15)
    fat_mm = u(12, 45) * (sy - 0.35)
    kf = []
    for z, ax, ay in ((130, 150, 112), (0, 160, 116), (-120, 155, 112), (-210, 165, 110),
                      (-340, 170, 106)):
        kf.append((z, 0, 0, ax * sx, ay * sy, 0, -0.05, u(-0.03, 0.03), 0, 0, u(-0.02, 0.02),
                   u(-0.05, -0.02), 0))
    body = Outline(kf)
    c.paint_layers(body, [(0, skin, None), (2.0, fat, None)])
    wall_kf = []
    for row in kf:
        wall_kf.append((row[0], 0, u(-4, 4), row[3] - fat_mm * u(0.6, 1.0),
                        row[4] - fat_mm * u(0.8, 1.3),
                        0, -0.03, u(-0.03, 0.03), 0, 0, 0, u(-0.04, -0.01), 0))
    abd_wall = Outline(wall_kf)
    wall_mm = u(7, 12)
    c.paint_layers(abd_wall, [(0, muscle, None), (wall_mm, vfat, None)], within=[fat])

    # rectus abdominis: paired straps either side of the midline, in front
    for side in (-1, 1):
        rectus = Tube(smooth_curve([(side * 38, -wall_kf[0][4] + 10, 40),
                                    (side * 40, -wall_kf[2][4] + 12, -120),
                                    (side * 30, -wall_kf[4][4] + 14, -300)]), 9, (2.6, 1, 1))
        c.paint(rectus, muscle, within=[vfat, muscle])

    # --- lungs above the diaphragm, heart ---------------------------------------------
    right_dome, left_dome = u(-4, 6), u(-18, -6)

    def above_dome(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return z > _dome(x, y, right_dome, left_dome) + 4

    c.paint(Box((-260, -260, -120), (260, 260, 200)), lung, within=[vfat], where=above_dome)
    heart = Blob((u(20, 35), -45 * sy, u(42, 55)), (60, 50, 45), (u(-20, 20), 0, 0),
                 random_harmonics(rng, 3, 0.05))
    c.paint(Blob((25, -45 * sy, 50), (72, 60, 55)), vfat, within=[lung])
    c.paint_layers(heart, [(0, myo, None), (10, blood, None)], within=[lung, vfat])

    # --- muscles of the back and psoas ------------------------------------------------
    for side in (-1, 1):
        erector = Tube(smooth_curve([(side * 38, 82 * sy, 80), (side * 40, 80 * sy, -100),
                                     (side * 42, 78 * sy, -340)]), (22, 26, 24), (1.3, 1.0, 1))
        c.paint(erector, muscle, within=[vfat, muscle, fat, lung])
        psoas = Tube(smooth_curve([(side * 28, 48, -70), (side * 40, 40, -170),
                                   (side * 58, 25, -275)]), (6, 18, 26))
        c.paint(psoas, muscle, within=[vfat])

    # --- spine: bodies, discs, arches, canal ------------------------------------------
    vz = np.arange(60.0, -330.0, -u(31, 36)) + u(-8, 8)
    spine_y = 45.0
    c.paint(Outline([(140, 0, spine_y + 27, 12, 10), (-340, 0, spine_y + 27, 12, 10)]),
            csf, within=[vfat, muscle, lung])
    for i, zc in enumerate(vz):
        w = 19 + 0.25 * i * 3
        vb = Outline([(zc - 12.5, 0, spine_y, w, 15, 0, -0.08), (zc + 12.5, 0, spine_y, w, 15,
                                                                   0, -0.08)])
        c.paint_layers(vb, [(0, cortical, _L["Vertebrae"]), (1.6, marrow, None)])
        c.paint(Outline([(zc + 12.5, 0, spine_y, w, 15, 0, -0.08),
                         (zc + 20, 0, spine_y, w, 15, 0, -0.08)]), disc)
        arch = Tube(smooth_curve([(-8, spine_y + 14, zc), (-14, spine_y + 24, zc + 2),
                                  (-9, spine_y + 37, zc), (0, spine_y + 40, zc - 2),
                                  (9, spine_y + 37, zc), (14, spine_y + 24, zc + 2),
                                  (8, spine_y + 14, zc)], 4), 4.5, (1, 1, 2.2))
        spinous = Tube([(0, spine_y + 38, zc - 2), (0, spine_y + 62, zc - 10)], (4, 3.5),
                       (1, 1, 2.5))
        tp_len = 32 if zc < -60 else 24
        trans = Union([Tube([(s * 12, spine_y + 22, zc + 3), (s * (12 + tp_len), spine_y + 24,
                                                             zc + 3)], (5, 3.5), (1, 1, 1.4))
                       for s in (-1, 1)])
        for part in (arch, spinous, trans):
            c.paint_layers(part, [(0, cortical, _L["Vertebrae"]), (2.0, marrow, None)])

    # --- iliac wings: curved bony plates from the sacroiliac joints to the front
    crest = u(-225, -200)
    for side in (-1, 1):
        wing = smooth_curve([(side * 38, 80, crest - 40), (side * 70, 62, crest - 28),
                             (side * 100 * sx, 28, crest - 30), (side * 112 * sx, -8, crest - 45)],
                            6)
        c.paint(Tube(wing, 9, (1, 1, 4.5)), muscle, within=[vfat, fat])  # iliacus, gluteal
        c.paint_layers(Tube(wing, 5.5, (1, 1, 6)), [(0, cortical, None), (1.8, marrow, None)],
                       within=[muscle, vfat, fat])

    # --- ribs with costal cartilage ---------------------------------------------------
    cart = c.tissue("cartilage", u(100, 180), 20)
    for j, z0 in enumerate((75, 45, 15, -15, -45, -75)):
        if j >= 4:
            sweep = np.deg2rad(np.linspace(85, 20 + 12 * (j - 4), 7))
        else:
            sweep = np.deg2rad(np.linspace(85, -55, 9))
        drop = np.linspace(0, 70 - 6 * j, len(sweep))
        for side in (-1, 1):
            ax_w = wall_kf[1][3] - 4
            ay_w = wall_kf[1][4] - 4
            pts = [(side * ax_w * np.cos(t) * 0.98, ay_w * np.sin(t) * 0.98 + 6, z0 - d)
                   for t, d in zip(sweep, drop, strict=True)]
            pts = [(side * 18, spine_y + 20, z0 + 5), *pts]
            curve = smooth_curve(pts, 5)
            rib = Tube(curve, 4.2, (1, 1, 1.6))
            c.paint_layers(rib, [(0, cortical, None), (1.5, marrow, None)],
                           within=[muscle, vfat, fat, lung])
            if j < 4:
                costal = Tube(smooth_curve([pts[-1], (side * 40, -ay_w + 8, z0 - drop[-1] - 15),
                                         (side * 8, -ay_w + 10, z0 - drop[-1] - 20)], 5),
                           4.0, (1, 1, 1.5))
                c.paint(costal, cart, within=[muscle, vfat, fat])

    # --- liver with lobes ---------------------------------------------------------------
    def below_dome(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return z < _dome(x, y, right_dome, left_dome) - 3

    lsx, lsz = u(0.88, 1.12), u(0.85, 1.15)
    right_lobe = Blob((-58 * sx, 5 * sy, -62 * lsz), (72 * lsx * sx, 78 * sy, 78 * lsz),
                      (u(-10, 10), u(-5, 5), u(-8, 8)), random_harmonics(rng, 4, 0.07))
    left_lobe = Blob((u(5, 30), -48 * sy, -42 * lsz), (u(55, 75) * lsx, 32 * sy, 36 * lsz),
                     (u(-15, 5), 0, u(-15, 5)), random_harmonics(rng, 3, 0.08))
    caudate = Blob((-8, 22 * sy, -50 * lsz), (20, 17, 28), (0, 0, 0),
                   random_harmonics(rng, 2, 0.06))
    liver_shape = Union([right_lobe, left_lobe, caudate])
    c.paint(liver_shape, liver, _L["Liver"], within=[vfat], where=below_dome)

    # --- vessels: IVC, aorta, portal and hepatic veins ------------------------------
    ivc = Tube(smooth_curve([(-22, 28, 40), (-20, 22, -30), (-22, 25, -130), (-20, 30, -230)]),
               (12, 13, 12, 11), (1.25, 0.8, 1))
    c.paint(ivc, ivc_t, _L["V_Venacava_I"], within=[vfat, liver, muscle])
    bif = u(-215, -190)
    aorta = Union([
        Tube(smooth_curve([(22, 33, 80), (12, 20, -40), (6, 15, bif)]), (13, 12, 10)),
        *[Tube(smooth_curve([(6, 15, bif + 3), (s * 25, 15, bif - 30), (s * 45, 20, -290)]),
               (8, 7, 6)) for s in (-1, 1)],
    ])
    c.paint(aorta, aorta_t, _L["A_Aorta"], within=[vfat, muscle, lung])
    porta = np.array([u(-35, -25), -5.0, -75 * lsz])
    c.paint(Tube(smooth_curve(np.vstack([(5, 5, -105), (-10, 0, -90), porta])), 7.5), portal,
            within=[vfat, panc])
    branches = [(porta, np.array([-80 * sx, 5, -60 * lsz]), 6.0),
                (porta, np.array([25, -45 * sy, -45 * lsz]), 5.0)]
    for _ in range(2):
        new = []
        for a, b, r in branches:
            c.paint(Tube(np.array([a, b]), (r, r * 0.8)), portal, within=[liver])
            for _k in range(2):
                d = (b - a) / np.linalg.norm(b - a) + rng.normal(0, 0.7, 3)
                new.append((b, b + d / np.linalg.norm(d) * u(20, 40), r * 0.65))
        branches = new
    for a, b, r in branches:
        c.paint(Tube(np.array([a, b]), (r, r * 0.6)), portal, within=[liver])
    hv_root = np.array([-20.0, 24.0, -12 * lsz])
    for tip in ((-95 * sx, 5, -40 * lsz), (-40, -45 * sy, -35 * lsz), (30, -45 * sy, -25 * lsz)):
        mid = (hv_root + np.array(tip)) / 2 + rng.normal(0, 6, 3)
        c.paint(Tube(smooth_curve([hv_root, mid, tip], 4), (6.5, 4.5, 2)), hepatic,
                within=[liver, ivc_t])

    # --- gallbladder --------------------------------------------------------------------
    gb = Blob((u(-50, -35), -42 * sy, -92 * lsz), (u(12, 17), u(13, 18), u(25, 38)),
              (u(-20, 20), u(15, 40), 0), random_harmonics(rng, 2, 0.05))
    if rng.random() < 0.85:
        c.paint(gb, bile, _L["Gallbladder"], within=[liver, vfat])

    # --- liver tumours ------------------------------------------------------------------
    lesions = _paint_tumours(c, rng, liver_shape, liver_hu, [liver, portal, hepatic])

    # --- spleen, kidneys, pancreas, stomach ---------------------------------------------
    spleen = Difference(
        Blob((92 * sx, 52 * sy, -45), (u(26, 34), u(45, 62), u(45, 62)), (u(30, 50), 0, 0),
             random_harmonics(rng, 3, 0.06)),
        Blob((50 * sx, 15 * sy, -45), (45, 45, 70)))
    c.paint(spleen, spleen_t, _L["Spleen"], within=[vfat, lung], where=below_dome)
    for side, name, zc in ((1, "Kidney_L", u(-120, -100)), (-1, "Kidney_R", u(-140, -118))):
        center = np.array([side * 72 * sx, 52.0 * sy, zc])
        kid = Blob(center, (u(22, 27), u(25, 30), u(48, 58)),
                   (side * u(20, 40), u(-15, -5), side * u(-15, -5)),
                   random_harmonics(rng, 3, 0.04))
        c.paint_layers(kid, [(0, cortex, _L[name]), (7, medulla, None)],
                       within=[vfat, muscle, liver, spleen_t])
        hilum = center + np.array([-side * 18, -12, 0])
        c.paint(Blob(hilum, (12, 11, 26), (side * 30, 0, 0)), sinus_fat,
                within=[medulla, cortex])
        c.paint(Blob(hilum + np.array([-side * 3, -2, 0]), (6, 6, 14), (side * 30, 0, 0)), urine,
                within=[sinus_fat, medulla])
        c.paint(Tube([hilum, (side * 14, 20, zc + 5)], 5), ivc_t,  # renal vein
                within=[vfat])
        if rng.random() < 0.25:
            cyst_c = center + rng.normal(0, 12, 3)
            c.paint(Blob(cyst_c, (u(5, 15),) * 3), urine, within=[cortex, medulla])
    pancreas = Tube(smooth_curve([(-32, -5, -112), (0, -18, -98), (40, -2, -88),
                                  (78 * sx, 30 * sy, -78)]), (15, 12, 11, 9))
    c.paint(pancreas, panc, _L["Pancreas"], within=[vfat])

    stomach = Blob((55 * sx, -30 * sy, -40), (u(35, 50), u(28, 38), u(40, 55)),
                   (u(-40, -20), 0, u(-10, 10)), random_harmonics(rng, 3, 0.06))
    level = u(-60, -20) * sy
    c.paint_layers(stomach, [(0, wall, _L["Stomach"]), (4, oral if positive_oral else fluid,
                                                         None)],
                   within=[vfat, muscle])
    c.paint(stomach, gas, min_depth=4, within=[fluid, oral],
            where=lambda x, y, z: y < level)

    # --- bowel: colon with stool and gas, small-bowel loops ---------------------------
    mottle = WaveNoise(rng, 9.0, 12)
    colon = Tube(smooth_curve([(-80 * sx, 10, -245), (-88 * sx, 5, -170), (-82 * sx, -10, -125),
                               (-40, -70 * sy, -118), (20, -72 * sy, -112),
                               (85 * sx, 0, -80), (95 * sx, 25, -150), (90 * sx, 15, -215),
                               (55, -5, -260)], 5), (24, 22, 22, 20, 20, 21, 19, 18, 17))
    c.paint_layers(colon, [(0, wall, None), (3, stool, None)], within=[vfat])
    c.paint(colon, gas, min_depth=3, within=[stool],
            where=lambda x, y, z: (mottle(x, y, z) > 0.5) | (y < -75 * sy))
    lumen = oral if positive_oral else fluid
    for _ in range(rng.integers(12, 20)):
        start = np.array([u(-75, 75), u(-85, 15), u(-250, -120)])
        walk = [start]
        for _k in range(9):
            walk.append(walk[-1] + rng.normal(0, 16, 3))
        loop = Tube(smooth_curve(np.array(walk), 5), u(9, 13))
        c.paint_layers(loop, [(0, wall, None), (2.5, lumen, None)], within=[vfat])

    info = {"lesions": lesions, "positive_oral_contrast": positive_oral,
            "liver_hu": float(liver_hu)}
    log.debug("phantom.abdomen.built", extra=fields(lesions=len(lesions)))
    return info


def _paint_tumours(c: Canvas, rng: np.random.Generator, liver_shape: Union, liver_hu: float,
                   host: list[int]) -> list[dict[str, Any]]:
    """Paint 0-6 tumours inside the liver; return one record per painted lesion."""
    count = int(rng.choice([0, 1, 1, 2, 2, 3, 4, 5, 6]))
    lesions: list[dict[str, Any]] = []
    lo, hi = liver_shape.bounds()
    instances = np.zeros(c.grid.shape, dtype=np.uint8)
    attempts = 0
    while len(lesions) < count and attempts < 200:
        attempts += 1
        diameter = float(np.exp(rng.uniform(np.log(5.0), np.log(60.0))))
        r = diameter / 2
        centre = rng.uniform(lo, hi)
        d = liver_shape.depth(*(np.array([v], dtype=np.float32) for v in centre))[0]
        if d < min(0.7 * r, 25.0) + 2:
            continue
        kind = str(rng.choice(["hypodense", "hypodense", "hypodense", "cyst", "hyperdense",
                               "rim"]))
        if kind == "hypodense":
            hu = liver_hu - rng.uniform(30, 70)
        elif kind == "cyst":
            hu = rng.uniform(0, 20)
        elif kind == "hyperdense":
            hu = liver_hu + rng.uniform(20, 45)
        else:
            hu = liver_hu - rng.uniform(40, 75)
        idx = len(lesions) + 1
        t = c.tissue(f"tumour_{attempts}", hu, 3 if kind == "cyst" else rng.uniform(6, 14))
        blob = Blob(centre, r * rng.uniform(0.8, 1.2, 3), rng.uniform(-90, 90, 3),
                    random_harmonics(rng, 4, 0.02 if kind == "cyst" else 0.1))
        # tumours never overwrite each other: only liver tissue is repainted
        painted = c.paint(blob, t, 2, within=host)
        if painted is None:
            continue
        sl, mask = painted
        if kind == "rim" and r > 6:
            rim = c.tissue(f"tumour_{attempts}_rim", liver_hu + rng.uniform(10, 35), 8)
            found = c.evaluate(blob)
            if found is not None:
                depth = found[1]
                c.tissue_map[sl][mask & (depth < rng.uniform(2, 4))] = rim
        voxels = int(mask.sum())
        if voxels == 0:
            continue
        instances[sl][mask] = idx
        centre_world = c.pose.to_world(centre)
        lesions.append({"id": idx, "type": kind, "diameter_mm": round(diameter, 1),
                        "mean_hu": round(float(hu), 1),
                        "center_mm": [round(float(v), 1) for v in centre_world],
                        "voxels": voxels})
    c.instances = instances
    return lesions
