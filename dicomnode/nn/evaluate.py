"""The one evaluation: ``dicomnode evaluate MODEL`` scores installed weights on cases
with ground truth that the weights never saw (a site's own test cases in the model's
public layout, or phantom seeds). The scores themselves are the model's
(:meth:`dicomnode.nn.recipe.ModelRecipe.score_case`); this module runs the segmenter,
times it, and warns when the seeds asked for were used in training or validation.
"""

from __future__ import annotations

import json
import logging
import re
import time
from collections.abc import Iterable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dicomnode.nn import datasets
from dicomnode.nn.recipe import ModelRecipe, Segmenter

log = logging.getLogger(__name__)

#: Scanner shifts :func:`perturb` applies, for robustness reports.
PERTURBATIONS = ("hu+30", "hu-30", "noise2x", "soft", "sharp")


def perturb(case: datasets.Case, kind: str, *, noise_hu: float = 10.0,
            seed: int = 0) -> datasets.Case:
    """The case as another scanner or protocol would show it (the truth unchanged).

    Parameters
    ----------
    case : Case
        A case with ground truth.
    kind : str
        ``"hu+30"`` / ``"hu-30"``: every HU shifted (calibration, contrast phase);
        ``"noise2x"``: noise of ``sqrt(3) * noise_hu`` added, doubling a noise of
        ``noise_hu``; ``"soft"``: a softer reconstruction kernel (Gaussian, 0.8 pixel
        in-plane); ``"sharp"``: a sharper one (unsharp mask, amount 1 at 1 pixel).
    noise_hu : float
        The case's own noise (the phantoms': 10 HU at 2.5 mm for head and neck).
    seed : int
        Seed of the added noise.

    Raises
    ------
    ValueError
        For an unknown ``kind``.
    """
    from scipy import ndimage

    hu = case.hu.astype(np.float64)
    if kind == "hu+30":
        out = hu + 30
    elif kind == "hu-30":
        out = hu - 30
    elif kind == "noise2x":
        out = hu + np.random.default_rng(seed).normal(0, np.sqrt(3) * noise_hu, hu.shape)
    elif kind in ("soft", "sharp"):
        blurred = ndimage.gaussian_filter(hu, (0, 0.8 if kind == "soft" else 1.0,
                                               0.8 if kind == "soft" else 1.0))
        out = blurred if kind == "soft" else hu + (hu - blurred)
    else:
        raise ValueError(f"Invalid 'perturbation' value '{kind}' - must be one of "
                         f"{', '.join(PERTURBATIONS)}")
    return replace(case, name=f"{case.name}:{kind}",
                   hu=np.clip(np.rint(out), -1024, 3071).astype(np.int16))


def evaluate_cases(recipe: ModelRecipe, segmenter: Segmenter,
                   cases: Iterable[datasets.Case]) -> dict[str, Any]:
    """Segment and score every case.

    Returns
    -------
    dict
        ``cases`` (the recipe's per-case scores and ``seconds``) and ``summary`` (the
        recipe's summary over them).
    """
    rows = []
    with torch.inference_mode():
        for case in cases:
            started = time.perf_counter()
            seg = segmenter.segment(case.hu, case.spacing)
            row = recipe.score(seg, case)
            row["seconds"] = round(time.perf_counter() - started, 2)
            rows.append(row)
            log.info("evaluate.case", extra={"dn_fields": {
                k: v for k, v in row.items() if not isinstance(v, (dict, list))}})
    return {"cases": rows, "summary": recipe.summarise(rows)}


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


def evaluate(recipe: ModelRecipe, seeds: Sequence[int] = (), *, data_dir: Path | None = None,
             models: Path | None = None, matrix: int | None = None,
             cache_dir: Path | None = None, device: str | None = "cpu",
             perturbation: str | None = None) -> dict[str, Any]:
    """Evaluate the installed weights of ``recipe`` on cases with ground truth.

    Parameters
    ----------
    recipe : ModelRecipe
        The model (configured with its evaluation options).
    seeds : sequence of int
        Phantom seeds never used in training (the manifest lists the held-out ones).
    data_dir : pathlib.Path, optional
        Phantom folders and/or the recipe's public layout that the weights were not
        trained on: a site's own test cases.
    models : pathlib.Path, optional
        Models folder (default: :func:`dicomnode.nn.weights.models_dir`).
    matrix : int, optional
        In-plane matrix of the generated phantoms (default: the recipe's evaluation
        matrix).
    cache_dir : pathlib.Path, optional
        Phantom cache.
    device : str, optional
        Torch device.
    perturbation : str, optional
        Score the cases as :func:`perturb` changes them (one of :data:`PERTURBATIONS`).

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
    from dicomnode.nn.runtime import select_device

    if perturbation is not None and perturbation not in PERTURBATIONS:
        raise ValueError(f"Invalid 'perturbation' value '{perturbation}' - must be one of "
                         f"{', '.join(PERTURBATIONS)}")
    if data_dir is None and not seeds:
        raise ValueError("Nothing to evaluate - give phantom seeds and/or a data directory")
    segmenter, entry = recipe.load_segmenter(models, select_device(device))
    warnings = [(f"phantom seed {found[0]} was" if len(found) == 1 else
                 f"phantom seeds {', '.join(map(str, found))} were")
                + f" used in {kind} of {entry.name} {entry.version}: scores on them flatter it"
                for kind, found in seen_seeds(entry, seeds).items() if found]
    cases: Iterable[datasets.Case] = recipe.iter_cases(
        data_dir, seeds, matrix=matrix or recipe.evaluation_matrix or recipe.phantom_matrix,
        cache_dir=cache_dir)
    if perturbation is not None:
        cases = (perturb(case, perturbation, noise_hu=recipe.phantom_noise_hu)
                 for case in cases)
    result = evaluate_cases(recipe, segmenter, cases)
    return {"model": {"name": entry.name, "version": entry.version, "sha256": entry.sha256},
            **result, "perturbation": perturbation, "warnings": warnings}
