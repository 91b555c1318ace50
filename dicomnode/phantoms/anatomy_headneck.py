"""Head-and-neck radiotherapy planning CT with the nine MICCAI 2015 organs at risk.

The head (skull, brain, brainstem, orbits, optic nerves, chiasm, sinuses) comes from
:mod:`dicomnode.phantoms.anatomy_cranium`; this module adds the face and the upper
neck: hard palate and teeth, mandible (body, angles, rami, condyles and coronoid
processes), tongue, masseter and pterygoid muscles, parotid glands behind the rami,
submandibular glands under the mandible, pharynx and larynx air column, hyoid,
thyroid cartilage, carotid arteries and jugular veins, cervical vertebrae with the
spinal cord. The scan runs from the vertex to about 5 cm below the mandible.

Anatomical frame as in the cranium: ``z = 0`` at the orbits, ``y`` to the back.
The chiasm (about 15 x 9 x 4 mm) and optic nerves (about 4 mm across) are small and
thin, as in life; the glands vary in size, fat content and enhancement per case.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from dicomnode.logs import fields
from dicomnode.phantoms.anatomy_cranium import paint_cranium
from dicomnode.phantoms.canvas import Canvas
from dicomnode.phantoms.shapes import Blob, Outline, Tube, random_harmonics, smooth_curve

log = logging.getLogger(__name__)

#: Label values of the head-and-neck phantom: the MICCAI 2015 organs at risk.
LABELS: dict[int, str] = {
    1: "BrainStem",
    2: "Chiasm",
    3: "Mandible",
    4: "OpticNrv_L",
    5: "OpticNrv_R",
    6: "Parotid_L",
    7: "Parotid_R",
    8: "Glnd_Submand_L",
    9: "Glnd_Submand_R",
}
_L = {v: k for k, v in LABELS.items()}

#: Scanned range in anatomical z (mm): vertex to below the mandible.
Z_RANGE: tuple[float, float] = (-150.0, 128.0)


def build(canvas: Canvas, rng: np.random.Generator) -> dict[str, Any]:
    """Paint one head-and-neck case."""
    c = canvas
    u = rng.uniform
    labels: dict[str, int | None] = {k: v for k, v in _L.items()}
    cr = paint_cranium(c, rng, labels, neck=True)
    t = cr.tissues
    muscle, fat, cortical, air = t["muscle"], t["fat"], t["cortical"], t["air"]
    marrow = c.tissue("marrow", u(250, 450), 60)
    enamel = c.tissue("enamel", u(2200, 2900), 150)
    contrast = rng.random() < 0.5
    artery = c.tissue("artery", u(180, 300) if contrast else u(35, 50), 5)
    vein = c.tissue("vein", u(120, 200) if contrast else u(35, 50), 5)
    tongue = c.tissue("tongue", u(60, 80), 8)
    cartilage = c.tissue("cartilage", u(100, 350), 60)
    cord = c.tissue("spinal_cord", u(30, 40), 3)
    csf = t["csf"]
    disc = c.tissue("disc", u(70, 100), 8)
    soft = [muscle, fat, t["skin"]]

    # --- fat planes of the face and neck --------------------------------------------
    for s in (-1, 1):
        c.paint(Blob((s * 26, 0, -52), (8, 12, 20), (0, 0, 0), random_harmonics(rng, 2, 0.1)),
                fat, within=[muscle])  # parapharyngeal space
        c.paint(Blob((s * 42, 28, -125), (14, 16, 30), (0, 0, 0),
                     random_harmonics(rng, 2, 0.1)), fat, within=[muscle])  # posterior triangle
    c.paint(Blob((0, -40, -108), (20, 14, 8), (0, 0, 0), random_harmonics(rng, 2, 0.1)), fat,
            within=[muscle])  # submental fat

    # --- cervical spine and spinal cord -----------------------------------------------
    canal = Outline([(-175, 0, 40, 11, 10), (-50, 0, 36, 13, 12)])
    c.paint(canal, csf, within=soft)
    c.paint(Tube(smooth_curve([(0, 30, -62), (0, 38, -100), (0, 40, -175)]), (6, 5.5, 5)),
            cord, None, within=[csf])
    c.paint_layers(Blob((0, 24, -55), (26, 22, 6)), [(0, cortical, None), (2, marrow, None)],
                   within=soft)  # atlas
    c.paint(Blob((0, 36, -55), (12, 11, 8)), csf, within=[marrow, cortical])
    c.paint_layers(Tube([(0, 22, -70), (0, 22, -48)], 5.5), [(0, cortical, None),
                                                              (1.5, marrow, None)],
                   within=[*soft, csf])  # dens
    for zc in np.arange(-72.0, -180.0, -u(18, 21)):
        c.paint_layers(Outline([(zc - 7, 0, 22, 15, 12, 0, -0.06), (zc + 7, 0, 22, 15, 12, 0,
                                                                      -0.06)]),
                       [(0, cortical, None), (1.5, marrow, None)], within=soft)
        c.paint(Outline([(zc + 7, 0, 22, 15, 12), (zc + 11, 0, 22, 15, 12)]), disc, within=soft)
        arch = Tube(smooth_curve([(-9, 32, zc), (-15, 42, zc), (-8, 53, zc), (0, 55, zc),
                                  (8, 53, zc), (15, 42, zc), (9, 32, zc)], 4), 3.5, (1, 1, 2))
        c.paint_layers(arch, [(0, cortical, None), (1.5, marrow, None)], within=soft)
        c.paint_layers(Tube([(0, 54, zc), (0, 72, zc - 6)], 3.5, (1, 1, 2)),
                       [(0, cortical, None), (1.5, marrow, None)], within=soft)
        for s in (-1, 1):
            c.paint(Tube([(s * 14, 24, zc), (s * 28, 28, zc)], 4, (1, 1, 1.5)), cortical,
                    within=soft)

    # --- palate, teeth, tongue, masticators ---------------------------------------------
    c.paint(Blob((0, -60, -42), (24, 26, 3.5)), cortical, within=[*soft, air])
    upper_arch = smooth_curve([(-26, -38, -50), (-24, -66, -50), (0, -84, -50), (24, -66, -50),
                               (26, -38, -50)], 6)
    c.paint(Tube(upper_arch, 4.5, (1, 1, 2.2)), enamel, within=[*soft, air])
    c.paint(Blob((0, -48, -68), (24, 34, 17), (0, 0, 0), random_harmonics(rng, 2, 0.05)),
            tongue, within=soft)
    for s in (-1, 1):
        c.paint(Blob((s * 56, -8, -58), (8, 17, 28), (0, 0, 0), random_harmonics(rng, 2, 0.06)),
                muscle, within=[fat, muscle])  # masseter
        c.paint(Blob((s * 34, -6, -62), (7, 14, 22), (s * 10, 0, 0)), muscle,
                within=[fat, muscle])  # medial pterygoid

    # --- mandible: body, angles, rami, condyles, coronoid processes --------------------
    ms = u(0.92, 1.08)
    body_pts = smooth_curve([(-47 * ms, 2, -84), (-42 * ms, -38, -82), (-26 * ms, -70, -84),
                             (0, -84 * ms, -87), (26 * ms, -70, -84), (42 * ms, -38, -82),
                             (47 * ms, 2, -84)], 6)
    mand = c.paint(Tube(body_pts, u(5.5, 6.5), (1, 1, 2.6)), cortical, _L["Mandible"],
                   within=[*soft, tongue, fat])
    c.paint(Tube(body_pts, 3.8, (1, 1, 3.4)), marrow, None, within=[cortical])
    lower_arch = smooth_curve([(-36 * ms, -40, -64), (-22 * ms, -68, -64), (0, -80 * ms, -65),
                               (22 * ms, -68, -64), (36 * ms, -40, -64)], 6)
    c.paint(Tube(lower_arch, 4.2, (1, 1, 2.0)), enamel, 0, within=[*soft, tongue])
    for s in (-1, 1):
        ramus = smooth_curve([(s * 47 * ms, 0, -86), (s * 48 * ms, 2, -58), (s * 49 * ms, 8, -32),
                              (s * 50 * ms, 11, -20)], 5)
        c.paint_layers(Tube(ramus, 4.2, (1, 3.2, 1)), [(0, cortical, _L["Mandible"]),
                                                        (1.8, marrow, None)],
                       within=[*soft, tongue])
        c.paint_layers(Blob((s * 51 * ms, 12, -16), (9, 6, 6)), [(0, cortical, _L["Mandible"]),
                                                                (1.8, marrow, None)],
                       within=soft)  # condyle
        c.paint(Tube([(s * 47 * ms, -8, -56), (s * 43 * ms, -20, -32)], (4, 2.5), (1, 1.6, 1)),
                cortical, _L["Mandible"], within=soft)  # coronoid

    # --- salivary glands ------------------------------------------------------------------
    parotid_hu = u(-35, 30)
    parotid = c.tissue("parotid", parotid_hu, u(10, 18))
    submand = c.tissue("submandibular", u(35, 55) + (u(20, 40) if contrast else 0), 7)

    def gland(name: str, tissue: int) -> tuple[int, int | None]:
        # a resected gland's bed fills with the patient's fat, unlabelled (the shapes are
        # drawn either way, so the other organs of a seed stay the same)
        return (fat, None) if name in c.resected else (tissue, _L[name])

    for s, side in ((1, "L"), (-1, "R")):
        pr = np.array([u(11, 15), u(13, 18), u(18, 25)])
        par = Blob((s * 47, 17, -44), pr, (s * u(10, 30), 0, 0), random_harmonics(rng, 4, 0.1))
        gr = np.array([u(8, 12), u(11, 16), u(8, 12)])
        sub = Blob((s * 31, -22, -97), gr, (s * u(-20, 10), 0, 0), random_harmonics(rng, 3, 0.08))
        tissue, label = gland(f"Parotid_{side}", parotid)
        c.paint(par, tissue, label, within=[muscle, fat])
        # deep lobe reaching medially behind the ramus
        c.paint(Blob((s * 38, 10, -48), pr * (0.5, 0.5, 0.6)), tissue, label,
                within=[muscle, fat])
        c.paint(sub, *gland(f"Glnd_Submand_{side}", submand), within=[muscle, fat])

    # --- airway, hyoid, larynx, vessels -------------------------------------------------
    airway = smooth_curve([(0, -38, -30), (0, -20, -40), (0, -10, -58), (0, -8, -80),
                           (0, -10, -100), (0, -22, -125), (0, -26, -175)], 5)
    radii = np.interp(np.linspace(0, 1, len(airway)), [0, 0.3, 0.6, 0.8, 1],
                      [8, 7, 6, 7, 8]) * u(0.7, 1.2)
    c.paint(Tube(airway, radii, (1.5, 1, 1)), air, within=[*soft, tongue])
    hyoid = smooth_curve([(-20, -6, -112), (-12, -24, -114), (0, -30, -115), (12, -24, -114),
                          (20, -6, -112)], 5)
    c.paint(Tube(hyoid, 2.5, (1, 1, 2)), cortical, within=soft)
    for s in (-1, 1):
        c.paint(Tube([(s * 18, -12, -140), (0, -40, -140)], 1.6, (1, 1, 12)), cartilage,
                within=soft)
        c.paint(Tube(smooth_curve([(s * 20, 8, -30), (s * 24, 4, -90), (s * 22, 2, -175)]),
                     3.5), artery, within=[muscle, fat])
        c.paint(Tube(smooth_curve([(s * 30, 14, -30), (s * 32, 10, -90), (s * 30, 6, -175)]),
                     u(4.5, 7)), vein, within=[muscle, fat])
    log.debug("phantom.headneck.built", extra=fields(mandible=mand is not None))
    return {"iv_contrast": contrast, "parotid_hu": round(parotid_hu, 1),
            "atrophy": round(cr.atrophy, 2)}
