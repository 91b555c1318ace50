"""Tests for dicomnode.phantoms.preview."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from dicomnode.phantoms import Phantom
from dicomnode.phantoms.preview import pick_slices, write_preview


def test_montage_has_tiles_and_coloured_outlines(small_phantoms: dict[str, Phantom],
                                                  tmp_path: Path) -> None:
    p = small_phantoms["headneck"]
    out = write_preview(p, tmp_path / "preview.png", count=8, tile=128)
    img = np.asarray(Image.open(out).convert("RGB")).astype(int)
    assert img.shape[1] == 4 * 128 and img.shape[0] >= 2 * 128
    colour = (np.abs(img[..., 0] - img[..., 1]) + np.abs(img[..., 1] - img[..., 2])) > 60
    assert colour.sum() > 50  # label outlines drawn


def test_slice_choice_includes_small_structures(small_phantoms: dict[str, Phantom]) -> None:
    p = small_phantoms["headneck"]
    picks = pick_slices(p, 8)
    assert len(picks) == 8 and picks == sorted(set(picks))
    values, counts = np.unique(p.labels[p.labels > 0], return_counts=True)
    rarest = values[np.argmin(counts)]
    assert any((p.labels[k] == rarest).any() for k in picks)
    with pytest.raises(ValueError, match="count"):
        write_preview(p, "unused.png", count=1)
