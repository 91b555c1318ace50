"""Tests for dicomnode.results.algorithm."""

from __future__ import annotations

import pytest

from dicomnode.results.algorithm import AlgorithmInfo


def test_identification_carries_name_version_checksum() -> None:
    info = AlgorithmInfo("headneck-oar", "1.2.0", "0f" * 32, "AnatomyNet")
    item = info.identification()[0]
    assert item.AlgorithmName == "headneck-oar"
    assert item.AlgorithmVersion == "1.2.0"
    assert "0f" * 32 in item.AlgorithmParameters
    assert info.software_versions[1] == "headneck-oar 1.2.0"


@pytest.mark.parametrize("kwargs, keyword", [
    ({"name": ""}, "name"),
    ({"version": "x" * 65}, "version"),
    ({"weights_sha256": "abc"}, "weights_sha256"),
    ({"weights_sha256": "AB" * 32}, "weights_sha256"),
])
def test_invalid_values_name_the_keyword(kwargs: dict[str, str], keyword: str) -> None:
    values = {"name": "n", "version": "1", "weights_sha256": "0" * 64} | kwargs
    with pytest.raises(ValueError, match=f"'{keyword}'"):
        AlgorithmInfo(**values)


def test_from_pipeline_mapping() -> None:
    info = AlgorithmInfo.from_mapping({"name": "liver", "version": "2", "sha256": "1" * 64})
    assert info.family == "Artificial Intelligence"
    with pytest.raises(ValueError, match="'sha256'"):
        AlgorithmInfo.from_mapping({"name": "liver", "version": "2"})
