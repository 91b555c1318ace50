"""What every trainable model brings to the shared training loop and evaluation.

A model (``dicomnode.nn.liver_tumor``, ``dicomnode.nn.headneck_oar``) subclasses
:class:`ModelRecipe` and says, in its own module and nowhere else: where its cases come
from (phantom region and label mapping, the public dataset's layout), how a case is
prepared for training, its stages (one network each), how patches are drawn and which
loss they are scored with, how the stages are put together for inference, and how a
prediction is scored. :mod:`dicomnode.nn.train` and :mod:`dicomnode.nn.evaluate` run
any recipe; ``dicomnode train MODEL`` and ``dicomnode evaluate MODEL`` find it by name.
"""

from __future__ import annotations

import importlib
import logging
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Any, ClassVar, Protocol

import numpy as np
import torch
from torch import nn

from dicomnode.nn import datasets, weights

log = logging.getLogger(__name__)

#: Built-in model recipes: name -> module under ``dicomnode.nn``.
BUILTIN: dict[str, str] = {"brain_ich": "brain_ich", "headneck_oar": "headneck_oar",
                           "liver_tumor": "liver_tumor"}

#: A case to read: a path, or a pair of paths (image, labels), or a phantom seed.
Source = Path | tuple[Path, ...] | int


@dataclass(frozen=True)
class Stage:
    """One network of a model, trained on its own.

    Attributes
    ----------
    name : str
        Key of its weights in the checkpoint and of its width (``width_<name>``).
    classes : int
        Output channels.
    width : int
        Default width.
    step_factor : int
        Its training steps are ``steps_per_epoch * step_factor`` per epoch.
    """

    name: str
    classes: int
    width: int
    step_factor: int = 1


class Segmentation(Protocol):
    """What a segmenter returns: labels on the input grid and seconds per step."""

    labels: np.ndarray
    timings: dict[str, float]


class Segmenter(Protocol):
    """The stages of a model put together for inference on one device."""

    device: torch.device

    def segment(self, hu: np.ndarray, spacing: Sequence[float]) -> Any:
        """Labels of one ``[z, y, x]`` HU volume (a :class:`Segmentation`)."""
        ...

    def warm_up(self) -> None:
        """Run each network once so that the first volume pays no start-up."""
        ...


