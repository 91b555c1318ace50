"""End-to-end latency: last instance acknowledged -> result stored at the PACS (Orthanc).

A phantom (abdomen 512x512x300 by default, or head and neck 512x512x180) is sent with
dcmtk ``storescu`` to the node with Orthanc's calling AE; the node completes the study
(association release + contiguity), routes it, runs ``liver_tumor`` (or
``headneck_oar``) and sends SEG, RTSTRUCT and SR to Orthanc. The figure is the time
from storescu's exit to the awaited object appearing in Orthanc (the liver's SR, the
head and neck's RTSTRUCT: what the planning system needs), with the job's per-stage
breakdown. The peer, measured in the same process, is the pipeline alone on the same
volume (plain PyTorch inference + post-processing), so the ratio says what the node
adds around the model.

Run: ``.venv/bin/python benchmarks/bench_end_to_end.py [--region abdomen|headneck]
[--matrix 512] [--slices N] [--studies N]``; with ``--studies 2`` the second study shows
the steady state of a node that has already processed one.
Targets: abdomen (issue 6) <= 60 s on the 2-core CPU, <= 5 s on an H100; head and neck
(issue 15) the same.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
import torch
from pydicom.uid import generate_uid

from benchmarks.bench_ingest import ENV, free_port, wait_port
from dicomnode.config import Peer, load_settings
from dicomnode.imaging.series import load_series
from dicomnode.nn import runtime
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.pipelines.base import get_pipeline
from dicomnode.store.status import node_status


def _copy_as_new_study(files: list[Path], out_dir: Path) -> list[Path]:
    """The same images under new study, series, frame-of-reference and instance UIDs."""
    out_dir.mkdir(parents=True)
    uids = {key: generate_uid() for key in ("StudyInstanceUID", "SeriesInstanceUID",
                                            "FrameOfReferenceUID")}
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        for key, uid in uids.items():
            setattr(ds, key, uid)
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copies.append(out_dir / path.name)
        ds.save_as(copies[-1], enforce_file_format=True)
    return copies


#: region -> (pipeline, default slices, the modality whose arrival stops the clock)
REGIONS = {"abdomen": ("liver_tumor", 300, "SR"), "headneck": ("headneck_oar", 180, "RTSTRUCT")}


def _count_series(url: str, modality: str) -> int:
    """Series of ``modality`` stored at Orthanc: one indexed query (the poll must not load
    the PACS with a request per stored CT image while the node works)."""
    request = urllib.request.Request(
        f"{url}/tools/find", method="POST",
        data=json.dumps({"Level": "Series", "Query": {"Modality": modality}}).encode())
    with urllib.request.urlopen(request, timeout=30) as resp:
        return len(json.loads(resp.read()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--region", choices=sorted(REGIONS), default="abdomen")
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--slices", type=int, default=None,
                        help="Slices (default: 300 abdomen, 180 head and neck).")
    parser.add_argument("--seed", type=int, default=21)
    parser.add_argument("--studies", type=int, default=1,
                        help="Studies sent one after the other (the same images under new "
                             "UIDs): the first after the node's start, then steady state.")
    args = parser.parse_args()
    pipeline_name, default_slices, awaited = REGIONS[args.region]
    with tempfile.TemporaryDirectory(prefix="bench-e2e-") as tmp:
        work = Path(tmp)
        phantom = make_phantom(args.region, seed=args.seed,
                               slices=args.slices or default_slices, matrix=args.matrix)
        files = sorted(p for p in write_phantom(phantom, work / "study") if p.suffix == ".dcm")
        studies = [files] + [_copy_as_new_study(files, work / f"study{k}")
                             for k in range(1, args.studies)]
        dicom_port, http_port = free_port(), free_port()
        (work / "orthanc.json").write_text(json.dumps({
            "Name": "bench", "StorageDirectory": str(work / "db"),
            "IndexDirectory": str(work / "db"), "DicomAet": "ORTHANC",
            "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
            "DicomAlwaysAllowStore": True, "Plugins": [],
        }))
        orthanc = subprocess.Popen(["Orthanc", str(work / "orthanc.json")],
                                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        settings = load_settings(None, port=free_port(), bind_address="127.0.0.1",
                                 data_dir=work / "node", disk_reserve_mb=0,
                                 log_level="WARNING",
                                 peers={"ORTHANC": Peer(host="127.0.0.1", port=dicom_port)})
        node = Node(settings)
        rows = []
        try:
            wait_port(http_port)
            wait_port(dicom_port)
            # a running node warms its pipelines and encoders at start; wait for that
            # before the clock starts, so the figure is a study's, not the start-up
            warm_started = time.perf_counter()
            node.start()
            node.runner.warmed.wait(300)
            warm_s = time.perf_counter() - warm_started
            url = f"http://127.0.0.1:{http_port}"
            for number, study in enumerate(studies, start=1):
                sent = time.monotonic()
                subprocess.run(["storescu", "-aet", "ORTHANC", "-aec", settings.ae_title,
                                "127.0.0.1", str(node.scp.port), *map(str, study)],
                               env=ENV, check=True, capture_output=True, timeout=600)
                acked = time.monotonic()
                study_uid = str(pydicom.dcmread(study[0], stop_before_pixels=True)
                                .StudyInstanceUID)
                checked = acked
                while time.monotonic() - acked < 900:
                    if _count_series(url, awaited) >= number:
                        break
                    if time.monotonic() - checked >= 1.0:
                        # the node's status is a few ORM queries in this process: asked
                        # every 50 ms it would take the GIL from the node being measured
                        checked = time.monotonic()
                        ended = [j for j in node_status(node.db)["jobs"]
                                 if j["study_uid"] == study_uid
                                 and j["state"] in ("no_result", "failed")]
                        if ended:
                            sys.exit(f"study {number}: job "
                                     f"{ended[0]['pipeline'] or 'routing'} "
                                     f"{ended[0]['state']}: {ended[0]['reason']}")
                    time.sleep(0.05)
                else:
                    sys.exit(f"no {awaited} at Orthanc: {node_status(node.db)['jobs']}")
                latency = time.monotonic() - acked
                jobs = [j for j in node_status(node.db)["jobs"] if j["study_uid"] == study_uid]
                rows.append((acked - sent, latency, jobs))
        finally:
            node.stop()
            orthanc.terminate()
            orthanc.wait()
        volume = load_series(files)
        pipeline = get_pipeline(pipeline_name)
        pipeline.warm_up()  # on this thread, as the node's worker did on its own
        started = time.perf_counter()
        pipeline.run(volume)
        alone = time.perf_counter() - started
    device = runtime.select_device(os.environ.get("DICOMNODE_DEVICE"))
    where = (f"GPU {torch.cuda.get_device_name(device)}" if device.type == "cuda"
             else f"CPU, {torch.get_num_threads()} threads")
    print(f"end to end: {args.region} phantom {args.matrix}x{args.matrix}x{len(files)}, "
          f"{pipeline_name}, {where}")
    print(f"  node start-up with warm-up (weights, device, encoders) {warm_s:7.2f} s")
    target = "<= 5 s on an H100" if device.type == "cuda" else "<= 60 s on the 2-core CPU"
    for number, (send_s, latency, jobs) in enumerate(rows, start=1):
        print(f"  study {number}: send (storescu, {len(files)} instances) {send_s:7.2f} s")
        print(f"  study {number}: last ack -> {awaited} stored at Orthanc {latency:7.2f} s  "
              f"(target {target})")
        for job in reversed(jobs):
            stages = ", ".join(f"{k} {v:.2f}" for k, v in (job["timings"] or {}).items()
                               if isinstance(v, int | float))
            print(f"    job {job['pipeline'] or 'routing'}: {job['state']}; {stages}")
    print(f"  peer: pipeline alone on the same volume     {alone:7.2f} s")
    print(f"  ratio end-to-end (last study) / pipeline alone {rows[-1][1] / alone:7.2f}x")


if __name__ == "__main__":
    main()
