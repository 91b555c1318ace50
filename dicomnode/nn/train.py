"""Training of the two-stage liver/tumour network: ``dicomnode train liver_tumor``.

Stage 1 learns the liver on the coarse grid from slabs of whole slices; stage 2 learns
liver and tumours at the fine grid from patches inside the (ground-truth) liver box,
most of them centred on a tumour, drawn by how much of it the network still misses
(:class:`TumourSampler`). Both use weighted cross-entropy + soft Dice, AdamW
and a cosine learning-rate decay. The result is one checkpoint holding both stages, an
entry in ``manifest.json`` (name, version, sha256, input spec, training data, metrics)
and a metrics file; when held-out seeds are given they are evaluated at the end.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

from dicomnode.nn import datasets, liver25d, runtime, weights
from dicomnode.nn.liver25d import (
    BOX_MARGIN_MM,
    HU_WINDOW,
    LIVER_SPACING,
    TUMOUR_SPACING,
    Liver25DNet,
    normalise_hu,
)
from dicomnode.nn.losses import CrossEntropyDiceLoss

log = logging.getLogger(__name__)

MODEL_NAME = "liver_tumor"
#: The two training stages, in order.
STAGES = ("liver", "tumour")
#: At most this many voxels of one tumour are kept for centring patches on it.
_VOXELS_PER_LESION = 400
FAMILY = ("2.5D context network (3D-convolution encoder stem, ASPP, depthwise-separable "
          "2D decoder), two stages: liver, then tumours in the liver box")


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (all recorded in the checkpoint)."""

    epochs: int = 10
    steps_per_epoch: int = 40
    tumour_step_factor: int = 15
    batch_size: int = 4
    slab: int = 8
    liver_patch: int = 128
    tumour_patch: int = 96
    width_liver: int = 8
    width_tumour: int = 12
    lr: float = 3e-3
    tumour_class_weight: float = 3.0
    #: Largest shift of a whole patch's HU (augmentation; scanners and contrast phases
    #: move the liver's HU, and a network that reads absolute HU loses tumours then).
    hu_shift: float = 18.0
    tumour_fraction: float = 0.7
    seed: int = 0
    threads: int = 2
    max_minutes_per_stage: float | None = None
    stages: tuple[str, ...] = ("liver", "tumour")
    init_from: Path | None = None
    #: Where the networks train: "cpu", "cuda[:N]" or "auto" (CUDA when present).
    device: str = "cpu"
    #: Processes that generate and prepare the cases (1: in this process).
    workers: int = 1
    #: A stage trained from ``init_from`` restarts from scratch at this width when it
    #: differs from the checkpoint's (a wider network cannot inherit narrower weights).
    reset_width: bool = False

    def __post_init__(self) -> None:
        for key in ("epochs", "steps_per_epoch", "tumour_step_factor", "batch_size",
                    "width_liver", "width_tumour", "threads", "workers"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid '{key}' value '{value}' - must be a positive integer")
        if self.slab < Liver25DNet.context_slices:
            raise ValueError(f"Invalid 'slab' value '{self.slab}' - must be >= "
                             f"{Liver25DNet.context_slices} (the network's context)")
        for key in ("liver_patch", "tumour_patch"):
            value = getattr(self, key)
            if value < 32 or value % 8:
                raise ValueError(f"Invalid '{key}' value '{value}' - must be a multiple of 8, "
                                 ">= 32")
        if self.max_minutes_per_stage is not None and not self.max_minutes_per_stage > 0:
            raise ValueError(f"Invalid 'max_minutes_per_stage' value "
                             f"'{self.max_minutes_per_stage}' - must be positive")
        if not 0 <= self.hu_shift <= 200:
            raise ValueError(f"Invalid 'hu_shift' value '{self.hu_shift}' - must be 0-200 HU")
        if not self.tumour_class_weight > 0:
            raise ValueError(f"Invalid 'tumour_class_weight' value '{self.tumour_class_weight}'"
                             " - must be positive")
        if not 0 < self.lr < 1:
            raise ValueError(f"Invalid 'lr' value '{self.lr}' - must be in (0, 1)")
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"Invalid 'stages' value '{','.join(self.stages)}' - choose from "
                             f"{', '.join(STAGES)}")
        if set(self.stages) != set(STAGES) and self.init_from is None:
            raise ValueError("Invalid 'stages' value - a stage that is not trained needs its "
                             "weights from 'init_from'")


