"""Fuzz and fault campaign against a running node, on loopback only.

Runs ``dicomnode serve`` as a subprocess and throws at it, in batches and from several
threads at once: random bytes, mutated association requests, mutated and truncated
P-DATA, PDUs announcing 4 GiB, datasets with flipped bytes sent over a valid association,
trickling senders, connections dropped mid-PDU, and legitimate stores beside them. After
every batch: the process must be up and answer a C-ECHO within 5 s. Then it kills the
node with SIGKILL at random points while it ingests, while a liver job runs and while
results are being exported, restarts it each time and checks that every instance the
sender saw acknowledged is indexed and readable, that no temporary file is left after
recovery, and that no study version has two result series of one kind at the receiving
peer (dcmtk ``storescp``). Optionally (root, ``--full-disk``) a node whose data folder
is a small tmpfs is filled up. The summary prints the counts; the exit status is 1 when
any check failed.

The peer for the ratio is dcmtk's ``storescp`` fed the same legitimate stores: the
campaign prints the node's echo latency after each batch against storescp's.

Usage: ``python benchmarks/campaign.py [--fuzz-cases 2000] [--kills 20] [--seed 1]``.
"""

from __future__ import annotations

import argparse
import collections
import io
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, _config
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.pdu import P_DATA_TF
from pynetdicom.sop_class import CTImageStorage, Verification
from sqlalchemy import select

from benchmarks.bench_ingest import free_port, wait_port
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.store.db import Database
from dicomnode.store.models import Delivery, Instance, Job
from tests.factories import ct_slice
from tests.net.rawpeer import RELEASE_RQ, associate_rq

# Datasets are sent from files as they lie on disk, flipped bytes and all.
_config.STORE_SEND_CHUNKED_DATASET = True

CALLING = "CAMPAIGN"
KINDS = ("random_bytes", "mutated_associate", "mutated_pdata", "huge_pdu", "truncated_pdata",
         "mutated_dataset", "trickle", "drop_mid_pdu", "valid_store")


@dataclass
class Tally:
    """What the campaign saw, printed as its summary."""

    cases: collections.Counter[str] = field(default_factory=collections.Counter)
    outcomes: collections.Counter[str] = field(default_factory=collections.Counter)
    acked: set[str] = field(default_factory=set)
    failures: list[str] = field(default_factory=list)
    echo_s: list[float] = field(default_factory=list)
    batches: int = 0
    up_after_batch: int = 0
    kills: collections.Counter[str] = field(default_factory=collections.Counter)
    lost: int = 0
    leftover_tmp: int = 0
    duplicate_result_series: int = 0
    rss_mb: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def note(self, kind: str, outcome: str) -> None:
        with self.lock:
            self.cases[kind] += 1
            self.outcomes[outcome] += 1


class NodeProcess:
    """``dicomnode serve`` in a subprocess with the campaign's config."""

    def __init__(self, work: Path, peer_port: int, data_dir: Path | None = None) -> None:
        self.work = work
        self.port = free_port()
        self.data_dir = data_dir or work / "var"
        self.config = work / f"node-{self.port}.yaml"
        self.config.write_text(json.dumps({
            "ae_title": "DICOMNODE", "port": self.port, "bind_address": "127.0.0.1",
            "data_dir": str(self.data_dir), "disk_reserve_mb": 0,
            "association_timeout_s": 2.0, "pdu_timeout_s": 3.0, "warm_up": False,
            "completion": {"quiet_period_s": 1.0}, "web": None,
            "peers": {CALLING: {"host": "127.0.0.1", "port": peer_port}},
        }))
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env["DICOMNODE_CONFIG"] = str(self.config)
        env.setdefault("OMP_NUM_THREADS", "1")
        self.proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve"], env=env,
                                     stdout=subprocess.DEVNULL,
                                     stderr=open(self.work / "node.log", "ab"))  # noqa: SIM115
        wait_port(self.port, 120)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()

    def rss_mb(self) -> float:
        assert self.proc is not None
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")

    def db(self) -> Database:
        return Database(f"sqlite:///{self.data_dir / 'dicomnode.db'}")


def echo_seconds(port: int, timeout: float = 5.0) -> float | None:
    """Seconds a C-ECHO took, or None when it failed within ``timeout``."""
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(Verification)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout
    start = time.perf_counter()
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    if not assoc.is_established:
        return None
    status = assoc.send_c_echo()
    assoc.release()
    took = time.perf_counter() - start
    return took if getattr(status, "Status", None) == 0 and took <= timeout else None


def _dataset_bytes(ds: pydicom.Dataset) -> bytes:
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, ds)
    return buf.getvalue()


