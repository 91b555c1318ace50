"""Inference runtime shared by every network: device, precision, sliding windows, resampling.

- :func:`select_device`: CUDA when present, else CPU; a config value forces one.
- :func:`configure_cpu_threads`: a sensible ``torch.set_num_threads`` on CPU.
- :func:`sliding_window_inference`: overlapping windows over a ``[C, Z, Y, X]`` image,
  batched, each window's output weighted by a Gaussian so that window borders count less
  (the nnU-Net recipe), mixed precision on GPU only, under ``torch.inference_mode()``.
- :func:`resample_to_spacing` / :func:`resample_to_shape`: spacing-aware resampling in and
  out of the network's grid (trilinear for images, nearest or probabilities for labels).
- :class:`SlidingWindowSegmenter` and :class:`Segmentation`: what the two-stage
  segmenters share (windows per pass, timing on an asynchronous device, warm-up, the
  organs' box of stage 1 on the input grid).

Only torch >= 2.2 APIs are used.
"""

from __future__ import annotations

import itertools
import logging
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the name every torch reader knows

log = logging.getLogger(__name__)

Predictor = Callable[[torch.Tensor], torch.Tensor]


def select_device(preference: str | None = None) -> torch.device:
    """Pick the torch device to run on.

    Parameters
    ----------
    preference : str, optional
        ``None``/``"auto"`` (the first CUDA device when present, else CPU), ``"cpu"``,
        ``"cuda"`` or ``"cuda:N"``.

    Returns
    -------
    torch.device

    Raises
    ------
    ValueError
        If ``preference`` is not a device name, or names a CUDA device that is absent.
    """
    if preference is None or preference == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(preference)
    except (RuntimeError, TypeError):
        raise ValueError(f"Invalid 'device' value '{preference}' - must be 'auto', 'cpu' "
                         "or 'cuda[:N]'") from None
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = device.index or 0
        if index >= count:
            raise ValueError(f"Invalid 'device' value '{preference}' - {count} CUDA "
                             "device(s) present")
        return torch.device("cuda", index)
    if device.type != "cpu":
        raise ValueError(f"Invalid 'device' value '{preference}' - must be 'auto', 'cpu' "
                         "or 'cuda[:N]'")
    return device


def configure_cpu_threads(threads: int | None = None) -> int:
    """Set torch's intra-op threads for CPU inference.

    Parameters
    ----------
    threads : int, optional
        Number of threads; by default ``DICOMNODE_TORCH_THREADS`` or the CPUs this process
        may use (``os.sched_getaffinity``), so that a container's CPU limit is honoured.

    Returns
    -------
    int
        The number of threads set.
    """
    if threads is None:
        env = os.environ.get("DICOMNODE_TORCH_THREADS")
        if env:
            threads = int(env)
        else:
            try:
                threads = len(os.sched_getaffinity(0))
            except AttributeError:  # not on Linux
                threads = os.cpu_count() or 1
    if threads < 1:
        raise ValueError(f"Invalid 'threads' value '{threads}' - must be >= 1")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def gaussian_importance(size: Sequence[int], sigma_scale: float = 0.125) -> torch.Tensor:
    """Gaussian weight map of a window: 1 at the centre, small but positive at borders.

    Parameters
    ----------
    size : sequence of int
        Window size per axis.
    sigma_scale : float
        Standard deviation as a fraction of the window size per axis.

    Returns
    -------
    torch.Tensor
        float32 weights of shape ``size``.
    """
    if sigma_scale <= 0:
        raise ValueError(f"Invalid 'sigma_scale' value '{sigma_scale}' - must be positive")
    weight = torch.ones((), dtype=torch.float32)
    for n in size:
        coords = torch.arange(n, dtype=torch.float32) - (n - 1) / 2
        sigma = max(n * sigma_scale, 1e-3)
        g = torch.exp(-0.5 * (coords / sigma) ** 2)
        weight = weight.unsqueeze(-1) * g
    weight = weight / weight.max()
    # no zero weights: every voxel of every window must count a little
    return weight.clamp_min(1e-3)