@dataclass
class _Prepared:
    """One case on both stage grids, normalised, ready for patch sampling."""

    coarse: torch.Tensor
    coarse_liver: torch.Tensor
    fine: torch.Tensor
    fine_labels: torch.Tensor
    lesion_voxels: list[np.ndarray] = field(default_factory=list)
    liver_voxels: np.ndarray = field(default_factory=lambda: np.zeros((0, 3), dtype=np.int64))


def _labels_to_grid(labels: np.ndarray, spacing: Sequence[float],
                    target: Sequence[float]) -> torch.Tensor:
    """Resample a 0/1/2 label map by interpolating each nested mask and thresholding."""
    organ, _ = runtime.resample_to_spacing((labels > 0).astype(np.float32), spacing, target)
    tumour, _ = runtime.resample_to_spacing((labels == 2).astype(np.float32), spacing, target)
    out = (organ > 0.5).to(torch.uint8)
    out[tumour > 0.5] = 2
    return out


def prepare(case: datasets.Case) -> _Prepared | None:
    """Put one case on the coarse (stage 1) and the fine liver-box (stage 2) grids."""
    if not (case.labels > 0).any():
        log.warning("train.case_without_liver", extra={"dn_fields": {"case": case.name}})
        return None
    hu = torch.from_numpy(np.ascontiguousarray(case.hu))
    coarse, _ = runtime.resample_to_spacing(hu, case.spacing, LIVER_SPACING)
    coarse_labels = _labels_to_grid(case.labels, case.spacing, LIVER_SPACING)
    idx = np.nonzero(case.labels > 0)
    box = []
    for axis in range(3):
        margin = math.ceil(1.5 * BOX_MARGIN_MM / case.spacing[axis])
        box.append(slice(max(0, int(idx[axis].min()) - margin),
                         min(case.labels.shape[axis], int(idx[axis].max()) + 1 + margin)))
    region = tuple(box)
    fine, _ = runtime.resample_to_spacing(hu[region], case.spacing, TUMOUR_SPACING)
    fine_labels = _labels_to_grid(case.labels[region], case.spacing, TUMOUR_SPACING)
    return _Prepared(normalise_hu(coarse).half(), (coarse_labels > 0).to(torch.uint8),
                     normalise_hu(fine).half(), fine_labels,
                     *_centres(fine_labels.numpy()))


