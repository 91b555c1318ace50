"""Which pipeline(s) a received study goes to, and why.

Routing reads every header of the study once, picks a series to look at
(:mod:`dicomnode.imaging.selection`), builds its volume and estimates the body region
from the image (:mod:`dicomnode.imaging.bodypart`). It also reads a region from the
descriptive tags through a synonym table (BodyPartExamined, ProtocolName,
SeriesDescription, StudyDescription; vendor spellings and languages). By default the
image wins when the two disagree, and the disagreement is recorded.

Declarative rules (YAML, see ``config/routing.yaml``; the same defaults are embedded
here as :data:`DEFAULT_RULES`) map conditions to actions::

    rules:
      - name: head_noncontrast_ich
        when:
          region: [head]                      # detected region (after image/tag policy)
          tags:                               # DICOM keywords of the routed series
            ContrastBolusAgent: {present: false}
            SeriesDescription: {not_regex: '(?i)contrast|\\bKM\\b'}
            SliceThickness: {range: [0.5, 5]}
            Modality: {in: [CT]}
          calling_aet: {regex: '^CT_'}         # the sending AE
        actions:
          - {pipeline: brain_ich, priority: urgent, destinations: [sender]}

Each matching rule's actions get their own series, chosen under the pipeline's
``selection`` preferences. A study without a usable CT series, or that no rule matches,
gives ``routed=False`` with the reason: never an exception for ordinary bad data.
"""

from __future__ import annotations

import logging
import re
import unicodedata
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset

from dicomnode.config import read_yaml
from dicomnode.imaging.bodypart import RegionEstimate, detect_region
from dicomnode.imaging.selection import (
    SelectionPreferences,
    SeriesInfo,
    describe_study,
    select_series,
)
from dicomnode.imaging.series import SeriesError, Volume, load_series
from dicomnode.logs import fields

log = logging.getLogger(__name__)

REGIONS = ("head", "headneck", "chest", "abdomen", "other")
PRIORITIES = ("urgent", "high", "normal", "low")
#: The tags a region is read from, in order of trust.
REGION_TAGS = ("BodyPartExamined", "ProtocolName", "SeriesDescription", "StudyDescription")
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]*$")

