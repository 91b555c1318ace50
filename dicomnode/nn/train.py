"""The one training loop: ``dicomnode train MODEL`` for every model recipe.

:func:`train` prepares the cases (phantom seeds generated on the fly, a site's data
folder in its public layout; optionally in worker processes), trains each stage of the
recipe with AdamW and a cosine learning-rate decay over whichever runs out first, the
steps or a time budget (bfloat16 autocast on CUDA), lets the recipe choose its operating
point on validation cases, writes one checkpoint holding every stage, a metrics file
and a ``manifest.json`` entry (name, version, sha256, input spec, training data,
held-out metrics), and evaluates held-out seeds at the end. What differs between models
(data, samplers, losses, networks, scores) comes from :mod:`dicomnode.nn.recipe`.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from dicomnode.nn import datasets, runtime, weights
from dicomnode.nn.recipe import (
    ModelRecipe,
    Options,
    Sampler,
    Source,
    Stage,
    get_recipe,
    make_options,
)

log = logging.getLogger(__name__)


@dataclass
class TrainConfig:
    """What every model's training run is given (recorded in the metrics file).

    Attributes
    ----------
    epochs, steps_per_epoch : int
        Steps of a stage are ``epochs * steps_per_epoch * stage.step_factor``.
    batch_size : int
        Patches per step.
    lr : float
        Peak learning rate.
    seed : int
        Seed of the sampling and of the networks' initialisation.
    threads : int
        torch's CPU threads.
    max_minutes_per_stage : float, optional
        Time budget of each stage.
    stages : tuple of str, optional
        Stages to train (None: all); the others keep ``init_from``'s weights.
    init_from : pathlib.Path, optional
        Checkpoint to start from.
    device : str
        ``"cpu"``, ``"cuda[:N]"`` or ``"auto"``.
    workers : int
        Processes that generate and prepare the cases (1: this process).
    widths : dict
        Stage name -> width (default: the recipe's).
    reset_width : bool
        A trained stage whose asked width differs from ``init_from``'s starts from scratch
        (a wider network cannot inherit narrower weights).
    """

    epochs: int = 10
    steps_per_epoch: int = 40
    batch_size: int = 4
    lr: float = 3e-3
    seed: int = 0
    threads: int = 2
    max_minutes_per_stage: float | None = None
    stages: tuple[str, ...] | None = None
    init_from: Path | None = None
    device: str = "cpu"
    workers: int = 1
    widths: dict[str, int] = field(default_factory=dict)
    reset_width: bool = False

    def __post_init__(self) -> None:
        for key in ("epochs", "steps_per_epoch", "batch_size", "threads", "workers"):
            value = getattr(self, key)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"Invalid '{key}' value '{value}' - must be a positive integer")
        for stage, width in self.widths.items():
            if not isinstance(width, int) or width < 4:
                raise ValueError(f"Invalid 'width_{stage}' value '{width}' - must be an "
                                 "integer >= 4")
        if self.max_minutes_per_stage is not None and not self.max_minutes_per_stage > 0:
            raise ValueError(f"Invalid 'max_minutes_per_stage' value "
                             f"'{self.max_minutes_per_stage}' - must be positive")
        if not 0 < self.lr < 1:
            raise ValueError(f"Invalid 'lr' value '{self.lr}' - must be in (0, 1)")

    def check(self, recipe: ModelRecipe) -> tuple[str, ...]:
        """The stages to train, checked against ``recipe``'s.

        Raises
        ------
        ValueError
            An unknown stage or width, or a stage left out with nothing to take its
            weights from.
        """
        names = tuple(s.name for s in recipe.stages)
        stages = names if self.stages is None else self.stages
        unknown = [s for s in (*stages, *self.widths) if s not in names]
        if unknown:
            raise ValueError(f"Invalid 'stages' value '{','.join(stages)}' - {recipe.name} "
                             f"has stages {', '.join(names)}")
        if set(stages) != set(names) and self.init_from is None:
            raise ValueError("Invalid 'stages' value - a stage that is not trained needs its "
                             "weights from 'init_from'")
        return stages


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


def fit(net: nn.Module, sampler: Sampler, loss_fn: nn.Module, cfg: TrainConfig,
        steps_per_epoch: int, label: str, rng: np.random.Generator
        ) -> tuple[list[float], int]:
    """Train ``net`` for ``cfg.epochs``; returns the mean loss of every epoch and the steps.

    Where :func:`autocast_bf16` says so, the forward pass runs under bfloat16 autocast
    (the loss in float32); the network is back on the CPU when this returns. A sampler
    with a ``feedback`` method is shown every batch's output (samplers that draw by
    difficulty).
    """
    device = runtime.select_device(cfg.device)
    net.to(device)
    amp = autocast_bf16(device)
    loss_fn = loss_fn.to(device)
    optimiser = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=1e-4)
    total = cfg.epochs * steps_per_epoch
    budget = cfg.max_minutes_per_stage * 60 if cfg.max_minutes_per_stage else math.inf
    progress = Progress(label, total)
    history = []
    net.train()
    step = 0
    started = time.perf_counter()
    done = 0.0
    feedback = getattr(sampler, "feedback", None)
    for _ in range(cfg.epochs):
        losses = []
        for _ in range(steps_per_epoch):
            # cosine decay over whichever runs out first: the steps or the time budget
            done = max(step / total, (time.perf_counter() - started) / budget)
            if done >= 1:
                break
            for group in optimiser.param_groups:
                group["lr"] = cfg.lr * 0.5 * (1 + math.cos(math.pi * done))
            image, target = sampler(rng)
            image = image.to(device, non_blocking=True)
            target = _to(target, device)
            optimiser.zero_grad(set_to_none=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                logits = net(image)
            loss = loss_fn(logits.float(), target)
            loss.backward()
            if feedback is not None:
                feedback(logits, target)
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


def autocast_bf16(device: torch.device) -> bool:
    """Whether training on ``device`` runs its forward pass in bfloat16.

    On CUDA always; on a CPU when it computes bfloat16 natively (``avx512_bf16`` or
    ``amx_bf16``), where a training step of AnatomyNet took half the time in float32's.
    Inference stays in float32 on a CPU.
    """
    if device.type == "cuda":
        return True
    if device.type != "cpu":
        return False
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((line for line in fh if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _to(target: Any, device: torch.device) -> Any:
    """A target tensor, or a tuple of them (labels with a per-sample class mask), on
    ``device``."""
    if isinstance(target, tuple):
        return tuple(t.to(device, non_blocking=True) for t in target)
    return target.to(device, non_blocking=True)


def train(recipe: ModelRecipe, out_dir: Path, *, data_dir: Path | None = None,
          seeds: Sequence[int] = (), heldout_seeds: Sequence[int] = (),
          val_seeds: Sequence[int] = (), config: TrainConfig | None = None,
          options: Options | None = None, version: str = "1.0.0", matrix: int | None = None,
          cache_dir: Path | None = None, update_manifest: bool = True) -> dict[str, Any]:
    """Train the recipe's stages and write the checkpoint, manifest entry and metrics.

    Parameters
    ----------
    recipe : ModelRecipe
        The model.
    out_dir : pathlib.Path
        Models folder: receives ``NAME-VERSION.pt``, ``NAME-VERSION.metrics.json`` and
        the ``manifest.json`` entry.
    data_dir : pathlib.Path, optional
        Phantom folders and/or the recipe's public layout.
    seeds : sequence of int
        Phantom seeds generated for training.
    heldout_seeds : sequence of int
        Phantom seeds evaluated after training (must not overlap ``seeds``).
    val_seeds : sequence of int
        Phantom seeds on which the recipe chooses its operating point (overlapping
        neither ``seeds`` nor ``heldout_seeds``).
    config : TrainConfig, optional
        What every model's run is given.
    options : Options, optional
        The recipe's own hyper-parameters (default: its defaults).
    version : str
        Version written to the manifest and the file name.
    matrix : int, optional
        In-plane matrix of generated phantoms (default: the recipe's).
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
    opts = options or make_options(recipe)
    trained = cfg.check(recipe)
    matrix = matrix or recipe.phantom_matrix
    test_matrix = recipe.evaluation_matrix or matrix
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
    prepared: list[Any] = []
    names: list[str] = []
    for name, item in prepared_cases(recipe, opts, data_dir, seeds, matrix=matrix,
                                     cache_dir=cache_dir, workers=cfg.workers):
        if item is not None:
            prepared.append(item)
            names.append(name)
        log.info("train.case_ready", extra={"dn_fields": {"case": name,
                                                          "cases": len(prepared)}})
    if not prepared:
        raise ValueError(f"Invalid 'data' value - no case with a {recipe.name} label")
    seconds: dict[str, float] = {"prepare": round(time.perf_counter() - started, 1)}

    nets, init = _networks(recipe, cfg, trained)
    history: dict[str, list[float]] = {s.name: [] for s in recipe.stages}
    steps: dict[str, int] = {s.name: 0 for s in recipe.stages}
    sampling: dict[str, Any] = {}
    for stage in recipe.stages:
        t = time.perf_counter()
        if stage.name in trained:
            sampler = recipe.sampler(stage, prepared, opts, cfg.batch_size)
            history[stage.name], steps[stage.name] = fit(
                nets[stage.name], sampler, recipe.loss(stage, opts), cfg,
                cfg.steps_per_epoch * stage.step_factor, f"stage {stage.name}", rng)
            summary = getattr(sampler, "summary", None)
            if summary is not None:
                sampling[stage.name] = summary()
        seconds[stage.name] = round(time.perf_counter() - t, 1)

    config_record: dict[str, Any] = {f"width_{name}": _width(net)
                                     for name, net in nets.items()}
    config_record["version"] = version
    config_record.update(recipe.train_config(opts))
    if init is not None:
        config_record.update(recipe.inherited(init["config"], trained))
    device = runtime.select_device(cfg.device)
    validation: dict[str, Any] | None = None
    if val_seeds:
        validation = recipe.validate(
            recipe.segmenter(nets, config_record, device),
            (recipe.phantom_case(s, matrix=test_matrix, cache_dir=cache_dir)
             for s in val_seeds))
        if validation is not None:
            config_record.update(validation.get("choice", {}))
            validation["phantom_seeds"] = datasets.format_seeds(val_seeds)
    config_record.update(recipe.operating_point(config_record))
    segmenter = recipe.segmenter(nets, config_record, device)

    out_dir.mkdir(parents=True, exist_ok=True)
    file_name = f"{recipe.name}-{version}.pt"
    checkpoint: dict[str, Any] = {name: {k: v.cpu() for k, v in net.state_dict().items()}
                                  for name, net in nets.items()}
    checkpoint["config"] = config_record
    tmp = out_dir / (file_name + ".tmp")
    torch.save(checkpoint, tmp)
    tmp.replace(out_dir / file_name)
    digest = weights.sha256_of(out_dir / file_name)

    training = {
        "cases": len(prepared), "case_names": names,
        "phantom_seeds": datasets.format_seeds(seeds),
        "data_dir": str(data_dir) if data_dir else None, "phantom_matrix": matrix,
        "config": {**asdict(cfg), "init_from": str(cfg.init_from) if cfg.init_from else None,
                   "stages": list(trained)},
        "options": asdict(opts),
        "loss_per_epoch": history, "steps": steps, "seconds": seconds,
        "threads": torch.get_num_threads(), "device": _device_name(cfg.device),
        "bfloat16_autocast": autocast_bf16(runtime.select_device(cfg.device)),
        "stages_trained": list(trained), "sampling": sampling,
        "initialised_from": ({k: v for k, v in init.items() if k != "config"}
                             if init is not None else None),
    }
    metrics: dict[str, Any] = {"training": training}
    if validation is not None:
        metrics["validation"] = validation
    entry: dict[str, Any] = {
        "name": recipe.name, "version": version, "file": file_name, "sha256": digest,
        "family": recipe.family,
        "input": recipe.input_spec(config_record),
        "training_data": (
            f"{len(prepared)} cases: "
            + (f"synthetic {recipe.region} phantoms (dicomnode.phantoms) seeds "
               f"{datasets.format_seeds(seeds)} at matrix {matrix}" if seeds else "")
            + (f"; data directory {data_dir}" if data_dir else "")
            + ". Synthetic data only unless a data directory says otherwise; not for "
              "clinical use."),
        "heldout": {"phantom_seeds": datasets.format_seeds(heldout_seeds),
                    "phantom_matrix": test_matrix},
        "validation": ({"phantom_seeds": datasets.format_seeds(val_seeds),
                        **recipe.operating_point(config_record)} if val_seeds else None),
        "metrics": {},
        "model_card": f"{recipe.name}.md",
    }
    if heldout_seeds:
        from dicomnode.nn.evaluate import evaluate_cases

        cases = (recipe.phantom_case(s, matrix=test_matrix, cache_dir=cache_dir)
                 for s in heldout_seeds)
        report = evaluate_cases(recipe, segmenter, cases)
        metrics["heldout"] = report
        entry["metrics"] = report["summary"]
    (out_dir / f"{recipe.name}-{version}.metrics.json").write_text(
        json.dumps(metrics, indent=2) + "\n")
    if update_manifest:
        weights.write_entry(entry, out_dir)
    log.info("train.done", extra={"dn_fields": {"model": recipe.name, "version": version,
                                                "sha256": digest[:12],
                                                "seconds": round(time.perf_counter()
                                                                 - started, 1)}})
    return entry


def _width(net: nn.Module) -> int:
    """The width a network was built with (every network keeps it as ``width``)."""
    return int(net.width)  # type: ignore[arg-type]


def _load_prepared(model: str, source: Source | int, options: Mapping[str, Any],
                   matrix: int, cache_dir: Path | None) -> tuple[str, Any]:
    """Read or generate one case and prepare it; its tensors as arrays, to pickle cheaply."""
    torch.set_num_threads(1)
    recipe = get_recipe(model)
    case = (recipe.phantom_case(source, matrix=matrix, cache_dir=cache_dir)
            if isinstance(source, int) else recipe.load(source))
    item = recipe.prepare(case, make_options(recipe, options))
    if item is None:
        return case.name, None
    return case.name, (type(item), {
        key: (("tensor", value.numpy()) if isinstance(value, torch.Tensor) else value)
        for key, value in vars(item).items()})


def _rebuilt(packed: tuple[type, dict[str, Any]] | None) -> Any:
    """A prepared case sent by a worker process, its tensors back as tensors."""
    if packed is None:
        return None
    kind, values = packed
    return kind(**{key: (torch.from_numpy(value[1]) if isinstance(value, tuple)
                         and len(value) == 2 and value[0] == "tensor" else value)
                   for key, value in values.items()})


def prepared_cases(recipe: ModelRecipe, options: Options, data_dir: Path | None,
                   seeds: Sequence[int], *, matrix: int, cache_dir: Path | None,
                   workers: int = 1) -> Iterator[tuple[str, Any]]:
    """Every case of ``data_dir`` then every phantom seed, prepared, in that order.

    With ``workers`` > 1 the cases are generated and prepared in that many processes
    (spawned, so that no torch thread pool is forked).
    """
    if workers == 1:
        for case in recipe.iter_cases(data_dir, seeds, matrix=matrix, cache_dir=cache_dir):
            yield case.name, recipe.prepare(case, options)
        return
    sources: list[Source | int] = [
        *(recipe.discover(data_dir) if data_dir is not None else []), *seeds]
    values = asdict(options) if is_dataclass(options) else {}
    context = multiprocessing.get_context("spawn")
    n = len(sources)
    with ProcessPoolExecutor(max(1, min(workers, n)), mp_context=context) as pool:
        for name, packed in pool.map(_load_prepared, [recipe.name] * n, sources, [values] * n,
                                     [matrix] * n, [cache_dir] * n):
            yield name, _rebuilt(packed)


def _device_name(preference: str) -> str:
    """The training device in words, e.g. ``cuda:0 (NVIDIA H200)`` or ``cpu``."""
    device = runtime.select_device(preference)
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)


