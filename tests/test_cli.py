"""The command line: serve with the embedded default + storescu + status --json."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import free_port
from tests.factories import write_series
from tests.peers import wait_port


def _cli(*args: str, cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "dicomnode.cli", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_serve_store_status(tmp_path: Path) -> None:
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env.update(DICOMNODE_PORT=str(port), DICOMNODE_BIND_ADDRESS="127.0.0.1",
               DICOMNODE_DISK_RESERVE_MB="0")
    # its own process group, as in a terminal: Ctrl-C reaches the node and its helper
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve"], cwd=tmp_path,
                            env=env, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        wait_port(port, 30)
        paths = write_series(tmp_path / "study", 300, rows=16, cols=16)
        out = subprocess.run(["storescu", "-aec", "DICOMNODE", "127.0.0.1", str(port),
                              *map(str, paths)], capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        deadline = time.monotonic() + 10
        while True:
            status = json.loads(_cli("status", "--json", cwd=tmp_path, env=env).stdout)
            if status["studies"] and status["studies"][0]["state"] == "complete":
                break
            assert time.monotonic() < deadline, status
            time.sleep(0.2)
        study = status["studies"][0]
        assert study["instances"] == 300 and study["completion_trigger"] == "association_release"
        assert (tmp_path / "var" / "dicomnode.db").is_file()
    finally:
        os.killpg(proc.pid, signal.SIGINT)  # Ctrl-C
        _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert "node.stopped" in err
    assert "Traceback" not in err, err


def test_process_reports_honestly(tmp_path: Path) -> None:
    write_series(tmp_path / "study", 5)
    res = _cli("process", str(tmp_path / "study"), "--out", str(tmp_path / "out"),
               cwd=tmp_path, env=dict(os.environ))
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    assert summary["state"] == "no_result" and summary["reason"]


def test_bad_config_exits_with_message(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("port: -1\n")
    res = _cli("status", "--config", str(cfg), cwd=tmp_path, env=dict(os.environ))
    assert res.returncode == 2 and "port" in res.stderr


def test_serve_with_a_tls_key_that_does_not_match_its_certificate_exits_with_the_key_named(
        tmp_path: Path) -> None:
    import yaml

    from tests.net.certs import make_pki

    pki = make_pki(tmp_path / "pki")
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump({
        "port": None, "bind_address": "127.0.0.1", "warm_up": False, "workers": 0,
        "tls": {"port": free_port(), "certificate": str(pki.server.certificate),
                "private_key": str(pki.client.private_key)}}))
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    # this checkout's package, whichever one the venv's install points at
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    res = _cli("serve", "--config", str(cfg), cwd=tmp_path, env=env)
    assert res.returncode == 1, res.stderr
    assert "cannot start: Invalid 'tls.certificate'" in res.stderr
    assert "Traceback" not in res.stderr, res.stderr


def test_node_with_broken_weights_says_so_and_keeps_receiving(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    import shutil

    from dicomnode.config import Settings
    from dicomnode.nn import weights
    from dicomnode.node import Node

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(weights.models_dir() / "manifest.json", models / "manifest.json")
    entry = next(e for e in weights.read_manifest(models) if e["name"] == "liver_tumor")
    (models / entry["file"]).write_bytes(b"not the trained weights")
    monkeypatch.setenv("DICOMNODE_MODELS_DIR", str(models))
    settings = Settings(port=0, bind_address="127.0.0.1", data_dir=tmp_path / "var",
                        disk_reserve_mb=0, workers=1)
    node = Node(settings)
    with caplog.at_level("WARNING", logger="dicomnode"):
        node.start()
        try:
            states = node.runner.check_pipelines()
            paths = write_series(tmp_path / "in", 3)
            out = subprocess.run(["storescu", "-aec", "DICOMNODE", "127.0.0.1",
                                  str(node.scp.port), *map(str, paths)],
                                 capture_output=True, text=True, timeout=60)
        finally:
            node.stop()
    assert out.returncode == 0, out.stderr
    assert "checksum" in states["liver_tumor"] or "sha256" in states["liver_tumor"]
    assert any("pipeline.unavailable" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    env = {**os.environ, "DICOMNODE_DATA_DIR": str(tmp_path / "var")}
    report = json.loads(_cli("status", "--json", cwd=tmp_path, env=env).stdout)
    assert report["totals"]["studies"] == 1
    assert report["pipelines"]["states"]["liver_tumor"] == states["liver_tumor"]


def test_worker_without_a_broker_says_so_and_exits_2(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "worker"], env=env,
                         capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert out.returncode == 2 and "needs broker_url" in out.stderr, out.stderr


@pytest.mark.slow
def test_process_with_radiomics_gives_lesion_groups_features_the_radiomics_table_lists(
        tmp_path: Path) -> None:
    import highdicom as hd
    import pydicom

    from dicomnode.results.radiomics import IBSI_SCHEME, features_from_sr
    from tests.results.conftest import dciodvfy_errors

    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["OMP_NUM_THREADS"] = "1"
    res = _cli("phantom", "abdomen", "--out", str(tmp_path / "study"), "--seed", "3",
               "--matrix", "192", "--slices", "100", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    res = subprocess.run([sys.executable, "-m", "dicomnode.cli", "process",
                          str(tmp_path / "study"), "--out", str(tmp_path / "out"),
                          "--radiomics"], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=1200)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    run = summary["pipelines"]["liver_tumor"]
    assert run["state"] == "done", run
    radiomics = run["result"]["measurements"]["radiomics"]
    assert radiomics["settings"]["bin_width_hu"] == 25.0
    lesions = run["result"]["measurements"]["lesion_count"]
    assert lesions >= 1
    assert list(radiomics["structures"]) == [f"Lesion {n}" for n in range(1, lesions + 1)]
    sr_path = tmp_path / "out" / "liver_tumor" / "sr.dcm"
    assert dciodvfy_errors(sr_path) == []
    hd.sr.srread(sr_path)  # highdicom reads it back as a TID 1500 report
    in_sr = features_from_sr(pydicom.dcmread(sr_path))
    from_json = {(name, f["ibsi_id"]): f["value"]
                 for name, feats in radiomics["structures"].items() for f in feats}
    assert {(f.structure, f.ibsi_id): f.value for f in in_sr} == from_json
    assert all(f.structure.startswith("Lesion ") for f in in_sr)
    assert IBSI_SCHEME in {s.CodingSchemeDesignator for s in
                           pydicom.dcmread(sr_path).CodingSchemeIdentificationSequence}
    res = _cli("radiomics", str(tmp_path / "out"), "--json", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    table = json.loads(res.stdout)
    assert {(s, code): v["value"] for s, feats in table.items()
            for code, v in feats.items()} == from_json
    res = _cli("radiomics", str(tmp_path / "out"), "--csv", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert len(res.stdout.splitlines()) == 1 + len(from_json)
    # a folder of CT images: processed with radiomics on, the table read from its SR
    res = subprocess.run([sys.executable, "-m", "dicomnode.cli", "radiomics",
                          str(tmp_path / "study"), "--json"], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert res.returncode == 0, res.stderr
    assert {(s, code): v["value"] for s, feats in json.loads(res.stdout).items()
            for code, v in feats.items()} == from_json


def test_radiomics_of_a_study_uid_reads_the_sr_the_node_recorded(tmp_path: Path) -> None:
    import numpy as np

    from dicomnode.results.algorithm import AlgorithmInfo
    from dicomnode.results.codes import HEADNECK
    from dicomnode.results.radiomics import RadiomicsParameters, compute_radiomics
    from dicomnode.results.seg import build_seg
    from dicomnode.results.source import check_source_images, write
    from dicomnode.results.sr import build_segmentation_sr
    from dicomnode.store.db import Database
    from dicomnode.store.models import Job, Patient, Study
    from tests.results.conftest import make_ct_series

    series = make_ct_series(tmp_path / "ct", slices=16, matrix=64)
    labels = np.where(np.isin(series.labels, (1, 6)), series.labels, 0).astype(np.uint8)
    geometry = check_source_images(series.images)
    hu = np.stack([ds.pixel_array for ds in series.images]).astype(np.float32)
    report = compute_radiomics(hu, labels, {1: "BrainStem", 6: "Parotid_L"},
                               (geometry.slice_spacing, *geometry.spacing),
                               RadiomicsParameters(resample_mm=None, families=("morphology",),
                                                   organs=True))
    algorithm = AlgorithmInfo("test", "1", "0" * 64, "test")
    table = [s for s in HEADNECK if s.name in ("BrainStem", "Parotid_L")]
    seg = build_seg(series.images, labels, table, algorithm)
    sr = write(build_segmentation_sr(series.images, seg, labels, table, algorithm,
                                     radiomics=report), tmp_path / "results" / "sr.dcm")
    db_url = f"sqlite:///{tmp_path / 'var' / 'dicomnode.db'}"
    (tmp_path / "var").mkdir()
    db = Database(db_url)
    db.upgrade()
    study_uid = str(series.images[0].StudyInstanceUID)
    with db.transaction() as session:
        patient = Patient(patient_id="x")
        study = Study(study_uid=study_uid, patient=patient)
        session.add_all([patient, study, Job(study=study, study_version=1, pipeline="headneck_oar",
                                             state="done", result={"files": [str(sr)]})])
    db.dispose()
    env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    env["DICOMNODE_DATABASE_URL"] = db_url
    res = _cli("radiomics", study_uid, "--json", cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    printed = json.loads(res.stdout)
    assert {s: {c: v["value"] for c, v in feats.items()} for s, feats in printed.items()} == {
        name: {f.ibsi_id: f.value for f in feats} for name, feats in report.structures.items()}
    res = _cli("radiomics", "1.2.3.999", cwd=tmp_path, env=env)
    assert res.returncode == 2 and "no SR result of study 1.2.3.999" in res.stderr
