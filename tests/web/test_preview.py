"""Result pictures (web/preview.py) drawn from the result objects and the stored CT."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
from fastapi.testclient import TestClient
from PIL import Image
from pydicom import dcmread
from pydicom.uid import generate_uid
from sqlalchemy import select

from dicomnode.node import Node
from dicomnode.results.algorithm import AlgorithmInfo
from dicomnode.results.codes import CATALOGUE, table_from_labels
from dicomnode.results.kos import build_kos
from dicomnode.results.seg import build_seg
from dicomnode.results.source import write
from dicomnode.store.models import Job, JobState, Study

ALGORITHM = AlgorithmInfo("test-model", "1", "0" * 64, "written by the test")


def _job_with(node: Node, study_uid: str, path: Path) -> int:
    with node.db.transaction() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        job = Job(study=study, study_version=study.version, pipeline="liver_tumor",
                  priority=50, state=JobState.DONE.value, result={"files": [str(path)]})
        session.add(job)
        session.flush()
        return job.id


def _png(client: TestClient, job: int) -> Image.Image:
    answer = client.get(f"/api/v1/jobs/{job}/preview.png")
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"] == "image/png"
    return Image.open(io.BytesIO(answer.content)).convert("RGB")


def test_a_seg_result_is_drawn_on_its_ct_slices_with_the_structure_outlined(
        client: TestClient, stored: tuple[Node, str], tmp_path: Path) -> None:
    node, uid = stored
    images = [dcmread(p) for p in sorted((tmp_path / "series").glob("*.dcm"))]
    labels = np.zeros((len(images), 32, 32), np.uint8)
    labels[1:4, 8:24, 8:24] = 1
    seg = build_seg(images, labels, table_from_labels({1: "Liver"}), ALGORITHM)
    job = _job_with(node, uid, write(seg, node.settings.results_dir / "job-seg" / "seg.dcm"))
    picture = _png(client, job)
    assert picture.size == (3 * 256, 256)  # the three slices with liver
    pixels = np.asarray(picture).reshape(-1, 3)
    assert (pixels == CATALOGUE["Liver"].color).all(axis=1).any()  # the outline
    # drawn once, then served from the file beside the results
    assert (node.settings.results_dir / "job-seg" / "preview.png").is_file()
    assert client.get(f"/api/v1/jobs/{job}/preview.png").content == \
        (node.settings.results_dir / "job-seg" / "preview.png").read_bytes()


def test_a_key_object_selection_shows_its_key_slices(
        client: TestClient, stored: tuple[Node, str], tmp_path: Path) -> None:
    node, uid = stored
    images = [dcmread(p) for p in sorted((tmp_path / "series").glob("*.dcm"))]
    kos = build_kos(images, [1, 3], ALGORITHM)
    job = _job_with(node, uid, write(kos, node.settings.results_dir / "job-kos" / "kos.dcm"))
    assert _png(client, job).size == (2 * 256, 256)


def test_a_result_without_a_picture_or_with_its_ct_gone_answers_404(
        client: TestClient, stored: tuple[Node, str], tmp_path: Path) -> None:
    node, uid = stored
    study = client.get(f"/api/v1/studies/{uid}").json()
    (sr_job,) = [r["job"] for r in study["results"]]
    assert client.get(f"/api/v1/jobs/{sr_job}/preview.png").status_code == 404
    assert client.get("/api/v1/jobs/999999/preview.png").status_code == 404
    images = [dcmread(p) for p in sorted((tmp_path / "series").glob("*.dcm"))]
    for image in images:  # a series the index does not hold
        image.SOPInstanceUID = image.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    kos = build_kos(images, [1], ALGORITHM)
    job = _job_with(node, uid, write(kos, node.settings.results_dir / "job-gone" / "kos.dcm"))
    answer = client.get(f"/api/v1/jobs/{job}/preview.png")
    assert answer.status_code == 404 and "no longer stored" in answer.json()["detail"]
