"""Acceptance: the results open in OHIF, in a real browser, on the right pixels.

A liver and a head-and-neck phantom CT series and the SEG, RTSTRUCT and SR that
``dicomnode encode`` makes for their ground truth, and a 5 mm head CT with the SR, KOS
and SEG the brain_ich pipeline makes of it, are stored in Orthanc (with its
DICOMweb plugin); OHIF, from npm at the version pinned in ``package.json``, is served on
loopback with ``/dicom-web`` forwarded to Orthanc (same origin), and Debian's headless
Chromium opens each study as a radiologist would: double-click a result series, answer
the viewer's prompt. Checked for each object:

- SEG and RTSTRUCT: the segment (ROI) names, and for each one, after jumping to it,
  the pixels the viewer draws (the screen with the segment shown minus the screen
  with it hidden) against the mask in the file mapped through the viewer's own
  canvas-to-world transform: precision and recall >= 0.99 (the contour line within 2
  screen pixels for RTSTRUCT), while the left-right mirrored mask does not match.
- SR (liver, head and neck, haemorrhage): every measurement group is listed in the
  measurement panel under its label,
  the viewport is not black, and nothing "not rehydratable", no TypeError, in the console.
- The burned-in overlay series (``results.burned_in_series``) opens as an ordinary
  image series, every image of it, with the outlines in colour.

Screenshots go to a temporary folder, or to ``$DICOMNODE_VIEWER_SCREENSHOTS`` to keep them.
"""

from __future__ import annotations

import io
import os
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
import pydicom
import pytest
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset
from scipy import ndimage

from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.burned_in import build_burned_in_series
from dicomnode.results.codes import structure_table
from dicomnode.results.encode import encode_label_map, labels_on_series
from dicomnode.results.source import write
from dicomnode.results.sr import tracked_name
from tests.peers import DICOMWEB_PLUGIN, orthanc
from tests.viewer.ohif import (
    CHROMIUM,
    CHROMIUM_ARGS,
    DIST,
    VIEWPORT_STATE,
    serve_viewer,
    viewer_version,
)

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

playwright_api = pytest.importorskip("playwright.sync_api")

DESCRIPTIONS = {
    "abdomen": ("AI liver segmentation", "AI liver contours", "AI liver measurements"),
    "headneck": ("AI OAR segmentation", "AI OAR contours", "AI OAR volumes"),
}
#: Each study's SR series; the head's is the haemorrhage pipeline's own report.
SR_DESCRIPTIONS = {**{region: names[2] for region, names in DESCRIPTIONS.items()},
                   "head": "AI haemorrhage report: haemorrhage suspected"}
#: A series the study browser lists once the study is open.
FIRST_SERIES = {**{region: names[0] for region, names in DESCRIPTIONS.items()},
                "head": "AI haemorrhage segmentation"}
#: A positive held-out head phantom (as in tests/e2e/test_orthanc_ich.py).
HEAD_SEED = 3003
BURNED_IN = "AI liver overlay, not for diagnosis"
#: Console lines that mean a result object did not load (issue #18's failure).
BAD_CONSOLE = ("not rehydratable", "TypeError", "no SCOORD", "Unable to generate tool state")
MIN_SCORE = 0.99
#: Two grabs this close count as the same picture (a blinking caret, a tooltip's fade).
SETTLED_PIXELS = 20
#: A mirrored mask "matches" if it scores this well; it must not.
MIRROR_MAX = 0.9
#: How far (screen pixels) a drawn contour line may lie from the file's contour.
LINE_TOLERANCE_PX = 2.0


@dataclass
class Study:
    region: str
    study_uid: str
    ct: dict[str, Dataset]
    seg: Path
    rtstruct: Path | None
    sr: Path
    extra: list[Path] = field(default_factory=list)

    def ct_paths(self) -> list[Path]:
        return [Path(ds.filename) for ds in self.ct.values()]


@dataclass
class Viewer:
    base: str
    browser: Any
    shots: Path
    studies: dict[str, Study]


def _store(url: str, paths: list[Path]) -> None:
    for path in paths:
        request = urllib.request.Request(f"{url}/instances", data=path.read_bytes(),
                                         method="POST")
        with urllib.request.urlopen(request, timeout=60) as answer:
            assert answer.status == 200


