"""Real DICOM peers started for tests: dcmtk storescp and Orthanc, on loopback."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.conftest import free_port


def wait_port(port: int, timeout: float = 20.0) -> None:
    """Block until something accepts TCP connections on 127.0.0.1:port."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port}")


@contextmanager
def storescp(out_dir: Path, port: int | None = None, aet: str = "STORESCP",
             ) -> Iterator[tuple[int, Path]]:
    """Run dcmtk's storescp writing into out_dir; yields (port, out_dir)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    proc = subprocess.Popen(
        ["storescp", "--aetitle", aet, "--output-directory", str(out_dir), "--promiscuous",
         str(port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
    )
    try:
        wait_port(port)
        yield port, out_dir
    finally:
        proc.terminate()
        proc.wait(timeout=10)


#: Where Debian's ``orthanc-dicomweb`` package puts the plugin.
DICOMWEB_PLUGIN = Path("/usr/share/orthanc/plugins/libOrthancDicomWeb.so")


@contextmanager
def orthanc(work: Path, aet: str = "ORTHANC", modalities: dict[str, list[object]] | None = None,
            dicomweb: bool = False) -> Iterator[dict[str, object]]:
    """Run Orthanc (Debian package) on free loopback ports with its own storage.

    Yields a dict with ``dicom_port``, ``http_port``, ``url`` and ``aet``; with
    ``dicomweb`` the DICOMweb plugin (Debian ``orthanc-dicomweb``) is loaded and
    ``dicomweb`` holds its root URL (QIDO-RS, WADO-RS and STOW-RS under ``/dicom-web``).
    """
    exe = shutil.which("Orthanc")
    if exe is None:
        raise RuntimeError("Orthanc is not installed (apt-get install orthanc)")
    work.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = free_port(), free_port()
    config = {
        "Name": "dicomnode-test", "StorageDirectory": str(work / "db"),
        "IndexDirectory": str(work / "db"), "DicomAet": aet, "DicomPort": dicom_port,
        "HttpPort": http_port, "RemoteAccessAllowed": False, "AuthenticationEnabled": False,
        "DicomServerEnabled": True, "HttpServerEnabled": True, "Plugins": [],
        "DicomModalities": modalities or {}, "DicomAlwaysAllowStore": True,
        "DicomCheckCalledAet": False, "StableAge": 2, "ConcurrentJobs": 1,
            }
    if dicomweb:
        if not DICOMWEB_PLUGIN.is_file():
            raise RuntimeError("Orthanc's DICOMweb plugin is not installed "
                               "(apt-get install orthanc-dicomweb)")
        config["Plugins"] = [str(DICOMWEB_PLUGIN)]
        # Full metadata from the files: viewers need every attribute, not the index's.
        config["DicomWeb"] = {"Enable": True, "Root": "/dicom-web/", "EnableWado": False,
                              "StudiesMetadata": "Full", "SeriesMetadata": "Full"}
    config = {k: v for k, v in config.items() if v is not None}
    cfg = work / "orthanc.json"
    cfg.write_text(json.dumps(config))
    log = (work / "orthanc.log").open("wb")
    proc = subprocess.Popen([exe, str(cfg)], stdout=log, stderr=subprocess.STDOUT)
    try:
        wait_port(http_port, 60)
        wait_port(dicom_port, 60)
        url = f"http://127.0.0.1:{http_port}"
        yield {"dicom_port": dicom_port, "http_port": http_port, "aet": aet, "url": url,
               **({"dicomweb": f"{url}/dicom-web"} if dicomweb else {})}
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()


def orthanc_get(url: str) -> object:
    """GET a JSON resource from Orthanc's REST API."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        return json.loads(resp.read())


def orthanc_text(url: str) -> str:
    """GET a plain-text resource (e.g. an instance's metadata) from Orthanc's REST API."""
    with urllib.request.urlopen(url, timeout=30) as resp:
        return str(resp.read().decode("utf-8")).strip()
