"""Small phantoms shared by the phantom tests (built once per session)."""

from __future__ import annotations

import pytest

from dicomnode.phantoms import Phantom, make_phantom

#: Small but anatomically complete settings per region (fast on two cores).
SMALL = {
    "headneck": {"matrix": 128, "slices": 60},
    "abdomen": {"matrix": 96, "slices": 40},
    "head": {"matrix": 96, "slices": 20},
}


@pytest.fixture(scope="session")
def small_phantoms() -> dict[str, Phantom]:
    """One small phantom per region."""
    return {region: make_phantom(region, 2, **kw) for region, kw in SMALL.items()}
