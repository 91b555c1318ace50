"""Synthetic CT studies with ground truth, for tests, demos, benchmarks and training.

>>> from dicomnode.phantoms import make_phantom, write_phantom
>>> p = make_phantom("abdomen", seed=3, matrix=128)     # doctest: +SKIP
>>> write_phantom(p, "out/abdomen-3")                    # doctest: +SKIP

Regions: ``headneck`` (RT planning CT, the nine MICCAI 2015 organs at risk),
``abdomen`` (portal-venous CT, liver with 0-6 tumours and distractor organs) and
``head`` (non-contrast brain CT with 0-2 haemorrhage subtypes and ``truth.json``).
Label names per region: ``dicomnode.phantoms.phantom.SPECS[region].labels``.
"""

from dicomnode.phantoms.phantom import REGIONS, Phantom, make_phantom, write_phantom

__all__ = ["REGIONS", "Phantom", "make_phantom", "write_phantom"]
