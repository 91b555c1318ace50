"""Ingest benchmark: storescu -> {dcmtk storescp, Orthanc, dicomnode}, images/s and ratios.

Sends the same CT study (default 300 slices of 512x512) with dcmtk ``storescu`` over
loopback to each receiver in turn, several rounds, alternating, and prints the median
images per second of each and dicomnode's ratios against the peers. dicomnode runs
its real ingest path: header check, durable spool (fsync + rename), SQLite index,
then the acknowledgement. ``TCP_NODELAY=1`` is set for both dcmtk ends (otherwise
Nagle's algorithm dominates).

Run: ``.venv/bin/python benchmarks/bench_ingest.py [--slices 300] [--matrix 512] [--rounds 3]``
Targets (issue 2): >= 1.0x Orthanc (must), 2x Orthanc and 0.5x storescp (goal).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

ENV = dict(os.environ, TCP_NODELAY="1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(port)


def make_study(out: Path, slices: int, matrix: int) -> list[Path]:
    """A CT study: the abdomen phantom when available, else smooth synthetic slices."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        from dicomnode.phantoms import make_phantom, write_phantom

        phantom = make_phantom("abdomen", seed=1, slices=slices, matrix=matrix)
        return sorted(p for p in write_phantom(phantom, out) if p.suffix == ".dcm")
    except ImportError:
        pass
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    yy, xx = np.mgrid[:matrix, :matrix]
    body = ((yy - matrix / 2) ** 2 / (0.4 * matrix) ** 2
            + (xx - matrix / 2) ** 2 / (0.45 * matrix) ** 2) < 1
    rng = np.random.default_rng(0)
    paths = []
    for i in range(slices):
        img = np.where(body, 1064, 24) + rng.normal(0, 12, (matrix, matrix))
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.Modality, ds.PatientID, ds.InstanceNumber = "CT", "BENCH", i + 1
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [-250, -250, -1.0 * i]
        ds.PixelSpacing, ds.SliceThickness = [0.98, 0.98], 1.0
        ds.Rows = ds.Columns = matrix
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated = ds.BitsStored = 16
        ds.HighBit, ds.PixelRepresentation = 15, 0
        ds.RescaleIntercept, ds.RescaleSlope = -1024, 1
        ds.PixelData = img.astype(np.uint16).tobytes()
        path = out / f"ct{i:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def send(files: list[Path], port: int, aec: str) -> float:
    """storescu all files over one association; returns seconds."""
    started = time.perf_counter()
    out = subprocess.run(
        ["storescu", "-aet", "BENCH", "-aec", aec, "127.0.0.1", str(port),
         *map(str, files)],
        env=ENV, capture_output=True, text=True, timeout=600,
    )
    elapsed = time.perf_counter() - started
    if out.returncode != 0:
        raise RuntimeError(f"storescu to {aec} failed: {out.stderr[-500:]}")
    return elapsed


@contextmanager
def storescp(work: Path) -> Iterator[tuple[int, str]]:
    port = free_port()
    out = work / "storescp"
    out.mkdir(parents=True)
    proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(out), str(port)],
                            env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, "STORESCP"
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def orthanc(work: Path) -> Iterator[tuple[int, str]]:
    dicom_port, http_port = free_port(), free_port()
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps({
        "Name": "bench", "StorageDirectory": str(work / "orthanc"),
        "IndexDirectory": str(work / "orthanc"), "DicomAet": "ORTHANC",
        "DicomPort": dicom_port, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "DicomAlwaysAllowStore": True, "DicomCheckCalledAet": False, "Plugins": [],
    }))
    proc = subprocess.Popen(["Orthanc", str(cfg)], env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(http_port)
        wait_port(dicom_port)
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/system", timeout=10):
            pass
        yield dicom_port, "ORTHANC"
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def dicomnode(work: Path) -> Iterator[tuple[int, str]]:
    port = free_port()
    env = {k: v for k, v in ENV.items() if not k.startswith("DICOMNODE_")}
    env.update(DICOMNODE_PORT=str(port), DICOMNODE_BIND_ADDRESS="127.0.0.1",
               DICOMNODE_DATA_DIR=str(work / "dicomnode"), DICOMNODE_DISK_RESERVE_MB="0",
               DICOMNODE_LOG_LEVEL="WARNING", DICOMNODE_WORKERS="0",
               DICOMNODE_WEB="off")
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        yield port, "DICOMNODE"
    finally:
        proc.terminate()
        proc.wait()


@contextmanager
def dicomnode_busy(work: Path, study: list[Path], job_nice: int | None = None,
                   ) -> Iterator[tuple[int, str]]:
    """A node with a liver job running on ``study`` (sent first) while the timed send runs.

    The node has its default workers; ``study`` (an abdomen) is sent by another AE, and
    the context is entered once its liver job has been running for a second.
    """
    from sqlalchemy import create_engine, text

    port = free_port()
    env = {k: v for k, v in ENV.items() if not k.startswith("DICOMNODE_")}
    env.update(DICOMNODE_PORT=str(port), DICOMNODE_BIND_ADDRESS="127.0.0.1",
               DICOMNODE_DATA_DIR=str(work / "dicomnode"), DICOMNODE_DISK_RESERVE_MB="0",
               DICOMNODE_LOG_LEVEL="WARNING", DICOMNODE_WARM_UP="false",
               DICOMNODE_WEB="off")
    if job_nice is not None:
        env["DICOMNODE_JOB_NICE"] = str(job_nice)
    proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve"], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        subprocess.run(["storescu", "-aet", "LIVERJOB", "-aec", "DICOMNODE", "127.0.0.1",
                        str(port), *map(str, study)], env=ENV, check=True,
                       capture_output=True, timeout=600)
        engine = create_engine(f"sqlite:///{work / 'dicomnode' / 'dicomnode.db'}")
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            with engine.connect() as conn:
                running = conn.execute(text(
                    "select count(*) from job where pipeline = 'liver_tumor' "
                    "and state = 'running'")).scalar()
            if running:
                break
            time.sleep(0.1)
        else:
            raise TimeoutError("the liver job did not start")
        engine.dispose()
        time.sleep(1.0)   # into the networks, past loading the volume
        yield port, "DICOMNODE"
    finally:
        proc.terminate()
        proc.wait()