def _pdata_pdus(ds: pydicom.Dataset, max_pdu: int = 16382) -> list[bytes]:
    """The P-DATA-TF PDUs a sender puts on the wire for one C-STORE of ``ds``."""
    primitive = C_STORE()
    primitive.MessageID = 1
    primitive.AffectedSOPClassUID = CTImageStorage
    primitive.AffectedSOPInstanceUID = ds.SOPInstanceUID
    primitive.Priority = 2
    primitive.DataSet = io.BytesIO(_dataset_bytes(ds))
    message = C_STORE_RQ()
    message.primitive_to_message(primitive)
    pdus = []
    for primitive_pdata in message.encode_msg(1, max_pdu):
        pdu = P_DATA_TF()
        pdu.from_primitive(primitive_pdata)
        pdus.append(bytes(pdu.encode()))
    return pdus


def _flip(data: bytes, rng: random.Random, count: int, start: int = 0) -> bytes:
    out = bytearray(data)
    for _ in range(count):
        i = rng.randrange(start, len(out))
        out[i] = rng.randrange(256)
    return bytes(out)


def _drain(sock: socket.socket, timeout: float) -> bytes:
    """Everything the node answers until it closes or ``timeout`` passes."""
    sock.settimeout(timeout)
    got = bytearray()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            chunk = sock.recv(65536)
            if not chunk:
                break
            got += chunk
    except OSError:
        pass
    return bytes(got)


def _associated(port: int) -> socket.socket | None:
    sock = socket.create_connection(("127.0.0.1", port), timeout=5)
    sock.sendall(associate_rq(calling=CALLING))
    head = b""
    try:
        while len(head) < 6:
            chunk = sock.recv(6 - len(head))
            if not chunk:
                break
            head += chunk
        if len(head) < 6 or head[0] != 0x02:
            sock.close()
            return None
        (length,) = struct.unpack(">I", head[2:6])
        body = b""
        while len(body) < length:
            chunk = sock.recv(length - len(body))
            if not chunk:
                break
            body += chunk
    except OSError:
        sock.close()
        return None
    return sock


def _outcome(answer: bytes) -> str:
    if not answer:
        return "closed"
    return {0x02: "associate-ac", 0x03: "associate-rj", 0x04: "p-data", 0x06: "release-rp",
            0x07: "a-abort"}.get(answer[0], f"pdu-0x{answer[0]:02x}")


def fuzz_case(kind: str, port: int, rng: random.Random, work: Path, tally: Tally) -> None:
    """Run one case of ``kind`` against the node on ``port`` and record what happened."""
    study, series = "1.2.826.0.1.3680043.8.498.7", generate_uid()
    ds = ct_slice(study, series, float(rng.randrange(200)), rng.randrange(200),
                  rows=64, cols=64)
    ds.PatientID, ds.PatientName = "CAMPAIGN", "Campaign^Fuzz"
    try:
        if kind == "random_bytes":
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(rng.randbytes(rng.randrange(1, 8192)))
                tally.note(kind, _outcome(_drain(sock, 4)))
        elif kind == "mutated_associate":
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                sock.sendall(_flip(associate_rq(calling=CALLING), rng, rng.randrange(1, 9)))
                answer = _drain(sock, 1.0)
                if answer[:1] == b"\x02":
                    sock.sendall(RELEASE_RQ)
                    answer += _drain(sock, 2)
                tally.note(kind, _outcome(answer))
        elif kind in ("mutated_pdata", "huge_pdu", "truncated_pdata", "drop_mid_pdu"):
            sock = _associated(port)
            if sock is None:
                tally.note(kind, "not-associated")
                return
            with sock:
                pdus = b"".join(_pdata_pdus(ds))
                if kind == "mutated_pdata":
                    sock.sendall(_flip(pdus, rng, rng.randrange(1, 17)))
                elif kind == "huge_pdu":
                    sock.sendall(b"\x04\x00\xff\xff\xff\xff" + rng.randbytes(65536))
                elif kind == "truncated_pdata":
                    sock.sendall(pdus[: rng.randrange(1, len(pdus))] + RELEASE_RQ)
                else:
                    sock.sendall(pdus[: rng.randrange(1, len(pdus))])
                    tally.note(kind, "dropped")
                    return
                tally.note(kind, _outcome(_drain(sock, 5)))
        elif kind == "trickle":
            with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
                request = associate_rq(calling=CALLING)
                sock.settimeout(0.25)
                sent, deadline = 0, time.monotonic() + 4
                try:
                    while sent < len(request) and time.monotonic() < deadline:
                        sock.send(request[sent:sent + 1])
                        sent += 1
                        try:
                            if sock.recv(1, socket.MSG_PEEK) == b"":
                                break
                        except TimeoutError:
                            pass
                    tally.note(kind, "cut" if sent < len(request) else "completed")
                except OSError:
                    tally.note(kind, "cut")
        elif kind in ("mutated_dataset", "valid_store"):
            path = work / f"{ds.SOPInstanceUID}.dcm"
            ds.save_as(path, enforce_file_format=True)
            if kind == "mutated_dataset":
                raw = path.read_bytes()
                meta_end = 132 + 12 + int.from_bytes(raw[140:144], "little")
                path.write_bytes(_flip(raw, rng, rng.randrange(1, 17), start=meta_end))
            ae = AE(ae_title=CALLING)
            ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
            ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
            assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
            if not assoc.is_established:
                tally.note(kind, "not-associated")
                path.unlink()
                return
            status = assoc.send_c_store(path)
            code = getattr(status, "Status", None)
            assoc.release()
            path.unlink()
            if code == 0:
                with tally.lock:
                    tally.acked.add(ds.SOPInstanceUID)
            elif kind == "valid_store":
                tally.failures.append(f"a valid store was answered {code!r}")
            tally.note(kind, "no-status" if code is None else f"status-0x{code:04x}")
        else:  # pragma: no cover - KINDS lists the kinds
            raise ValueError(kind)
    except Exception as exc:  # the client's own trouble is an outcome, not a node fault
        tally.note(kind, f"client-{type(exc).__name__}")