class Sampler(Protocol):
    """Draws one training batch ``(image [B, C, ...], target [B, ...])``."""

    def __call__(self, rng: np.random.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """One batch."""
        ...


@dataclass
class Options:
    """Hyper-parameters of one model (a recipe subclasses this with its own fields).

    Each field's ``metadata["help"]`` is its help text in ``dicomnode train MODEL``.
    """

    def validate(self) -> None:
        """Raise ``ValueError`` naming the field whose value is wrong."""


class ModelRecipe(ABC):
    """A trainable, evaluable model: data, stages, samplers, losses, inference, metrics.

    Class attributes
    ----------------
    name : str
        Model name: the pipeline's and the manifest's.
    region : str
        Phantom region its training phantoms are made of.
    family : str
        The model family in words (recorded in the manifest and in every result).
    stages : tuple of Stage
        Its networks, in training order.
    labels : dict
        Label value -> structure name of its output.
    options : type
        Its :class:`Options` dataclass.
    phantom_matrix : int
        In-plane matrix of its training phantoms.
    evaluation_matrix : int or None
        In-plane matrix of its validation and held-out phantoms (None: the training one).
    phantom_noise_hu : float
        Noise of its phantoms at their protocol (robustness reports double it).
    data_layout : str
        The public dataset's layout it reads, in words (for help texts and errors).
    """

    name: ClassVar[str]
    region: ClassVar[str]
    family: ClassVar[str]
    stages: ClassVar[tuple[Stage, ...]]
    labels: ClassVar[dict[int, str]]
    options: ClassVar[type[Options]] = Options
    phantom_matrix: ClassVar[int] = 256
    evaluation_matrix: ClassVar[int | None] = None
    phantom_noise_hu: ClassVar[float] = 10.0
    data_layout: ClassVar[str] = ""

    # --- data -------------------------------------------------------------------------

    @abstractmethod
    def relabel(self, labels: np.ndarray, table: Mapping[int, str]) -> np.ndarray:
        """The phantom's (or a phantom folder's) labels mapped onto this model's."""

    def phantom_case(self, seed: int, *, matrix: int | None = None,
                     cache_dir: Path | None = None) -> datasets.Case:
        """The training phantom of ``seed`` (see :func:`dicomnode.nn.datasets.phantom_case`)."""
        return datasets.phantom_case(self.region, seed, self.relabel,
                                     matrix=matrix or self.phantom_matrix, cache_dir=cache_dir)

    def discover(self, data_dir: Path) -> list[Source]:
        """Cases under ``data_dir``: phantom folders and the public dataset's layout.

        Raises
        ------
        ValueError
            If the directory does not exist or holds no case.
        """
        datasets.check_data_dir(data_dir)
        found: list[Source] = [*datasets.phantom_dirs(data_dir), *self.discover_public(data_dir)]
        if not found:
            raise ValueError(f"Invalid 'data' value '{data_dir}' - no phantom folders "
                             f"(*.dcm + labels.nii.gz) and no {self.data_layout}")
        return found

    def discover_public(self, data_dir: Path) -> list[Source]:
        """Cases of the public dataset's layout under ``data_dir`` (none by default)."""
        return []

    def load(self, source: Source) -> datasets.Case:
        """Read one discovered case (a phantom folder, or the public layout's files)."""
        if isinstance(source, int):
            return self.phantom_case(source)
        if isinstance(source, Path):
            return datasets.load_phantom_dir(source, self.relabel)
        return self.load_public(source)

    def load_public(self, source: tuple[Path, ...]) -> datasets.Case:
        """Read one case of the public dataset's layout."""
        raise ValueError(f"Invalid 'source' value '{source}' - {self.name} reads no "
                         "public layout")

    def iter_cases(self, data_dir: Path | None = None, seeds: Sequence[int] = (), *,
                   matrix: int | None = None, cache_dir: Path | None = None
                   ) -> Iterator[datasets.Case]:
        """Every case of a directory, then every phantom seed."""
        if data_dir is not None:
            for source in self.discover(data_dir):
                yield self.load(source)
        for seed in seeds:
            yield self.phantom_case(seed, matrix=matrix, cache_dir=cache_dir)

    # --- training ---------------------------------------------------------------------

    @abstractmethod
    def prepare(self, case: datasets.Case, options: Options) -> Any | None:
        """One case on the stages' grids, ready for sampling; None to leave it out.

        The result must be a dataclass whose tensors and arrays pickle (cases are
        prepared in worker processes).
        """

    @abstractmethod
    def network(self, stage: Stage, width: int) -> nn.Module:
        """A fresh network of ``stage`` at ``width``."""

    @abstractmethod
    def sampler(self, stage: Stage, cases: list[Any], options: Options,
                batch_size: int) -> Sampler:
        """Draws ``stage``'s training batches from the prepared cases."""

    @abstractmethod
    def loss(self, stage: Stage, options: Options) -> nn.Module:
        """``stage``'s loss: ``loss(logits, target)``."""

    # --- inference --------------------------------------------------------------------

    @abstractmethod
    def segmenter(self, nets: Mapping[str, nn.Module], config: Mapping[str, Any],
                  device: torch.device, **overrides: Any) -> Segmenter:
        """The stages put together for inference (``config``: the checkpoint's record)."""

    def build_segmenter(self, checkpoint: Mapping[str, Any], device: torch.device,
                        **overrides: Any) -> Segmenter:
        """Networks from a checkpoint (one state per stage, ``config`` with the widths)."""
        config = dict(checkpoint.get("config", {}))
        nets: dict[str, nn.Module] = {}
        for stage in self.stages:
            net = self.network(stage, int(config.get(f"width_{stage.name}", stage.width)))
            net.load_state_dict(checkpoint[stage.name])
            nets[stage.name] = net
        return self.segmenter(nets, config, device, **overrides)

    def load_segmenter(self, models: Path | None = None, device: torch.device | None = None,
                       **overrides: Any) -> tuple[Segmenter, weights.ManifestEntry]:
        """The checked installed weights of this model, ready on ``device``.

        Raises
        ------
        dicomnode.nn.weights.WeightsError
            Missing weights or a checksum mismatch.
        """
        from dicomnode.nn.runtime import select_device

        checkpoint, entry = weights.load_weights(self.name, models)
        return self.build_segmenter(checkpoint, device or select_device(), **overrides), entry

    def validate(self, segmenter: Segmenter, cases: Iterator[datasets.Case]
                 ) -> dict[str, Any] | None:
        """Choose what is chosen on validation cases (an operating point); None: nothing.

        Returns what was measured (recorded in the metrics file) with the chosen values
        under ``choice``: they are written into the checkpoint's config, from which the
        segmenter is built.
        """
        return None

    def inherited(self, previous: Mapping[str, Any], trained: Sequence[str]
                  ) -> dict[str, Any]:
        """What a checkpoint trained from ``previous`` keeps of its config (``trained``:
        the stages trained again); validation may choose it anew."""
        return {}

    def train_config(self, options: Options) -> dict[str, Any]:
        """What of ``options`` inference needs, written into the checkpoint's config."""
        return {}

    def operating_point(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The settings chosen on validation that the weights ship with (from ``config``)."""
        return {}

    def input_spec(self, config: Mapping[str, Any]) -> dict[str, Any]:
        """The manifest's ``input`` section: what the weights expect and how they label."""
        return {"modality": "CT", "region": self.region, "units": "HU",
                "labels": {str(k): v for k, v in self.labels.items()}}

    # --- evaluation -------------------------------------------------------------------

    @abstractmethod
    def score_case(self, labels: np.ndarray, case: datasets.Case) -> dict[str, Any]:
        """Scores of one predicted label map against its case's truth."""

    def score(self, result: Any, case: datasets.Case) -> dict[str, Any]:
        """Scores of one segmenter result (a :class:`Segmentation`) against its case's
        truth: :meth:`score_case` of its labels, unless the model scores more than labels
        (a classifier's probabilities)."""
        return self.score_case(result.labels, case)

    @abstractmethod
    def summarise(self, rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
        """Scores over cases."""

    @abstractmethod
    def report_lines(self, report: Mapping[str, Any]) -> list[str]:
        """The evaluation report as lines of text (``dicomnode evaluate`` without --json)."""

    def evaluation_options(self) -> dict[str, tuple[type, Any, str]]:
        """Options of ``dicomnode evaluate MODEL``: name -> (type, default, help)."""
        return {}

    def configure_evaluation(self, **values: Any) -> None:  # noqa: B027 - optional hook
        """Take the values of :meth:`evaluation_options` before scoring (none here)."""


def make_options(recipe: ModelRecipe, values: Mapping[str, Any] | None = None) -> Options:
    """The recipe's options: defaults, overridden by the non-None ``values``; validated.

    Raises
    ------
    ValueError
        An unknown option, or a value its field refuses.
    """
    known = {f.name for f in fields(recipe.options)}
    given = {k: v for k, v in (values or {}).items() if v is not None}
    unknown = sorted(set(given) - known)
    if unknown:
        raise ValueError(f"Invalid option '{unknown[0]}' - {recipe.name} takes "
                         f"{', '.join(sorted(known)) or 'no options'}")
    options = recipe.options(**given)
    options.validate()
    return options


def option_help(recipe: ModelRecipe) -> list[tuple[str, type, Any, str]]:
    """``(name, type, default, help)`` of each of the recipe's options, for the CLI."""
    out = []
    for f in fields(recipe.options):
        default = (f.default if f.default is not MISSING
                   else f.default_factory())  # type: ignore[misc,operator]
        kind = type(default) if default is not None else str
        out.append((f.name, kind, default, str(f.metadata.get("help", ""))))
    return out


def get_recipe(name: str) -> ModelRecipe:
    """The recipe of model ``name``.

    Raises
    ------
    ValueError
        An unknown name (the message lists the models there are).
    """
    module = BUILTIN.get(name)
    if module is None:
        raise ValueError(f"Invalid 'model' value '{name}' - must be one of "
                         f"{', '.join(sorted(BUILTIN))}")
    recipe: Callable[[], ModelRecipe] = importlib.import_module(
        f"dicomnode.nn.{module}").RECIPE
    return recipe()


def positive_ints(options: Options, *names: str) -> None:
    """Raise ``ValueError`` for the first of ``names`` that is not a positive integer."""
    for key in names:
        value = getattr(options, key)
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"Invalid '{key}' value '{value}' - must be a positive integer")