RECEIVERS: dict[str, Callable[[Path], object]] = {
    "dcmtk_storescp": storescp, "orthanc": orthanc, "dicomnode": dicomnode,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--matrix", type=int, default=512)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    parser.add_argument("--busy", action="store_true", help=(
        "instead: dicomnode idle against dicomnode while a liver job runs (issue 17: the "
        "busy rate >= 0.8x the idle rate)"))
    args = parser.parse_args()
    if args.busy:
        busy(args)
        return
    for tool in ("storescu", "storescp", "Orthanc"):
        if shutil.which(tool) is None:
            sys.exit(f"{tool} not found: apt-get install dcmtk orthanc")
    with tempfile.TemporaryDirectory(prefix="bench-ingest-") as tmp:
        files = make_study(Path(tmp) / "study", args.slices, args.matrix)
        size_mb = sum(p.stat().st_size for p in files) / 2**20
        rates: dict[str, list[float]] = {name: [] for name in RECEIVERS}
        for rnd in range(args.rounds):
            for name, receiver in RECEIVERS.items():
                work = Path(tmp) / f"{name}-{rnd}"
                work.mkdir()
                with receiver(work) as (port, aec):  # type: ignore[attr-defined]
                    rates[name].append(len(files) / send(files, port, aec))
                shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    print(f"ingest: {len(files)} CT slices of {args.matrix}x{args.matrix} "
          f"({size_mb:.0f} MiB), storescu over loopback, {args.rounds} rounds, median")
    for name, rate in med.items():
        spread = f"{min(rates[name]):.0f}-{max(rates[name]):.0f}"
        print(f"  {name:<15} {rate:8.1f} images/s  (range {spread})")
    vs_orthanc = med["dicomnode"] / med["orthanc"]
    vs_storescp = med["dicomnode"] / med["dcmtk_storescp"]
    # each round runs the three receivers back to back: the median of the per-round
    # ratios holds when the machine's speed drifts between rounds
    paired = statistics.median(d / o for d, o in zip(rates["dicomnode"], rates["orthanc"],
                                                     strict=True))
    print(f"  ratio dicomnode/orthanc        {vs_orthanc:5.2f}x  (must >= 1.0, goal 2.0)")
    print(f"  ratio dicomnode/orthanc, median of per-round ratios {paired:5.2f}x")
    print(f"  ratio dicomnode/dcmtk_storescp {vs_storescp:5.2f}x  (goal 0.5)")
    if args.json:
        args.json.write_text(json.dumps({"median_images_per_s": med, "rounds": rates,
                                         "vs_orthanc": vs_orthanc,
                                         "vs_orthanc_paired": paired,
                                         "vs_storescp": vs_storescp}, indent=2))


def busy(args: argparse.Namespace) -> None:
    """Ingest into an idle node and into one running a liver job, alternating rounds."""
    with tempfile.TemporaryDirectory(prefix="bench-ingest-busy-") as tmp:
        files = make_study(Path(tmp) / "study", args.slices, args.matrix)
        from dicomnode.phantoms import make_phantom, write_phantom

        phantom = make_phantom("abdomen", seed=7, matrix=256, spacing=(2.5, 1.6, 1.6))
        liver = sorted(p for p in write_phantom(phantom, Path(tmp) / "liver")
                       if p.suffix == ".dcm")
        # "busy, same priority": job_nice 0, the node before its workers ran nicer
        rates: dict[str, list[float]] = {"idle": [], "busy": [], "busy, same priority": []}
        for rnd in range(args.rounds):
            for name in rates:
                work = Path(tmp) / f"{name}-{rnd}".replace(" ", "").replace(",", "-")
                work.mkdir()
                receiver = (dicomnode(work) if name == "idle" else dicomnode_busy(
                    work, liver, 0 if "same" in name else None))
                with receiver as (port, aec):
                    rates[name].append(len(files) / send(files, port, aec))
                shutil.rmtree(work, ignore_errors=True)
    med = {name: statistics.median(v) for name, v in rates.items()}
    paired = statistics.median(b / i for b, i in zip(rates["busy"], rates["idle"], strict=True))
    print(f"ingest while a liver job runs: {len(files)} CT slices of {args.matrix}x"
          f"{args.matrix}, storescu over loopback, {args.rounds} rounds, median")
    for name, rate in med.items():
        print(f"  {name:<20} {rate:8.1f} images/s  (range {min(rates[name]):.0f}-"
              f"{max(rates[name]):.0f})")
    print(f"  ratio busy/idle {med['busy'] / med['idle']:5.2f}x, median of per-round "
          f"ratios {paired:5.2f}x  (target >= 0.8); at the same priority "
          f"{med['busy, same priority'] / med['idle']:5.2f}x")
    if args.json:
        args.json.write_text(json.dumps({"median_images_per_s": med, "rounds": rates,
                                         "busy_vs_idle_paired": paired}, indent=2))


if __name__ == "__main__":
    main()
