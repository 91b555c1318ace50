"""How stable the node's radiomics features are under scanner shifts.

For the liver lesions of the held-out phantoms (seeds 0-19 by default), the features are
computed by the node's own extraction (:func:`dicomnode.results.radiomics.structure_features`,
the default settings: 1 mm isotropic, bin width 25 HU from -1000 HU, 3D volume merge)
on each lesion's ground-truth mask (not a segmentation: the shifts change only the
CT), on the phantom as it is and as :func:`dicomnode.nn.evaluate.perturb` shows it
(+-30 HU, doubled noise, softer and sharper kernel). A feature value is "stable" under
a shift when it changes by less than 10 % (relative to the original value; a value of
0 must stay 0). The table gives the share of stable (lesion, feature) values per shift
and family, and the features stable for at least 90 % of lesions under every shift.

Run: ``OMP_NUM_THREADS=1 nice python -m benchmarks.radiomics_stability [--seeds 0-19]
[--matrix 256]``; it prints a Markdown table for ``benchmarks/README.md``.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from collections import defaultdict
from typing import Any

import numpy as np
from scipy import ndimage

from dicomnode.nn.evaluate import PERTURBATIONS, perturb
from dicomnode.nn.liver_tumor import LiverTumorRecipe
from dicomnode.results.radiomics import RadiomicsParameters, structure_features

#: A value that changes by less than this share of itself is stable.
THRESHOLD = 0.10


def _seeds(text: str) -> list[int]:
    first, _, last = text.partition("-")
    return list(range(int(first), int(last or first) + 1))


def lesion_features(seed: int, matrix: int, parameters: RadiomicsParameters) -> dict[str, Any]:
    """Features of each ground-truth lesion of one phantom, unperturbed and per shift."""
    recipe = LiverTumorRecipe()
    case = recipe.phantom_case(seed, matrix=matrix)
    if case.instances is not None:
        instances = case.instances
    else:
        instances, _ = ndimage.label(case.labels == 2, structure=np.ones((3, 3, 3), bool))
    variants = {"original": case, **{kind: perturb(case, kind, noise_hu=recipe.phantom_noise_hu,
                                                   seed=seed) for kind in PERTURBATIONS}}
    out: dict[str, Any] = {}
    for number, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is None:
            continue
        mask = instances[box] == number
        if mask.sum() < 8:  # a lesion of a few voxels has no texture to speak of
            continue
        out[f"{seed}:{number}"] = {
            name: {f.name: (f.family, f.value) for f in structure_features(
                variant.hu, mask, box, case.spacing, parameters)}
            for name, variant in variants.items()}
    return out


def _short(name: str) -> str:
    """A MIRP column without its settings suffix (``cm_joint_avg``)."""
    return re.sub(r"(_d1)?(_3d(_v_mrg)?)?(_fbs_w[0-9.]+)?$", "", name)


def summarise(results: dict[str, Any]) -> str:
    """The Markdown table of stable shares."""
    stable: dict[tuple[str, str], list[bool]] = defaultdict(list)
    per_feature: dict[str, dict[str, list[bool]]] = defaultdict(lambda: defaultdict(list))
    families: dict[str, str] = {}
    for lesion in results.values():
        original = lesion["original"]
        for kind in PERTURBATIONS:
            for name, (family, value) in original.items():
                families[name] = family
                other = lesion[kind].get(name, (family, float("nan")))[1]
                ok = (other == value) if value == 0 else (
                    bool(np.isfinite(other)) and abs(other - value) < THRESHOLD * abs(value))
                stable[(kind, family)].append(ok)
                stable[(kind, "all")].append(ok)
                per_feature[name][kind].append(ok)
    names = ["all", *dict.fromkeys(families.values())]
    lines = ["| shift | " + " | ".join(names) + " |",
             "| --- | " + " | ".join("---:" for _ in names) + " |"]
    for kind in PERTURBATIONS:
        cells = [f"{100 * np.mean(stable[(kind, n)]):.0f} %" for n in names]
        lines.append(f"| {kind} | " + " | ".join(cells) + " |")
    robust = sorted(n for n, kinds in per_feature.items()
                    if all(np.mean(kinds[k]) >= 0.9 for k in PERTURBATIONS))
    lines += ["", f"Stable (< 10 % change) for >= 90 % of lesions under every shift "
              f"({len(robust)} of {len(per_feature)}): "
              + ", ".join(f"`{_short(n)}`" for n in robust)]
    return "\n".join(lines)


def main() -> None:
    """Compute and print the stability table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", default="0-19")
    parser.add_argument("--matrix", type=int, default=256)
    parser.add_argument("--json", default=None, help="Also write the raw values here.")
    args = parser.parse_args()
    parameters = RadiomicsParameters()
    started = time.perf_counter()
    results: dict[str, Any] = {}
    for seed in _seeds(args.seeds):
        results.update(lesion_features(seed, args.matrix, parameters))
        print(f"seed {seed}: {len(results)} lesions so far, "
              f"{time.perf_counter() - started:.0f} s", flush=True)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(results, fh)
    print(f"\n{len(results)} lesions of seeds {args.seeds} (matrix {args.matrix}), "
          f"settings {parameters.to_dict()}\n")
    print(summarise(results))


if __name__ == "__main__":
    main()
