"""Completeness latency: seconds from the last acknowledged instance to "complete".

For each trigger the same study is sent with dcmtk ``storescu`` to dicomnode, and the
time from storescu's exit (the last acknowledgement) to the study's ``complete`` state
is measured. The peer is Orthanc's stable-study detection (``StableAge``, the same
idea as dicomnode's quiet period) measured in the same run: Orthanc is given the same
quiet period and polled through its REST API (``IsStable``).

Run: ``.venv/bin/python benchmarks/bench_completion.py [--slices 120] [--quiet 2]``
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from sqlalchemy import select

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_ingest import ENV, free_port, make_study, wait_port
from dicomnode.config import load_settings
from dicomnode.node import Node
from dicomnode.store.models import Study


def _send(files: list[Path], port: int, aec: str) -> float:
    subprocess.run(["storescu", "-aec", aec, "127.0.0.1", str(port), *map(str, files)],
                   env=ENV, check=True, capture_output=True, timeout=600)
    return time.monotonic()


def dicomnode_latency(files: list[Path], work: Path, quiet: float, release: bool) -> float:
    settings = load_settings(
        None, port=free_port(), bind_address="127.0.0.1", data_dir=work, disk_reserve_mb=0,
        workers=0, log_level="WARNING",
        completion={"quiet_period_s": quiet, "on_association_release": release,
                    "expected_count": False, "poll_interval_s": 0.1},
    )
    node = Node(settings)
    node.start()
    try:
        acked = _send(files, node.scp.port, settings.ae_title)
        while True:
            with node.db.session() as s:
                state = s.execute(select(Study.state)).scalar_one_or_none()
            if state == "complete":
                return time.monotonic() - acked
            time.sleep(0.01)
    finally:
        node.stop()


def orthanc_latency(files: list[Path], work: Path, quiet: float) -> float:
    dicom_port, http_port = free_port(), free_port()
    cfg = work / "orthanc.json"
    work.mkdir(parents=True, exist_ok=True)
    cfg.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(work / "db"), "IndexDirectory": str(work / "db"),
        "DicomAet": "ORTHANC", "DicomPort": dicom_port, "HttpPort": http_port,
        "RemoteAccessAllowed": False, "DicomAlwaysAllowStore": True, "Plugins": [],
        "StableAge": max(1, round(quiet)),
    }))
    proc = subprocess.Popen(["Orthanc", str(cfg)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(http_port)
        wait_port(dicom_port)
        acked = _send(files, dicom_port, "ORTHANC")
        url = f"http://127.0.0.1:{http_port}"
        while True:
            with urllib.request.urlopen(f"{url}/studies?expand", timeout=10) as resp:
                studies = json.loads(resp.read())
            if studies and studies[0].get("IsStable"):
                return time.monotonic() - acked
            time.sleep(0.01)
    finally:
        proc.terminate()
        proc.wait()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=120)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--quiet", type=float, default=2.0)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-completion-") as tmp:
        files = make_study(Path(tmp) / "study", args.slices, args.matrix)
        results: dict[str, list[float]] = {"release": [], "quiet": [], "orthanc": []}
        for rnd in range(args.rounds):
            results["release"].append(dicomnode_latency(
                files, Path(tmp) / f"r{rnd}", args.quiet, release=True))
            results["quiet"].append(dicomnode_latency(
                files, Path(tmp) / f"q{rnd}", args.quiet, release=False))
            results["orthanc"].append(orthanc_latency(files, Path(tmp) / f"o{rnd}", args.quiet))
    med = {k: statistics.median(v) for k, v in results.items()}
    print(f"completion latency: {len(files)} slices, quiet period {args.quiet:g} s, "
          f"{args.rounds} rounds, median seconds from last ack to complete")
    print(f"  dicomnode association release + contiguity {med['release']:7.3f} s")
    print(f"  dicomnode quiet period                     {med['quiet']:7.3f} s")
    print(f"  orthanc StableAge={max(1, round(args.quiet))}                        "
          f"{med['orthanc']:7.3f} s")
    print(f"  ratio orthanc/dicomnode (release)  {med['orthanc'] / med['release']:8.1f}x faster")
    print(f"  ratio orthanc/dicomnode (quiet)    {med['orthanc'] / med['quiet']:8.2f}x")


if __name__ == "__main__":
    main()
