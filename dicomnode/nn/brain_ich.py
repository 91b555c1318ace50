"""The ``brain_ich`` model's recipe: data, sampler, loss, operating point and scores.

One stage, :class:`dicomnode.nn.ichnet.IchNet` (2D CNN per slab on three windows and
the neighbouring slabs, bidirectional GRU over the slabs, six outputs, a blood
segmentation head), trained end to end on windows of consecutive slabs of whole
studies with the RSNA 2019 weighted log loss (slabs and study) plus the blood mask's
loss where a case has voxel labels. Augmentation: HU shift and contrast, extra noise,
a softer or sharper kernel, a left-right flip, the slab order reversed.

Data: head phantoms (one seed in three a thin 1.25 mm series, the others 5 mm; truth
per slice from the bleed labels, as :func:`dicomnode.phantoms.truth.head_truth` gives
it), phantom folders, and the RSNA 2019 layout: DICOM slices anywhere under the data
folder with ``stage_2_train.csv`` (``ID,Label`` rows ``ID_<sop>_<finding>,0|1``); the
series are rebuilt from the headers (Series Instance UID, positions). RSNA cases have
no voxel labels: they teach the classifier only.

Operating point: on validation phantoms, the threshold of ``any`` is the highest at
which the study-level sensitivity is at least ``target_sensitivity`` (0.95); each
subtype's maximises sensitivity + specificity (Youden). The blood
segmentation ships only where its validation Dice reaches :data:`SEG_MIN_DICE`.

Scores: study-level AUC per finding, the RSNA weighted log loss on studies and on
slices, sensitivity and specificity at the operating point, and the blood Dice.
"""

from __future__ import annotations

import csv
import logging
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the name every torch reader knows
from torch import nn

from dicomnode.nn import datasets
from dicomnode.nn.ichnet import (
    FINDINGS,
    SLAB_MM,
    IchClassifier,
    IchNet,
    IchPrediction,
    IchTarget,
    RsnaLoss,
    prepare_volume,
    slab_mask,
    weighted_log_loss_np,
    windows,
)
from dicomnode.nn.recipe import ModelRecipe, Options, Sampler, Source, Stage, positive_ints

log = logging.getLogger(__name__)

#: Model label of each subtype's blood (the phantom's ``ICH_<Subtype>`` labels).
SUBTYPE_LABELS: dict[int, str] = {1: "ICH_Epidural", 2: "ICH_Intraparenchymal",
                                  3: "ICH_Intraventricular", 4: "ICH_Subarachnoid",
                                  5: "ICH_Subdural"}
#: Thin phantoms: one seed in three, at this slice spacing (mm).
THIN_MM = 1.25
#: The blood segmentation ships where its mean validation Dice reaches this.
SEG_MIN_DICE = 0.6
#: The RSNA 2019 labels file.
RSNA_CSV = "stage_2_train.csv"


