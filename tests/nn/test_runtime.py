"""Tests of dicomnode.nn.runtime: device choice, Gaussian sliding windows, resampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dicomnode.nn import runtime


def test_select_device_cpu_and_auto() -> None:
    assert runtime.select_device("cpu").type == "cpu"
    auto = runtime.select_device(None)
    assert auto.type == ("cuda" if torch.cuda.is_available() else "cpu")


@pytest.mark.parametrize("value", ["tpu", "cuda:7", "nonsense:x"])
def test_select_device_rejects(value: str) -> None:
    if value == "cuda:7" and torch.cuda.device_count() > 7:
        pytest.skip("machine has 8 GPUs")
    with pytest.raises(ValueError, match="'device'"):
        runtime.select_device(value)


def test_configure_cpu_threads() -> None:
    before = torch.get_num_threads()
    try:
        assert runtime.configure_cpu_threads(1) == 1
        assert torch.get_num_threads() == 1
        with pytest.raises(ValueError, match="'threads'"):
            runtime.configure_cpu_threads(0)
    finally:
        torch.set_num_threads(before)


def test_gaussian_importance_peaks_in_centre() -> None:
    w = runtime.gaussian_importance((5, 9, 9))
    assert w.shape == (5, 9, 9)
    assert float(w[2, 4, 4]) == pytest.approx(1.0)
    assert float(w.min()) > 0
    assert float(w[0, 0, 0]) < float(w[2, 4, 4])


def _threshold_net(batch: torch.Tensor) -> torch.Tensor:
    """Two-class 'network': large logits for class 1 where the input is positive."""
    fg = (batch[:, :1] > 0).float() * 20 - 10
    return torch.cat([-fg, fg], dim=1)


@pytest.mark.parametrize("shape", [(5, 20, 20), (30, 70, 45)])
def test_sliding_window_reproduces_a_local_network(shape: tuple[int, int, int]) -> None:
    image = torch.randn(1, *shape)
    probs = runtime.sliding_window_inference(_threshold_net, image, (8, 32, 32), 2,
                                             overlap=0.5, batch_size=3)
    assert probs.shape == (2, *shape)
    assert torch.allclose(probs.sum(0), torch.ones(shape), atol=1e-5)
    assert torch.equal(probs.argmax(0), (image[0] > 0).long())


def test_sliding_window_validates() -> None:
    with pytest.raises(ValueError, match="'overlap'"):
        runtime.sliding_window_inference(_threshold_net, torch.zeros(1, 4, 4, 4), (2, 2, 2), 2,
                                         overlap=1.0)
    with pytest.raises(ValueError, match="'image'"):
        runtime.sliding_window_inference(_threshold_net, torch.zeros(4, 4, 4), (2, 2, 2), 2)


def test_resample_to_spacing_keeps_extent() -> None:
    volume = np.zeros((30, 64, 64), dtype=np.int16)
    out, spacing = runtime.resample_to_spacing(volume, (2.0, 0.8, 0.8), (4.0, 1.6, 1.6))
    assert tuple(out.shape) == (15, 32, 32)
    assert spacing == pytest.approx((4.0, 1.6, 1.6))
    with pytest.raises(ValueError, match="'target'"):
        runtime.resample_to_spacing(volume, (2.0, 0.8, 0.8), (0.0, 1.0, 1.0))


def test_resample_nearest_keeps_labels() -> None:
    labels = np.zeros((4, 8, 8), dtype=np.uint8)
    labels[:, 2:6, 2:6] = 2
    up = runtime.resample_to_shape(labels, (8, 16, 16), mode="nearest")
    assert set(np.unique(up.numpy())) == {0.0, 2.0}
    assert int((up == 2).sum()) == 8 * 8 * 8