def _starts(length: int, window: int, overlap: float) -> list[int]:
    """Window start positions covering ``length`` with at least ``overlap``."""
    if length <= window:
        return [0]
    step = max(1, int(window * (1 - overlap)))
    count = math.ceil((length - window) / step) + 1
    # spread the windows evenly so the last one ends exactly at the border
    return [round(i * (length - window) / (count - 1)) for i in range(count)]


def sliding_window_inference(predict: Predictor, image: torch.Tensor,
                             roi_size: Sequence[int], num_classes: int, *,
                             overlap: float = 0.5, batch_size: int = 4,
                             sigma_scale: float = 0.125, device: torch.device | None = None,
                             amp: bool | None = None,
                             output_device: torch.device | None = None) -> torch.Tensor:
    """Run a network over overlapping windows and blend them with Gaussian weights.

    Parameters
    ----------
    predict : callable
        Maps a batch ``[B, C, rz, ry, rx]`` to logits ``[B, num_classes, rz, ry, rx]``.
    image : torch.Tensor
        ``[C, Z, Y, X]`` input (any device; windows are moved to ``device``).
    roi_size : sequence of int
        Window ``(rz, ry, rx)``; an image smaller than the window is padded.
    num_classes : int
        Channels of the network output.
    overlap : float
        Fraction of a window shared with its neighbour, 0 to < 1.
    batch_size : int
        Windows per forward pass.
    sigma_scale : float
        Gaussian sigma as a fraction of the window size.
    device : torch.device, optional
        Where the network runs (default: the image's device).
    amp : bool, optional
        Mixed precision; by default on CUDA only (never on CPU).
    output_device : torch.device, optional
        Where the result is returned (default: the CPU); ``device`` keeps it on the GPU
        for further GPU work.

    Returns
    -------
    torch.Tensor
        float32 softmax probabilities ``[num_classes, Z, Y, X]``.
    """
    if image.ndim != 4:
        raise ValueError(f"Invalid 'image' value of shape {tuple(image.shape)} - must be "
                         "[C, Z, Y, X]")
    if len(roi_size) != 3 or any(int(r) < 1 for r in roi_size):
        raise ValueError(f"Invalid 'roi_size' value '{roi_size}' - must be three positive sizes")
    if not 0 <= overlap < 1:
        raise ValueError(f"Invalid 'overlap' value '{overlap}' - must be in [0, 1)")
    if batch_size < 1:
        raise ValueError(f"Invalid 'batch_size' value '{batch_size}' - must be >= 1")
    device = device or image.device
    use_amp = (device.type == "cuda") if amp is None else (amp and device.type == "cuda")
    _, *shape = image.shape
    roi = [int(r) for r in roi_size]
    pad = [max(0, r - s) for r, s in zip(roi, shape, strict=True)]
    if any(pad):
        # F.pad takes the last axis first
        image = F.pad(image, [p for axis in reversed(pad) for p in (0, axis)],
                      mode="replicate" if all(s > 1 for s in shape) else "constant")
    padded = list(image.shape[1:])
    weight = gaussian_importance(roi, sigma_scale).to(device)
    out = torch.zeros((num_classes, *padded), dtype=torch.float32, device=device)
    norm = torch.zeros(padded, dtype=torch.float32, device=device)
    corners = list(itertools.product(*(_starts(n, r, overlap)
                                       for n, r in zip(padded, roi, strict=True))))
    with torch.inference_mode():
        for first in range(0, len(corners), batch_size):
            chunk = corners[first:first + batch_size]
            windows = [image[:, z:z + roi[0], y:y + roi[1], x:x + roi[2]] for z, y, x in chunk]
            if device.type == "cuda" and len(windows) < batch_size:
                # a short last batch is padded: one batch shape per network, so the
                # kernels chosen at warm-up serve every volume (no first-use delays)
                windows += [windows[-1]] * (batch_size - len(windows))
            batch = torch.stack(windows).to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.float16,
                                enabled=use_amp):
                logits = predict(batch)[:len(chunk)]
            probs = torch.softmax(logits.float(), dim=1)
            for (z, y, x), p in zip(chunk, probs, strict=True):
                out[:, z:z + roi[0], y:y + roi[1], x:x + roi[2]] += p * weight
                norm[z:z + roi[0], y:y + roi[1], x:x + roi[2]] += weight
    out /= norm
    out = out[:, :shape[0], :shape[1], :shape[2]]
    return out.to(output_device or torch.device("cpu"))