def _centres(labels: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
    """Patch centres: voxels of each tumour (one array per tumour) and of the liver.

    Sampling a tumour first and then one of its voxels gives a 10 mm tumour as many
    patches as a 60 mm one (uniform voxel sampling would favour the large one ~200-fold).
    """
    rng = np.random.default_rng(0)
    comps, _ = ndimage.label(labels == 2, structure=np.ones((3, 3, 3), dtype=bool))
    lesions = []
    for index, box in enumerate(ndimage.find_objects(comps), start=1):
        if box is None:
            continue
        voxels = np.argwhere(comps[box] == index) + [s.start for s in box]
        if len(voxels) > _VOXELS_PER_LESION:
            voxels = voxels[rng.choice(len(voxels), _VOXELS_PER_LESION, replace=False)]
        lesions.append(voxels)
    liver = np.argwhere(labels == 1)
    if len(liver) > 5000:
        liver = liver[rng.choice(len(liver), 5000, replace=False)]
    return lesions, liver


def _crop(image: torch.Tensor, labels: torch.Tensor, start: Sequence[int],
          size: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop ``size`` at ``start``, padding with air (-1) / background where it leaves."""
    out_img = torch.full(tuple(size), -1.0, dtype=torch.float32)
    out_lab = torch.zeros(tuple(size), dtype=torch.long)
    src = []
    dst = []
    for s, n, total in zip(start, size, image.shape, strict=True):
        lo, hi = max(0, s), min(total, s + n)
        src.append(slice(lo, hi))
        dst.append(slice(lo - s, hi - s))
    out_img[tuple(dst)] = image[tuple(src)].float()
    out_lab[tuple(dst)] = labels[tuple(src)].long()
    return out_img, out_lab


def _augment(image: torch.Tensor, rng: np.random.Generator,
             hu_shift: float = 18.0) -> torch.Tensor:
    """Contrast jitter, a shift of every HU by up to ``hu_shift`` and a little extra noise
    (on the normalised image)."""
    scale = float(rng.uniform(0.9, 1.1))
    half_window = (HU_WINDOW[1] - HU_WINDOW[0]) / 2
    shift = float(rng.uniform(-hu_shift, hu_shift)) / half_window
    noise = float(rng.uniform(0, 0.04))
    out = image * scale + shift
    if noise > 0:
        out = out + noise * torch.randn_like(out)
    return out


def _sample_liver(cases: list[_Prepared], cfg: TrainConfig,
                  rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    images, labels = [], []
    size = (cfg.slab, cfg.liver_patch, cfg.liver_patch)
    for _ in range(cfg.batch_size):
        case = cases[int(rng.integers(len(cases)))]
        z_n, y_n, x_n = case.coarse.shape
        liver_z = np.flatnonzero(case.coarse_liver.numpy().any(axis=(1, 2)))
        if len(liver_z) and rng.random() < 0.8:
            zc = int(rng.choice(liver_z))
        else:
            zc = int(rng.integers(z_n))
        start = [zc - cfg.slab // 2,
                 int(rng.integers(min(0, y_n - size[1]), max(0, y_n - size[1]) + 1)),
                 int(rng.integers(min(0, x_n - size[2]), max(0, x_n - size[2]) + 1))]
        img, lab = _crop(case.coarse, case.coarse_liver, start, size)
        images.append(_augment(img, rng, cfg.hu_shift))
        labels.append(lab)
    return torch.stack(images)[:, None], torch.stack(labels)


class TumourSampler:
    """Stage-2 patches, tumours drawn by how much of them the network still misses.

    A fraction ``cfg.tumour_fraction`` of the patches is centred on a tumour; the rest
    is split between liver parenchyma (hard negatives: vessels, mottle) and anywhere in
    the liver box. A tumour is drawn with probability proportional to
    ``floor + difficulty``, where difficulty is a running mean of the fraction of the
    patch's tumour voxels the network labelled otherwise (1 for a tumour not yet seen).
    Uniform drawing spends most patches on tumours the network already finds (large,
    hypodense ones) and few on those it misses (cysts at the liver edge, hyperdense or
    thin-rimmed ones); the floor keeps every tumour in the rotation.

    Parameters
    ----------
    cases : list of _Prepared
        The training cases.
    floor : float
        Weight of a tumour the network finds perfectly, against 1 + floor for one it
        misses entirely.
    memory : float
        Weight of the previous difficulty in the running mean.
    """

    def __init__(self, cases: list[_Prepared], *, floor: float = 0.25,
                 memory: float = 0.7) -> None:
        if not floor > 0:
            raise ValueError(f"Invalid 'floor' value '{floor}' - must be positive")
        if not 0 <= memory < 1:
            raise ValueError(f"Invalid 'memory' value '{memory}' - must be in [0, 1)")
        self.lesions = [(case, voxels) for case in cases for voxels in case.lesion_voxels]
        self.difficulty = np.ones(len(self.lesions))
        self.floor = floor
        self.memory = memory
        self._drawn: list[int] = []

    def __call__(self, cases: list[_Prepared], cfg: TrainConfig,
                 rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch ``([B, 1, slab, P, P] image, [B, slab, P, P] labels)``."""
        images, labels = [], []
        size = (cfg.slab, cfg.tumour_patch, cfg.tumour_patch)
        weights = self.floor + self.difficulty
        weights = weights / weights.sum() if len(weights) else weights
        self._drawn = []
        for _ in range(cfg.batch_size):
            draw = rng.random()
            drawn = -1
            if self.lesions and draw < cfg.tumour_fraction:
                drawn = int(rng.choice(len(self.lesions), p=weights))
                case, voxels = self.lesions[drawn]
                centre = voxels[int(rng.integers(len(voxels)))]
                jitter = rng.integers(-size[1] // 3, size[1] // 3 + 1, 2)
                centre = np.array([centre[0], centre[1] + jitter[0], centre[2] + jitter[1]])
            else:
                case = cases[int(rng.integers(len(cases)))]
                if len(case.liver_voxels) and draw < (1 + cfg.tumour_fraction) / 2:
                    centre = case.liver_voxels[int(rng.integers(len(case.liver_voxels)))]
                else:
                    centre = np.array([int(rng.integers(n)) for n in case.fine.shape])
            start = [int(c) - s // 2 for c, s in zip(centre, size, strict=True)]
            img, lab = _crop(case.fine, case.fine_labels, start, size)
            images.append(_augment(img, rng, cfg.hu_shift))
            labels.append(lab)
            self._drawn.append(drawn)
        return torch.stack(images)[:, None], torch.stack(labels)

    def feedback(self, logits: torch.Tensor, target: torch.Tensor) -> None:
        """Update the difficulty of the tumours of the last batch from its output."""
        with torch.no_grad():
            truth = target == liver25d.TUMOUR
            found = (logits.argmax(1) == liver25d.TUMOUR) & truth
            totals = truth.flatten(1).sum(1).tolist()
            hits = found.flatten(1).sum(1).tolist()
        for drawn, total, hit in zip(self._drawn, totals, hits, strict=True):
            if drawn >= 0 and total:
                self.difficulty[drawn] = (self.memory * self.difficulty[drawn]
                                          + (1 - self.memory) * (1.0 - hit / total))

    def summary(self) -> dict[str, Any]:
        """Tumour count and the distribution of their final difficulty."""
        if not len(self.difficulty):
            return {"tumours": 0}
        return {"tumours": len(self.difficulty),
                "difficulty_mean": round(float(self.difficulty.mean()), 3),
                "difficulty_quartiles": [round(float(q), 3) for q in
                                         np.quantile(self.difficulty, [0.25, 0.5, 0.75])],
                "mostly_missed": int((self.difficulty > 0.5).sum())}


class Progress:
    """A progress line: redrawn in place on a terminal, logged once per epoch otherwise."""

    def __init__(self, label: str, total: int) -> None:
        self.label = label
        self.total = total
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, done: int, loss: float, *, epoch_end: bool = False) -> None:
        """Report ``done`` of ``total`` steps with the running loss."""
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.total - done)
        width = 30
        bar = "#" * int(width * done / self.total) + "-" * (width - int(width * done / self.total))
        line = (f"{self.label} [{bar}] {done}/{self.total} loss {loss:.4f} "
                f"{elapsed:.0f}s elapsed, {eta:.0f}s left")
        if self.tty:
            sys.stderr.write("\r" + line + ("\n" if done == self.total else ""))
            sys.stderr.flush()
        elif epoch_end:
            log.info(line)


def _fit(net: Liver25DNet, sampler: Any, cases: list[_Prepared], cfg: TrainConfig,
         steps_per_epoch: int, class_weights: Sequence[float], label: str,
         rng: np.random.Generator) -> tuple[list[float], int]:
    """Train ``net`` for ``cfg.epochs``; returns the mean loss of every epoch and the steps.

    On CUDA the forward pass runs under bfloat16 autocast (the loss in float32); the
    network is back on the CPU when this returns.
    """
    device = runtime.select_device(cfg.device)
    net.to(device)
    amp = device.type == "cuda"
    loss_fn = CrossEntropyDiceLoss(class_weights).to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    total = cfg.epochs * steps_per_epoch
    budget = cfg.max_minutes_per_stage * 60 if cfg.max_minutes_per_stage else math.inf
    progress = Progress(label, total)
    history = []
    net.train()
    step = 0
    started = time.perf_counter()
    done = 0.0
    for _ in range(cfg.epochs):
        losses = []
        for _ in range(steps_per_epoch):
            # cosine decay over whichever runs out first: the steps or the time budget
            done = max(step / total, (time.perf_counter() - started) / budget)
            if done >= 1:
                break
            for group in optimiser.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * done))
            image, target = sampler(cases, cfg, rng)
            image = image.to(device, non_blocking=True)
            target = target.to(device, non_blocking=True)
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(image)
            loss = loss_fn(logits.float(), target)
            loss.backward()
            if hasattr(sampler, "feedback"):
                sampler.feedback(logits, target)
            optimiser.step()
            losses.append(float(loss.detach()))
            step += 1
            progress.update(step, float(np.mean(losses[-20:])),
                            epoch_end=len(losses) == steps_per_epoch)
        if losses:
            history.append(round(float(np.mean(losses)), 5))
        if done >= 1:
            log.info("train.time_budget_reached", extra={"dn_fields": {
                "stage": label.strip(), "steps": step, "of": total}})
            break
    net.cpu().eval()
    return history, step


