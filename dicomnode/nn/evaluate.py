"""Evaluation of the liver/tumour segmenter on cases with ground truth.

Per case: liver Dice (liver including tumours, the LiTS convention); tumour Dice
restricted to tumours whose longest axial diameter, measured on the truth mask, is at
least ``min_diameter_mm`` (ground truth: those tumours;
prediction: every predicted tumour component except those touching only smaller true
tumours); lesion detection (a true tumour >= ``min_diameter_mm`` counts as detected when
a predicted tumour voxel overlaps it); false-positive components (predicted tumour
components touching no true tumour).

Over cases, tumour Dice is reported the two ways of the LiTS benchmark (Bilic et al.,
Medical Image Analysis 2023): *Dice per case*, the mean of the per-case scores
(``tumour_dice_mean``; every case weighs the same, so a small missed tumour costs as much
as a large one), and *Dice global*, one Dice over the voxels of those cases pooled
(``tumour_dice_global``; large tumours dominate). The smallest per-case score and the
fraction of cases at 0.75 or more are reported as well.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from dicomnode.nn import datasets
from dicomnode.nn.liver25d import TUMOUR, LiverTumorSegmenter, _longest_axial_diameter

log = logging.getLogger(__name__)

_CONNECT = np.ones((3, 3, 3), dtype=bool)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def _true_lesions(case: datasets.Case) -> tuple[np.ndarray, dict[int, float]]:
    """Instance map of the true tumours and each one's longest axial diameter (mm).

    The diameter is measured on the painted truth mask (RECIST style), not taken from
    the phantom's nominal size: a nominal 15 mm tumour clipped by vessels or the liver
    edge can be a few voxels in the label map.
    """
    tumour = case.labels == TUMOUR
    if case.instances is not None and case.instances.shape == tumour.shape:
        instances = np.where(tumour, case.instances, 0).astype(np.int32)
    else:
        instances, _ = ndimage.label(tumour, structure=_CONNECT)
    sizes = {}
    for index, box in enumerate(ndimage.find_objects(instances), start=1):
        if box is not None:
            sizes[index] = _longest_axial_diameter(instances[box] == index, case.spacing)
    return instances, sizes


def score_case(pred: np.ndarray, case: datasets.Case, *,
               min_diameter_mm: float = 10.0) -> dict[str, Any]:
    """Scores of one predicted label map against its case's truth."""
    instances, diameters = _true_lesions(case)
    big_ids = [i for i, d in diameters.items() if d >= min_diameter_mm]
    big = np.isin(instances, big_ids) if big_ids else np.zeros(pred.shape, dtype=bool)
    small = (instances > 0) & ~big
    pred_tumour = pred == TUMOUR
    comps, count = ndimage.label(pred_tumour, structure=_CONNECT)
    keep = np.zeros(pred.shape, dtype=bool)
    false_positives = 0
    for index, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        comp = comps[box] == index
        touches_big = bool((big[box] & comp).any())
        touches_small = bool((small[box] & comp).any())
        if not touches_big and not touches_small:
            false_positives += 1
        if touches_big or not touches_small:
            keep[box] |= comp
    detected = [i for i in big_ids if bool(pred_tumour[instances == i].any())]
    result: dict[str, Any] = {
        "case": case.name,
        "liver_dice": round(dice(pred > 0, case.labels > 0), 4),
        "true_lesions": len(diameters), "true_lesions_ge_min": len(big_ids),
        "detected_ge_min": len(detected), "predicted_lesions": int(count),
        "false_positive_lesions": false_positives,
    }
    result["tumour_dice_ge_min"] = round(dice(keep, big), 4) if big_ids else None
    # the voxel counts behind that Dice, pooled over cases for LiTS's Dice global
    result["tumour_voxels"] = [int((keep & big).sum()), int(keep.sum()), int(big.sum())]
    return result


def evaluate_cases(segmenter: LiverTumorSegmenter, cases: Iterable[datasets.Case], *,
                   min_diameter_mm: float = 10.0) -> dict[str, Any]:
    """Segment and score every case.

    Returns
    -------
    dict
        ``cases`` (per-case scores, seconds) and ``summary``: mean and minimum liver Dice,
        mean/minimum tumour Dice over cases with a tumour >= ``min_diameter_mm`` and the
        fraction of those at >= 0.75, detection recall, false positives per case.
    """
    rows = []
    for case in cases:
        started = time.perf_counter()
        seg = segmenter.segment(case.hu, case.spacing)
        row = score_case(seg.labels, case, min_diameter_mm=min_diameter_mm)
        row["seconds"] = round(time.perf_counter() - started, 2)
        rows.append(row)
        log.info("evaluate.case", extra={"dn_fields": row})
    return {"cases": rows, "summary": summarise(rows, min_diameter_mm)}