#: The default rules; ``config/routing.yaml`` holds the same content as a file to copy.
DEFAULT_RULES: dict[str, Any] = {
    "version": 1,
    "match": "first",
    "region_source": "image",
    "min_image_confidence": 0.5,
    "synonyms": {
        "head": ["HEAD", "BRAIN", "KOPF", "SCHÄDEL", "SCHAEDEL", "SCHADEL", "CCT", "CRANE",
                 "CRANIUM", "CRANIAL", "SKULL", "HIRN", "CEREBRAL", "CERVEAU", "TETE", "CRANEO",
                 "CABEZA", "CERVELLO", "CRANIO", "ENCEFALO", "HOOFD", "HERSENEN", "NCCT HEAD",
                 "STROKE", "SCHLAGANFALL"],
        "neck": ["NECK", "HALS", "CERVICAL", "COU", "CUELLO", "COLLO", "LARYNX", "PHARYNX",
                 "THYROID", "SCHILDDRUESE", "HNO", "ORL"],
        "headneck": ["HEADNECK", "HEAD NECK", "HEAD AND NECK", "HEAD_NECK", "H N", "HN",
                     "KOPFHALS", "KOPF HALS", "KOPF UND HALS", "TETE ET COU", "TETE COU",
                     "CABEZA Y CUELLO", "TESTA COLLO", "HEAD NECK RT", "PAROTID", "OROPHARYNX",
                     "NASOPHARYNX"],
        "chest": ["CHEST", "THORAX", "LUNG", "LUNGE", "THORAKS", "TORAX", "TORACE",
                  "POITRINE", "PULMO"],
        "abdomen": ["ABDOMEN", "ABD", "ABDO", "LIVER", "LEBER", "BAUCH", "FOIE", "HIGADO",
                    "FEGATO", "HEPAR", "HEPATIC", "ABDOMINAL", "ADDOME", "ABDOMINALE",
                    "OBERBAUCH", "UPPER ABDOMEN", "ABDPELVIS", "ABDOMENPELVIS"],
        "other": ["PELVIS", "BECKEN", "LEG", "KNEE", "KNIE", "EXTREMITY", "SPINE", "LWS",
                  "BWS", "FOOT", "HAND", "SHOULDER", "SCHULTER"],
    },
    "selection": {
        "default": {"orientation": "axial", "min_slice_thickness_mm": 0.5,
                    "max_slice_thickness_mm": 5.0, "kernels": ["soft", "unknown", "bone", "lung"],
                    "min_slices": 10, "min_coverage_mm": 30.0},
        "brain_ich": {"orientation": "axial", "min_slice_thickness_mm": 0.5,
                      "max_slice_thickness_mm": 5.0, "kernels": ["soft", "unknown", "bone"],
                      "min_slices": 10, "min_coverage_mm": 60.0},
        "headneck_oar": {"orientation": "axial", "min_slice_thickness_mm": 0.5,
                         "max_slice_thickness_mm": 3.0, "kernels": ["soft", "unknown", "bone"],
                         "min_slices": 20, "min_coverage_mm": 80.0},
        "liver_tumor": {"orientation": "axial", "min_slice_thickness_mm": 0.5,
                        "max_slice_thickness_mm": 5.0, "kernels": ["soft", "unknown"],
                        "min_slices": 20, "min_coverage_mm": 80.0},
    },
    "rules": [
        {
            "name": "head_noncontrast_ich",
            "description": "Head-only non-contrast CT: intracranial haemorrhage triage",
            "when": {
                "region": ["head"],
                "tags": {
                    "Modality": {"in": ["CT"]},
                    "ContrastBolusAgent": {"present": False},
                    "SeriesDescription": {
                        # a contrast word, unless negated (w/o, non-contrast, nativ, ohne)
                        "not_regex": (r"(?i)^(?!.*(without|w/o|\bnon[- ]?con|\bnc\b|nativ|"
                                      r"ohne|sans|\bsin\b)).*(contrast|kontrast|\bKM\b|"
                                      r"\bC\+|\bCE\b|\bCTA\b|angio)"),
                    },
                },
            },
            "actions": [{"pipeline": "brain_ich", "priority": "urgent",
                         "destinations": ["sender"]}],
        },
        {
            "name": "headneck_oar",
            "description": "Head-and-neck coverage: organs at risk for RT planning",
            "when": {"region": ["headneck"], "tags": {"Modality": {"in": ["CT"]}}},
            "actions": [{"pipeline": "headneck_oar", "priority": "normal",
                         "destinations": ["sender"]}],
        },
        {
            "name": "abdomen_liver",
            "description": "Abdomen: liver and liver tumours",
            "when": {"region": ["abdomen"], "tags": {"Modality": {"in": ["CT"]}}},
            "actions": [{"pipeline": "liver_tumor", "priority": "normal",
                         "destinations": ["sender"]}],
        },
    ],
}


# ---------------------------------------------------------------------------------------
# Rules


def _normalise(text: str) -> list[str]:
    """Upper-case ASCII tokens: umlauts spelled out (Ä -> AE), accents dropped."""
    text = str(text).upper()
    for a, b in (("Ä", "AE"), ("Ö", "OE"), ("Ü", "UE"), ("ß", "SS")):
        text = text.replace(a, b)
    text = unicodedata.normalize("NFKD", text).encode("ascii", "ignore").decode()
    return [t for t in re.split(r"[^A-Z0-9+]+", text) if t]


