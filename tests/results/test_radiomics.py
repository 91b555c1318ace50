"""Tests for dicomnode.results.radiomics: IBSI reference values, per-lesion groups, the SR."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
import SimpleITK as sitk  # noqa: N813

from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import ABDOMEN
from dicomnode.results.measure import measure_liver
from dicomnode.results.radiomics import (
    IBSI_SCHEME,
    RadiomicsParameters,
    RadiomicsReport,
    compute_radiomics,
    extract_features,
    features_from_sr,
    reported_features,
)
from dicomnode.results.seg import build_seg
from dicomnode.results.source import check_source_images, write
from dicomnode.results.sr import build_segmentation_sr, tracked_name
from tests.results.conftest import CtSeries, dciodvfy_errors
from tests.results.test_sr import (
    _abdomen_labels,
    _groups,
    assert_every_group_is_drawn_on_the_source_series,
)

PHANTOM = Path(__file__).parent / "data" / "ibsi1_digital_phantom"
#: The IBSI digital phantom's configuration: its own 2 mm grid, its grey levels as bins.
PHANTOM_SETTINGS = RadiomicsParameters(bin_width_hu=1.0, bin_lower_bound_hu=1.0,
                                       resample_mm=None, margin_mm=0.0,
                                       spatial_autocorrelation=True)
#: Fast settings for the small test series (no resampling).
FAST = RadiomicsParameters(resample_mm=None, organs=True)


def _ibsi_rounded(value: float) -> float:
    """Three significant digits, as the IBSI reference values are given."""
    if value == 0:
        return 0.0
    return round(value, 2 - math.floor(math.log10(abs(value))))


def _phantom() -> tuple[np.ndarray, np.ndarray, tuple[float, float, float]]:
    image = sitk.ReadImage(str(PHANTOM / "phantom.nii.gz"))
    mask = sitk.ReadImage(str(PHANTOM / "mask.nii.gz"))
    spacing = tuple(float(s) for s in reversed(image.GetSpacing()))
    return (sitk.GetArrayFromImage(image).astype(np.float32),
            sitk.GetArrayFromImage(mask) > 0, spacing)  # type: ignore[return-value]


def test_the_ibsi_digital_phantom_gives_every_reference_value_within_tolerance() -> None:
    hu, mask, spacing = _phantom()
    features = {f.ibsi_id: f for f in extract_features(hu, mask, spacing, PHANTOM_SETTINGS)}
    with (PHANTOM / "reference_values.csv").open(encoding="utf-8") as fh:
        references = list(csv.DictReader(fh))
    assert {r["family"] for r in references} == set(PHANTOM_SETTINGS.families)
    misses = []
    for ref in references:
        got = features.get(ref["ibsi_id"])
        if got is None:
            misses.append(f"{ref['mirp_name']}: not computed")
            continue
        if abs(_ibsi_rounded(got.value) - float(ref["reference"])) > \
                float(ref["tolerance"]) + 1e-9:
            misses.append(f"{ref['mirp_name']}: {got.value} vs {ref['reference']} "
                          f"+- {ref['tolerance']}")
    assert misses == []
    assert len(references) == 128


def test_every_default_family_has_its_features_with_units() -> None:
    hu, mask, spacing = _phantom()
    features = extract_features(hu * 10, mask, spacing, RadiomicsParameters())
    by_family = {f.family for f in features}
    assert by_family == set(RadiomicsParameters().families)
    units = {f.name: f.unit for f in features}
    assert units["morph_volume"] == "mm3" and units["stat_mean"] == "[hnsf'U]"
    assert units["stat_var"] == "[hnsf'U]2" and units["stat_skew"] == "1"
    # Moran's I and Geary's C are left out unless asked for (slow on large organs)
    assert not {"morph_moran_i", "morph_geary_c"} & set(units)
    assert all(f.meaning and not f.meaning.endswith("- ") for f in features)
    assert len({f.ibsi_id for f in features}) == len(features)


@pytest.mark.parametrize(("change", "keyword"), [
    ({"families": ("shape",)}, "families"),
    ({"families": ()}, "families"),
    ({"bin_width_hu": 0}, "bin_width_hu"),
    ({"resample_mm": -1.0}, "resample_mm"),
    ({"aggregation": "2d"}, "aggregation"),
    ({"margin_mm": -1.0}, "margin_mm"),
])
def test_bad_settings_are_refused_naming_the_setting(change: dict[str, object],
                                                      keyword: str) -> None:
    with pytest.raises(ValueError, match=f"Invalid '{keyword}'"):
        RadiomicsParameters(**change)  # type: ignore[arg-type]


def test_an_empty_or_misshapen_mask_is_refused() -> None:
    hu = np.zeros((4, 5, 6), np.float32)
    with pytest.raises(ValueError, match="no voxel"):
        extract_features(hu, np.zeros(hu.shape, bool), (1, 1, 1), FAST)
    with pytest.raises(ValueError, match="Invalid 'mask' shape"):
        extract_features(hu, np.ones((4, 5, 5), bool), (1, 1, 1), FAST)
    with pytest.raises(ValueError, match="Invalid 'spacing'"):
        extract_features(hu, np.ones(hu.shape, bool), (1, 0, 1), FAST)


def test_lesions_get_the_numbers_the_report_gives_them(axial: CtSeries) -> None:
    labels = _abdomen_labels(axial)
    geometry = check_source_images(axial.images)
    hu = np.stack([ds.pixel_array for ds in axial.images]).astype(np.float32)
    report = compute_radiomics(hu, labels, {1: "Liver", 2: "Lesion_Liver"},
                               (geometry.slice_spacing, *geometry.spacing), FAST)
    assert list(report.structures) == ["Liver", "Lesion 1", "Lesion 2", "Lesion 3"]
    lesions = measure_liver(labels == 1, labels == 2, geometry).lesions
    for lesion in lesions:
        volume = next(f.value for f in report.structures[f"Lesion {lesion.number}"]
                      if f.name == "morph_vol_approx")  # voxel count times voxel volume
        assert volume / 1000 == pytest.approx(lesion.volume_cm3, rel=1e-4)
    organs_off = compute_radiomics(hu, labels, {1: "Liver", 2: "Lesion_Liver"},
                                   (geometry.slice_spacing, *geometry.spacing),
                                   RadiomicsParameters(resample_mm=None, organs=False))
    assert list(organs_off.structures) == ["Lesion 1", "Lesion 2", "Lesion 3"]
    assert RadiomicsReport.from_dict(report.to_dict()).to_dict() == report.to_dict()


def test_the_sr_carries_each_groups_features_coded_by_ibsi_identifier(
        axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    labels = _abdomen_labels(axial)
    geometry = check_source_images(axial.images)
    hu = np.stack([ds.pixel_array for ds in axial.images]).astype(np.float32)
    report = compute_radiomics(hu, labels, {1: "Liver", 2: "Lesion_Liver"},
                               (geometry.slice_spacing, *geometry.spacing), FAST)
    seg = build_seg(axial.images, labels, ABDOMEN, algorithm)
    sr = build_segmentation_sr(axial.images, seg, labels, ABDOMEN, algorithm,
                               radiomics=report)
    path = write(sr, tmp_path / "sr.dcm")
    assert dciodvfy_errors(path) == []
    back = pydicom.dcmread(path)
    # highdicom reads it back as a TID 1500 report, every group still drawn for OHIF
    parsed = hd.sr.srread(path)
    assert_every_group_is_drawn_on_the_source_series(parsed, axial.images)
    assert features_from_sr(back) == reported_features(report)
    schemes = {s.CodingSchemeDesignator: s for s in back.CodingSchemeIdentificationSequence}
    assert "IBSI" in schemes[IBSI_SCHEME].CodingSchemeName
    groups = {}
    for group in _groups(back):
        name = tracked_name(next(str(i.TextValue) for i in group.ContentSequence
                                 if i.ValueType == "TEXT"))
        groups[name] = group
    assert set(groups) == {"Liver", "Lesion_Liver", "Lesion 1", "Lesion 2", "Lesion 3"}
    lesion = [i for i in groups["Lesion 1"].ContentSequence
              if i.ValueType == "NUM"
              and i.ConceptNameCodeSequence[0].CodingSchemeDesignator == IBSI_SCHEME]
    assert len(lesion) == len(report.structures["Lesion 1"])
    # each feature names MIRP and the settings that make it comparable
    first = lesion[0]
    params = [str(i.TextValue) for i in first.ContentSequence if i.ValueType == "TEXT"]
    assert "MIRP" in params and any(p.startswith("discretisation=fixed bin size 25.0 HU")
                                     for p in params)
    # the all-lesions group keeps its own figures only
    assert not any(i.ValueType == "NUM" and i.ConceptNameCodeSequence[0]
                   .CodingSchemeDesignator == IBSI_SCHEME
                   for i in groups["Lesion_Liver"].ContentSequence)


def test_a_segmented_haemorrhage_has_its_features_in_the_ich_report(
        axial: CtSeries, algorithm: AlgorithmInfo, tmp_path: Path) -> None:
    from dicomnode.results.sr import IchResult, build_ich_sr

    geometry = check_source_images(axial.images)
    hu = np.stack([ds.pixel_array for ds in axial.images]).astype(np.float32)
    blood = (axial.labels == 6).astype(np.uint8)
    report = compute_radiomics(hu, blood, {1: "Hemorrhage_Intracranial"},
                               (geometry.slice_spacing, *geometry.spacing),
                               RadiomicsParameters(resample_mm=None,
                                                   families=("morphology", "statistics")))
    assert list(report.structures) == ["Hemorrhage_Intracranial"]
    sr = build_ich_sr(axial.images, [IchResult("any", 0.91, True, (10, 11)),
                                     IchResult("subdural", 0.88, True, (11,))],
                      algorithm, radiomics=report)
    path = write(sr, tmp_path / "ich.dcm")
    assert dciodvfy_errors(path) == []
    hd.sr.srread(path)
    found = features_from_sr(pydicom.dcmread(path))
    assert {f.structure for f in found} == {"any"}
    assert [(f.ibsi_id, f.value) for f in found] == [
        (f.ibsi_id, f.value) for f in report.structures["Hemorrhage_Intracranial"]]