#: Tumour-probability thresholds tried on validation cases (None: the most probable class).
TUMOUR_THRESHOLDS: tuple[float | None, ...] = (None, 0.5, 0.4, 0.3, 0.2)
#: Smallest kept tumour islands (ml) tried on validation cases.
MIN_TUMOUR_ML: tuple[float, ...] = (0.2, 0.1, 0.05)


def _rule_name(threshold: float | None, min_tumour_ml: float) -> str:
    return f"{'argmax' if threshold is None else threshold} / {min_tumour_ml} ml"


def choose_tumour_rule(segmenter: LiverTumorSegmenter, cases: Iterable[datasets.Case],
                            candidates: Sequence[float | None] = TUMOUR_THRESHOLDS,
                            min_tumour_mls: Sequence[float] = MIN_TUMOUR_ML, *,
                            min_diameter_mm: float = 10.0) -> dict[str, Any]:
    """Pick the tumour threshold and smallest tumour island that score best on validation.

    The networks run once per case; each (threshold, island size) rule labels the same
    probabilities. The score is mean tumour Dice plus detection recall (tumours >=
    ``min_diameter_mm``); ties go to the higher threshold, then the larger island
    (fewer false positives). The cases must be neither training nor held-out test
    cases.

    Returns
    -------
    dict
        ``threshold`` and ``min_tumour_ml`` (the choice) and ``candidates``: the summary
        of every rule, keyed ``"THRESHOLD / ML ml"``.
    """
    rules = [(c, m) for c in candidates for m in min_tumour_mls]
    rows: dict[tuple[float | None, float], list[dict[str, Any]]] = {r: [] for r in rules}
    for case in cases:
        started = time.perf_counter()
        segs = segmenter.segment_rules(case.hu, case.spacing, rules)
        seconds = round(time.perf_counter() - started, 2)
        for rule, seg in zip(rules, segs, strict=True):
            row = score_case(seg.labels, case, min_diameter_mm=min_diameter_mm)
            rows[rule].append({**row, "seconds": seconds})
    summaries = {r: summarise(rows[r], min_diameter_mm) for r in rules}

    def score(rule: tuple[float | None, float]) -> tuple[float, float, float]:
        summary = summaries[rule]
        value = (summary.get("tumour_dice_mean") or 0.0) + (summary.get("detection_recall")
                                                            or 0.0)
        threshold, min_ml = rule
        return round(value, 4), 1.0 if threshold is None else threshold, min_ml

    best = max(rules, key=score)
    log.info("evaluate.threshold_chosen", extra={"dn_fields": {
        "threshold": best[0], "min_tumour_ml": best[1], "score": score(best)[0]}})
    return {"threshold": best[0], "min_tumour_ml": best[1],
            "candidates": {_rule_name(*r): summaries[r] for r in rules}}


def summarise(rows: Sequence[dict[str, Any]], min_diameter_mm: float = 10.0) -> dict[str, Any]:
    """Aggregate per-case scores (see :func:`evaluate_cases`)."""
    if not rows:
        return {"cases": 0}
    liver = [r["liver_dice"] for r in rows]
    tumour = [r["tumour_dice_ge_min"] for r in rows if r["tumour_dice_ge_min"] is not None]
    # overlap, predicted and true voxels pooled over the cases that have a Dice
    counts = [r["tumour_voxels"] for r in rows if r["tumour_dice_ge_min"] is not None]
    pooled = [sum(column) for column in zip(*counts, strict=True)]
    truth = sum(r["true_lesions_ge_min"] for r in rows)
    found = sum(r["detected_ge_min"] for r in rows)
    return {
        "cases": len(rows),
        "min_tumour_diameter_mm": min_diameter_mm,
        "liver_dice_mean": round(float(np.mean(liver)), 4),
        "liver_dice_min": round(float(np.min(liver)), 4),
        "tumour_cases": len(tumour),
        "tumour_dice_mean": round(float(np.mean(tumour)), 4) if tumour else None,
        "tumour_dice_min": round(float(np.min(tumour)), 4) if tumour else None,
        "tumour_dice_global": (round(2.0 * pooled[0] / (pooled[1] + pooled[2]), 4)
                               if pooled and pooled[1] + pooled[2] else None),
        "tumour_cases_dice_ge_0_75": (round(float(np.mean([d >= 0.75 for d in tumour])), 3)
                                      if tumour else None),
        "lesions_ge_min": truth,
        "lesions_detected": found,
        "detection_recall": round(found / truth, 4) if truth else None,
        "false_positive_lesions_per_case": round(
            float(np.mean([r["false_positive_lesions"] for r in rows])), 3),
        "seconds_per_case": round(float(np.mean([r["seconds"] for r in rows])), 2),
    }