@dataclass
class Condition:
    """A test on one value: regex, set membership, numeric range, presence."""

    name: str
    regex: re.Pattern[str] | None = None
    not_regex: re.Pattern[str] | None = None
    in_: list[str] | None = None
    not_in: list[str] | None = None
    minimum: float | None = None
    maximum: float | None = None
    present: bool | None = None

    @classmethod
    def from_spec(cls, name: str, spec: Any) -> Condition:
        """Build from YAML: a mapping, a list (``in``) or a scalar (regex).

        Parameters
        ----------
        name : str
            The tag keyword or ``calling_aet`` (for messages).
        spec : mapping, list or str
            ``{regex, not_regex, in, not_in, range: [lo, hi], min, max, present}``.

        Returns
        -------
        Condition
        """
        if isinstance(spec, str):
            spec = {"regex": spec}
        elif isinstance(spec, list):
            spec = {"in": spec}
        if not isinstance(spec, Mapping):
            raise ValueError(f"Invalid '{name}' value '{spec}' - expected a mapping, list or "
                             "string")
        known = {"regex", "not_regex", "in", "not_in", "range", "min", "max", "present"}
        for key in spec:
            if key not in known:
                raise ValueError(f"Invalid '{name}' condition key '{key}' - known: "
                                 f"{', '.join(sorted(known))}")
        cond = cls(name=name)
        for key, attr in (("regex", "regex"), ("not_regex", "not_regex")):
            if key in spec:
                try:
                    setattr(cond, attr, re.compile(str(spec[key])))
                except re.error as exc:
                    raise ValueError(f"Invalid '{name}.{key}' value '{spec[key]}' - {exc}") from exc
        for key, attr in (("in", "in_"), ("not_in", "not_in")):
            if key in spec:
                values = spec[key]
                if not isinstance(values, list):
                    raise ValueError(f"Invalid '{name}.{key}' value '{values}' - must be a list")
                setattr(cond, attr, [str(v).strip().upper() for v in values])
        lo, hi = spec.get("min"), spec.get("max")
        if "range" in spec:
            rng = spec["range"]
            if not isinstance(rng, list) or len(rng) != 2:
                raise ValueError(f"Invalid '{name}.range' value '{rng}' - must be [min, max]")
            lo, hi = rng
        for key, v in (("min", lo), ("max", hi)):
            if v is not None and not isinstance(v, (int, float)):
                raise ValueError(f"Invalid '{name}.{key}' value '{v}' - must be a number")
        cond.minimum = float(lo) if lo is not None else None
        cond.maximum = float(hi) if hi is not None else None
        if cond.minimum is not None and cond.maximum is not None and cond.minimum > cond.maximum:
            raise ValueError(f"Invalid '{name}.range' value '[{lo}, {hi}]' - min > max")
        if "present" in spec:
            if not isinstance(spec["present"], bool):
                raise ValueError(f"Invalid '{name}.present' value '{spec['present']}' - "
                                 "must be true or false")
            cond.present = spec["present"]
        return cond

    def evaluate(self, value: Any) -> tuple[bool, str]:
        """Test a value (None when the tag is absent or empty).

        Returns
        -------
        (bool, str)
            Whether it holds, and a short reason.
        """
        if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v) for v in value)
        else:
            text = "" if value is None else str(value).strip()
        present = text != ""
        if self.present is not None and present != self.present:
            return False, f"{self.name} is {'present' if present else 'absent'}"
        if self.regex is not None and not (present and self.regex.search(text)):
            return False, f"{self.name} does not match /{self.regex.pattern}/"
        if self.not_regex is not None and present and self.not_regex.search(text):
            return False, f"{self.name} matches excluded /{self.not_regex.pattern}/"
        if self.in_ is not None and text.upper() not in self.in_:
            return False, f"{self.name} is not one of {self.in_}"
        if self.not_in is not None and text.upper() in self.not_in:
            return False, f"{self.name} is one of excluded {self.not_in}"
        if self.minimum is not None or self.maximum is not None:
            try:
                number = float(value[0] if isinstance(value, (list, tuple)) else text)
            except (TypeError, ValueError, IndexError):
                return False, f"{self.name} is not a number"
            if self.minimum is not None and number < self.minimum:
                return False, f"{self.name} {number:g} < {self.minimum:g}"
            if self.maximum is not None and number > self.maximum:
                return False, f"{self.name} {number:g} > {self.maximum:g}"
        return True, f"{self.name} ok"


@dataclass
class Action:
    """Send the study to a pipeline with a priority and result destinations."""

    pipeline: str
    priority: str = "normal"
    destinations: list[str] = field(default_factory=lambda: ["sender"])

    @classmethod
    def from_spec(cls, rule: str, spec: Any) -> Action:
        """Build from YAML (``{pipeline, priority, destinations}``)."""
        if not isinstance(spec, Mapping) or "pipeline" not in spec:
            raise ValueError(f"Invalid 'actions' value '{spec}' in rule '{rule}' - needs a "
                             "'pipeline'")
        unknown = set(spec) - {"pipeline", "priority", "destinations"}
        if unknown:
            raise ValueError(f"Invalid 'actions' key '{sorted(unknown)[0]}' in rule '{rule}'")
        pipeline = str(spec["pipeline"])
        if not _NAME.match(pipeline):
            raise ValueError(f"Invalid 'pipeline' value '{pipeline}' in rule '{rule}'")
        priority = str(spec.get("priority", "normal"))
        if priority not in PRIORITIES:
            raise ValueError(f"Invalid 'priority' value '{priority}' in rule '{rule}' - must be "
                             f"one of {', '.join(PRIORITIES)}")
        dests = spec.get("destinations", ["sender"])
        if not isinstance(dests, list) or not all(isinstance(d, str) and d for d in dests):
            raise ValueError(f"Invalid 'destinations' value '{dests}' in rule '{rule}' - must "
                             "be a list of destination names")
        return cls(pipeline, priority, list(dests))


