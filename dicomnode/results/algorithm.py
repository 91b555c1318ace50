"""Identification of the algorithm that produced a result, carried by every result object."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import highdicom as hd
from pydicom.sr.codedict import codes

_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class AlgorithmInfo:
    """The model that produced a result: what a reviewer needs to trace it back.

    Parameters
    ----------
    name
        Algorithm name, e.g. ``"dicomnode-headneck-oar"`` (at most 64 characters).
    version
        Algorithm version, e.g. ``"0.1.0"`` (at most 64 characters).
    weights_sha256
        SHA-256 of the weight file that was loaded (64 lower-case hex digits).
    family
        Short description of the model family, e.g. ``"AnatomyNet 3D U-Net"``.
    """

    name: str
    version: str
    weights_sha256: str
    family: str = "Artificial Intelligence"

    def __post_init__(self) -> None:
        for key in ("name", "version"):
            value = getattr(self, key)
            if not value or len(value) > 64 or "\\" in value:
                raise ValueError(
                    f"Invalid '{key}' value '{value}' - must be 1 to 64 characters without '\\'"
                )
        if not _SHA256.match(self.weights_sha256):
            raise ValueError(
                f"Invalid 'weights_sha256' value '{self.weights_sha256}' - "
                "must be 64 lower-case hex digits"
            )

    @classmethod
    def from_mapping(cls, values: Mapping[str, str]) -> AlgorithmInfo:
        """Build from a pipeline's ``algorithm`` dict: ``name``, ``version``, ``sha256``,
        and optionally ``family``."""
        missing = [k for k in ("name", "version", "sha256") if not values.get(k)]
        if missing:
            raise ValueError(f"Invalid 'algorithm' value - '{missing[0]}' is missing")
        return cls(values["name"], values["version"], values["sha256"],
                   values.get("family") or "Artificial Intelligence")

    @property
    def software_versions(self) -> tuple[str, str]:
        """Values for Software Versions (0018,1020): the node's and the algorithm's version."""
        from dicomnode import __version__

        return (f"dicomnode {__version__}", f"{self.name} {self.version}"[:64])

    @property
    def parameters(self) -> dict[str, str]:
        """Algorithm parameters recorded in the SEG: the weight checksum and the family."""
        return {"weights_sha256": self.weights_sha256, "family": self.family}

    def identification(self) -> hd.AlgorithmIdentificationSequence:
        """Algorithm Identification Sequence for SEG segments and SR documents."""
        return hd.AlgorithmIdentificationSequence(
            name=self.name,
            version=self.version,
            family=codes.DCM.ArtificialIntelligence,
            source="dicomnode",
            parameters=self.parameters,
        )

    def describe(self) -> str:
        """One line naming algorithm, version and the first 12 digits of the weights."""
        return f"{self.name} {self.version} (weights sha256 {self.weights_sha256[:12]})"