def _networks(recipe: ModelRecipe, cfg: TrainConfig, trained: Sequence[str]
              ) -> tuple[dict[str, nn.Module], dict[str, Any] | None]:
    """Every stage's network, fresh or initialised from ``cfg.init_from`` (a checkpoint).

    Returns the networks and a record of the initial checkpoint (file name, sha256,
    version, its config, the stages started from scratch), or ``None`` without one.
    """
    def width(stage: Stage) -> int:
        return cfg.widths.get(stage.name, stage.width)

    if cfg.init_from is None:
        return {s.name: recipe.network(s, width(s)) for s in recipe.stages}, None
    path = Path(cfg.init_from)
    if not path.is_file():
        raise ValueError(f"Invalid 'init_from' value '{path}' - no such checkpoint file")
    nets: dict[str, nn.Module] = {}
    reset = []
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
        previous = checkpoint["config"]
        for stage in recipe.stages:
            old_width = int(previous.get(f"width_{stage.name}", width(stage)))
            if (cfg.reset_width and stage.name in trained and stage.name in cfg.widths
                    and cfg.widths[stage.name] != old_width):
                nets[stage.name] = recipe.network(stage, cfg.widths[stage.name])
                reset.append(stage.name)
                continue
            net = recipe.network(stage, old_width)
            net.load_state_dict(checkpoint[stage.name])
            nets[stage.name] = net
    except Exception as exc:  # torch.load raises pickle/zip/runtime errors alike
        raise ValueError(f"Invalid 'init_from' value '{path}' - not a {recipe.name} "
                         f"checkpoint ({exc})") from exc
    record = {"file": path.name, "sha256": weights.sha256_of(path),
              "version": previous.get("version"), "stages_from_scratch": reset,
              "config": dict(previous)}
    return nets, record