@dataclass
class Rule:
    """Conditions (all must hold) and the actions they trigger."""

    name: str
    description: str = ""
    regions: list[str] | None = None
    min_region_confidence: float = 0.0
    tag_regions: list[str] | None = None
    tags: list[Condition] = field(default_factory=list)
    calling_aet: Condition | None = None
    actions: list[Action] = field(default_factory=list)

    @classmethod
    def from_spec(cls, spec: Any) -> Rule:
        """Build from YAML (``{name, description, when, actions}``)."""
        if not isinstance(spec, Mapping):
            raise ValueError(f"Invalid 'rules' entry '{spec}' - must be a mapping")
        name = str(spec.get("name", ""))
        if not _NAME.match(name):
            raise ValueError(f"Invalid 'name' value '{name}' - a rule needs an identifier name")
        unknown = set(spec) - {"name", "description", "when", "actions"}
        if unknown:
            raise ValueError(f"Invalid rule key '{sorted(unknown)[0]}' in rule '{name}'")
        when = spec.get("when") or {}
        if not isinstance(when, Mapping):
            raise ValueError(f"Invalid 'when' value '{when}' in rule '{name}'")
        unknown = set(when) - {"region", "min_region_confidence", "tag_region", "tags",
                               "calling_aet"}
        if unknown:
            raise ValueError(f"Invalid 'when' key '{sorted(unknown)[0]}' in rule '{name}'")
        rule = cls(name=name, description=str(spec.get("description", "")))
        for key, attr in (("region", "regions"), ("tag_region", "tag_regions")):
            if key in when:
                regions = when[key]
                regions = [regions] if isinstance(regions, str) else regions
                if not isinstance(regions, list) or not all(r in REGIONS for r in regions):
                    raise ValueError(f"Invalid '{key}' value '{when[key]}' in rule '{name}' - "
                                     f"regions are {', '.join(REGIONS)}")
                setattr(rule, attr, list(regions))
        conf = when.get("min_region_confidence", 0.0)
        if not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
            raise ValueError(f"Invalid 'min_region_confidence' value '{conf}' in rule '{name}'"
                             " - must be in [0, 1]")
        rule.min_region_confidence = float(conf)
        tags = when.get("tags") or {}
        if not isinstance(tags, Mapping):
            raise ValueError(f"Invalid 'tags' value '{tags}' in rule '{name}' - must map "
                             "keywords to conditions")
        from pydicom.datadict import keyword_dict

        for keyword, cspec in tags.items():
            if keyword not in keyword_dict:
                raise ValueError(f"Invalid 'tags' keyword '{keyword}' in rule '{name}' - not a "
                                 "DICOM keyword")
            rule.tags.append(Condition.from_spec(str(keyword), cspec))
        if "calling_aet" in when:
            rule.calling_aet = Condition.from_spec("calling_aet", when["calling_aet"])
        actions = spec.get("actions")
        if not isinstance(actions, list) or not actions:
            raise ValueError(f"Invalid 'actions' value '{actions}' in rule '{name}' - needs at "
                             "least one action")
        rule.actions = [Action.from_spec(name, a) for a in actions]
        return rule


