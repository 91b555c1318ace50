"""Tests for dicomnode.results.codes: the structure tables."""

from __future__ import annotations

import pytest

from dicomnode.results.codes import (
    ABDOMEN,
    ANATOMICAL_STRUCTURE,
    HEADNECK,
    ICH_FINDINGS,
    structure_table,
)


def test_headneck_table_is_the_miccai_set_in_label_order() -> None:
    assert [s.name for s in HEADNECK] == [
        "BrainStem", "OpticChiasm", "Bone_Mandible", "OpticNrv_L", "OpticNrv_R", "Parotid_L",
        "Parotid_R", "Glnd_Submand_L", "Glnd_Submand_R"]
    assert [s.label for s in HEADNECK] == list(range(1, 10))
    assert all(s.category == ANATOMICAL_STRUCTURE for s in HEADNECK)
    assert all(s.type.scheme_designator == "SCT" for s in HEADNECK)
    assert len({s.color for s in HEADNECK}) == len(HEADNECK)
    lateral = {s.name: s.laterality.meaning for s in HEADNECK if s.laterality is not None}
    assert lateral["Parotid_L"] == "Left" and lateral["Glnd_Submand_R"] == "Right"


def test_abdomen_and_ich() -> None:
    assert [s.name for s in ABDOMEN] == ["Liver", "Lesion_Liver"]
    assert ABDOMEN[1].rt_roi_type == "GTV"
    assert [f.key for f in ICH_FINDINGS] == ["any", "epidural", "intraparenchymal",
                                             "intraventricular", "subarachnoid", "subdural"]


def test_unknown_table() -> None:
    assert structure_table("abdomen") is ABDOMEN
    with pytest.raises(ValueError, match="'structures' value 'pelvis'"):
        structure_table("pelvis")


def test_table_from_pipeline_labels() -> None:
    from dicomnode.results.codes import table_from_labels

    table = table_from_labels({2: "Lesion_Liver", 1: "Liver", 5: "Kidney_R"})
    assert [(s.label, s.name) for s in table] == [(1, "Liver"), (2, "Lesion_Liver"),
                                                 (5, "Kidney_R")]
    assert table[1].is_lesion and not table[0].is_lesion
    with pytest.raises(ValueError, match="'Heart'"):
        table_from_labels({1: "Heart"})