def seen_seeds(entry: Any, seeds: Iterable[int]) -> dict[str, list[int]]:
    """The phantom seeds among ``seeds`` that the weights were trained or validated on.

    Scores on those cases flatter the weights. Training seeds come from the
    ``NAME-VERSION.metrics.json`` beside the weights (``phantom-SEED`` case names),
    validation seeds from the manifest entry.

    Parameters
    ----------
    entry : dicomnode.nn.weights.ManifestEntry
        The weights evaluated.
    seeds : iterable of int
        Phantom seeds about to be evaluated.

    Returns
    -------
    dict
        ``training`` and ``validation``: sorted seeds of each kind (empty lists when
        none, or when the records are missing).
    """
    wanted = set(seeds)
    trained: set[int] = set()
    metrics = entry.directory / f"{entry.name}-{entry.version}.metrics.json"
    try:
        names = json.loads(metrics.read_text())["training"]["case_names"]
    except (OSError, ValueError, KeyError, TypeError):
        names = []
    for name in names:
        match = re.fullmatch(r"phantom-(\d+)", str(name))
        if match:
            trained.add(int(match.group(1)))
    validation = (entry.data.get("validation") or {}).get("phantom_seeds")
    validated = set(datasets.parse_seeds(validation)) if validation else set()
    return {"training": sorted(wanted & trained), "validation": sorted(wanted & validated)}


def evaluate(seeds: Sequence[int] = (), *, data_dir: Path | None = None,
             models: Path | None = None, matrix: int = 256, cache_dir: Path | None = None,
             device: str | None = "cpu", min_diameter_mm: float = 10.0) -> dict[str, Any]:
    """Evaluate the installed ``liver_tumor`` weights on cases with ground truth.

    Parameters
    ----------
    seeds : sequence of int
        Phantom seeds never used in training (the manifest lists the held-out ones).
    data_dir : pathlib.Path, optional
        Phantom folders and/or LiTS pairs (``volume-N.nii``, ``segmentation-N.nii``)
        that the weights were not trained on: a site's own test cases.
    models : pathlib.Path, optional
        Models folder (default: :func:`dicomnode.nn.weights.models_dir`).
    matrix : int
        In-plane matrix of the generated phantoms.
    cache_dir : pathlib.Path, optional
        Phantom cache.
    device : str, optional
        Torch device.
    min_diameter_mm : float
        Smallest tumour (longest axial diameter on the truth mask) that tumour Dice and
        detection count.

    Returns
    -------
    dict
        ``model`` (name, version, sha256 of the weights evaluated), ``cases`` and
        ``summary`` as :func:`evaluate_cases` returns them, and ``warnings``: one line
        for each kind of seed the weights have seen (see :func:`seen_seeds`).

    Raises
    ------
    ValueError
        If neither seeds nor a data directory is given, or the directory holds no case.
    dicomnode.nn.weights.WeightsError
        Missing weights or a checksum mismatch.
    """
    from dicomnode.nn.liver25d import load_segmenter
    from dicomnode.nn.runtime import select_device

    if data_dir is None and not seeds:
        raise ValueError("Nothing to evaluate - give phantom seeds and/or a data directory")
    segmenter, entry = load_segmenter(models, select_device(device))
    warnings = [(f"phantom seed {found[0]} was" if len(found) == 1 else
                 f"phantom seeds {', '.join(map(str, found))} were")
                + f" used in {kind} of {entry.name} {entry.version}: scores on them flatter it"
                for kind, found in seen_seeds(entry, seeds).items() if found]
    cases = datasets.iter_cases(data_dir, seeds, matrix=matrix, cache_dir=cache_dir)
    with torch.inference_mode():
        result = evaluate_cases(segmenter, cases, min_diameter_mm=min_diameter_mm)
    return {"model": {"name": entry.name, "version": entry.version, "sha256": entry.sha256},
            **result, "warnings": warnings}