@dataclass
class RoutingRules:
    """A validated rule set with its synonym table and selection preferences."""

    rules: list[Rule]
    synonyms: dict[str, list[list[str]]]
    selection: dict[str, SelectionPreferences]
    match: str = "first"
    region_source: str = "image"
    min_image_confidence: float = 0.5

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RoutingRules:
        """Validate and build from a parsed YAML mapping.

        Parameters
        ----------
        data : mapping
            Keys ``rules`` (required), ``synonyms``, ``selection``, ``match``
            (``first``/``all``), ``region_source`` (``image``/``tags``),
            ``min_image_confidence``, ``version``.

        Returns
        -------
        RoutingRules
        """
        if not isinstance(data, Mapping):
            raise ValueError(f"Invalid 'routing' value '{data}' - the top level must be a mapping")
        known = {"version", "match", "region_source", "min_image_confidence", "synonyms",
                 "selection", "rules"}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Invalid 'routing' key '{sorted(unknown)[0]}' - known keys: "
                             f"{', '.join(sorted(known))}")
        match = str(data.get("match", "first"))
        if match not in ("first", "all"):
            raise ValueError(f"Invalid 'match' value '{match}' - must be first or all")
        source = str(data.get("region_source", "image"))
        if source not in ("image", "tags"):
            raise ValueError(f"Invalid 'region_source' value '{source}' - must be image or tags")
        conf = data.get("min_image_confidence", 0.5)
        if not isinstance(conf, (int, float)) or not 0.0 <= conf <= 1.0:
            raise ValueError(f"Invalid 'min_image_confidence' value '{conf}' - must be in [0, 1]")
        synonyms_in = data.get("synonyms", DEFAULT_RULES["synonyms"])
        if not isinstance(synonyms_in, Mapping):
            raise ValueError(f"Invalid 'synonyms' value '{synonyms_in}' - must map regions to "
                             "lists of terms")
        synonyms: dict[str, list[list[str]]] = {}
        for region, terms in synonyms_in.items():
            if region not in (*REGIONS, "neck"):
                raise ValueError(f"Invalid 'synonyms' region '{region}' - regions are "
                                 f"{', '.join((*REGIONS, 'neck'))}")
            if not isinstance(terms, list):
                raise ValueError(f"Invalid 'synonyms.{region}' value '{terms}' - must be a list")
            synonyms[region] = [tok for tok in (_normalise(str(t)) for t in terms) if tok]
        selection_in = data.get("selection") or {}
        if not isinstance(selection_in, Mapping):
            raise ValueError(f"Invalid 'selection' value '{selection_in}' - must be a mapping")
        selection = {str(k): SelectionPreferences.from_dict(v) for k, v in selection_in.items()}
        rules_in = data.get("rules")
        if not isinstance(rules_in, list):
            raise ValueError(f"Invalid 'rules' value '{rules_in}' - must be a list of rules")
        rules = [Rule.from_spec(r) for r in rules_in]
        names = [r.name for r in rules]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"Invalid 'name' value '{sorted(dup)[0]}' - rule names must be unique")
        return cls(rules, synonyms, selection, match, source, float(conf))

    def preferences(self, pipeline: str | None) -> SelectionPreferences:
        """Series preferences for a pipeline (falls back to ``default``)."""
        if pipeline and pipeline in self.selection:
            return self.selection[pipeline]
        return self.selection.get("default", SelectionPreferences())

    def destinations(self) -> set[str]:
        """Every destination name the actions use (``sender`` included)."""
        return {d for r in self.rules for a in r.actions for d in a.destinations}


def load_rules(path: Path | str | None = None) -> RoutingRules:
    """Load routing rules from YAML, or the embedded defaults.

    Parameters
    ----------
    path : Path or str, optional
        A routing YAML file. None gives :data:`DEFAULT_RULES`.

    Returns
    -------
    RoutingRules

    Raises
    ------
    ValueError
        If the file is missing, not YAML, or a rule is malformed (the message names
        the offending key and value).
    """
    if path is None:
        return RoutingRules.from_dict(DEFAULT_RULES)
    return RoutingRules.from_dict(read_yaml(Path(path), "rules"))


# ---------------------------------------------------------------------------------------
# Regions from tags


@dataclass
class TagRegion:
    """The region the descriptive tags name, tag by tag."""

    region: str | None
    sources: dict[str, dict[str, Any]] = field(default_factory=dict)
    conflicting: bool = False

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {"region": self.region, "sources": self.sources, "conflicting": self.conflicting}


def _contains(tokens: list[str], term: list[str]) -> bool:
    n = len(term)
    for i in range(len(tokens) - n + 1):
        window = tokens[i:i + n]
        if window[:-1] != term[:-1]:
            continue
        last, want = window[-1], term[-1]
        # Long terms also match as the start of a compound (SCHAEDELBASIS, LEBERMETASTASEN).
        if last == want or (len(want) >= 4 and last.startswith(want)):
            return True
    return False


def region_from_text(text: str, synonyms: Mapping[str, list[list[str]]]) -> str | None:
    """Name the region a free-text tag value describes.

    Parameters
    ----------
    text : str
        A BodyPartExamined, protocol or description value.
    synonyms : mapping
        Region -> normalised term token lists (``RoutingRules.synonyms``).

    Returns
    -------
    str or None
        ``head``, ``headneck`` (an explicit head-and-neck term, a neck term, or head
        and neck terms together), ``chest``, ``abdomen`` (also chest with abdomen),
        ``other``, or None.
    """
    tokens = _normalise(text)
    if not tokens:
        return None
    found = {region for region, terms in synonyms.items()
             if any(_contains(tokens, t) for t in terms)}
    if not found:
        return None
    if "headneck" in found or "neck" in found:
        return "headneck"
    if "head" in found:
        return "head"
    if "abdomen" in found:
        return "abdomen"
    if "chest" in found:
        return "chest"
    return "other"