def _make_study(region: str, work: Path) -> Study:
    phantom = make_phantom(region, seed=5, slices=40, matrix=192)
    ct_dir = work / region / "ct"
    write_phantom(phantom, ct_dir)
    out = work / region / "out"
    result = encode_label_map(ct_dir, ct_dir / "labels.nii.gz", region, out)
    ct = {str(ds.SOPInstanceUID): ds for ds in
          (pydicom.dcmread(p) for p in sorted(ct_dir.glob("*.dcm")))}
    study_uid = str(next(iter(ct.values())).StudyInstanceUID)
    study = Study(region, study_uid, ct, result.seg, result.rtstruct, result.sr)
    if region == "abdomen":  # the burned-in series, as results.burned_in_series sends it
        images = sorted(ct.values(), key=lambda ds: float(ds.ImagePositionPatient[2]))
        table = structure_table(region)
        labels = labels_on_series(ct_dir / "labels.nii.gz", images)
        labels[~np.isin(labels, [s.label for s in table])] = 0
        series = build_burned_in_series(images, labels, table, AlgorithmInfo(
            "external-label-map", "unknown", "0" * 64, "phantom ground truth"),
            series_description=BURNED_IN)
        study.extra = [write(sc, out / f"burned-in-{k:04d}.dcm")
                       for k, sc in enumerate(series, start=1)]
    return study


def _ich_study(work: Path) -> Study:
    """A 5 mm head CT and what the brain_ich pipeline makes of it: SR, KOS and SEG."""
    from dicomnode.workflow.jobs import process_study

    ct_dir = work / "head" / "ct"
    write_phantom(make_phantom("head", HEAD_SEED, matrix=256, slices=40, spacing=5.0), ct_dir)
    paths = sorted(ct_dir.glob("*.dcm"))
    run = process_study(paths, work / "head" / "out", "", "brain_ich")
    assert run.state.value == "done", run.reason
    out = work / "head" / "out" / "brain_ich"
    ct = {str(ds.SOPInstanceUID): ds for ds in (pydicom.dcmread(p) for p in paths)}
    study_uid = str(next(iter(ct.values())).StudyInstanceUID)
    return Study("head", study_uid, ct, out / "seg.dcm", None, out / "sr.dcm",
                 extra=[out / "kos.dcm"])


@pytest.fixture(scope="module")
def viewer(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Viewer]:
    if not (DIST / "index.html").is_file():
        pytest.fail("OHIF is not installed: run `npm ci --ignore-scripts` in tests/viewer "
                    "(scripts/test does)")
    if not DICOMWEB_PLUGIN.is_file() or not Path(CHROMIUM).is_file():
        pytest.fail("needs Debian's orthanc-dicomweb and chromium (scripts/test installs them)")
    work = tmp_path_factory.mktemp("ohif")
    shots = Path(os.environ.get("DICOMNODE_VIEWER_SCREENSHOTS") or work / "screenshots")
    shots.mkdir(parents=True, exist_ok=True)
    studies = {region: _make_study(region, work) for region in DESCRIPTIONS}
    studies["head"] = _ich_study(work)
    with orthanc(work / "orthanc", dicomweb=True) as pacs:
        for study in studies.values():
            _store(str(pacs["url"]), [*study.ct_paths(), study.seg, study.sr, *study.extra,
                                      *([study.rtstruct] if study.rtstruct else [])])
        with serve_viewer(str(pacs["dicomweb"])) as base, \
                playwright_api.sync_playwright() as play:
            browser = play.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
            try:
                yield Viewer(base, browser, shots, studies)
            finally:
                browser.close()