def train_liver_tumor(out_dir: Path, *, data_dir: Path | None = None,
                      seeds: Sequence[int] = (), heldout_seeds: Sequence[int] = (),
                      val_seeds: Sequence[int] = (),
                      config: TrainConfig | None = None, version: str = "1.0.0",
                      matrix: int = 256, cache_dir: Path | None = None,
                      update_manifest: bool = True) -> dict[str, Any]:
    """Train both stages and write the checkpoint, manifest entry and metrics.

    Parameters
    ----------
    out_dir : pathlib.Path
        Models folder: receives ``liver_tumor-VERSION.pt``, ``liver_tumor-VERSION.metrics.json``
        and the ``manifest.json`` entry.
    data_dir : pathlib.Path, optional
        Phantom folders and/or LiTS pairs (see :mod:`dicomnode.nn.datasets`).
    seeds : sequence of int
        Phantom seeds generated for training.
    heldout_seeds : sequence of int
        Phantom seeds evaluated after training (must not overlap ``seeds``).
    val_seeds : sequence of int
        Phantom seeds on which the tumour threshold and the smallest kept tumour island
        are chosen (overlapping neither
        ``seeds`` nor ``heldout_seeds``); none: the most probable class.
    config : TrainConfig, optional
        Hyper-parameters.
    version : str
        Version written to the manifest and the file name.
    matrix : int
        In-plane matrix of generated phantoms.
    cache_dir : pathlib.Path, optional
        Cache of generated phantoms.
    update_manifest : bool
        Write the manifest entry.

    Returns
    -------
    dict
        The manifest entry (with ``metrics``).
    """
    cfg = config or TrainConfig()
    overlap = set(seeds) & set(heldout_seeds)
    if overlap:
        raise ValueError(f"Invalid 'heldout_seeds' value - {sorted(overlap)} are also "
                         "training seeds")
    overlap = set(val_seeds) & (set(seeds) | set(heldout_seeds))
    if overlap:
        raise ValueError(f"Invalid 'val_seeds' value - {sorted(overlap)} are also training "
                         "or held-out seeds")
    if data_dir is None and not seeds:
        raise ValueError("Invalid 'data' value 'None' - give a data directory or phantom seeds")
    runtime.configure_cpu_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    started = time.perf_counter()
    prepared: list[_Prepared] = []
    names: list[str] = []
    for name, item in _prepared_cases(data_dir, seeds, matrix=matrix, cache_dir=cache_dir,
                                      workers=cfg.workers):
        if item is not None:
            prepared.append(item)
            names.append(name)
        log.info("train.case_ready", extra={"dn_fields": {"case": name,
                                                          "cases": len(prepared)}})
    if not prepared:
        raise ValueError("Invalid 'data' value - no case with a liver label")
    prep_seconds = time.perf_counter() - started

    liver_net, tumour_net, init = _networks(cfg)
    liver_hist: list[float] = []
    tumour_hist: list[float] = []
    steps = {"liver": 0, "tumour": 0}
    tumour_sampling: dict[str, Any] | None = None
    t = time.perf_counter()
    if "liver" in cfg.stages:
        liver_hist, steps["liver"] = _fit(liver_net, _sample_liver, prepared, cfg,
                                          cfg.steps_per_epoch, (1.0, 1.0), "stage 1 liver ",
                                          rng)
    liver_seconds = time.perf_counter() - t
    t = time.perf_counter()
    if "tumour" in cfg.stages:
        sampler = TumourSampler(prepared)
        tumour_hist, steps["tumour"] = _fit(tumour_net, sampler, prepared, cfg,
                                            cfg.steps_per_epoch * cfg.tumour_step_factor,
                                            (1.0, 1.0, cfg.tumour_class_weight),
                                            "stage 2 tumour", rng)
        tumour_sampling = sampler.summary()
    tumour_seconds = time.perf_counter() - t

    config_record: dict[str, Any] = {"width_liver": cfg.width_liver,
                                     "width_tumour": cfg.width_tumour, "version": version}
    segmenter = liver25d.LiverTumorSegmenter(liver_net, tumour_net,
                                             runtime.select_device(cfg.device))
    validation: dict[str, Any] | None = None
    if val_seeds:
        from dicomnode.nn.evaluate import choose_tumour_rule

        with torch.inference_mode():
            validation = choose_tumour_rule(segmenter, (
                datasets.phantom_case(s, matrix=matrix, cache_dir=cache_dir)
                for s in val_seeds))
        segmenter.tumour_threshold = validation["threshold"]
        segmenter.min_tumour_ml = validation["min_tumour_ml"]
        validation["phantom_seeds"] = _ranges(val_seeds)
    elif init and "tumour" not in cfg.stages:
        # nothing retrained, nothing chosen: keep the initial checkpoint's rule
        segmenter.tumour_threshold = init["tumour_threshold"]
        if init.get("min_tumour_ml") is not None:
            segmenter.min_tumour_ml = init["min_tumour_ml"]
    config_record["tumour_threshold"] = segmenter.tumour_threshold
    config_record["min_tumour_ml"] = segmenter.min_tumour_ml

    out_dir.mkdir(parents=True, exist_ok=True)
    file_name = f"{MODEL_NAME}-{version}.pt"
    checkpoint = {
        "liver": {k: v.cpu() for k, v in liver_net.state_dict().items()},
        "tumour": {k: v.cpu() for k, v in tumour_net.state_dict().items()},
        "config": config_record,
    }
    tmp = out_dir / (file_name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out_dir / file_name)
    digest = weights.sha256_of(out_dir / file_name)

    training = {
        "cases": len(prepared), "case_names": names,
        "phantom_seeds": _ranges(seeds), "data_dir": str(data_dir) if data_dir else None,
        "phantom_matrix": matrix,
        "config": {**asdict(cfg), "init_from": str(cfg.init_from) if cfg.init_from else None},
        "loss_per_epoch": {"liver": liver_hist, "tumour": tumour_hist},
        "steps": steps,
        "seconds": {"prepare": round(prep_seconds, 1), "liver": round(liver_seconds, 1),
                    "tumour": round(tumour_seconds, 1)},
        "threads": torch.get_num_threads(),
        "device": _device_name(cfg.device),
        "stages_trained": list(cfg.stages),
        "tumour_sampling": tumour_sampling,
        "initialised_from": init,
    }
    metrics: dict[str, Any] = {"training": training}
    if validation is not None:
        metrics["validation"] = validation
    entry: dict[str, Any] = {
        "name": MODEL_NAME, "version": version, "file": file_name, "sha256": digest,
        "family": FAMILY,
        "input": {"modality": "CT", "region": "abdomen", "units": "HU",
                  "hu_window": list(HU_WINDOW), "context_slices": Liver25DNet.context_slices,
                  "stage1_spacing_mm": list(LIVER_SPACING),
                  "stage2_spacing_mm": list(TUMOUR_SPACING),
                  "liver_box_margin_mm": BOX_MARGIN_MM,
                  "tumour_threshold": segmenter.tumour_threshold,
                  "min_tumour_ml": segmenter.min_tumour_ml,
                  "labels": {"1": "Liver", "2": "Lesion_Liver"}},
        "training_data": (
            f"{len(prepared)} cases: "
            + (f"synthetic abdomen phantoms (dicomnode.phantoms) seeds {_ranges(seeds)} at "
               f"matrix {matrix}" if seeds else "")
            + (f"; data directory {data_dir}" if data_dir else "")
            + ". Synthetic data only unless a data directory says otherwise; not for "
              "clinical use."),
        "heldout": {"phantom_seeds": _ranges(heldout_seeds), "phantom_matrix": matrix},
        "validation": ({"phantom_seeds": _ranges(val_seeds),
                        "tumour_threshold": segmenter.tumour_threshold,
                        "min_tumour_ml": segmenter.min_tumour_ml} if val_seeds else None),
        "metrics": {},
        "model_card": f"{MODEL_NAME}.md",
    }
    if heldout_seeds:
        from dicomnode.nn.evaluate import evaluate_cases

        cases = (datasets.phantom_case(s, matrix=matrix, cache_dir=cache_dir)
                 for s in heldout_seeds)
        report = evaluate_cases(segmenter, cases)
        metrics["heldout"] = report
        entry["metrics"] = report["summary"]
    (out_dir / f"{MODEL_NAME}-{version}.metrics.json").write_text(
        json.dumps(metrics, indent=2) + "\n")
    if update_manifest:
        weights.write_entry(entry, out_dir)
    log.info("train.done", extra={"dn_fields": {"model": MODEL_NAME, "version": version,
                                                "sha256": digest[:12],
                                                "seconds": round(time.perf_counter()
                                                                 - started, 1)}})
    return entry