def tag_region(ds: Dataset, synonyms: Mapping[str, list[list[str]]]) -> TagRegion:
    """Read the region from the descriptive tags of a header.

    Each of :data:`REGION_TAGS` votes; the most frequent region wins and ties go to the
    more trusted tag (BodyPartExamined first).

    Parameters
    ----------
    ds : pydicom.dataset.Dataset
    synonyms : mapping
        ``RoutingRules.synonyms``.

    Returns
    -------
    TagRegion
    """
    sources: dict[str, dict[str, Any]] = {}
    votes: list[str] = []
    for keyword in REGION_TAGS:
        value = str(ds.get(keyword, "") or "").strip()
        if not value:
            continue
        region = region_from_text(value, synonyms)
        sources[keyword] = {"value": value, "region": region}
        if region:
            votes.append(region)
    if not votes:
        return TagRegion(None, sources)
    best = max(dict.fromkeys(votes), key=lambda r: (votes.count(r), -votes.index(r)))
    return TagRegion(best, sources, conflicting=len(set(votes)) > 1)


# ---------------------------------------------------------------------------------------
# Decision


@dataclass
class RoutedAction:
    """One pipeline run the study should get."""

    pipeline: str
    priority: str
    destinations: list[str]
    series_instance_uid: str
    series_reason: str
    rule: str

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form."""
        return {"pipeline": self.pipeline, "priority": self.priority,
                "destinations": self.destinations,
                "series_instance_uid": self.series_instance_uid,
                "series_reason": self.series_reason, "rule": self.rule}


@dataclass
class RoutingDecision:
    """What routing decided for a study, and why."""

    routed: bool
    reason: str
    study_instance_uid: str | None = None
    calling_aet: str | None = None
    matched_rules: list[str] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)
    series_instance_uid: str | None = None
    series_reason: str | None = None
    image_region: RegionEstimate | None = None
    tag_region: TagRegion | None = None
    region: str | None = None
    region_source: str | None = None
    disagreements: list[dict[str, Any]] = field(default_factory=list)
    actions: list[RoutedAction] = field(default_factory=list)
    rules_not_matched: dict[str, str] = field(default_factory=dict)
    series: list[dict[str, Any]] = field(default_factory=list)
    rejected_series: dict[str, str] = field(default_factory=dict)
    volume: Volume | None = field(default=None, repr=False)

    @property
    def matched_rule(self) -> str | None:
        """The first matching rule, or None."""
        return self.matched_rules[0] if self.matched_rules else None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable form (the volume is left out)."""
        return {
            "routed": self.routed,
            "reason": self.reason,
            "study_instance_uid": self.study_instance_uid,
            "calling_aet": self.calling_aet,
            "matched_rule": self.matched_rule,
            "matched_rules": self.matched_rules,
            "reasons": self.reasons,
            "series": {"series_instance_uid": self.series_instance_uid,
                       "why": self.series_reason},
            "region": {
                "used": self.region,
                "source": self.region_source,
                "image": self.image_region.to_dict() if self.image_region else None,
                "tags": self.tag_region.to_dict() if self.tag_region else None,
            },
            "disagreements": self.disagreements,
            "actions": [a.to_dict() for a in self.actions],
            "rules_not_matched": self.rules_not_matched,
            "series_considered": self.series,
            "rejected_series": self.rejected_series,
        }