def check_store(node: NodeProcess, acked: set[str], tally: Tally, what: str) -> None:
    """Every acknowledged SOP instance indexed and readable; no temporary file left."""
    db = node.db()
    try:
        with db.session() as s:
            rows = {r.sop_uid: r.path for r in s.execute(select(Instance)).scalars()}
    finally:
        db.dispose()
    lost = [uid for uid in acked if uid not in rows]
    unreadable = []
    for uid in acked:
        if uid in rows:
            try:
                stored = pydicom.dcmread(node.data_dir / "spool" / rows[uid],
                                         stop_before_pixels=True).SOPInstanceUID
                if stored != uid:
                    unreadable.append(f"{uid} stored as {stored}")
            except Exception as exc:
                unreadable.append(f"{uid} ({rows[uid]}): {type(exc).__name__}: {exc}")
    tmp_dir = node.data_dir / "spool" / "tmp"
    # Stores still inside their PDU timeout may hold a partial file for a few seconds.
    _wait_for(lambda: not any(tmp_dir.glob("*")), 10, poll=0.2)
    tmp = list(tmp_dir.glob("*"))
    tally.lost += len(lost) + len(unreadable)
    tally.leftover_tmp += len(tmp)
    if lost or unreadable or tmp:
        tally.failures.append(f"{what}: {len(lost)} lost, {len(unreadable)} unreadable, "
                              f"{len(tmp)} temp files")
        tally.failures.extend(f"  unreadable: {u}" for u in unreadable[:5])


def fuzz_batches(node: NodeProcess, cases: int, batch: int, rng: random.Random, work: Path,
                 tally: Tally, threads: int = 8) -> None:
    """``cases`` fuzz cases in batches; the node must be up and echo after each batch."""
    done = 0
    while done < cases:
        n = min(batch, cases - done)
        seeds = [rng.randrange(2**32) for _ in range(n)]
        kinds = [rng.choice(KINDS) for _ in range(n)]
        with ThreadPoolExecutor(threads) as pool:
            list(pool.map(lambda a: fuzz_case(a[0], node.port, random.Random(a[1]), work, tally),
                          zip(kinds, seeds, strict=True)))
        done += n
        tally.batches += 1
        took = echo_seconds(node.port) if node.alive() else None
        if took is None:
            tally.failures.append(f"batch {tally.batches}: node down or no echo within 5 s")
            if not node.alive():
                node.start()
        else:
            tally.up_after_batch += 1
            tally.echo_s.append(took)
        tally.rss_mb.append(node.rss_mb())
        print(f"batch {tally.batches}: {done}/{cases} cases, echo "
              f"{'-' if took is None else f'{took * 1000:.0f} ms'}, RSS {tally.rss_mb[-1]:.0f} MB",
              flush=True)