#: The tensor fields of :class:`_Prepared` (sent between processes as numpy arrays).
_TENSOR_FIELDS = ("coarse", "coarse_liver", "fine", "fine_labels")


def _load_prepared(source: int | Path | tuple[Path, Path], matrix: int,
                   cache_dir: Path | None) -> tuple[str, dict[str, Any] | None]:
    """Read or generate one case and prepare it; plain arrays, so that it pickles cheaply."""
    torch.set_num_threads(1)
    case = (datasets.phantom_case(source, matrix=matrix, cache_dir=cache_dir)
            if isinstance(source, int) else datasets.load(source))
    item = prepare(case)
    if item is None:
        return case.name, None
    return case.name, {key: (value.numpy() if key in _TENSOR_FIELDS else value)
                       for key, value in vars(item).items()}


def _prepared_cases(data_dir: Path | None, seeds: Sequence[int], *, matrix: int,
                    cache_dir: Path | None, workers: int = 1
                    ) -> Iterator[tuple[str, _Prepared | None]]:
    """Every case of ``data_dir`` then every phantom seed, prepared, in that order.

    With ``workers`` > 1 the cases are generated and prepared in that many processes
    (spawned, so that no torch thread pool is forked).
    """
    if workers == 1:
        for case in datasets.iter_cases(data_dir, seeds, matrix=matrix, cache_dir=cache_dir):
            yield case.name, prepare(case)
        return
    sources: list[int | Path | tuple[Path, Path]] = [
        *(datasets.discover(data_dir) if data_dir is not None else []), *seeds]
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max(1, min(workers, len(sources))), mp_context=context) as pool:
        for name, item in pool.map(_load_prepared, sources, [matrix] * len(sources),
                                   [cache_dir] * len(sources)):
            yield name, (_Prepared(**_tensors(item)) if item else None)