class Session:
    """One browser tab on one study, with everything the console said."""

    def __init__(self, viewer: Viewer, study: Study) -> None:
        self.page = viewer.browser.new_page(viewport={"width": 1400, "height": 900})
        self.console: list[str] = []
        self.visible: dict[str, set[int]] = {}  # segments shown, per segmentation
        self.page.on("console", lambda m: self.console.append(f"{m.type}: {m.text}"))
        self.page.on("pageerror", lambda e: self.console.append(f"pageerror: {e}"))
        self.shots = viewer.shots
        # the first-visit tour would cover the viewport at a moment of its choosing
        self.page.add_init_script(
            "localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour']))")
        self.page.goto(f"{viewer.base}/viewer?StudyInstanceUIDs={study.study_uid}")
        self.page.get_by_text(FIRST_SERIES[study.region]).wait_for(timeout=90_000)
        self.wait_until("() => cornerstone.getRenderingEngines()[0]?.getViewports()[0]"
                        "?.getCurrentImageId?.() != null")
        skip = self.page.get_by_text("Skip all")  # a tour the viewer adds later
        if skip.count():
            skip.click()

    def wait_until(self, predicate: str, timeout_s: float = 60) -> Any:
        self.page.wait_for_function(predicate, timeout=timeout_s * 1000)
        return self.page.evaluate(predicate)

    def load(self, description: str) -> None:
        """Double-click a result series and answer the viewer's question with Yes."""
        self.page.get_by_text(description).dblclick()
        self.page.get_by_role("button", name="Yes").click(timeout=60_000)

    def settle(self) -> None:
        """Wait until two screen grabs of the viewport agree (rendering has finished)."""
        last = None
        for _ in range(15):
            self.page.evaluate("() => new Promise(r => requestAnimationFrame(() => "
                               "requestAnimationFrame(r)))")
            grab, _ = self.grab()
            if last is not None and grab.shape == last.shape and np.count_nonzero(
                    (grab != last).any(axis=-1)) <= SETTLED_PIXELS:
                return
            last = grab
            time.sleep(0.1)

    def grab(self) -> tuple[np.ndarray, dict[str, Any]]:
        """The viewport's pixels (RGB, screen) and its state (transform, image)."""
        state = self.page.evaluate(VIEWPORT_STATE)
        x, y, w, h = state["box"]
        png = self.page.screenshot(clip={"x": x, "y": y, "width": w, "height": h})
        return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(np.int16), state

    def shot(self, name: str) -> Path:
        path = self.shots / f"{name}.png"
        self.page.screenshot(path=str(path))
        return path

    def bad_console_lines(self) -> list[str]:
        return [line for line in self.console
                if line.startswith("pageerror") or any(bad in line for bad in BAD_CONSOLE)]

    def close(self) -> None:
        self.page.close()


@pytest.fixture
def session_for(viewer: Viewer) -> Iterator[Any]:
    opened: list[Session] = []

    def open_(region: str) -> Session:
        opened.append(Session(viewer, viewer.studies[region]))
        return opened[-1]

    yield open_
    for session in opened:
        session.close()


# --- geometry: the viewer's transform and the file's masks --------------------------


def _canvas_to_world(state: dict[str, Any]) -> tuple[np.ndarray, np.ndarray]:
    """The viewer's affine canvas -> world map as (origin, 3x2 matrix)."""
    origin = np.array(state["origin"], float)
    axes = np.stack([np.array(state["ex"], float) - origin,
                     np.array(state["ey"], float) - origin], axis=1)
    return origin, axes


def _pixel_indices(state: dict[str, Any], shape: tuple[int, int], image: Dataset
                   ) -> tuple[np.ndarray, np.ndarray]:
    """For each screen pixel's centre, the (row, column) of ``image`` under it."""
    origin, axes = _canvas_to_world(state)
    ys, xs = np.mgrid[0:shape[0], 0:shape[1]] + 0.5
    world = origin + xs[..., None] * axes[:, 0] + ys[..., None] * axes[:, 1]
    iop = np.array(image.ImageOrientationPatient, float)
    rel = world - np.array(image.ImagePositionPatient, float)
    spacing = np.array(image.PixelSpacing, float)
    return rel @ iop[3:] / spacing[0], rel @ iop[:3] / spacing[1]