def _send_files(port: int, files: list[Path], acked: set[str],
                stop: threading.Event | None = None) -> None:
    ae = AE(ae_title=CALLING)
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    try:
        assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    except OSError:
        return
    if not assoc.is_established:
        return
    for path in files:
        if stop is not None and stop.is_set():
            break
        try:
            status = assoc.send_c_store(path)
        except Exception:
            break
        if not assoc.is_established or getattr(status, "Status", None) != 0:
            break
        acked.add(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
    if assoc.is_established:
        assoc.release()


def _wait_for(predicate: Any, timeout: float, poll: float = 0.05) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(poll)
    return False


def _job_state(node: NodeProcess) -> tuple[int, int, int]:
    """(running jobs, finished jobs, deliveries being sent) in the node's index."""
    db = node.db()
    try:
        with db.session() as s:
            jobs = list(s.execute(select(Job)).scalars())
            sending = [d for d in s.execute(select(Delivery)).scalars() if d.state == "sending"]
    except Exception:
        return 0, 0, 0
    finally:
        db.dispose()
    return (sum(j.state == "running" for j in jobs),
            sum(j.state in ("done", "no_result", "failed") for j in jobs), len(sending))


def result_series_duplicates(received: Path) -> int:
    """Study versions with two result series of one modality at the receiving peer."""
    series: dict[tuple[str, str], set[str]] = collections.defaultdict(set)
    for path in received.rglob("*"):
        if not path.is_file():
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:
            continue
        if ds.Modality == "CT":
            continue
        series[(ds.StudyInstanceUID, ds.Modality)].add(ds.SeriesInstanceUID)
    return sum(len(uids) - 1 for uids in series.values() if len(uids) > 1)


def kill_campaign(node: NodeProcess, kills: int, rng: random.Random, work: Path,
                  tally: Tally, abdomen: list[Path],
                  phases: tuple[str, ...] = ("ingest", "processing", "export")) -> None:
    """``kills`` SIGKILLs at random points of ingest, processing and export."""
    for k in range(kills):
        phase = phases[k % len(phases)] if abdomen else "ingest"
        acked: set[str] = set()
        if phase == "ingest":
            study, series = generate_uid(), generate_uid()
            files = []
            for i in range(120):
                ds = ct_slice(study, series, float(i), i, rows=128, cols=128)
                path = work / "ingest" / f"{k}-{i}.dcm"
                path.parent.mkdir(exist_ok=True)
                ds.save_as(path, enforce_file_format=True)
                files.append(path)
            sender = threading.Thread(target=_send_files, args=(node.port, files, acked))
            sender.start()
            time.sleep(rng.uniform(0.05, 1.5))
            node.kill()
            sender.join(30)
            shutil.rmtree(work / "ingest")
        else:
            study = _copy_study(abdomen, work / f"study-{k}")
            _send_files(node.port, study, acked)
            if phase == "processing":
                hit = _wait_for(lambda: _job_state(node)[0] > 0, 60)
                time.sleep(rng.uniform(0.0, 4.0))
            else:
                hit = _wait_for(lambda: _job_state(node)[2] > 0, 120, poll=0.005)
                time.sleep(rng.uniform(0.0, 0.05))
            node.kill()
            if not hit:
                tally.kills[f"{phase} (state not seen before the kill)"] += 1
        tally.kills[phase] += 1
        node.start()
        check_store(node, acked, tally, f"kill {k + 1} ({phase})")
        print(f"kill {k + 1}/{kills} during {phase}: {len(acked)} acknowledged, checked",
              flush=True)


def _copy_study(files: list[Path], out: Path) -> list[Path]:
    """The abdomen series as a new study (new study, series and SOP instance UIDs)."""
    out.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    copies = []
    for path in files:
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        copy = out / path.name
        ds.save_as(copy, enforce_file_format=True)
        copies.append(copy)
    return copies


def full_disk(work: Path, peer_port: int, tally: Tally) -> str:
    """Fill a node whose data folder is a 48 MB tmpfs; it must refuse, not lose or die."""
    mount = work / "tmpfs"
    mount.mkdir()
    made = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount)],
                          capture_output=True)
    if made.returncode != 0:
        return "skipped (mounting a tmpfs needs root)"
    node = NodeProcess(work, peer_port, data_dir=mount / "var")
    try:
        node.start()
        acked: set[str] = set()
        study, series = generate_uid(), generate_uid()
        files = []
        for i in range(160):  # 160 x 512 KB is more than the tmpfs holds
            path = work / "full" / f"{i}.dcm"
            path.parent.mkdir(exist_ok=True)
            ct_slice(study, series, float(i), i, rows=512, cols=512).save_as(
                path, enforce_file_format=True)
            files.append(path)
        _send_files(node.port, files, acked)
        up = echo_seconds(node.port) is not None
        check_store(node, acked, tally, "full disk")
        if not up:
            tally.failures.append("full disk: no echo after the disk filled")
        return f"{len(acked)} of {len(files)} acknowledged before the disk was full, node up: {up}"
    finally:
        node.stop()
        subprocess.run(["umount", str(mount)], capture_output=True)