def _tensors(item: dict[str, Any]) -> dict[str, Any]:
    """The arrays of a prepared case back as tensors (the voxel lists stay numpy)."""
    return {key: (torch.from_numpy(value) if key in _TENSOR_FIELDS else value)
            for key, value in item.items()}


def _device_name(preference: str) -> str:
    """The training device in words, e.g. ``cuda:0 (NVIDIA H200)`` or ``cpu``."""
    device = runtime.select_device(preference)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _networks(cfg: TrainConfig) -> tuple[Liver25DNet, Liver25DNet, dict[str, Any] | None]:
    """Both networks, fresh or initialised from ``cfg.init_from`` (a checkpoint file).

    Returns the networks and a record of the initial checkpoint (file name, sha256,
    version) for the metrics file, or ``None`` when trained from scratch.
    """
    if cfg.init_from is None:
        return Liver25DNet(2, cfg.width_liver), Liver25DNet(3, cfg.width_tumour), None
    path = Path(cfg.init_from)
    if not path.is_file():
        raise ValueError(f"Invalid 'init_from' value '{path}' - no such checkpoint file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        previous = checkpoint["config"]
        nets = []
        reset = []
        for stage, classes, key in (("liver", 2, "width_liver"), ("tumour", 3, "width_tumour")):
            old_width = int(previous.get(key, getattr(cfg, key)))
            if cfg.reset_width and stage in cfg.stages and getattr(cfg, key) != old_width:
                nets.append(Liver25DNet(classes, getattr(cfg, key)))
                reset.append(stage)
                continue
            net = Liver25DNet(classes, old_width)
            net.load_state_dict(checkpoint[stage])
            nets.append(net)
        liver, tumour = nets
    except Exception as exc:  # torch.load raises pickle/zip/runtime errors alike
        raise ValueError(f"Invalid 'init_from' value '{path}' - not a liver_tumor "
                         f"checkpoint ({exc})") from exc
    cfg.width_liver, cfg.width_tumour = liver.width, tumour.width
    record = {"file": path.name, "sha256": weights.sha256_of(path),
              "version": previous.get("version"),
              "tumour_threshold": previous.get("tumour_threshold"),
              "min_tumour_ml": previous.get("min_tumour_ml"),
              "stages_from_scratch": reset}
    return liver, tumour, record


def _ranges(values: Sequence[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``"0-2,5"``."""
    out: list[str] = []
    items = sorted(set(int(v) for v in values))
    i = 0
    while i < len(items):
        j = i
        while j + 1 < len(items) and items[j + 1] == items[j] + 1:
            j += 1
        out.append(str(items[i]) if i == j else f"{items[i]}-{items[j]}")
        i = j + 1
    return ",".join(out)


def train_from_cli(model: str, *, data: Path | None, phantom_seeds: str | None,
                   heldout_seeds: str | None, epochs: int, steps_per_epoch: int, out: Path,
                   val_seeds: str | None = None,
                   version: str, cache_dir: Path | None,
                   max_minutes_per_stage: float | None = None, stages: str = "liver,tumour",
                   init_from: Path | None = None, lr: float | None = None,
                   device: str = "auto", batch_size: int | None = None, workers: int = 1,
                   width_liver: int | None = None, width_tumour: int | None = None,
                   tumour_class_weight: float | None = None,
                   hu_shift: float | None = None) -> dict[str, Any]:
    """What ``dicomnode train MODEL`` runs: parse the seed lists and train.

    Raises
    ------
    ValueError
        Unknown model, bad seed lists or no data.
    """
    if model != MODEL_NAME:
        raise ValueError(f"Invalid 'model' value '{model}' - trainable here: {MODEL_NAME}")
    seeds = datasets.parse_seeds(phantom_seeds) if phantom_seeds else []
    heldout = datasets.parse_seeds(heldout_seeds) if heldout_seeds else []
    validation = datasets.parse_seeds(val_seeds) if val_seeds else []
    # options left out keep TrainConfig's defaults
    given: dict[str, Any] = {key: value for key, value in (
        ("lr", lr), ("batch_size", batch_size), ("width_liver", width_liver),
        ("width_tumour", width_tumour), ("tumour_class_weight", tumour_class_weight),
        ("hu_shift", hu_shift))
        if value is not None}
    config = TrainConfig(epochs=epochs, steps_per_epoch=steps_per_epoch,
                         max_minutes_per_stage=max_minutes_per_stage,
                         stages=tuple(s.strip() for s in stages.split(",")
                                      if s.strip() and s.strip() != "none"),
                         init_from=init_from, device=device, workers=workers,
                         reset_width="width_liver" in given or "width_tumour" in given,
                         **given)
    return train_liver_tumor(out, data_dir=data, seeds=seeds, heldout_seeds=heldout,
                             val_seeds=validation,
                             config=config, version=version, cache_dir=cache_dir)
