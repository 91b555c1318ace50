"""Structure tables: TG-263 names, SNOMED CT category/type codes, colours, label values.

The codes are SNOMED CT concepts as used in DICOM CID 7150 (segmentation property
categories) and CID 7151/7192 (anatomic structures); TG-263 gives the structure names
that planning systems match on. ``HEADNECK`` and ``ABDOMEN`` list the structures in the
order of their label values in a label map (label ``i + 1`` is entry ``i``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace

from highdicom.sr.coding import CodedConcept
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code

#: Local coding scheme for concepts without a standard code (documented in the SR).
LOCAL_SCHEME = "99DCMNODE"

ANATOMICAL_STRUCTURE = codes.SCT.AnatomicalStructure  # 91723000
ABNORMAL_STRUCTURE = codes.SCT.MorphologicallyAbnormalStructure  # 49755003
LEFT = codes.SCT.Left
RIGHT = codes.SCT.Right


@dataclass(frozen=True)
class Structure:
    """One structure that a pipeline segments.

    Parameters
    ----------
    name
        TG-263 structure name (ROI Name in RTSTRUCT, Segment Label in SEG).
    label
        Value of the structure in a label map (1-based).
    category
        SNOMED CT segmented property category.
    type
        SNOMED CT segmented property type.
    laterality
        SNOMED CT laterality modifier (``Left``/``Right``) or ``None``.
    color
        Display colour as RGB 0-255 (ROI Display Color, and CIELab in SEG).
    rt_roi_type
        RT ROI Interpreted Type: ``ORGAN`` for organs at risk, ``GTV`` for tumours.
    """

    name: str
    label: int
    category: Code | CodedConcept
    type: Code | CodedConcept
    laterality: Code | CodedConcept | None
    color: tuple[int, int, int]
    rt_roi_type: str = "ORGAN"

    @property
    def is_lesion(self) -> bool:
        """Whether this is a lesion (tumour) rather than an organ."""
        return self.category == ABNORMAL_STRUCTURE

    def __post_init__(self) -> None:
        if self.label < 1 or self.label > 255:
            raise ValueError(f"Invalid 'label' value '{self.label}' - must be 1 to 255")
        if not self.name or len(self.name) > 64:
            raise ValueError(f"Invalid 'name' value '{self.name}' - must be 1 to 64 characters")


def _organ(name: str, label: int, type_: Code, color: tuple[int, int, int],
           laterality: Code | None = None) -> Structure:
    return Structure(name, label, ANATOMICAL_STRUCTURE, type_, laterality, color, "ORGAN")


#: Head-and-neck organs at risk (the MICCAI 2015 set) by their TG-263 names, in label order.
HEADNECK: tuple[Structure, ...] = (
    _organ("BrainStem", 1, codes.SCT.BrainStem, (255, 170, 0)),
    _organ("OpticChiasm", 2, codes.SCT.OpticChiasm, (255, 0, 255)),
    _organ("Bone_Mandible", 3, codes.SCT.Mandible, (230, 230, 170)),
    _organ("OpticNrv_L", 4, codes.SCT.OpticNerve, (0, 170, 255), LEFT),
    _organ("OpticNrv_R", 5, codes.SCT.OpticNerve, (0, 255, 170), RIGHT),
    _organ("Parotid_L", 6, codes.SCT.ParotidGland, (255, 85, 85), LEFT),
    _organ("Parotid_R", 7, codes.SCT.ParotidGland, (85, 255, 85), RIGHT),
    _organ("Glnd_Submand_L", 8, codes.SCT.SubmandibularGland, (170, 85, 255), LEFT),
    _organ("Glnd_Submand_R", 9, codes.SCT.SubmandibularGland, (255, 255, 0), RIGHT),
)

#: Liver and liver tumours, in label order (the names the phantoms and pipelines use).
ABDOMEN: tuple[Structure, ...] = (
    _organ("Liver", 1, codes.SCT.Liver, (221, 130, 101)),
    Structure("Lesion_Liver", 2, ABNORMAL_STRUCTURE, codes.SCT.Neoplasm, None, (255, 0, 0),
              "GTV"),
)

STRUCTURE_TABLES: dict[str, tuple[Structure, ...]] = {"headneck": HEADNECK, "abdomen": ABDOMEN}

#: Every structure the node knows by TG-263 name (label values are placeholders).
CATALOGUE: dict[str, Structure] = {s.name: s for s in (
    *HEADNECK, *ABDOMEN,
    Structure("GTV_Liver", 2, ABNORMAL_STRUCTURE, codes.SCT.Neoplasm, None, (255, 0, 0), "GTV"),
    _organ("Spleen", 3, codes.SCT.Spleen, (157, 108, 162)),
    _organ("Kidney_L", 4, codes.SCT.Kidney, (185, 102, 83), LEFT),
    _organ("Kidney_R", 5, codes.SCT.Kidney, (185, 102, 83), RIGHT),
    _organ("A_Aorta", 6, codes.SCT.Aorta, (224, 97, 76)),
    _organ("Vertebrae", 7, codes.SCT.Vertebra, (241, 214, 145)),
    _organ("Gallbladder", 8, codes.SCT.Gallbladder, (139, 150, 98)),
    _organ("Pancreas", 9, codes.SCT.Pancreas, (249, 180, 111)),
    # the blood of an intracranial haemorrhage, any subtype (brain_ich's SEG)
    Structure("Hemorrhage_Intracranial", 1, ABNORMAL_STRUCTURE,
              CodedConcept("1386000", "SCT", "Intracranial hemorrhage"), None, (255, 60, 0),
              "AVOIDANCE"),
)}


def table_from_labels(names: Mapping[int, str]) -> tuple[Structure, ...]:
    """Build a structure table from a pipeline's ``label value -> TG-263 name`` mapping.

    Parameters
    ----------
    names
        E.g. ``PipelineResult.structures``: ``{1: "Liver", 2: "Lesion_Liver"}``.

    Returns
    -------
    tuple of Structure
        The catalogue entries with the given label values, in label order.

    Raises
    ------
    ValueError
        For a name the catalogue does not know.
    """
    table = []
    for label, name in sorted(names.items()):
        if name not in CATALOGUE:
            raise ValueError(f"Invalid structure name '{name}' (label {label}) - known names: "
                             f"{sorted(CATALOGUE)}")
        table.append(replace(CATALOGUE[name], label=int(label)))
    return tuple(table)


def structure_table(region: str) -> tuple[Structure, ...]:
    """Return the structure table of a region (``"headneck"`` or ``"abdomen"``).

    Raises
    ------
    ValueError
        If ``region`` names no table.
    """
    try:
        return STRUCTURE_TABLES[region]
    except KeyError:
        raise ValueError(
            f"Invalid 'structures' value '{region}' - must be one of {sorted(STRUCTURE_TABLES)}"
        ) from None


@dataclass(frozen=True)
class Finding:
    """An intracranial haemorrhage finding reported by the ICH pipeline."""

    key: str
    code: CodedConcept


def _sct(value: str, meaning: str) -> CodedConcept:
    return CodedConcept(value, "SCT", meaning)


#: The six ICH outputs, in the order of the model's outputs. Epidural has no SNOMED CT
#: concept we could verify offline, so it is coded in the local scheme.
ICH_FINDINGS: tuple[Finding, ...] = (
    Finding("any", _sct("1386000", "Intracranial hemorrhage")),
    Finding("epidural", CodedConcept("EDH", LOCAL_SCHEME, "Epidural hemorrhage")),
    Finding("intraparenchymal", _sct("274100004", "Cerebral hemorrhage")),
    Finding("intraventricular", _sct("274110009", "Intraventricular hemorrhage")),
    Finding("subarachnoid", _sct("21454007", "Subarachnoid hemorrhage")),
    Finding("subdural", _sct("35486000", "Subdural hemorrhage")),
)

#: Measurements without a standard code (local scheme).
TUMOR_BURDEN = CodedConcept("TTB", LOCAL_SCHEME, "Total tumor volume")
TUMOR_TO_LIVER_RATIO = CodedConcept("TLR", LOCAL_SCHEME, "Tumor to liver volume ratio")
