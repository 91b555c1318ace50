"""The head shared by the ``head`` and ``headneck`` phantoms: scalp, skull, brain, orbits.

Anatomical frame: ``z = 0`` at the centre of the orbits, the vertex near ``z = +118``;
``y`` grows to the back of the head, ``x`` to the patient's left. The skull is a
perturbed ellipsoidal vault with outer table, diploe and inner table, closed below by
a skull base stepped in three fossae (anterior, middle, posterior). The brain has a
grey-matter ribbon folded into gyri and sulci, white matter, deep grey nuclei, lateral,
third and fourth ventricles, cerebellum and brainstem; the orbits hold globes with
lenses, orbital fat and the optic nerves running back to the chiasm in the suprasellar
cistern. Sinuses, nasal cavity, mastoid air cells and petrous bones give the skull
base its bone/air pattern.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from dicomnode.phantoms.canvas import Canvas
from dicomnode.phantoms.shapes import (
    Blob,
    Outline,
    Shape,
    Tube,
    Union,
    WaveNoise,
    random_harmonics,
    smooth_curve,
)

log = logging.getLogger(__name__)

VAULT_CENTER = (0.0, 12.0, 25.0)
VAULT_RADII = (71.0, 90.0, 88.0)


def skull_floor(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Height of the inner skull base: anterior, middle and posterior fossae.

    The anterior fossa sits over the orbits, the middle fossa is deepest laterally
    (temporal lobes) with the sella raised in the midline, the posterior fossa is a
    bowl whose lowest point is the foramen magnum.
    """
    base = np.interp(y, [-120, -38, -28, 8, 22, 140], [16, 16, -14, -14, -40, -40])
    middle = (y > -34) & (y < 14)
    posterior = y >= 14
    ax = np.abs(x)
    lift = np.where(middle, 12.0 * np.exp(-((ax / 16.0) ** 2)),
                    np.where(posterior, (ax / 58.0) ** 2 * 24.0 + ((y - 45) / 70.0) ** 2 * 18.0,
                             0.0))
    return (base + lift).astype(np.float32)


@dataclass
class Cranium:
    """What the head builders need after the shared anatomy is painted."""

    inner_skull: Blob
    brain: Blob
    tissues: dict[str, int]
    sulci: WaveNoise
    ventricles: Union
    brainstem: Union
    scale: float
    atrophy: float


def _head_outline(rng: np.random.Generator, neck: bool, vault: np.ndarray) -> Outline:
    """Skin surface: vault ellipsoid, face with nose, and (optionally) the neck."""
    u = rng.uniform
    cx, cy, cz = VAULT_CENTER
    scalp = u(5.0, 7.0)
    ra, rb, rc = vault[0] + scalp, vault[1] + scalp, vault[2] + scalp
    rows: list[tuple[float, ...]] = []
    for z in (cz + rc - 0.5, cz + rc - 2, cz + rc - 5, 100, 90, 75, 60, 45, 30):
        f = np.sqrt(max(1 - ((z - cz) / rc) ** 2, 0.01))
        rows.append((z, cx, cy, ra * f, rb * f, 0, 0, 0, 0, 0, 0, u(0, 0.02), 0))
    nose = u(0.04, 0.08)
    rows += [
        (15, 0, 8, 76, 100, 0, -0.01, 0, 0, 0, 0, 0.01, 0),
        (0, 0, 6, 75, 101, 0, -0.03, -0.02, 0, 0, nose * 0.3, 0.0, 0),
        (-20, 0, 0, 72, 102, 0, -0.02, -0.04, 0, 0, nose, 0.0, 0),
        (-40, 0, -8, 70, 90, 0, 0, -0.05, 0, 0, nose * 0.4, 0.0, 0),
    ]
    if neck:
        rows += [
            (-60, 0, -10, 68, 84, 0, 0, -0.05, 0, 0, 0.02, 0, 0),
            (-80, 0, -8, 66, 80, 0, 0, -0.06, 0, 0, 0.01, 0, 0),
            (-100, 0, -2, 62, 72, 0, 0.02, -0.05, 0, 0, 0, 0.02, 0),
            (-120, 0, 5, 58, 62, 0, 0.03, -0.02, 0, 0, 0, 0.02, 0),
            (-170, 0, 8, 62, 60, 0, 0.02, 0.02, 0, 0, 0, 0.02, 0),
        ]
    else:
        rows += [(-70, 0, -8, 68, 84, 0, 0, -0.05, 0, 0, 0.02, 0, 0)]
    return Outline(rows)