def _sampled(mask: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """A 2D mask sampled (nearest voxel) at each screen pixel's (row, column)."""
    r, c = np.round(rows).astype(int), np.round(cols).astype(int)
    inside = (r >= 0) & (r < mask.shape[0]) & (c >= 0) & (c < mask.shape[1])
    out = np.zeros(rows.shape, bool)
    out[inside] = mask[r[inside], c[inside]]
    return out


def _on_voxel_edge(rows: np.ndarray, cols: np.ndarray, state: dict[str, Any],
                   image: Dataset) -> np.ndarray:
    """Screen pixels within half a screen pixel of a voxel edge."""
    _, axes = _canvas_to_world(state)
    half = 0.5 * float(np.linalg.norm(axes[:, 0])) / np.array(image.PixelSpacing, float)
    return ((np.round(rows - half[0]) != np.round(rows + half[0]))
            | (np.round(cols - half[1]) != np.round(cols + half[1])))


def _world_to_screen(state: dict[str, Any], points: np.ndarray) -> np.ndarray:
    """World points (n, 3) to screen (x, y) through the inverse of the viewer's map."""
    origin, axes = _canvas_to_world(state)
    solution, *_ = np.linalg.lstsq(axes, (points - origin).T, rcond=None)
    return np.asarray(solution.T)


def _mirror_world(points: np.ndarray, image: Dataset) -> np.ndarray:
    """Mirror world points left-right in the image grid (column c -> columns-1-c)."""
    iop = np.array(image.ImageOrientationPatient, float)
    ipp = np.array(image.ImagePositionPatient, float)
    dx = float(image.PixelSpacing[1])
    column = (points - ipp) @ iop[:3] / dx
    return points + np.outer((image.Columns - 1 - 2 * column) * dx, iop[:3])


def _scores(drawn: np.ndarray, expected: np.ndarray) -> tuple[float, float]:
    both = float(np.count_nonzero(drawn & expected))
    return both / max(np.count_nonzero(drawn), 1), both / max(np.count_nonzero(expected), 1)


def _line_scores(drawn: np.ndarray, line: np.ndarray) -> tuple[float, float]:
    """Precision and recall of a drawn contour against the expected line, within tolerance."""
    if not drawn.any() or not line.any():
        return 0.0, 0.0
    near_line = ndimage.distance_transform_edt(~line) <= LINE_TOLERANCE_PX
    near_drawn = ndimage.distance_transform_edt(~drawn) <= LINE_TOLERANCE_PX
    return (float(np.count_nonzero(drawn & near_line)) / np.count_nonzero(drawn),
            float(np.count_nonzero(line & near_drawn)) / np.count_nonzero(line))


def _drawn(shown: np.ndarray, hidden: np.ndarray) -> np.ndarray:
    return np.abs(shown - hidden).max(axis=-1) > 10


def _current_image(state: dict[str, Any], study: Study) -> Dataset:
    uid = str(state["imageId"]).split("/instances/")[1].split("/")[0]
    return study.ct[uid]


def _lateral(mask: np.ndarray) -> bool:
    """Whether the left-right mirror of a 2D mask differs from it (a usable control)."""
    mirrored = mask[:, ::-1]
    return np.count_nonzero(mask & mirrored) < 0.5 * np.count_nonzero(mask)


def _show_only(session: Session, segmentation_id: str, numbers: list[int], keep: int | None
               ) -> None:
    """Show segment ``keep`` alone (none: hide all); only segments that change are set,
    as each change re-renders the labelmap (seconds in a software-rendered browser)."""
    shown = session.visible.setdefault(segmentation_id, set(numbers))
    wanted = {keep} if keep is not None else set()
    changes = [[n, n in wanted] for n in numbers if (n in shown) != (n in wanted)]
    session.page.evaluate(
        "([id, changes]) => changes.forEach(([n, on]) => services.segmentationService"
        ".setSegmentVisibility('default', id, n, on))", [segmentation_id, changes])
    session.visible[segmentation_id] = wanted
    session.settle()


def _segmentation(session: Session, description: str) -> dict[str, Any]:
    return session.wait_until(
        f"""() => {{
          const s = services.segmentationService.getSegmentations()
            .find(x => x.label === {description!r});
          return s && Object.keys(s.segments).length ? {{id: s.segmentationId,
            segments: Object.values(s.segments).map(g => [g.segmentIndex, g.label])}} : null;
        }}""", timeout_s=90)


def _jump(session: Session, segmentation_id: str, number: int) -> None:
    session.page.evaluate(
        "([id, n]) => services.segmentationService.jumpToSegmentCenter(id, n, 'default', "
        "0.9, false)", [segmentation_id, number])
    session.settle()


# --- the tests -----------------------------------------------------------------------


@pytest.mark.parametrize("region", list(DESCRIPTIONS))
def test_seg_opens_with_its_segment_names_and_each_overlay_falls_on_the_mask_pixels(
        region: str, viewer: Viewer, session_for: Any) -> None:
    study = viewer.studies[region]
    session = session_for(region)
    description = DESCRIPTIONS[region][0]
    session.load(description)
    seg = hd.seg.segread(study.seg)
    names = {int(item.SegmentNumber): str(item.SegmentLabel) for item in seg.SegmentSequence}
    shown = _segmentation(session, description)
    assert dict(shown["segments"]) == names
    numbers = sorted(names)
    for number in numbers:
        _jump(session, shown["id"], number)
        _show_only(session, shown["id"], numbers, number)
        with_it, state = session.grab()
        if number == numbers[0]:
            session.shot(f"{region}-seg-{names[number]}")
        _show_only(session, shown["id"], numbers, None)
        without, _ = session.grab()
        drawn = _drawn(with_it, without)
        image = _current_image(state, study)
        mask = seg.get_pixels_by_source_instance(
            [str(image.SOPInstanceUID)], segment_numbers=[number],
            assert_missing_frames_are_empty=True)[0, ..., 0] > 0
        assert mask.any(), f"{names[number]}: the viewer jumped to a slice without it"
        rows, cols = _pixel_indices(state, drawn.shape, image)
        # a screen pixel whose centre lies within half a screen pixel of a voxel edge may
        # go either way: neither counted for nor against
        edge = _on_voxel_edge(rows, cols, state, image)
        drawn &= ~edge
        precision, recall = _scores(drawn, _sampled(mask, rows, cols) & ~edge)
        assert precision >= MIN_SCORE and recall >= MIN_SCORE, (names[number], precision, recall)
        if _lateral(mask):
            mirrored = _scores(drawn, _sampled(mask[:, ::-1], rows, cols) & ~edge)
            assert min(mirrored) < MIRROR_MAX, (names[number], mirrored)
    assert session.bad_console_lines() == []


def _contours_on(rtstruct: Dataset, roi_number: int, sop_uid: str) -> list[np.ndarray]:
    for roi in rtstruct.ROIContourSequence:
        if int(roi.ReferencedROINumber) != roi_number:
            continue
        return [np.array(item.ContourData, float).reshape(-1, 3)
                for item in roi.get("ContourSequence", [])
                if str(item.ContourImageSequence[0].ReferencedSOPInstanceUID) == sop_uid]
    return []


def _line_image(state: dict[str, Any], shape: tuple[int, int], contours: list[np.ndarray]
                ) -> np.ndarray:
    canvas = Image.new("1", (shape[1], shape[0]), 0)
    draw = ImageDraw.Draw(canvas)
    for contour in contours:
        xy = _world_to_screen(state, contour) - 0.5  # pixel centres
        draw.line([tuple(p) for p in np.vstack([xy, xy[:1]])], fill=1, width=1)
    return np.asarray(canvas, bool)


@pytest.mark.parametrize("region", list(DESCRIPTIONS))
def test_rtstruct_opens_with_its_roi_names_and_each_contour_is_drawn_on_the_file_contour(
        region: str, viewer: Viewer, session_for: Any) -> None:
    study = viewer.studies[region]
    session = session_for(region)
    description = DESCRIPTIONS[region][1]
    session.load(description)
    assert study.rtstruct is not None
    rtstruct = pydicom.dcmread(study.rtstruct)
    names = {int(item.ROINumber): str(item.ROIName)
             for item in rtstruct.StructureSetROISequence}
    shown = _segmentation(session, description)
    by_name = {label: number for number, label in shown["segments"]}
    assert set(by_name) == set(names.values())
    numbers = sorted(by_name.values())
    for roi_number, name in sorted(names.items()):
        number = by_name[name]
        _jump(session, shown["id"], number)
        _show_only(session, shown["id"], numbers, number)
        with_it, state = session.grab()
        if roi_number == min(names):
            session.shot(f"{region}-rtstruct-{name}")
        _show_only(session, shown["id"], numbers, None)
        without, _ = session.grab()
        drawn = _drawn(with_it, without)
        image = _current_image(state, study)
        contours = _contours_on(rtstruct, roi_number, str(image.SOPInstanceUID))
        assert contours, f"{name}: the viewer jumped to a slice without its contour"
        line = _line_image(state, drawn.shape, contours)
        precision, recall = _line_scores(drawn, line)
        assert precision >= MIN_SCORE and recall >= MIN_SCORE, (name, precision, recall)
        mirrored = [_mirror_world(c, image) for c in contours]
        mirror_line = _line_image(state, drawn.shape, mirrored)
        if np.count_nonzero(line & ndimage.binary_dilation(mirror_line, iterations=2)) < (
                0.5 * np.count_nonzero(line)):  # a lateral structure: the mirror is a control
            assert min(_line_scores(drawn, mirror_line)) < MIRROR_MAX, name
    assert session.bad_console_lines() == []


def _measurement_groups(path: Path) -> list[str]:
    """The labels a viewer lists, one per measurement group: its Comment, else the
    name in its tracking identifier."""
    report = pydicom.dcmread(path)
    measurements = next(item for item in report.ContentSequence
                        if item.ConceptNameCodeSequence[0].CodeMeaning == "Imaging Measurements")
    names = []
    for group in measurements.ContentSequence:
        by_name = {item.ConceptNameCodeSequence[0].CodeMeaning: item
                   for item in group.ContentSequence}
        comment = by_name.get("Comment")
        names.append(str(comment.TextValue) if comment is not None else
                     tracked_name(str(by_name["Tracking Identifier"].TextValue)))
    return names


@pytest.mark.parametrize("region", list(SR_DESCRIPTIONS))
def test_sr_lists_every_measurement_in_the_panel_and_draws_on_a_visible_slice(
        region: str, viewer: Viewer, session_for: Any) -> None:
    study = viewer.studies[region]
    session = session_for(region)
    session.load(SR_DESCRIPTIONS[region])
    expected = _measurement_groups(study.sr)
    listed = session.wait_until(
        f"""() => {{
          const m = services.measurementService.getMeasurements();
          return m.length >= {len(expected)} ? m.map(x => x.label) : null;
        }}""", timeout_s=90)
    assert sorted(listed) == sorted(expected)
    panel = session.page.locator('[data-cy="trackedMeasurements-btn"]')
    if panel.count():
        panel.first.click()
    for name in expected:
        session.page.get_by_text(name, exact=True).first.wait_for(timeout=30_000)
    session.settle()
    pixels, _ = session.grab()
    session.shot(f"{region}-sr")
    lit = np.count_nonzero(pixels.max(axis=-1) > 40) / pixels[..., 0].size
    assert lit > 0.1, f"the viewport is black ({lit:.1%} lit)"
    yellow = (pixels[..., 0] > 150) & (pixels[..., 1] > 150) & (pixels[..., 2] < 100)
    assert yellow.any(), "no measurement drawn on the slice shown"
    assert session.bad_console_lines() == []


def test_the_viewer_is_the_pinned_ohif() -> None:
    import json

    pinned = json.loads((Path(__file__).parent / "package.json").read_text())
    assert viewer_version() == pinned["dependencies"]["@ohif/app"]


def test_the_burned_in_series_opens_as_an_ordinary_image_series(
        viewer: Viewer, session_for: Any) -> None:
    study = viewer.studies["abdomen"]
    session = session_for("abdomen")
    series_uid = str(pydicom.dcmread(study.extra[0], stop_before_pixels=True).SeriesInstanceUID)
    session.page.get_by_text(BURNED_IN).dblclick()
    count = session.wait_until(
        f"""() => {{
          const id = cornerstone.getRenderingEngines()[0].getViewports()[0].getCurrentImageId();
          if (!id || !id.includes({series_uid!r})) return null;
          const ds = services.displaySetService.getActiveDisplaySets()
            .find(d => d.SeriesInstanceUID === {series_uid!r});
          return ds ? ds.images.length : null;
        }}""", timeout_s=90)
    assert count == len(study.extra)
    session.settle()
    pixels, _ = session.grab()
    session.shot("abdomen-burned-in")
    lit = np.count_nonzero(pixels.max(axis=-1) > 40) / pixels[..., 0].size
    assert lit > 0.1, f"the viewport is black ({lit:.1%} lit)"
    colour = (np.abs(pixels[..., 0] - pixels[..., 1]) > 60) | (
        np.abs(pixels[..., 1] - pixels[..., 2]) > 60)
    assert np.count_nonzero(colour) > 50, "no coloured outline on the image shown"
    assert session.bad_console_lines() == []