def peer_echo(work: Path) -> float:
    """Median C-ECHO time against dcmtk's storescp (the ratio's peer)."""
    port = free_port()
    proc = subprocess.Popen(["storescp", "--aetitle", "DICOMNODE", "--output-directory",
                             str(work), str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        wait_port(port)
        times = [t for t in (echo_seconds(port) for _ in range(5)) if t is not None]
    finally:
        proc.terminate()
        proc.wait(10)
    return sorted(times)[len(times) // 2]


def main(argv: list[str] | None = None) -> int:
    """Run the campaign; print the summary; 1 when a check failed."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fuzz-cases", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--kills", type=int, default=20)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--no-processing", action="store_true",
                        help="kill only during ingest (no liver jobs: faster)")
    parser.add_argument("--full-disk", action="store_true",
                        help="also fill a node on a small tmpfs (needs root)")
    parser.add_argument("--phases", default="ingest,processing,export",
                        help="where the kills fall, in turn")
    parser.add_argument("--keep", type=Path, help="keep the work folder here (debugging)")
    parser.add_argument("--json", type=Path, help="also write the summary here")
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    tally = Tally()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="campaign-") as tmp:
        work = Path(tmp)
        received = work / "received"
        received.mkdir()
        peer_port = free_port()
        receiver = subprocess.Popen(["storescp", "--aetitle", CALLING, "--output-directory",
                                 str(received), "--promiscuous", str(peer_port)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        node = NodeProcess(work, peer_port)
        try:
            wait_port(peer_port)
            node.start()
            fuzz_batches(node, args.fuzz_cases, args.batch, rng, work, tally)
            check_store(node, tally.acked, tally, "after the fuzz batches")
            abdomen: list[Path] = []
            if args.kills and not args.no_processing:
                phantom = make_phantom("abdomen", seed=7, matrix=256, spacing=(2.5, 1.6, 1.6))
                abdomen = sorted(p for p in write_phantom(phantom, work / "abdomen")
                                 if p.suffix == ".dcm")
            kill_campaign(node, args.kills, rng, work, tally, abdomen,
                          tuple(args.phases.split(",")))
            check_store(node, tally.acked, tally, "after the kills")
            if abdomen:  # let the last jobs and deliveries finish before counting
                _wait_for(lambda: _job_state(node)[0] == 0 and _job_state(node)[2] == 0, 180, 1)
                time.sleep(3)
            tally.duplicate_result_series = result_series_duplicates(received)
            disk = full_disk(work, peer_port, tally) if args.full_disk else "not run"
            (work / "peer").mkdir()
            peer = peer_echo(work / "peer")
            if args.keep:
                node.stop()
                shutil.copytree(work, args.keep, dirs_exist_ok=True)
        finally:
            node.stop()
            receiver.terminate()
            receiver.wait(10)
    if tally.duplicate_result_series:
        tally.failures.append(f"{tally.duplicate_result_series} duplicate result series")
    growth = tally.rss_mb[-1] - tally.rss_mb[0] if tally.rss_mb else 0.0
    if growth >= 100:
        tally.failures.append(f"RSS grew {growth:.0f} MB")
    echo_median = sorted(tally.echo_s)[len(tally.echo_s) // 2] if tally.echo_s else float("nan")
    summary = {
        "cases": sum(tally.cases.values()), "by_kind": dict(tally.cases),
        "outcomes": dict(tally.outcomes), "batches": tally.batches,
        "node_up_after_batch": tally.up_after_batch,
        "echo_after_batch_s": {"median": round(echo_median, 3),
                               "max": round(max(tally.echo_s, default=float("nan")), 3)},
        "echo_ratio_vs_storescp": round(echo_median / peer, 2) if peer else None,
        "kills": dict(tally.kills), "acknowledged_fuzz_stores": len(tally.acked),
        "lost": tally.lost, "leftover_temp_files": tally.leftover_tmp,
        "duplicate_result_series": tally.duplicate_result_series,
        "rss_mb": {"after_first_batch": round(tally.rss_mb[0], 1) if tally.rss_mb else None,
                   "last": round(tally.rss_mb[-1], 1) if tally.rss_mb else None},
        "full_disk": disk, "failures": tally.failures,
        "minutes": round((time.monotonic() - started) / 60, 1),
    }
    text = json.dumps(summary, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text)
    return 1 if tally.failures else 0


if __name__ == "__main__":
    sys.exit(main())