def explain(decision: RoutingDecision | Mapping[str, Any]) -> str:
    """Render a routing decision as a few lines for people (CLI, status pages).

    Parameters
    ----------
    decision : RoutingDecision or mapping
        A decision or its ``to_dict()`` form (as stored with a job).

    Returns
    -------
    str
    """
    d = decision.to_dict() if isinstance(decision, RoutingDecision) else dict(decision)
    lines = [("routed: " if d.get("routed") else "") + str(d.get("reason", ""))]
    region = d.get("region") or {}
    image = region.get("image") or {}
    tags = region.get("tags") or {}
    if region.get("used"):
        lines.append(
            f"region: {region['used']} from {region.get('source')}"
            + (f" (image {image.get('region')} {image.get('confidence', 0):.2f}: "
               f"{(image.get('evidence') or {}).get('rule', '')})" if image else "")
            + (f"; tags {tags.get('region')}" if tags.get("region") else "")
        )
    series = d.get("series") or {}
    if series.get("series_instance_uid"):
        lines.append(f"series: {series['series_instance_uid']} ({series.get('why')})")
    if d.get("matched_rule"):
        lines.append(f"rule: {', '.join(d.get('matched_rules') or [d['matched_rule']])}")
    for action in d.get("actions") or []:
        lines.append(f"  -> {action['pipeline']} [{action['priority']}] to "
                     f"{', '.join(action['destinations'])} on {action['series_instance_uid']}")
    for dis in d.get("disagreements") or []:
        lines.append(f"disagreement: {dis['message']}")
    if not d.get("routed"):
        for name, why in (d.get("rules_not_matched") or {}).items():
            lines.append(f"  rule {name}: {why}")
    return "\n".join(lines)


def _decide_region(image: RegionEstimate | None, tags: TagRegion,
                   rules: RoutingRules) -> tuple[str | None, str | None, list[dict[str, Any]]]:
    disagreements: list[dict[str, Any]] = []
    image_ok = image is not None and image.confidence >= rules.min_image_confidence
    if rules.region_source == "tags" and tags.region:
        region, source = tags.region, "tags"
    elif image_ok:
        assert image is not None
        region, source = image.region, "image"
    elif tags.region:
        region, source = tags.region, "tags (image region uncertain)"
    elif image is not None:
        region, source = image.region, "image (low confidence)"
    else:
        region, source = None, None
    if image is not None and tags.region and tags.region != image.region:
        disagreements.append({
            "kind": "region",
            "image": image.region,
            "image_confidence": round(image.confidence, 3),
            "tags": tags.region,
            "used": region,
            "message": (f"tags say {tags.region}, image says {image.region} "
                        f"({image.confidence:.2f}); {source} used"),
        })
    if tags.conflicting:
        disagreements.append({
            "kind": "tags",
            "message": "descriptive tags name different regions: " + ", ".join(
                f"{k}={v['region']}" for k, v in tags.sources.items() if v["region"]),
        })
    return region, source, disagreements


def _rule_matches(rule: Rule, region: str | None, confidence: float, tags: TagRegion,
                  ds: Dataset, calling_aet: str | None) -> tuple[bool, list[str]]:
    why: list[str] = []
    if rule.regions is not None:
        if region not in rule.regions:
            return False, [f"region {region} not in {rule.regions}"]
        why.append(f"region {region} in {rule.regions}")
    if rule.min_region_confidence and confidence < rule.min_region_confidence:
        return False, [f"region confidence {confidence:.2f} < {rule.min_region_confidence:.2f}"]
    if rule.tag_regions is not None:
        if tags.region not in rule.tag_regions:
            return False, [f"tag region {tags.region} not in {rule.tag_regions}"]
        why.append(f"tag region {tags.region} in {rule.tag_regions}")
    for cond in rule.tags:
        elem = ds.get(cond.name)
        ok, reason = cond.evaluate(elem)
        if not ok:
            return False, [reason]
        why.append(reason)
    if rule.calling_aet is not None:
        ok, reason = rule.calling_aet.evaluate(calling_aet)
        if not ok:
            return False, [reason]
        why.append(f"calling AE {calling_aet} ok")
    return True, why