def normalise_hu(hu: torch.Tensor | np.ndarray, window: tuple[float, float]) -> torch.Tensor:
    """Clip HU to ``window`` and scale linearly to [-1, 1].

    Parameters
    ----------
    hu : torch.Tensor or numpy.ndarray
        Hounsfield units, any shape.
    window : (float, float)
        Lowest and highest HU kept; they map to -1 and 1.

    Returns
    -------
    torch.Tensor
        float32, the shape of ``hu``.
    """
    lo, hi = window
    if not hi > lo:
        raise ValueError(f"Invalid 'window' value '{window}' - upper must exceed lower")
    x = torch.as_tensor(hu).float().clamp(lo, hi)
    return (x - (lo + hi) / 2) / ((hi - lo) / 2)


def shape_for_spacing(shape: Sequence[int], spacing: Sequence[float],
                      target: Sequence[float]) -> tuple[int, int, int]:
    """Grid shape that covers the same extent at the target spacing."""
    return tuple(max(1, round(n * s / t))  # type: ignore[return-value]
                 for n, s, t in zip(shape, spacing, target, strict=True))


def resample_to_shape(volume: torch.Tensor | np.ndarray, shape: Sequence[int], *,
                      mode: str = "trilinear") -> torch.Tensor:
    """Resample ``[Z, Y, X]`` or ``[C, Z, Y, X]`` to a new grid shape.

    Parameters
    ----------
    volume : torch.Tensor or numpy.ndarray
        Image (any real dtype; computed in float32) or label map (``mode="nearest"``).
    shape : sequence of int
        Target ``(Z, Y, X)``.
    mode : str
        ``"trilinear"`` for images and probabilities, ``"nearest"`` for labels.

    Returns
    -------
    torch.Tensor
        float32, same number of dimensions as the input.
    """
    if mode not in ("trilinear", "nearest"):
        raise ValueError(f"Invalid 'mode' value '{mode}' - must be 'trilinear' or 'nearest'")
    tensor = torch.as_tensor(volume)
    squeeze = tensor.ndim == 3
    if tensor.ndim not in (3, 4):
        raise ValueError(f"Invalid 'volume' value of shape {tuple(tensor.shape)} - must be "
                         "[Z, Y, X] or [C, Z, Y, X]")
    target = tuple(int(n) for n in shape)
    if tuple(tensor.shape[-3:]) == target:
        out = tensor.float()
        return out
    x = tensor.float().unsqueeze(0)
    if squeeze:
        x = x.unsqueeze(0)
    if mode == "trilinear":
        y = F.interpolate(x, size=target, mode="trilinear", align_corners=False)
    else:
        y = F.interpolate(x, size=target, mode="nearest-exact")
    y = y[0]
    return y[0] if squeeze else y


def resample_to_spacing(volume: torch.Tensor | np.ndarray, spacing: Sequence[float],
                        target: Sequence[float], *, mode: str = "trilinear"
                        ) -> tuple[torch.Tensor, tuple[float, float, float]]:
    """Resample ``[Z, Y, X]`` (or ``[C, Z, Y, X]``) from ``spacing`` to about ``target``.

    Parameters
    ----------
    volume : torch.Tensor or numpy.ndarray
        Image or label map.
    spacing : sequence of float
        Current ``(dz, dy, dx)`` in mm.
    target : sequence of float
        Wanted ``(dz, dy, dx)`` in mm.
    mode : str
        ``"trilinear"`` or ``"nearest"``.

    Returns
    -------
    tuple
        The resampled float32 tensor and its exact spacing (extent / new shape).
    """
    for name, value in (("spacing", spacing), ("target", target)):
        if len(value) != 3 or any(not np.isfinite(v) or v <= 0 for v in value):
            raise ValueError(f"Invalid '{name}' value '{value}' - must be three positive mm")
    shape = tuple(torch.as_tensor(volume).shape[-3:])
    new_shape = shape_for_spacing(shape, spacing, target)
    exact = tuple(float(n * s / m) for n, s, m in zip(shape, spacing, new_shape, strict=True))
    return resample_to_shape(volume, new_shape, mode=mode), exact  # type: ignore[return-value]