def paint_cranium(c: Canvas, rng: np.random.Generator, labels: dict[str, int | None],
                  *, neck: bool) -> Cranium:
    """Paint scalp, skull, brain, ventricles, orbits, optic pathway and sinuses.

    Parameters
    ----------
    c
        Canvas to paint on.
    rng
        Random source of this case.
    labels
        Label value for ``Brain``, ``Ventricles``, ``Skull``, ``BrainStem``, ``Chiasm``,
        ``OpticNrv_L`` and ``OpticNrv_R`` (``None`` or missing: not labelled).
    neck
        Continue the skin outline down the neck (head-and-neck scans).
    """
    u = rng.uniform

    def lab(name: str) -> int | None:
        return labels.get(name)

    skin = c.tissue("skin", u(25, 50), 8)
    fat = c.tissue("fat", u(-100, -75), 14)
    muscle = c.tissue("muscle", u(45, 60), 8)
    cortical = c.tissue("cortical_bone", u(1300, 1900), 120)
    diploe = c.tissue("diploe", u(500, 900), 120)
    csf = c.tissue("csf", u(2, 12), 3)
    gm = c.tissue("grey_matter", u(36, 42), 2.5)
    wm = c.tissue("white_matter", gm_hu := c.tissues[gm].hu - u(6, 10), 2.0)
    deep_gm = c.tissue("deep_grey", c.tissues[gm].hu - u(0, 3), 2.0)
    stem = c.tissue("brainstem", gm_hu + u(0, 3), 2.0)
    cereb = c.tissue("cerebellum", c.tissues[gm].hu + u(-2, 2), 3.0)
    falx = c.tissue("falx", u(42, 58), 3)
    air = c.tissue("sinus_air", u(-1000, -960), 10)
    orbital_fat = c.tissue("orbital_fat", u(-95, -70), 10)
    vitreous = c.tissue("vitreous", u(5, 15), 3)
    lens = c.tissue("lens", u(90, 130), 5)
    sclera = c.tissue("sclera", u(45, 65), 5)
    nerve = c.tissue("optic_nerve", u(30, 40), 3)
    pituitary = c.tissue("pituitary", u(40, 60), 4)

    scale = 1.0
    atrophy = u(0.0, 1.0)
    harm = random_harmonics(rng, 4, 0.035, 2.0)
    vr = np.array(VAULT_RADII) * rng.uniform(0.95, 1.05, 3)
    thick = u(5.5, 8.0)

    # scalp and soft tissues
    outline = _head_outline(rng, neck, vr)
    c.paint_layers(outline, [(0, skin, None), (2.0, fat, None), (u(4.5, 6.5), muscle, None)])

    # skull: outer table, diploe, inner table, cavity
    floor_drop = u(7.0, 10.0)

    def above(offset: float) -> Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]:
        return lambda x, y, z: z > skull_floor(x, y) - offset

    outer = Blob(VAULT_CENTER, vr, (0, 0, 0), harm)
    # vault and skull base: the bone reaches ``floor_drop`` mm below the middle and
    # posterior fossae, and only a thin orbital roof lies under the anterior fossa
    def base_plate(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        drop = np.where(y < -34, 3.5, floor_drop).astype(np.float32)
        return z > skull_floor(x, y) - drop

    c.paint_layers(outer, [(0, cortical, lab("Skull")), (1.8, diploe, None)],
                   where=base_plate)
    inner_table = Blob(VAULT_CENTER, vr - thick + 1.8, (0, 0, 0), harm)
    c.paint(inner_table, cortical, where=above(1.8))
    inner = Blob(VAULT_CENTER, vr - thick, (0, 0, 0), harm)
    c.paint(inner, csf, 0, where=above(0))

    # frontal sinus in the thick frontal bone
    fs = Blob((0, VAULT_CENTER[1] - vr[1] + 4, u(25, 40)), (u(9, 16), 5, u(8, 13)), (0, 0, 0),
              random_harmonics(rng, 2, 0.1))
    if rng.random() < 0.85:
        c.paint(fs, air, 0 if lab("Skull") else None, within=[diploe, cortical])

    # brain: cortex ribbon with gyri and sulci, white matter
    gap = 0.8 + 1.6 * atrophy
    brain = Blob(VAULT_CENTER, vr - thick - gap, (0, 0, 0), harm)
    sulci = WaveNoise(rng, u(20, 26), 16)
    sulcus_w = 0.10 + 0.10 * atrophy

    def brain_region(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return z > skull_floor(x, y) + 1.0

    found = c.block(*brain.bounds())
    if found is not None:
        sl, ax, ay, az = found
        depth = brain.depth(ax, ay, az)
        region = (depth > 0) & brain_region(ax, ay, az)
        n = sulci(ax, ay, az)
        ribbon = 2.8 + 1.2 * np.abs(n)
        is_gm = region & ((depth < ribbon) | ((np.abs(n) < sulcus_w + 0.28) & (depth < 20)))
        is_sulcus = region & (np.abs(n) < sulcus_w) & (depth < 16)
        fissure = region & (np.abs(ax) < 1.2 + 1.5 * atrophy) & (depth < 45)
        falx_mask = region & (np.abs(ax) < 0.45) & (depth < 40)
        tmap, lmap = c.tissue_map[sl], c.labels[sl]
        tmap[region] = wm
        tmap[is_gm] = gm
        brain_label = lab("Brain")
        if brain_label is not None:
            lmap[region] = brain_label
        tmap[is_sulcus | fissure] = csf
        tmap[falx_mask] = falx
        lmap[is_sulcus | fissure | falx_mask] = 0

    # cerebellum below the tentorium with fine folia
    folia = WaveNoise(rng, 7.0, 10)

    def infratentorial(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return (z < -0.35 * (y - 20) + 2) & (y > 12) & (z > skull_floor(x, y) + 1.0)

    cb = c.paint(brain, cereb, lab("Brain"), where=infratentorial, within=[gm, wm, csf, falx])
    if cb is not None:
        sl, mask = cb
        found = c.block(*brain.bounds())
        if found is not None:
            _, ax, ay, az = found
            cleft = mask & (np.abs(folia(ax, ay, az)) < 0.12 + 0.1 * atrophy)
            c.tissue_map[sl][cleft] = csf
            c.labels[sl][cleft] = 0

    # deep grey nuclei and ventricles
    vs = u(0.75, 1.1) + 0.5 * atrophy
    for s in (-1, 1):
        c.paint(Blob((s * 14, -22, 36), (7, 12, 10), (s * 10, 0, 0)), deep_gm,
                within=[wm, gm])  # caudate head
        c.paint(Blob((s * 11, 8, 28), (10, 14, 10), (0, 0, 0)), deep_gm,
                within=[wm, gm])  # thalamus
        c.paint(Blob((s * 24, -8, 26), (6, 17, 11), (s * -8, 0, 0)), deep_gm,
                within=[wm, gm])  # lentiform nucleus
    parts: list[Shape] = []
    for s in (-1, 1):
        body = smooth_curve([(s * 9, -32, 36), (s * 12, -10, 44), (s * 16, 20, 44),
                             (s * 22, 40, 34), (s * 20, 62, 30)], 6)
        parts.append(Tube(body, np.array([4.5, 4.0, 4.0, 7.0, 3.0]).repeat(6)[: len(body)] * vs,
                          (1.0, 1.0, 1.5)))
        temporal = smooth_curve([(s * 22, 38, 33), (s * 30, 22, 12), (s * 32, 2, 2)], 6)
        parts.append(Tube(temporal, np.linspace(5, 2.2, len(temporal)) * vs))
    parts.append(Blob((0, 2, 24), (1.5 + 1.5 * atrophy, 14, 9)))  # third ventricle
    parts.append(Blob((0, 34, -18), (6, 4, 9), (0, -20, 0)))  # fourth ventricle
    ventricles = Union(parts)
    c.paint(ventricles, csf, lab("Ventricles") or 0, within=[wm, gm, deep_gm, csf, cereb, falx])
    if rng.random() < 0.5:
        calc = c.tissue("choroid_calcification", u(120, 300), 20)
        for s in (-1, 1):
            c.paint(Blob((s * 22, 40, 34), (2.5, 3.5, 2.5)), calc, None)

    # basal cisterns, brainstem, pituitary, sphenoid sinus
    c.paint(Blob((0, -8, 6), (11, 8, 5)), csf, 0, within=[wm, gm, deep_gm, falx, diploe])
    c.paint(Blob((0, 20, -22), (12, 12, 26)), csf, 0, within=[wm, gm, cereb, deep_gm])
    # foramen magnum: the opening in the posterior fossa floor for the medulla
    c.paint(Blob((0, 32, -46), (15, 18, 14)), csf, 0, within=[diploe, cortical, muscle, fat])
    brainstem = Union([
        Tube(smooth_curve([(0, 30, -62), (0, 26, -42), (0, 22, -22), (0, 16, -2), (0, 10, 14)],
                          5), (8.5, 10, 12, 11, 10)),
        Blob((0, 16, -20), (14, 12, 13)),  # pons belly
    ])
    c.paint(brainstem, stem, lab("BrainStem") or lab("Brain"),
            within=[csf, wm, gm, cereb, deep_gm, diploe, muscle, fat])
    c.paint(Blob((0, -9, -4), (6, 5, 4)), pituitary, None, within=[diploe, cortical, csf])
    c.paint(Blob((0, -24, -12), (12, 11, 10), (0, 0, 0), random_harmonics(rng, 2, 0.1)), air,
            None, within=[diploe, cortical, muscle])

    # orbits: bony cone, fat, globe with lens; optic nerves and chiasm
    for s, name in ((-1, "OpticNrv_R"), (1, "OpticNrv_L")):
        # OpticNrv_R lies on the patient's right (negative x)
        centre = np.array([s * 33.0, -62.0, 0.0])
        c.paint_layers(Blob(centre + np.array([0, 8, 0]), (20, 28, 16), (s * 12, 0, 0)),
                       [(0, cortical, None), (2.2, orbital_fat, None)],
                       within=[muscle, fat, diploe, cortical, skin, csf, wm, gm])
        globe_c = centre + np.array([0, -12, 0])
        c.paint_layers(Blob(globe_c, (12, 12, 12)), [(0, sclera, None), (1.2, vitreous, None)])
        c.paint(Blob(globe_c + np.array([0, -9.5, 0]), (4.5, 1.8, 4.5)), lens)
        path = smooth_curve([globe_c + np.array([0, 11.5, 0]), (s * 28, -42, 3), (s * 17, -28, 6),
                             (s * 8, -15, 8)], 5)
        c.paint(Tube(path, 2.1), nerve, lab(name), within=[orbital_fat, cortical, diploe, csf,
                                                          gm, wm, sclera, muscle])
    c.paint(Blob((0, -11, 8), (7.5, 4.5, 2.0)), nerve, lab("Chiasm"),
            within=[csf, wm, gm, nerve])
    for s in (-1, 1):
        c.paint(Tube([(s * 5, -8, 9), (s * 14, 4, 11)], 1.8), nerve, lab("Brain"),
                within=[csf, wm, gm])

    # sinuses, nasal cavity, zygoma, petrous bones and mastoids
    mottle = WaveNoise(rng, 6.0, 12)
    def septa(x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        return mottle(x, y, z) > -0.35
    for s in (-1, 1):
        # maxillary sinus: air inside a thin bony wall
        c.paint_layers(Blob((s * 28, -58, -30), (16, 18, 20), (0, 0, 0),
                            random_harmonics(rng, 2, 0.08)),
                       [(0, cortical, None), (1.6, air, None)], within=[muscle, diploe, fat])
        c.paint(Tube([(s * 44, -62, -14), (s * 60, -20, -16), (s * 58, 2, -18)], 4.0,
                     (1, 1, 1.6)), cortical, within=[muscle, fat])
        petrous = Blob((s * 36, 18, -20), (30, 9, 9), (s * -40, 0, 0))
        c.paint(petrous, cortical, lab("Skull"), within=[csf, muscle, diploe, cereb, wm, gm, fat])
        mastoid = Blob((s * 50, 30, -26), (12, 14, 14))
        c.paint_layers(mastoid, [(0, cortical, lab("Skull")), (2, diploe, None)],
                       within=[muscle, fat, diploe, csf, cereb])
        c.paint(mastoid, air, None, min_depth=2.5, within=[diploe], where=septa)
    nasal = Blob((0, -68, -24), (10, 28, 26), (0, 0, 0), random_harmonics(rng, 2, 0.06))
    c.paint(Blob((0, -68, -24), (12, 29, 27)), cortical, None, within=[muscle, fat])
    c.paint(nasal, air, None, within=[muscle, diploe, cortical],
            where=lambda x, y, z: (np.abs(x) > 1.2) & (mottle(x, y, z) > -0.6))
    ethmoid = Blob((0, -55, 2), (10, 18, 14))
    c.paint(ethmoid, air, None, within=[diploe, cortical, muscle, orbital_fat], where=septa)

    return Cranium(inner_skull=inner, brain=brain,
                   tissues={"csf": csf, "gm": gm, "wm": wm, "deep_gm": deep_gm, "cereb": cereb,
                            "falx": falx, "stem": stem, "cortical": cortical,
                            "diploe": diploe, "muscle": muscle, "fat": fat, "skin": skin,
                            "air": air, "nerve": nerve},
                   sulci=sulci, ventricles=ventricles, brainstem=brainstem, scale=scale,
                   atrophy=atrophy)
