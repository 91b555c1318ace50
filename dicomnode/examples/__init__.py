"""Small CT series shipped with the package, for warming the node up at start-up.

``ct_abdomen`` (40 slices, 64 x 64) and ``ct_headneck`` (56 slices, 96 x 96) are
noise-free phantoms on coarse grids, written by ``scripts/make_examples.py``
(generated files: regenerate, do not edit). The serving path reads them instead of
running the phantom generator.
"""

from __future__ import annotations

from pathlib import Path

EXAMPLES_DIR = Path(__file__).resolve().parent
#: The regions an example series exists for.
REGIONS = ("abdomen", "headneck")


def example_series(region: str) -> list[Path]:
    """The files of the example series of ``region``, in slice order.

    Raises
    ------
    ValueError
        When no example exists for ``region``.
    """
    if region not in REGIONS:
        raise ValueError(f"Invalid 'region' value '{region}' - examples exist for "
                         f"{', '.join(REGIONS)}")
    return sorted((EXAMPLES_DIR / f"ct_{region}").glob("*.dcm"))