@dataclass
class BrainIchOptions(Options):
    """Hyper-parameters of the haemorrhage model (recorded in the metrics file)."""

    slab_window: int = field(default=24, metadata={
        "help": "Consecutive 5 mm slabs per training sample."})
    hu_shift: float = field(default=40.0, metadata={
        "help": "Largest HU shift of a training sample (augmentation)."})
    extra_noise: float = field(default=8.0, metadata={
        "help": "Largest standard deviation (HU) of noise added to a training sample."})
    study_weight: float = field(default=0.5, metadata={
        "help": "Weight of the study-level log loss beside the slab-level one."})
    seg_weight: float = field(default=0.5, metadata={
        "help": "Weight of the blood segmentation loss (0: no segmentation training)."})
    target_sensitivity: float = field(default=0.95, metadata={
        "help": "Study-level sensitivity the threshold of 'any' is chosen for on "
                "validation."})

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field whose value is wrong."""
        positive_ints(self, "slab_window")
        if not 0 <= self.hu_shift <= 200:
            raise ValueError(f"Invalid 'hu_shift' value '{self.hu_shift}' - must be 0-200 HU")
        if not 0 <= self.extra_noise <= 100:
            raise ValueError(f"Invalid 'extra_noise' value '{self.extra_noise}' - must be "
                             "0-100 HU")
        for key in ("study_weight", "seg_weight"):
            if getattr(self, key) < 0:
                raise ValueError(f"Invalid '{key}' value '{getattr(self, key)}' - must be >= 0")
        if not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"Invalid 'target_sensitivity' value "
                             f"'{self.target_sensitivity}' - must be in (0, 1]")


# ---------------------------------------------------------------------------------------
# Truth


def slice_truth(labels: np.ndarray, spacing: Sequence[float]) -> np.ndarray:
    """``[z, 6]`` 0/1 per slice and finding from a label map in the model's labels.

    A slice shows a subtype where its blood covers at least
    :data:`dicomnode.phantoms.truth.MIN_SLICE_AREA_MM2` (the phantoms' truth rule).
    """
    from dicomnode.phantoms.truth import MIN_SLICE_AREA_MM2

    min_voxels = max(1, int(np.ceil(MIN_SLICE_AREA_MM2 / (spacing[1] * spacing[2]))))
    out = np.zeros((labels.shape[0], len(FINDINGS)), dtype=np.uint8)
    for value in SUBTYPE_LABELS:
        out[:, value] = (labels == value).sum(axis=(1, 2)) >= min_voxels
    out[:, 0] = out[:, 1:].max(axis=1)
    return out


def case_truth(case: datasets.Case) -> np.ndarray:
    """``[z, 6]`` slice truth of a case: its ``truth`` (RSNA) or its labels (phantoms)."""
    if case.truth is not None and "slices" in case.truth:
        return np.asarray(case.truth["slices"], dtype=np.uint8)
    return slice_truth(case.labels, case.spacing)


def has_voxel_labels(case: datasets.Case) -> bool:
    """Whether the case's label map draws its blood (phantoms) or is empty by default."""
    return case.present is None or bool(case.present)


# ---------------------------------------------------------------------------------------
# RSNA 2019 layout


def read_rsna_labels(path: Path) -> dict[str, np.ndarray]:
    """``stage_2_train.csv`` -> SOP Instance UID -> six 0/1 labels (RSNA order).

    Rows are ``ID_<sop>_<finding>,<label>``; the RSNA files' own SOP Instance UIDs start
    with ``ID_``, so both ``ID_<sop>`` and ``<sop>`` find a row.

    Raises
    ------
    ValueError
        A row that is not ``ID_<sop>_<finding>,0|1`` (naming its line).
    """
    out: dict[str, np.ndarray] = {}
    with path.open(newline="") as fh:
        for line, row in enumerate(csv.reader(fh), start=1):
            if not row or (line == 1 and row[0].strip().upper() == "ID"):
                continue
            key = row[0].strip()
            sop, _, finding = key.rpartition("_")
            if (len(row) < 2 or not sop.startswith("ID_") or finding not in FINDINGS
                    or row[1].strip() not in ("0", "1")):
                raise ValueError(f"Invalid '{path.name}' line {line} '{','.join(row)}' - "
                                 "expected ID_<sop>_<finding>,0|1")
            labels = out.setdefault(sop, np.zeros(len(FINDINGS), dtype=np.uint8))
            labels[FINDINGS.index(finding)] = int(row[1])
    return out


def _rsna_key(sop: str) -> str:
    return sop if sop.startswith("ID_") else f"ID_{sop}"


def rsna_series(data_dir: Path) -> list[tuple[Path, ...]]:
    """The RSNA layout under ``data_dir``: ``(labels csv, slice files...)`` per series.

    The slices are grouped by Series Instance UID from their headers (the RSNA files are
    one flat folder of single slices). Series none of whose slices has a row are left
    out.
    """
    import pydicom

    tables = sorted(data_dir.rglob(RSNA_CSV))
    if not tables:
        return []
    table = tables[0]
    known = set(read_rsna_labels(table))
    series: dict[str, list[Path]] = defaultdict(list)
    for path in sorted(data_dir.rglob("*.dcm")):
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True,
                                 specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
        except Exception:
            log.warning("rsna.unreadable", extra={"dn_fields": {"file": path.name}})
            continue
        if _rsna_key(str(ds.SOPInstanceUID)) in known:
            series[str(ds.SeriesInstanceUID)].append(path)
    return [(table, *files) for _, files in sorted(series.items())]


# ---------------------------------------------------------------------------------------
# Training samples


@dataclass
class PreparedIchCase:
    """One study on the network's slab grid, ready for sampling."""

    slabs: torch.Tensor       # [S, px, px] int16 HU
    slab_labels: torch.Tensor  # [S, 6] uint8
    blood: torch.Tensor       # [S, px, px] bool (all False without voxel labels)
    has_seg: bool


def _kernel2d(image: torch.Tensor, rng: np.random.Generator) -> torch.Tensor:
    """``[S, H, W]``: a softer (blurred) or sharper (unsharp-masked) kernel, half the time."""
    draw = rng.random()
    if draw < 0.5:
        return image
    sigma = float(rng.uniform(0.4, 1.0))
    x = torch.arange(-2, 3, dtype=torch.float32)
    g = torch.exp(-0.5 * (x / sigma) ** 2)
    g = g / g.sum()
    flat = image[:, None]
    blurred = F.conv2d(F.pad(flat, (2, 2, 0, 0), mode="replicate"), g.view(1, 1, 1, 5))
    blurred = F.conv2d(F.pad(blurred, (0, 0, 2, 2), mode="replicate"),
                       g.view(1, 1, 5, 1))[:, 0]
    if draw < 0.75:
        return blurred
    return image + float(rng.uniform(0.3, 1.0)) * (image - blurred)


class _StudySampler:
    """Windows of consecutive slabs of whole studies, augmented, as a batch."""

    def __init__(self, cases: list[PreparedIchCase], options: BrainIchOptions,
                 batch_size: int) -> None:
        self.cases = cases
        self.options = options
        self.batch_size = batch_size

    def __call__(self, rng: np.random.Generator) -> tuple[torch.Tensor, IchTarget]:
        """``([B, L, 3, H, W] windows, IchTarget)``."""
        chosen = [self.cases[int(rng.integers(len(self.cases)))]
                  for _ in range(self.batch_size)]
        length = min(self.options.slab_window, *(c.slabs.shape[0] for c in chosen))
        images, slices, blood, has_seg = [], [], [], []
        for case in chosen:
            start = int(rng.integers(case.slabs.shape[0] - length + 1))
            part = slice(start, start + length)
            hu = case.slabs[part].float()
            mask = case.blood[part]
            hu = _kernel2d(hu, rng)
            hu = (hu - 40) * float(rng.uniform(0.9, 1.1)) + 40
            hu = hu + float(rng.uniform(-self.options.hu_shift, self.options.hu_shift))
            sd = float(rng.uniform(0, self.options.extra_noise))
            if sd > 0:
                hu = hu + torch.randn(hu.shape, generator=torch.Generator().manual_seed(
                    int(rng.integers(2**31)))) * sd
            labels = case.slab_labels[part]
            if rng.random() < 0.5:
                hu, mask = torch.flip(hu, dims=[-1]), torch.flip(mask, dims=[-1])
            if rng.random() < 0.5:
                hu, mask, labels = (torch.flip(hu, dims=[0]), torch.flip(mask, dims=[0]),
                                    torch.flip(labels, dims=[0]))
            images.append(windows(hu))
            slices.append(labels.float())
            blood.append(mask)
            has_seg.append(case.has_seg)
        return torch.stack(images), IchTarget(torch.stack(slices), torch.stack(blood),
                                              torch.tensor(has_seg))


# ---------------------------------------------------------------------------------------
# Scores


def auc(scores: Sequence[float], truth: Sequence[int]) -> float | None:
    """Area under the ROC curve (Mann-Whitney, ties counted half); None with one class."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(truth, dtype=bool)
    pos, neg = s[y], s[~y]
    if not len(pos) or not len(neg):
        return None
    greater = (pos[:, None] > neg[None, :]).sum()
    ties = (pos[:, None] == neg[None, :]).sum()
    return float((greater + 0.5 * ties) / (len(pos) * len(neg)))


def threshold_for_sensitivity(scores: Sequence[float], truth: Sequence[int],
                              target: float) -> float:
    """The highest threshold (``p >= t`` is positive) whose sensitivity is >= ``target``.

    Without a positive case, 0.5.
    """
    s = np.asarray(scores, dtype=np.float64)
    pos = np.sort(s[np.asarray(truth, dtype=bool)])[::-1]
    if not len(pos):
        return 0.5
    need = int(np.ceil(target * len(pos) - 1e-9))
    return float(pos[max(need, 1) - 1])


def threshold_youden(scores: Sequence[float], truth: Sequence[int]) -> float:
    """The threshold (``p >= t`` is positive) with the highest sensitivity + specificity
    (ties: the lower threshold, the more sensitive). Without both classes, 0.5."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(truth, dtype=bool)
    if not y.any() or y.all():
        return 0.5
    best, best_t = -1.0, 0.5
    for t in np.unique(s):
        d = s >= t
        j = float(d[y].mean() + (~d[~y]).mean())
        if j > best + 1e-12:
            best, best_t = j, float(t)
    return best_t


def threshold_in_gap(scores: Sequence[float], chosen: float) -> float:
    """``chosen`` moved down to halfway (on the logit scale) to the next lower score.

    A threshold found on validation sits on one validation case's score, so a new case
    scoring a hair lower falls on the other side. Any threshold between that score and
    the next lower one makes the same validation decisions; the middle of the gap keeps
    a margin on both sides (the logit scale, because probabilities crowd near 0 and 1).
    Rounded down to 1e-5 where that stays inside the gap.
    """
    s = np.asarray(scores, dtype=np.float64)
    lower = s[s < chosen]
    if not len(lower):
        return float(chosen)
    eps = 1e-6
    a, b = np.clip([chosen, float(lower.max())], eps, 1 - eps)
    middle = float(1.0 / (1.0 + np.exp(-0.5 * (np.log(a / (1 - a)) + np.log(b / (1 - b))))))
    rounded = float(np.floor(middle * 1e5) / 1e5)
    if rounded > lower.max():
        return rounded
    return middle if middle > lower.max() else float(chosen)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    total = int(a.sum()) + int(b.sum())
    return 1.0 if total == 0 else 2.0 * float((a & b).sum()) / total


def score_prediction(result: IchPrediction, case: datasets.Case) -> dict[str, Any]:
    """One study's truth, probabilities and decisions, its slices' log loss, blood Dice."""
    truth = case_truth(case)
    study_truth = truth.max(axis=0)
    row: dict[str, Any] = {
        "case": case.name, "thin": bool(case.spacing[0] < SLAB_MM * 0.75),
        "truth": {k: int(v) for k, v in zip(FINDINGS, study_truth, strict=True)},
        "probability": {k: round(float(result.study[k]), 5) for k in FINDINGS},
        "decision": dict(result.decisions),
        "slices": int(truth.shape[0]),
        "slice_log_loss": round(weighted_log_loss_np(result.slices, truth), 5),
    }
    if has_voxel_labels(case) and study_truth[0]:
        row["blood_dice"] = round(dice(result.labels > 0, case.labels > 0), 4)
    return row


def summarise(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """AUC, sensitivity and specificity per finding; weighted log losses; blood Dice."""
    if not rows:
        return {"cases": 0}
    findings: dict[str, dict[str, Any]] = {}
    for key in FINDINGS:
        y = [r["truth"][key] for r in rows]
        p = [r["probability"][key] for r in rows]
        d = [bool(r["decision"].get(key, False)) for r in rows]
        tp = sum(1 for a, b in zip(y, d, strict=True) if a and b)
        tn = sum(1 for a, b in zip(y, d, strict=True) if not a and not b)
        pos, neg = sum(y), len(y) - sum(y)
        value = auc(p, y)
        findings[key] = {"positives": pos, "negatives": neg,
                         "auc": None if value is None else round(value, 4),
                         "sensitivity": round(tp / pos, 4) if pos else None,
                         "specificity": round(tn / neg, 4) if neg else None}
    study_truth = np.array([[r["truth"][k] for k in FINDINGS] for r in rows])
    study_p = np.array([[r["probability"][k] for k in FINDINGS] for r in rows])
    n_slices = sum(r["slices"] for r in rows)
    slice_loss = sum(r["slice_log_loss"] * r["slices"] for r in rows) / max(n_slices, 1)
    by_thickness = {}
    for name, thin in (("thin", True), ("5mm", False)):
        part = [r for r in rows if r["thin"] == thin]
        value = auc([r["probability"]["any"] for r in part], [r["truth"]["any"] for r in part])
        by_thickness[name] = {"cases": len(part),
                              "auc_any": None if value is None else round(value, 4)}
    dices = [r["blood_dice"] for r in rows if "blood_dice" in r]
    return {
        "cases": len(rows),
        "auc_any": findings["any"]["auc"],
        "auc_subtype_min": min((f["auc"] for k, f in findings.items()
                                if k != "any" and f["auc"] is not None), default=None),
        "weighted_log_loss_study": round(weighted_log_loss_np(study_p, study_truth), 5),
        "weighted_log_loss_slice": round(float(slice_loss), 5),
        "sensitivity_any": findings["any"]["sensitivity"],
        "specificity_any": findings["any"]["specificity"],
        "findings": findings,
        "by_thickness": by_thickness,
        "blood_dice_mean": round(float(np.mean(dices)), 4) if dices else None,
        "seconds_per_case": round(float(np.mean([r["seconds"] for r in rows])), 2),
    }


def choose_operating_point(classifier: IchClassifier, cases: Iterable[datasets.Case],
                           target: float) -> dict[str, Any]:
    """The thresholds on validation cases, and the blood segmentation's validation Dice
    (which decides whether it ships).

    ``any`` (the triage decision) gets the highest threshold with ``target``
    sensitivity; each subtype the one with the highest sensitivity + specificity: with a
    dozen positives of a subtype, the sensitivity rule sets its threshold at the one
    lowest positive and the specificity falls with it. Each is then moved into the gap
    below it (:func:`threshold_in_gap`): the same validation decisions, with a margin.
    """
    probs: dict[str, list[float]] = {k: [] for k in FINDINGS}
    truth: dict[str, list[int]] = {k: [] for k in FINDINGS}
    dices = []
    for case in cases:
        result = classifier.segment(case.hu, case.spacing)
        study = case_truth(case).max(axis=0)
        for k, key in enumerate(FINDINGS):
            probs[key].append(result.study[key])
            truth[key].append(int(study[k]))
        if has_voxel_labels(case) and study[0]:
            dices.append(dice(result.labels > 0, case.labels > 0))
    chosen = {key: (threshold_for_sensitivity(probs[key], truth[key], target)
                    if key == "any" else threshold_youden(probs[key], truth[key]))
              for key in FINDINGS}
    thresholds = {key: threshold_in_gap(probs[key], value) for key, value in chosen.items()}
    seg_dice = float(np.mean(dices)) if dices else 0.0
    measured = {}
    for key in FINDINGS:
        y = np.asarray(truth[key], dtype=bool)
        d = np.asarray(probs[key]) >= thresholds[key]
        measured[key] = {"positives": int(y.sum()), "threshold": thresholds[key],
                         "sensitivity": round(float(d[y].mean()), 4) if y.any() else None,
                         "specificity": round(float((~d[~y]).mean()), 4)
                         if (~y).any() else None}
    log.info("evaluate.operating_point", extra={"dn_fields": {
        "cases": len(truth["any"]), "threshold_any": thresholds["any"],
        "seg_dice": round(seg_dice, 4)}})
    return {"cases": len(truth["any"]), "target_sensitivity": target,
            "findings": measured, "blood_dice_mean": round(seg_dice, 4),
            "choice": {"thresholds": thresholds,
                       "segmentation": bool(seg_dice >= SEG_MIN_DICE),
                       "seg_dice_validation": round(seg_dice, 4)}}


# ---------------------------------------------------------------------------------------
# The recipe


class BrainIchRecipe(ModelRecipe):
    """Intracranial haemorrhage in a non-contrast head CT: six findings per slab and study."""

    name = "brain_ich"
    region = "head"
    family = ("RSNA 2019 winners' design: 2D residual CNN per 5 mm slab on three CT windows "
              "(brain 40/80, subdural 80/200, bone 600/2800) and the neighbouring slabs, "
              "two-layer bidirectional GRU over the slabs, six outputs, weighted log loss "
              "(any = 2), forward and reversed order averaged")
    stages = (Stage("ichnet", len(FINDINGS), 16),)
    labels: ClassVar[dict[int, str]] = dict(SUBTYPE_LABELS)
    options = BrainIchOptions
    phantom_matrix = 160
    evaluation_matrix = 256
    phantom_noise_hu = 3.0
    data_layout = f"RSNA 2019 layout (DICOM slices + {RSNA_CSV})"

    def __init__(self) -> None:
        self._rsna_tables: dict[Path, dict[str, np.ndarray]] = {}

    def relabel(self, labels: np.ndarray, table: Mapping[int, str]) -> np.ndarray:
        """The phantom's ``ICH_<Subtype>`` labels as 1-5, everything else 0."""
        out = np.zeros(labels.shape, dtype=np.uint8)
        for value, name in table.items():
            target = next((k for k, n in SUBTYPE_LABELS.items() if n == name), None)
            if target is not None:
                out[labels == value] = target
        return out

    def phantom_case(self, seed: int, *, matrix: int | None = None,
                     cache_dir: Path | None = None) -> datasets.Case:
        """The head phantom of ``seed``: thin (1.25 mm) for one seed in three, else 5 mm."""
        return datasets.phantom_case(self.region, seed, self.relabel,
                                     matrix=matrix or self.phantom_matrix,
                                     spacing=THIN_MM if seed % 3 == 2 else None,
                                     cache_dir=cache_dir)

    def discover_public(self, data_dir: Path) -> list[Source]:
        """RSNA 2019 series: ``(stage_2_train.csv, slice files...)`` each."""
        return list(rsna_series(data_dir))

    def load_public(self, source: tuple[Path, ...]) -> datasets.Case:
        """One RSNA series: its volume and each slice's six labels (no voxel labels)."""
        from dicomnode.imaging.series import load_series

        table_path, *files = source
        if table_path not in self._rsna_tables:
            self._rsna_tables[table_path] = read_rsna_labels(table_path)
        table = self._rsna_tables[table_path]
        volume = load_series(files)
        missing = [uid for uid in volume.sop_instance_uids if _rsna_key(uid) not in table]
        if missing:
            raise ValueError(f"Invalid 'data' value '{table_path}' - no labels for "
                             f"{len(missing)} slice(s) of series {volume.series_instance_uid}")
        slices = [table[_rsna_key(uid)].tolist() for uid in volume.sop_instance_uids]
        return datasets.Case(f"rsna-{volume.series_instance_uid}", volume.hu,
                             np.zeros(volume.hu.shape, dtype=np.uint8), volume.spacing,
                             present=(), truth={"slices": slices})

    def prepare(self, case: datasets.Case, options: Options) -> PreparedIchCase:
        """Slabs of the cropped head, slab labels (any of its slices), the blood mask."""
        prepared = prepare_volume(case.hu, case.spacing)
        truth = case_truth(case)
        slab_labels = np.stack([truth[g.start:g.stop].max(axis=0) for g in prepared.groups])
        seg = has_voxel_labels(case)
        blood = (slab_mask(case.labels > 0, prepared) if seg
                 else np.zeros(prepared.slabs.shape, dtype=bool))
        return PreparedIchCase(torch.from_numpy(prepared.slabs),
                               torch.from_numpy(slab_labels), torch.from_numpy(blood), seg)

    def network(self, stage: Stage, width: int) -> nn.Module:
        """An :class:`~dicomnode.nn.ichnet.IchNet` of ``width`` (GRU hidden ``4 * width``)."""
        return IchNet(width, hidden=4 * width, segmentation=True)

    def sampler(self, stage: Stage, cases: list[Any], options: Options,
                batch_size: int) -> Sampler:
        """Augmented windows of consecutive slabs."""
        assert isinstance(options, BrainIchOptions)
        return _StudySampler(cases, options, batch_size)  # type: ignore[return-value]

    def loss(self, stage: Stage, options: Options) -> nn.Module:
        """RSNA weighted log loss (slabs and study) + the blood mask's."""
        assert isinstance(options, BrainIchOptions)
        return RsnaLoss(options.study_weight, options.seg_weight)

    def segmenter(self, nets: Mapping[str, nn.Module], config: Mapping[str, Any],
                  device: torch.device, **overrides: Any) -> IchClassifier:
        """The network with the thresholds chosen on validation (0.5 before)."""
        net = nets["ichnet"]
        assert isinstance(net, IchNet)
        thresholds = {k: float(v) for k, v in (config.get("thresholds") or {}).items()}
        options = {"thresholds": thresholds,
                   "seg_threshold": float(config.get("seg_threshold", 0.5)),
                   "segmentation": bool(config.get("segmentation", False)), **overrides}
        return IchClassifier(net, device, **options)

    def validate(self, segmenter: Any, cases: Any) -> dict[str, Any] | None:
        """Thresholds for the target sensitivity, and whether the segmentation ships."""
        target = float(getattr(self, "_target_sensitivity", 0.95))
        with torch.inference_mode():
            return choose_operating_point(segmenter, cases, target)

    def train_config(self, options: Options) -> dict[str, Any]:
        """The sensitivity the thresholds are chosen for (kept for :meth:`validate`)."""
        assert isinstance(options, BrainIchOptions)
        self._target_sensitivity = options.target_sensitivity
        return {"target_sensitivity": options.target_sensitivity, "slab_mm": SLAB_MM}

    def inherited(self, previous: Mapping[str, Any], trained: Sequence[str]
                  ) -> dict[str, Any]:
        """Nothing: the one stage is always trained again."""
        return {}

    def operating_point(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Thresholds, the target sensitivity, and whether the blood SEG ships."""
        return {"thresholds": {k: float(v) for k, v in
                               (config.get("thresholds") or {}).items()},
                "target_sensitivity": float(config.get("target_sensitivity", 0.95)),
                "segmentation": bool(config.get("segmentation", False)),
                "seg_dice_validation": config.get("seg_dice_validation")}

    def input_spec(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """Windows, slab thickness, input size, outputs and the operating point."""
        from dicomnode.nn.ichnet import INPUT_PX, WINDOWS

        return {"modality": "CT", "region": "head", "units": "HU",
                "contrast": "none", "orientation": "axial",
                "windows": [list(w) for w in WINDOWS], "slab_mm": SLAB_MM,
                "input_px": INPUT_PX, "outputs": list(FINDINGS),
                **self.operating_point(config),
                "labels": {"1": "ICH (blood)"}}

    def score_case(self, labels: np.ndarray, case: datasets.Case) -> dict[str, Any]:
        """Not used: :meth:`score` reads the probabilities, not only the labels."""
        raise NotImplementedError("brain_ich scores probabilities: use score()")

    def score(self, result: Any, case: datasets.Case) -> dict[str, Any]:
        """See :func:`score_prediction`."""
        return score_prediction(result, case)

    def summarise(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """See :func:`summarise`."""
        return summarise(rows)

    def report_lines(self, report: Mapping[str, Any]) -> list[str]:
        """Per finding AUC, sensitivity and specificity; the log losses."""
        info, summary = report["model"], report["summary"]
        lines = [f"{info['name']} {info['version']} (sha256 {info['sha256'][:12]}), "
                 f"{summary['cases']} cases"
                 + (f", {report['perturbation']}" if report.get("perturbation") else "")]

        def fmt(value: Any) -> str:
            return "-" if value is None else f"{value:.3f}"

        for key, f in summary.get("findings", {}).items():
            lines.append(f"{key:<17} AUC {fmt(f['auc'])}  sens {fmt(f['sensitivity'])}  "
                         f"spec {fmt(f['specificity'])}  ({f['positives']} positive)")
        lines.append(f"weighted log loss: study {summary.get('weighted_log_loss_study')}, "
                     f"slice {summary.get('weighted_log_loss_slice')}")
        for name, part in summary.get("by_thickness", {}).items():
            lines.append(f"AUC any, {name} series: {fmt(part['auc_any'])} "
                         f"({part['cases']} cases)")
        lines.append(f"blood Dice (positive studies): {fmt(summary.get('blood_dice_mean'))}")
        return lines


RECIPE = BrainIchRecipe
