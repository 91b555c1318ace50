"""Radiomics of segmented structures: IBSI features computed by MIRP.

Shape (morphology), first-order intensity (statistics, intensity histogram) and texture
(GLCM, GLRLM, GLSZM, NGTDM) features of each structure a pipeline segments, on the
original CT in HU. The features are MIRP's (an IBSI-compliant library; no texture
matrix is written here); this module chooses the settings that make features
comparable between studies (resampling to isotropic voxels, a fixed bin width in HU
from a fixed lower bound, one aggregation method), crops the CT to each structure's
box before MIRP resamples it (a lesion's box, not the 512x512x300 grid), and turns
MIRP's table into records keyed by IBSI feature identifiers (``RNU0`` is the volume)
with UCUM units. The records are rounded once here, so the pipeline's JSON result,
the TID 1500 SR and the ``dicomnode radiomics`` table give the same numbers.

MIRP is an optional dependency (the ``radiomics`` extra), imported when features are
computed.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from scipy import ndimage

from dicomnode.logs import fields

log = logging.getLogger(__name__)

#: The coding scheme of the SR's feature codes: IBSI feature identifiers. Not registered
#: with DICOM, so a private designator ("99" prefix) named in the SR's Coding Scheme
#: Identification Sequence.
IBSI_SCHEME = "99IBSI"
IBSI_SCHEME_NAME = "IBSI feature identifiers (ibsi.readthedocs.io)"
IBSI_SCHEME_ORGANIZATION = "Image Biomarker Standardisation Initiative"

#: Feature families the node can report -> MIRP's family tag.
FAMILIES: dict[str, str] = {
    "morphology": "morph",
    "statistics": "stat",
    "intensity_histogram": "ih",
    "glcm": "cm",
    "glrlm": "rlm",
    "glszm": "szm",
    "ngtdm": "ngtdm",
}

#: Texture aggregation (IBSI 1 section 3.1.2) -> MIRP's spatial methods for the
#: matrices merged over directions (GLCM, GLRLM) and for those without directions
#: (GLSZM, NGTDM). The name and its IBSI identifiers go into the report.
AGGREGATIONS: dict[str, tuple[str, str, str]] = {
    "3d_volume_merge": ("3d_volume_merge", "3d", "IAZD/KOBO"),
    "3d_average": ("3d_average", "3d", "ITBB/KOBO"),
    "2.5d_volume_merge": ("2.5d_volume_merge", "2.5d", "ZW7Z/62GR"),
    "2.5d_direction_merge": ("2.5d_direction_merge", "2.5d", "JJUI/62GR"),
}

#: MIRP's columns of the morphology features left out unless asked for (slow to compute).
SPATIAL_AUTOCORRELATION = ("morph_moran_i", "morph_geary_c")

#: Significant digits of every reported feature value (JSON, SR and table alike).
SIGNIFICANT_DIGITS = 6

_HU = "[hnsf'U]"
#: UCUM units of the features that have one; every other feature is a number ("1").
_UNITS: dict[str, str] = {
    "morph_volume": "mm3", "morph_vol_approx": "mm3", "morph_area_mesh": "mm2",
    "morph_av": "/mm", "morph_com": "mm", "morph_diam": "mm",
    "morph_pca_maj_axis": "mm", "morph_pca_min_axis": "mm", "morph_pca_least_axis": "mm",
    "morph_integ_int": f"{_HU}.mm3",
    "stat_mean": _HU, "stat_var": f"{_HU}2", "stat_median": _HU, "stat_min": _HU,
    "stat_p10": _HU, "stat_p90": _HU, "stat_max": _HU, "stat_iqr": _HU, "stat_range": _HU,
    "stat_mad": _HU, "stat_rmad": _HU, "stat_medad": _HU, "stat_energy": f"{_HU}2",
    "stat_rms": _HU,
}


#: Readable names MIRP leaves blank.
_MEANINGS = {"morph_integ_int": "Morphology (3D) - integrated intensity"}


@dataclass(frozen=True)
class RadiomicsParameters:
    """The settings that make features comparable; all of them go into the report.

    Attributes
    ----------
    families
        Which feature families (keys of :data:`FAMILIES`).
    bin_width_hu
        Fixed bin width in HU of the intensity histogram and texture matrices.
    bin_lower_bound_hu
        Lower bound of the first bin (and of the intensity range: voxels below it are
        left out of the intensity and texture features, not of the shape).
    resample_mm
        Isotropic voxel size the CT and mask are resampled to (CT: cubic spline, mask:
        linear, kept where >= 0.5); ``None``: the source grid.
    aggregation
        Texture aggregation (a key of :data:`AGGREGATIONS`).
    margin_mm
        CT kept around each structure's box before resampling (interpolation context).
    spatial_autocorrelation
        Also report Moran's I and Geary's C (:data:`SPATIAL_AUTOCORRELATION`): MIRP
        estimates them by Monte Carlo sampling of voxel pairs, about a minute of CPU for
        a liver at 1 mm; off by default.
    organs
        Features of organs too (the liver, each organ at risk); off by default: of
        lesions and haemorrhages only (a liver at 1 mm costs ~25 s of CPU, a lesion ~1 s).
    """

    families: tuple[str, ...] = tuple(FAMILIES)
    bin_width_hu: float = 25.0
    bin_lower_bound_hu: float = -1000.0
    resample_mm: float | None = 1.0
    aggregation: str = "3d_volume_merge"
    margin_mm: float = 5.0
    spatial_autocorrelation: bool = False
    organs: bool = False

    def __post_init__(self) -> None:
        unknown = [f for f in self.families if f not in FAMILIES]
        if unknown or not self.families:
            raise ValueError(f"Invalid 'families' value '{list(self.families)}' - choose "
                             f"from {', '.join(FAMILIES)}")
        if not self.bin_width_hu > 0:
            raise ValueError(f"Invalid 'bin_width_hu' value '{self.bin_width_hu}' - must be > 0")
        if self.resample_mm is not None and not self.resample_mm > 0:
            raise ValueError(f"Invalid 'resample_mm' value '{self.resample_mm}' - must be > 0 "
                             "or null (no resampling)")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"Invalid 'aggregation' value '{self.aggregation}' - choose from "
                             f"{', '.join(AGGREGATIONS)}")
        if self.margin_mm < 0:
            raise ValueError(f"Invalid 'margin_mm' value '{self.margin_mm}' - must be >= 0")

    def describe(self) -> list[str]:
        """The settings as ``key=value`` lines (the SR's algorithm parameters)."""
        matrices, zones, ibsi = AGGREGATIONS[self.aggregation]
        return [
            f"families={','.join(self.families)}",
            f"resample_mm={'none' if self.resample_mm is None else self.resample_mm}",
            "interpolation=image cubic spline, mask linear >= 0.5",
            f"discretisation=fixed bin size {self.bin_width_hu} HU from "
            f"{self.bin_lower_bound_hu} HU",
            f"aggregation={self.aggregation} (GLCM/GLRLM {matrices}, GLSZM/NGTDM {zones}; "
            f"IBSI {ibsi})",
            "glcm_distance=1",
            f"structures={'organs and lesions' if self.organs else 'lesions'}",
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON form (the pipeline result's ``radiomics.settings``)."""
        return {**asdict(self), "families": list(self.families)}


@dataclass(frozen=True)
class Feature:
    """One feature value of one structure.

    Attributes
    ----------
    ibsi_id
        IBSI feature identifier (the code value in the SR).
    name
        MIRP's column name (``morph_volume``, ``cm_joint_max_d1_3d_v_mrg_fbs_w25.0``).
    meaning
        Readable name (``Morphology (3D) - volume``; the SR's code meaning).
    family
        One of :data:`FAMILIES`.
    value
        Rounded to :data:`SIGNIFICANT_DIGITS`.
    unit
        UCUM unit code (``mm3``, ``[hnsf'U]``, ``1``).
    """

    ibsi_id: str
    name: str
    meaning: str
    family: str
    value: float
    unit: str

    def to_dict(self) -> dict[str, Any]:
        """JSON form."""
        return asdict(self)


@dataclass
class RadiomicsReport:
    """Features of each reported structure, with the settings and library they came from.

    Attributes
    ----------
    parameters
        The settings used.
    library
        ``"mirp <version>"``.
    structures
        Group name as the SR tracks it (``Liver``, ``Lesion 1``, ``Parotid_L``) -> features.
    """

    parameters: RadiomicsParameters
    library: str
    structures: dict[str, list[Feature]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON form (what a pipeline result carries as ``measurements["radiomics"]``)."""
        return {"library": self.library, "settings": self.parameters.to_dict(),
                "structures": {name: [f.to_dict() for f in feats]
                               for name, feats in self.structures.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RadiomicsReport:
        """Inverse of :meth:`to_dict`."""
        settings = dict(data["settings"])
        settings["families"] = tuple(settings["families"])
        return cls(RadiomicsParameters(**settings), str(data["library"]),
                   {name: [Feature(**f) for f in feats]
                    for name, feats in data["structures"].items()})


def mirp_version() -> str:
    """The installed MIRP's version (raises ImportError naming the extra when absent)."""
    try:
        from importlib.metadata import version

        import mirp  # noqa: F401
    except ImportError as exc:  # pragma: no cover - the extra is installed in tests
        raise ImportError("radiomics needs MIRP: pip install 'dicomnode[radiomics]'") from exc
    return version("mirp")


def _round(value: float) -> float:
    return float(f"{value:.{SIGNIFICANT_DIGITS}g}")


class _QuietMirp(logging.Filter):
    """Drops MIRP's progress lines (logged on the root logger at INFO)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno >= logging.WARNING or "/mirp/" not in record.pathname


_QUIET = _QuietMirp()
_QUIET_LOCK = threading.Lock()


@contextmanager
def _mirp_logging() -> Iterator[None]:
    """Keep MIRP from configuring logging or writing its progress to stdout.

    MIRP calls ``logging.basicConfig(stream=sys.stdout)`` on each run, which adds a
    handler when the root logger has none (a CLI printing JSON on stdout); a handler
    held for the call stops that, and the filter drops its INFO lines.
    """
    root = logging.getLogger()
    with _QUIET_LOCK:
        if _QUIET not in root.filters:
            root.addFilter(_QUIET)
    placeholder = logging.NullHandler()
    root.addHandler(placeholder)
    try:
        yield
    finally:
        root.removeHandler(placeholder)


def _mirp_settings(parameters: RadiomicsParameters) -> Any:
    from mirp.settings.feature_parameters import FeatureExtractionSettingsClass
    from mirp.settings.general_parameters import GeneralSettingsClass
    from mirp.settings.generic import SettingsClass
    from mirp.settings.image_processing_parameters import ImagePostProcessingClass
    from mirp.settings.interpolation_parameters import (
        ImageInterpolationSettingsClass,
        MaskInterpolationSettingsClass,
    )
    from mirp.settings.perturbation_parameters import ImagePerturbationSettingsClass
    from mirp.settings.resegmentation_parameters import ResegmentationSettingsClass
    from mirp.settings.transformation_parameters import ImageTransformationSettingsClass

    matrices, zones, _ = AGGREGATIONS[parameters.aggregation]
    general = GeneralSettingsClass(by_slice=False)
    return SettingsClass(
        general_settings=general,
        post_process_settings=ImagePostProcessingClass(),
        img_interpolate_settings=ImageInterpolationSettingsClass(
            by_slice=False, new_spacing=parameters.resample_mm, spline_order=3,
            anti_aliasing=False),
        roi_interpolate_settings=MaskInterpolationSettingsClass(
            roi_spline_order=1, roi_interpolation_mask_inclusion_threshold=0.5),
        roi_resegment_settings=ResegmentationSettingsClass(
            resegmentation_intensity_range=[parameters.bin_lower_bound_hu, np.nan]),
        perturbation_settings=ImagePerturbationSettingsClass(),
        img_transform_settings=ImageTransformationSettingsClass(
            by_slice=False, response_map_feature_settings=None),
        feature_extr_settings=FeatureExtractionSettingsClass(
            by_slice=False, ibsi_compliant=True,
            base_feature_families=[FAMILIES[f] for f in parameters.families],
            base_discretisation_method="fixed_bin_size",
            base_discretisation_bin_width=float(parameters.bin_width_hu),
            glcm_distance=1.0, glcm_spatial_method=matrices, glrlm_spatial_method=matrices,
            glszm_spatial_method=zones, ngtdm_spatial_method=zones),
    )


def _numpy_input(kind: str, array: np.ndarray, spacing: Sequence[float]) -> Any:
    """A MIRP image (or mask) object for an in-memory array with its voxel size.

    MIRP takes a plain array only at 1 mm voxels; its numpy file object takes the
    spacing, and is completed here as MIRP completes one made from an array.
    """
    from mirp._data_import.numpy_file import ImageNumpyFile, MaskNumpyFile

    cls = MaskNumpyFile if kind == "mask" else ImageNumpyFile
    item = cls(image_spacing=tuple(float(s) for s in spacing),
               image_modality="generic_mask" if kind == "mask" else "CT",
               sample_name="structure")
    item.image_data = item.image_metadata = array
    item.complete()
    item.update_image_data()
    item.check(raise_error=True, remove_metadata=False)
    return item


def extract_features(hu: np.ndarray, mask: np.ndarray, spacing: Sequence[float],
                     parameters: RadiomicsParameters) -> list[Feature]:
    """IBSI features of one structure, computed by MIRP on the array given.

    Parameters
    ----------
    hu
        CT ``[z, y, x]`` in HU (a crop holding the structure, or the whole volume).
    mask
        Boolean ``[z, y, x]``, the shape of ``hu``, with at least one voxel.
    spacing
        ``(dz, dy, dx)`` in mm.
    parameters
        The settings.

    Returns
    -------
    list of Feature
        The IBSI features of the chosen families, in MIRP's order; a feature MIRP cannot
        compute for this structure (NaN: e.g. a texture of one grey level) is left out.
    """
    if hu.shape != mask.shape or hu.ndim != 3:
        raise ValueError(f"Invalid 'mask' shape {mask.shape} - must be the CT's 3D shape "
                         f"{hu.shape}")
    if not mask.any():
        raise ValueError("Invalid 'mask' value - the structure has no voxel")
    if len(spacing) != 3 or not all(s > 0 for s in spacing):
        raise ValueError(f"Invalid 'spacing' value '{tuple(spacing)}' - three sizes > 0 mm")
    import mirp
    from mirp._features.feature_generator import generate_features

    mirp_version()
    settings = _mirp_settings(parameters)
    skipped = () if parameters.spatial_autocorrelation else SPATIAL_AUTOCORRELATION
    with _mirp_logging():
        # MIRP's own image processing (resampling, resegmentation); its feature objects
        # then compute on the processed image as its workflow does, leaving out the
        # features not in the IBSI reference set and those not asked for.
        processed = mirp.extract_images(
            image=_numpy_input("image", hu.astype(np.float32, copy=False), spacing),
            mask=_numpy_input("mask", mask.astype(bool, copy=False), spacing),
            image_modality="CT", settings=settings, image_export_format="native",
            export_images=True, write_images=False)
        (image,), (roi,) = processed[0]
        family_of = {tag: name for name, tag in FAMILIES.items()} | {"ngt": "ngtdm"}
        out = []
        previous = None
        for feature in generate_features(settings=settings.feature_extr):
            if not feature.ibsi_id or not feature.is_ibsi_compliant(image=image):
                continue
            feature.create_table_name()
            column = str(feature.table_name)
            if column in skipped:
                continue
            feature.compute(image=image, mask=roi)
            if previous is not None:
                previous.clear_local_cache(other=feature)
            previous = feature
            value = float(feature.value)
            if math.isfinite(value):
                meaning = _MEANINGS.get(column, str(feature.name).strip())
                if meaning.count(")") > meaning.count("("):  # MIRP's typo in a few names
                    meaning = meaning.rstrip(")")
                out.append(Feature(str(feature.ibsi_id), column, meaning[:64],
                                   family_of[column.split("_", 1)[0]], _round(value),
                                   _UNITS.get(column, "1")))
        if previous is not None:
            previous.clear_cache()
    return out


def _grown_box(box: Sequence[slice], shape: Sequence[int], spacing: Sequence[float],
               margin_mm: float) -> tuple[slice, slice, slice]:
    """``box`` grown by ``margin_mm`` (at least one voxel) on each side, within ``shape``."""
    out = []
    for axis in range(3):
        pad = max(1, math.ceil(margin_mm / float(spacing[axis])))
        out.append(slice(max(0, int(box[axis].start) - pad),
                         min(int(shape[axis]), int(box[axis].stop) + pad)))
    return tuple(out)  # type: ignore[return-value]


def structure_features(hu: np.ndarray, mask: np.ndarray, box: Sequence[slice],
                       spacing: Sequence[float],
                       parameters: RadiomicsParameters) -> list[Feature]:
    """:func:`extract_features` of a structure on its box (plus margin) of a whole volume.

    The box is cut before MIRP resamples, so a 3 ml lesion of a 512x512x300 series
    costs its own few thousand voxels; the features are those of the whole volume
    (shape and texture only see the mask; the margin feeds the interpolation).

    Parameters
    ----------
    hu
        The whole CT ``[z, y, x]`` in HU.
    mask
        The structure's boolean mask within ``box`` (``mask.shape`` is the box's).
    box
        Where ``mask`` lies in ``hu``.
    spacing, parameters
        As for :func:`extract_features`.
    """
    grown = _grown_box(box, hu.shape, spacing, parameters.margin_mm)
    crop = np.zeros(tuple(s.stop - s.start for s in grown), bool)
    crop[tuple(slice(b.start - g.start, b.stop - g.start)
               for b, g in zip(box, grown, strict=True))] = mask
    return extract_features(hu[grown], crop, spacing, parameters)


def lesion_groups(structures: Mapping[int, str]) -> bool:
    """Whether a label map's lesion structure is reported per lesion (a liver is present).

    Mirrors the SR: with a ``Liver`` and a lesion structure, the lesions are the groups.
    """
    from dicomnode.results.codes import CATALOGUE

    names = set(structures.values())
    return "Liver" in names and any(CATALOGUE[n].is_lesion for n in names if n in CATALOGUE)


def compute_radiomics(hu: np.ndarray, label_map: np.ndarray, structures: Mapping[int, str],
                      spacing: Sequence[float],
                      parameters: RadiomicsParameters) -> RadiomicsReport:
    """Features of every structure of a pipeline's label map, as the SR groups them.

    Organs (and a haemorrhage) are one group each, named as the structure. With a
    ``Liver`` present, the lesion structure is split into its lesions, numbered as the
    SR's ``Lesion N`` groups (:func:`dicomnode.results.measure.label_lesions`), and its
    all-lesions group gets none.

    Parameters
    ----------
    hu
        The CT volume ``[z, y, x]`` in HU.
    label_map
        ``[z, y, x]`` labels on the same grid.
    structures
        Label value -> structure name.
    spacing
        ``(dz, dy, dx)`` in mm.
    parameters
        The settings.

    Returns
    -------
    RadiomicsReport
    """
    from dicomnode.results.codes import CATALOGUE
    from dicomnode.results.measure import label_lesions

    if hu.shape != label_map.shape:
        raise ValueError(f"Invalid 'label_map' shape {label_map.shape} - the CT is {hu.shape}")
    report = RadiomicsReport(parameters, f"mirp {mirp_version()}")
    split = lesion_groups(structures)
    for value, name in sorted(structures.items()):
        structure = CATALOGUE.get(name)
        mask = label_map == value
        found = ndimage.find_objects(mask.astype(np.uint8))
        if not found or found[0] is None:
            continue
        box = found[0]
        if split and structure is not None and structure.is_lesion:
            for number, (inner, component) in enumerate(label_lesions(mask[box]), start=1):
                at = tuple(slice(b.start + i.start, b.start + i.stop)
                           for b, i in zip(box, inner, strict=True))
                report.structures[f"Lesion {number}"] = structure_features(
                    hu, component, at, spacing, parameters)
            continue
        if structure is not None and not structure.is_lesion and not parameters.organs:
            continue
        report.structures[name] = structure_features(hu, mask[box], box, spacing, parameters)
    log.info("radiomics.done", extra=fields(structures=len(report.structures),
                                            features=sum(map(len, report.structures.values()))))
    return report


@dataclass(frozen=True)
class ReportedFeature:
    """One feature as a report gives it back: structure, IBSI code, meaning, value, unit."""

    structure: str
    ibsi_id: str
    meaning: str
    value: float
    unit: str


#: DCM 112039 Tracking Identifier: names a TID 1500 measurement group.
_TRACKING_IDENTIFIER = ("112039", "DCM")


def _concept(item: Any) -> tuple[str, str]:
    code = item.ConceptNameCodeSequence[0]
    return str(code.CodeValue), str(code.CodingSchemeDesignator)


def features_from_sr(sr: Any) -> list[ReportedFeature]:
    """The IBSI features a TID 1500 SR of the node carries, per measurement group.

    Parameters
    ----------
    sr : pydicom.dataset.Dataset
        A Comprehensive 3D SR (any: one without features gives an empty list).

    Returns
    -------
    list of ReportedFeature
        In the order of the report, each with its group's tracking identifier.
    """
    out: list[ReportedFeature] = []

    def groups(item: Any) -> Iterator[Any]:
        for child in item.get("ContentSequence", []):
            if child.get("ValueType") == "CONTAINER":
                if any(c.get("ValueType") == "TEXT" and _concept(c) == _TRACKING_IDENTIFIER
                       for c in child.get("ContentSequence", [])):
                    yield child
                else:
                    yield from groups(child)

    from dicomnode.results.sr import tracked_name  # sr imports this module

    for group in groups(sr):
        items = list(group.get("ContentSequence", []))
        name = tracked_name(next(str(c.TextValue) for c in items if c.get("ValueType") == "TEXT"
                                 and _concept(c) == _TRACKING_IDENTIFIER))
        for item in items:
            if item.get("ValueType") != "NUM" or _concept(item)[1] != IBSI_SCHEME:
                continue
            measured = item.MeasuredValueSequence[0]
            out.append(ReportedFeature(
                name, str(item.ConceptNameCodeSequence[0].CodeValue),
                str(item.ConceptNameCodeSequence[0].CodeMeaning),
                float(measured.NumericValue),
                str(measured.MeasurementUnitsCodeSequence[0].CodeValue)))
    return out


def reported_features(report: RadiomicsReport) -> list[ReportedFeature]:
    """The features of a :class:`RadiomicsReport` as :func:`features_from_sr` gives them."""
    return [ReportedFeature(name, f.ibsi_id, f.meaning, f.value, f.unit)
            for name, feats in report.structures.items() for f in feats]