# ---------------------------------------------------------------------------------------
# What the two-stage segmenters share


@dataclass
class Segmentation:
    """A segmenter's output: uint8 labels on the input grid, seconds per step, the box
    stage 2 read (None when stage 1 found nothing) and, from segmenters that keep
    probabilities, each label's mean probability over the voxels it was given."""

    labels: np.ndarray
    timings: dict[str, float] = field(default_factory=dict)
    box: tuple[slice, slice, slice] | None = None
    confidence: dict[int, float] = field(default_factory=dict)


def box_on_input(mask: np.ndarray, shape: Sequence[int], spacing: Sequence[float],
                 margin_mm: float) -> tuple[slice, slice, slice]:
    """The box of a coarse-grid mask's voxels on the input grid, widened by ``margin_mm``.

    Parameters
    ----------
    mask : numpy.ndarray
        Boolean ``[z, y, x]`` on the coarse grid, at least one voxel set.
    shape, spacing : sequence
        The input grid's shape and ``(dz, dy, dx)`` mm (the coarse grid spans the same
        extent).
    margin_mm : float
        Margin on every side, clipped to the volume.
    """
    idx = np.nonzero(mask)
    box = []
    for axis in range(3):
        scale = shape[axis] / mask.shape[axis]
        margin = margin_mm / spacing[axis]
        lo = int(np.floor(idx[axis].min() * scale - margin))
        hi = int(np.ceil((idx[axis].max() + 1) * scale + margin))
        box.append(slice(max(0, lo), min(int(shape[axis]), hi)))
    return tuple(box)  # type: ignore[return-value]


class SlidingWindowSegmenter:
    """Networks run by overlapping windows on one device.

    Subclasses list their networks with :meth:`windows`; this class runs a network over
    an image, times work on an asynchronous device and warms every network up.

    Parameters
    ----------
    device : torch.device
        Where the networks run.
    batch_size : int, optional
        Windows per forward pass (default 2 on a CPU, 8 on a GPU).
    """

    def __init__(self, device: torch.device, batch_size: int | None = None) -> None:
        self.device = device
        self.batch_size = batch_size or (8 if device.type == "cuda" else 2)

    def windows(self) -> Sequence[tuple[torch.nn.Module, tuple[int, int, int], int]]:
        """Each network with its window size and input channels."""
        raise NotImplementedError

    def _predict(self, net: torch.nn.Module, image: torch.Tensor,
                 roi: tuple[int, int, int]) -> torch.Tensor:
        """Class probabilities ``[classes, z, y, x]`` of a ``[C, z, y, x]`` (or
        ``[z, y, x]``) image, left on the image's device (on a GPU they stay there for
        resampling and labelling)."""
        if image.ndim == 3:
            image = image[None]
        return sliding_window_inference(
            net, image, roi, int(net.num_classes), overlap=0.25,  # type: ignore[arg-type]
            batch_size=self.batch_size, device=self.device, output_device=image.device)

    def _done(self) -> float:
        """``time.perf_counter()`` once the device has finished (GPU work is asynchronous)."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def warm_up(self) -> None:
        """Run each network once on a blank window of its size.

        On a GPU this creates the CUDA context and selects the convolution kernels, so
        that the first study does not pay for them (seconds); on a CPU it is cheap.
        """
        for net, roi, channels in self.windows():
            self._predict(net, torch.full((channels, *roi), -1.0, device=self.device), roi)
        self._done()