def train_from_cli(model: str, *, data: Path | None, phantom_seeds: str | None,
                   heldout_seeds: str | None, val_seeds: str | None, out: Path, version: str,
                   cache_dir: Path | None, epochs: int = 10, steps_per_epoch: int = 40,
                   max_minutes_per_stage: float | None = None, stages: str | None = None,
                   init_from: Path | None = None, lr: float | None = None,
                   device: str = "auto", batch_size: int | None = None, workers: int = 1,
                   threads: int | None = None,
                   widths: Mapping[str, int | None] | None = None,
                   options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What ``dicomnode train MODEL`` runs: parse the seed lists and options, train.

    Options left out (None) keep their defaults.

    Raises
    ------
    ValueError
        Unknown model or option, bad seed lists or no data.
    """
    recipe = get_recipe(model)
    opts = make_options(recipe, options)
    asked = {k: v for k, v in (widths or {}).items() if v is not None}
    given: dict[str, Any] = {key: value for key, value in (("lr", lr),
                                                           ("batch_size", batch_size),
                                                           ("threads", threads))
                             if value is not None}
    chosen = (None if stages is None else
              tuple(s.strip() for s in stages.split(",") if s.strip() and s.strip() != "none"))
    config = TrainConfig(epochs=epochs, steps_per_epoch=steps_per_epoch,
                         max_minutes_per_stage=max_minutes_per_stage, stages=chosen,
                         init_from=init_from, device=device, workers=workers,
                         widths=asked, reset_width=bool(asked), **given)
    return train(recipe, out, data_dir=data,
                 seeds=datasets.parse_seeds(phantom_seeds) if phantom_seeds else [],
                 heldout_seeds=datasets.parse_seeds(heldout_seeds) if heldout_seeds else [],
                 val_seeds=datasets.parse_seeds(val_seeds) if val_seeds else [],
                 config=config, options=opts, version=version, cache_dir=cache_dir)


#: The fields of TrainConfig (the CLI builds its shared options from them).
CONFIG_FIELDS = tuple(f.name for f in fields(TrainConfig))