def route_study(
    paths: Sequence[Path | str],
    rules: RoutingRules | None = None,
    calling_aet: str | None = None,
    *,
    infos: Iterable[SeriesInfo] | None = None,
) -> RoutingDecision:
    """Decide which pipeline(s) a study goes to.

    Parameters
    ----------
    paths : sequence of path
        The study's files or directories.
    rules : RoutingRules, optional
        Defaults to :func:`load_rules` () (the embedded defaults).
    calling_aet : str, optional
        The AE title that sent the study.
    infos : iterable of SeriesInfo, optional
        Already described series (skips reading headers again).

    Returns
    -------
    RoutingDecision
        ``routed=False`` with a reason when nothing usable was found or no rule matched.
    """
    rules = rules or load_rules()
    series = list(infos) if infos is not None else describe_study(paths)
    decision = RoutingDecision(routed=False, reason="", calling_aet=calling_aet)
    decision.series = [s.to_dict() for s in series]
    if not series:
        decision.reason = "no DICOM files in the study"
        return _finish(decision)
    decision.study_instance_uid = series[0].study_instance_uid

    choice = select_series(series, rules.preferences("routing"))
    decision.rejected_series = dict(choice.rejected)
    by_uid = {s.series_instance_uid: s for s in series}
    volume: Volume | None = None
    chosen: SeriesInfo | None = None
    for uid in choice.candidates:
        try:
            volume = load_series(by_uid[uid].headers or by_uid[uid].paths)
            chosen = by_uid[uid]
            break
        except (SeriesError, ValueError, TypeError, AttributeError, KeyError, OSError) as exc:
            # Bad data in one series (truncated pixels, odd values) must not stop routing.
            decision.rejected_series[uid] = f"could not build a volume: {exc}"
    if chosen is None or volume is None:
        decision.reason = f"not routed: {choice.reason}" if choice.series is None else (
            "not routed: no candidate series could be read")
        return _finish(decision)
    decision.volume = volume
    decision.series_instance_uid = chosen.series_instance_uid
    decision.series_reason = choice.reason if chosen is choice.series else (
        "first readable candidate")

    image = detect_region(volume)
    tags = tag_region(chosen.first_header, rules.synonyms)
    region, source, disagreements = _decide_region(image, tags, rules)
    decision.image_region, decision.tag_region = image, tags
    decision.region, decision.region_source = region, source
    decision.disagreements = disagreements
    confidence = image.confidence if source and source.startswith("image") else 1.0

    for rule in rules.rules:
        ok, why = _rule_matches(rule, region, confidence, tags, chosen.first_header, calling_aet)
        if not ok:
            decision.rules_not_matched[rule.name] = "; ".join(why)
            continue
        actions: list[RoutedAction] = []
        for action in rule.actions:
            pick = select_series(series, rules.preferences(action.pipeline))
            if pick.series is None:
                decision.reasons.append(
                    f"rule {rule.name}: {action.pipeline} skipped - {pick.reason} under its "
                    "series preferences")
                continue
            actions.append(RoutedAction(action.pipeline, action.priority,
                                        list(action.destinations),
                                        pick.series.series_instance_uid, pick.reason, rule.name))
        if not actions:
            decision.rules_not_matched[rule.name] = "matched, but no series suits its pipelines"
            continue
        decision.matched_rules.append(rule.name)
        decision.reasons.append(f"rule {rule.name}: " + "; ".join(why))
        decision.actions.extend(actions)
        if rules.match == "first":
            break

    if decision.actions:
        decision.routed = True
        decision.reason = ", ".join(f"{a.pipeline} ({a.priority})" for a in decision.actions)
    else:
        decision.reason = (
            f"not routed: no rule matches region {region} ({source}"
            + (f", confidence {image.confidence:.2f}" if source and "image" in source else "")
            + ")"
        )
    return _finish(decision)


def route_directory(study_dir: Path | str, rules_path: Path | str | None = None,
                    calling_aet: str | None = None, *, as_json: bool = False) -> tuple[int, str]:
    """Route one study directory and render the decision (``dicomnode route``).

    Parameters
    ----------
    study_dir : Path or str
        A directory with the study's files (searched recursively).
    rules_path : Path or str, optional
        A routing YAML; the embedded defaults without it.
    calling_aet : str, optional
        Route as if this AE had sent the study.
    as_json : bool
        Render ``to_dict()`` as JSON instead of :func:`explain` text.

    Returns
    -------
    (int, str)
        Exit status (0 routed, 1 not routed, 2 bad arguments) and the text to print.
    """
    import json

    try:
        directory = Path(study_dir)
        if not directory.is_dir():
            raise ValueError(f"Invalid 'study_dir' value '{directory}' - not a directory")
        rules = load_rules(rules_path)
        decision = route_study([directory], rules, calling_aet)
    except ValueError as exc:
        return 2, f"dicomnode: {exc}"
    text = json.dumps(decision.to_dict(), indent=2) if as_json else explain(decision)
    return (0 if decision.routed else 1), text


def _finish(decision: RoutingDecision) -> RoutingDecision:
    log.info("routing.decided",
             extra=fields(study=decision.study_instance_uid, routed=decision.routed,
                          rules=decision.matched_rules, region=decision.region,
                          source=decision.region_source,
                          pipelines=[a.pipeline for a in decision.actions],
                          series=decision.series_instance_uid,
                          disagreements=len(decision.disagreements)))
    return decision
