"""Tests for dicomnode.workflow.routing: rules, synonyms, image-vs-tag policy, decisions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydicom.uid import generate_uid

from dicomnode.workflow.routing import (
    DEFAULT_RULES,
    Condition,
    RoutingRules,
    explain,
    load_rules,
    region_from_text,
    route_directory,
    route_study,
)
from tests.imaging.conftest import anatomy, write_phantom_case, write_series

REPO = Path(__file__).resolve().parents[2]

TAGS = {
    "head": {"body_part": "HEAD", "description": "Schaedel nativ 5.0 H30s",
             "study_description": "CCT nativ", "protocol": "Kopf Routine"},
    "headneck": {"body_part": "HEADNECK", "description": "Kopf-Hals RT 2.0",
                 "study_description": "RT Planung Kopf Hals", "protocol": "HN RT"},
    "abdomen": {"body_part": "ABDOMEN", "description": "Leber 3.0 portal",
                "study_description": "CT Abdomen", "protocol": "Leber 3-phasig"},
}
EXPECTED = {"head": "brain_ich", "headneck": "headneck_oar", "abdomen": "liver_tumor"}
SPACING = {"head": 3.0, "headneck": 2.5, "abdomen": 3.0}
PIX = 400 / 96


def _study(root: Path, region: str, tags: dict[str, Any] | None, **kw: Any) -> Path:
    hu = anatomy(region, slices=40, matrix=96, seed=11)
    write_series(root, hu, spacing=(SPACING[region], 400 / 96, 400 / 96),
                 study_uid=generate_uid(), **(tags or {}), **kw)
    return root


def test_default_rules_file_matches_embedded_defaults() -> None:
    data = yaml.safe_load((REPO / "config" / "routing.yaml").read_text(encoding="utf-8"))
    assert data == DEFAULT_RULES
    rules = load_rules(REPO / "config" / "routing.yaml")
    assert [r.name for r in rules.rules] == [r.name for r in load_rules().rules]
    assert rules.destinations() == {"sender"}


@pytest.mark.parametrize("region", ["head", "headneck", "abdomen"])
@pytest.mark.parametrize("variant", ["tags", "no_tags", "misleading"])
def test_each_region_routes(tmp_path: Path, region: str, variant: str) -> None:
    if variant == "tags":
        tags: dict[str, Any] | None = TAGS[region]
    elif variant == "no_tags":
        tags = None
    else:
        tags = {"body_part": "CHEST" if region != "chest" else "ABDOMEN"}
    decision = route_study([_study(tmp_path, region, tags)])
    assert decision.routed, decision.reason
    assert [a.pipeline for a in decision.actions] == [EXPECTED[region]]
    assert decision.image_region is not None and decision.image_region.region == region
    assert decision.region_source == "image"
    if variant == "tags":
        assert decision.tag_region is not None and decision.tag_region.region == region
        assert not [d for d in decision.disagreements if d["kind"] == "region"]
    elif variant == "no_tags":
        assert decision.tag_region is not None and decision.tag_region.region is None
    else:
        assert decision.tag_region is not None and decision.tag_region.region == "chest"
        (dis,) = decision.disagreements
        assert dis["tags"] == "chest" and dis["image"] == region and dis["used"] == region
    payload = json.loads(json.dumps(decision.to_dict()))
    assert payload["matched_rule"] == decision.matched_rule
    assert payload["actions"][0]["series_instance_uid"] == decision.series_instance_uid


def test_head_is_urgent_and_goes_back_to_sender(tmp_path: Path) -> None:
    d = route_study([_study(tmp_path, "head", TAGS["head"])], calling_aet="CT_SCANNER1")
    (action,) = d.actions
    assert action.priority == "urgent" and action.destinations == ["sender"]
    assert d.matched_rule == "head_noncontrast_ich"
    assert any("region head" in r for r in d.reasons)


def test_contrast_head_is_not_routed_to_ich(tmp_path: Path) -> None:
    d = route_study([_study(tmp_path, "head", TAGS["head"], contrast="IOMEPROL")])
    assert not d.routed
    assert "ContrastBolusAgent is present" in d.rules_not_matched["head_noncontrast_ich"]
    assert d.reason.startswith("not routed: no rule matches region head")


def test_chest_matches_no_default_rule(tmp_path: Path) -> None:
    hu = anatomy("chest", slices=30, matrix=96)
    write_series(tmp_path, hu, spacing=(3.0, 400 / 96, 400 / 96))
    d = route_study([tmp_path])
    assert not d.routed and d.region == "chest" and not d.actions
    assert "no rule matches region chest" in d.reason


def test_localizer_plus_two_reconstructions(tmp_path: Path) -> None:
    hu = anatomy("abdomen", slices=60, matrix=96, seed=4)
    scout = generate_uid()
    study = generate_uid()
    write_series(tmp_path / "1", hu[30:31], series_uid=scout, study_uid=study, series_number=1,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), iop=(1, 0, 0, 0, 0, -1))
    thick = generate_uid()
    write_series(tmp_path / "2", hu[::5], series_uid=thick, study_uid=study, series_number=2,
                 spacing=(7.5, 400 / 96, 400 / 96), kernel="B30f")
    bone = generate_uid()
    write_series(tmp_path / "3", hu, series_uid=bone, study_uid=study, series_number=3,
                 spacing=(1.5, 400 / 96, 400 / 96), kernel="B70f")
    soft = generate_uid()
    write_series(tmp_path / "4", hu, series_uid=soft, study_uid=study, series_number=4,
                 spacing=(1.5, 400 / 96, 400 / 96), kernel="B30f")
    d = route_study([tmp_path])
    assert d.routed and d.series_instance_uid == soft
    assert d.actions[0].series_instance_uid == soft
    assert d.rejected_series[scout] == "localizer"
    assert "thicker" in d.rejected_series[thick]
    assert "kernel bone" in d.rejected_series[bone]
    assert len(d.series) == 4


def test_no_usable_ct_series(tmp_path: Path) -> None:
    hu = anatomy("head", slices=1, matrix=32)
    write_series(tmp_path, hu, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    (tmp_path / "readme.txt").write_text("hello")
    d = route_study([tmp_path])
    assert not d.routed and "no usable CT series" in d.reason
    empty = tmp_path / "empty"
    empty.mkdir()
    assert route_study([empty]).reason == "no DICOM files in the study"


def test_region_synonyms() -> None:
    syn = load_rules().synonyms
    cases = {
        "KOPF": "head", "SCHÄDEL nativ": "head", "cCT": "head", "Brain 5mm": "head",
        "HALS": "headneck", "Kopf-Hals": "headneck", "HEAD^NECK": "headneck",
        "HEADNECK": "headneck", "NECK": "headneck", "LEBER": "abdomen",
        "Abdomen portalvenös": "abdomen", "CT THORAX ABDOMEN": "abdomen",
        "LIVER": "abdomen", "Lebermetastasen": "abdomen", "THORAX": "chest",
        "BECKEN": "other", "ROUTINE": None, "": None,
    }
    for text, region in cases.items():
        assert region_from_text(text, syn) == region, text


def test_custom_rules_tags_ranges_sets_and_calling_ae(tmp_path: Path) -> None:
    study = _study(tmp_path, "abdomen", TAGS["abdomen"])
    spec = {
        "match": "all",
        "rules": [
            {"name": "from_research", "when": {"calling_aet": {"regex": "^RESEARCH"}},
             "actions": [{"pipeline": "liver_tumor", "priority": "low",
                          "destinations": ["research_pacs"]}]},
            {"name": "thin_liver", "when": {
                "region": ["abdomen"],
                "tags": {"SliceThickness": {"range": [0.5, 3.0]},
                         "KVP": {"min": 100},
                         "ConvolutionKernel": {"in": ["B30F", "I30F"]},
                         "BodyPartExamined": {"regex": "(?i)abd"}}},
             "actions": [{"pipeline": "liver_tumor", "priority": "high"}]},
            {"name": "too_thick", "when": {"tags": {"SliceThickness": {"min": 4}}},
             "actions": [{"pipeline": "liver_tumor"}]},
        ],
    }
    rules = RoutingRules.from_dict(spec)
    d = route_study([study], rules, calling_aet="RESEARCH_PACS")
    assert d.matched_rules == ["from_research", "thin_liver"]
    assert [a.priority for a in d.actions] == ["low", "high"]
    assert d.actions[0].destinations == ["research_pacs"]
    assert "SliceThickness 3 < 4" in d.rules_not_matched["too_thick"]
    d2 = route_study([study], rules, calling_aet="CT1")
    assert d2.matched_rules == ["thin_liver"]
    assert "calling_aet does not match" in d2.rules_not_matched["from_research"]


def test_region_source_tags_policy(tmp_path: Path) -> None:
    study = _study(tmp_path, "abdomen", {"body_part": "HEAD"})
    spec = dict(DEFAULT_RULES, region_source="tags")
    d = route_study([study], RoutingRules.from_dict(spec))
    assert d.region == "head" and d.region_source == "tags"
    assert d.disagreements[0]["used"] == "head"
    assert [a.pipeline for a in d.actions] == ["brain_ich"]


def test_pipeline_without_suitable_series_is_skipped(tmp_path: Path) -> None:
    # headneck_oar wants <= 3 mm slices; 5 mm slices are routed nowhere, with the reason
    hu = anatomy("headneck", slices=40, matrix=96, seed=2)
    write_series(tmp_path, hu, spacing=(5.0, 400 / 96, 400 / 96))
    d = route_study([tmp_path])
    assert not d.routed
    assert "no series suits" in d.rules_not_matched["headneck_oar"]
    assert any("headneck_oar skipped" in r for r in d.reasons)


@pytest.mark.parametrize(
    ("spec", "match"),
    [
        ({"rules": "x"}, "'rules'"),
        ({"rules": [], "colour": 1}, "'routing' key 'colour'"),
        ({"rules": [], "match": "some"}, "'match'"),
        ({"rules": [{"name": "a", "actions": [{"pipeline": "p", "priority": "asap"}]}]},
         "'priority' value 'asap'"),
        ({"rules": [{"name": "a", "when": {"region": ["leg"]}, "actions": [{"pipeline": "p"}]}]},
         "'region' value"),
        ({"rules": [{"name": "a", "when": {"tags": {"BodyPart": "x"}},
                     "actions": [{"pipeline": "p"}]}]}, "'tags' keyword 'BodyPart'"),
        ({"rules": [{"name": "a", "when": {"tags": {"KVP": {"range": [5, 1]}}},
                     "actions": [{"pipeline": "p"}]}]}, "min > max"),
        ({"rules": [{"name": "a", "when": {"tags": {"KVP": {"regex": "("}}},
                     "actions": [{"pipeline": "p"}]}]}, "'KVP.regex'"),
        ({"rules": [{"name": "a", "actions": []}]}, "'actions'"),
        ({"rules": [{"name": "a", "actions": [{"pipeline": "p"}]},
                    {"name": "a", "actions": [{"pipeline": "p"}]}]}, "unique"),
        ({"rules": [], "synonyms": {"knee": ["KNIE"]}}, "'synonyms' region 'knee'"),
        ({"rules": [], "selection": {"brain_ich": {"kernels": ["sharp"]}}}, "'kernels'"),
    ],
)
def test_rule_validation(spec: dict[str, Any], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        RoutingRules.from_dict(spec)


def test_load_rules_errors(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no such file"):
        load_rules(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rules: [unclosed")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_rules(bad)


def test_condition_semantics() -> None:
    assert Condition.from_spec("X", {"present": False}).evaluate(None)[0]
    assert not Condition.from_spec("X", {"present": False}).evaluate("IOMEPROL")[0]
    assert Condition.from_spec("X", ["CT", "MR"]).evaluate("ct")[0]
    assert Condition.from_spec("X", "^A").evaluate("ABC")[0]
    assert not Condition.from_spec("X", "^A").evaluate(None)[0]
    assert Condition.from_spec("X", {"not_regex": "KM"}).evaluate(None)[0]
    assert Condition.from_spec("X", {"min": 1, "max": 2}).evaluate("1.5")[0]
    assert not Condition.from_spec("X", {"max": 2}).evaluate("abc")[0]
    assert Condition.from_spec("X", {"regex": "B30"}).evaluate(["B30f", "3"])[0]


def test_broken_files_do_not_raise(tmp_path: Path) -> None:
    import pydicom

    hu = anatomy("abdomen", slices=30, matrix=96, seed=9)
    bad_geometry = generate_uid()
    paths = write_series(tmp_path / "geo", hu, series_uid=bad_geometry, series_number=2,
                         spacing=(2.0, PIX, PIX))
    ds = pydicom.dcmread(paths[3])
    del ds.ImagePositionPatient
    ds.save_as(paths[3])
    short_pixels = generate_uid()
    paths = write_series(tmp_path / "px", hu, series_uid=short_pixels, series_number=3,
                         spacing=(3.0, PIX, PIX))
    ds = pydicom.dcmread(paths[5])
    ds.PixelData = ds.PixelData[:100]
    ds.save_as(paths[5])
    trunc = tmp_path / "truncated.dcm"
    trunc.write_bytes(paths[6].read_bytes()[:400])
    d = route_study([tmp_path])
    assert not d.routed
    assert "missing" in d.rejected_series[bad_geometry].lower()
    assert "could not build a volume" in d.rejected_series[short_pixels]
    assert d.reason == "not routed: no candidate series could be read"
    # a good series next to the broken ones is still routed
    good = generate_uid()
    write_series(tmp_path / "ok", hu, series_uid=good, series_number=4, spacing=(3.0, PIX, PIX))
    d = route_study([tmp_path])
    assert d.routed and d.series_instance_uid == good


def test_explain_lists_rule_region_series_and_disagreement(tmp_path: Path) -> None:
    d = route_study([_study(tmp_path, "head", {"body_part": "ABDOMEN"})])
    text = explain(d)
    assert text.startswith("routed: brain_ich (urgent)")
    assert "region: head from image" in text and "tags abdomen" in text
    assert "rule: head_noncontrast_ich" in text
    assert "disagreement: tags say abdomen, image says head" in text
    assert explain(json.loads(json.dumps(d.to_dict()))) == text


@pytest.mark.parametrize(
    ("description", "non_contrast"),
    [("Head w/o contrast", True), ("Schädel nativ 5.0", True), ("Non-contrast head", True),
     ("Axial brain 5 mm", True), ("CT Head with contrast", False), ("Kopf mit KM", False),
     ("CTA Circle of Willis", False), ("Head C+", False)],
)
def test_default_ich_rule_reads_contrast_in_descriptions(description: str,
                                                         non_contrast: bool) -> None:
    (cond,) = [c for c in load_rules().rules[0].tags if c.name == "SeriesDescription"]
    assert cond.evaluate(description)[0] is non_contrast


def test_route_directory(tmp_path: Path) -> None:
    study = _study(tmp_path / "s", "abdomen", TAGS["abdomen"])
    code, text = route_directory(study)
    assert code == 0 and text.startswith("routed: liver_tumor (normal)")
    code, text = route_directory(study, as_json=True)
    assert code == 0 and json.loads(text)["actions"][0]["pipeline"] == "liver_tumor"
    rules = tmp_path / "r.yaml"
    rules.write_text(yaml.safe_dump({"rules": [
        {"name": "only_ct1", "when": {"calling_aet": {"in": ["CT1"]}},
         "actions": [{"pipeline": "liver_tumor"}]}]}))
    code, text = route_directory(study, rules, "CT2")
    assert code == 1 and "rule only_ct1: calling_aet is not one of ['CT1']" in text
    assert route_directory(tmp_path / "missing")[0] == 2
    assert route_directory(study, tmp_path / "nope.yaml")[0] == 2


# --- on the phantoms of dicomnode.phantoms -------------------------------------------

MISLEADING = {"head": "ABDOMEN", "headneck": "ABDOMEN", "abdomen": "HEAD"}


@pytest.mark.parametrize("region", ["head", "headneck", "abdomen"])
@pytest.mark.parametrize("variant", ["tags", "no_tags", "misleading", "misleading_alone"])
def test_phantom_regions_route(tmp_path: Path, region: str, variant: str) -> None:
    """Tags present, all descriptive tags removed, a wrong BodyPartExamined (with the true
    descriptions, or alone): the image decides every time."""
    kw: dict[str, Any] = {
        "tags": {},
        "no_tags": {"body_part": None, "descriptions": False},
        "misleading": {"body_part": MISLEADING[region]},
        "misleading_alone": {"body_part": MISLEADING[region], "descriptions": False},
    }[variant]
    write_phantom_case(tmp_path, region, **kw)
    d = route_study([tmp_path], calling_aet="PACS")
    assert d.routed, explain(d)
    assert [a.pipeline for a in d.actions] == [EXPECTED[region]]
    assert d.image_region is not None and d.image_region.region == region
    assert d.image_region.confidence >= 0.7
    assert d.region == region and d.region_source == "image"
    assert d.tag_region is not None
    wrong = region_from_text(MISLEADING[region], load_rules().synonyms)
    kinds = sorted(x["kind"] for x in d.disagreements)
    if variant == "tags":
        assert d.tag_region.region == region and kinds == []
    elif variant == "no_tags":
        assert d.tag_region.region is None and d.tag_region.sources == {} and kinds == []
    elif variant == "misleading":
        # BodyPartExamined contradicts the descriptions: recorded; whichever the tag vote
        # gives, the image region is used
        tags_conflict = next(x for x in d.disagreements if x["kind"] == "tags")
        assert f"BodyPartExamined={wrong}" in tags_conflict["message"]
        if d.tag_region.region != region:
            assert kinds == ["region", "tags"]
            assert d.disagreements[0]["used"] == region
    else:
        assert d.tag_region.region == wrong and kinds == ["region"]
        (dis,) = d.disagreements
        assert dis["tags"] == wrong and dis["image"] == region and dis["used"] == region
    stored = json.loads(json.dumps(d.to_dict()))
    assert stored["actions"][0]["pipeline"] == EXPECTED[region]
    assert stored["region"]["image"]["evidence"]["rule"]


def test_phantom_localizer_plus_two_reconstructions(tmp_path: Path) -> None:
    """Localizer, a 5 mm and a 2 mm reconstruction (plus a bone kernel copy): 2 mm soft wins."""
    import pydicom

    from dicomnode.phantoms.phantom import make_phantom, write_phantom

    study = generate_uid()
    thin = write_phantom_case(tmp_path / "thin", "abdomen", study_uid=study)
    thin_uid = str(pydicom.dcmread(thin[0]).SeriesInstanceUID)
    thick_phantom = make_phantom("abdomen", 0, matrix=128, spacing=5.0)
    write_phantom(thick_phantom, tmp_path / "thick", study_uid=study)
    bone = write_phantom_case(tmp_path / "bone", "abdomen", study_uid=study)
    bone_uid = generate_uid()
    for p in bone:
        ds = pydicom.dcmread(p)
        ds.SeriesInstanceUID = bone_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.ConvolutionKernel = "BONE"
        ds.SeriesNumber = 3
        ds.save_as(p)
    hu = anatomy("abdomen", slices=1, matrix=128)
    scout = generate_uid()
    write_series(tmp_path / "scout", hu, series_uid=scout, study_uid=study, series_number=0,
                 image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"), iop=(1, 0, 0, 0, 0, -1))
    d = route_study([tmp_path])
    assert d.routed and d.series_instance_uid == thin_uid
    assert [a.series_instance_uid for a in d.actions] == [thin_uid]
    assert d.rejected_series[scout] == "localizer"
    assert "kernel bone" in d.rejected_series[bone_uid]
    (thick_uid,) = [s["series_instance_uid"] for s in d.series
                    if s["slice_thickness"] == 5.0]
    assert d.rejected_series[thick_uid] == "ranked lower: thicker slices (5 mm)"


def test_cli_route_command(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dicomnode.cli import app

    write_phantom_case(tmp_path / "s", "head", body_part=None, descriptions=False)
    result = CliRunner().invoke(app, ["route", str(tmp_path), "--calling-aet", "CT1",
                                      "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.output)
    assert payload["actions"][0]["pipeline"] == "brain_ich"
    assert payload["actions"][0]["priority"] == "urgent"
    assert payload["calling_aet"] == "CT1"
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(app, ["route", str(empty)])
    assert result.exit_code == 1 and "no DICOM files" in result.output
