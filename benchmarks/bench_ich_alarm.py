"""Haemorrhage alarm latency: last instance acknowledged -> urgent webhook received.

A node with the default workers (``workers: 1``, ``urgent_workers: 1``), warmed, its
results going back to Orthanc, one webhook to an HTTP receiver in this process
(``tests/webhook.py``: http.server on loopback). A 5 mm routine head CT of 40 slices
(phantom seed 3003, a subdural bleed; ``--matrix`` 512 as a scanner writes it) is sent
with dcmtk ``storescu`` under Orthanc's calling AE. The figure is the time from
storescu's exit (every instance acknowledged) to the webhook's request arriving at the
receiver, measured:

- on an idle node (``--rounds`` times, the same images under new UIDs each time);
- while an abdomen job runs: an abdomen phantom (``liver_tumor``) is sent first and the
  head study ``--delay`` s after its job started.

Peers in the same process: the same head study's C-STORE into Orthanc (storescu start
-> exit; how long the PACS itself takes to take the study in), and the running abdomen
job's own time. Ratios: idle alarm / Orthanc C-STORE, busy alarm / abdomen job.

Run: ``.venv/bin/python benchmarks/bench_ich_alarm.py [--matrix 512] [--rounds 3]
[--abdomen-slices 120] [--delay 1.0]``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
from sqlalchemy import select

from benchmarks.bench_end_to_end import _copy_as_new_study
from benchmarks.bench_ingest import ENV, free_port
from dicomnode.config import Peer, Webhook, load_settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.store.models import Job, Study
from tests.peers import orthanc
from tests.webhook import WebhookReceiver

HEAD_SEED = 3003


def _storescu(port: int, aec: str, files: list[Path]) -> float:
    """Send ``files`` as ORTHANC; returns time.time() at storescu's exit."""
    subprocess.run(["storescu", "-aet", "ORTHANC", "-aec", aec, "127.0.0.1", str(port),
                    *map(str, files)], env=ENV, check=True, capture_output=True, timeout=600)
    return time.time()


def _utc(value: datetime | None) -> float | None:
    if value is None:
        return None
    return (value if value.tzinfo else value.replace(tzinfo=UTC)).timestamp()


def _stages(node: Node, study_uid: str, acked: float) -> dict[str, Any]:
    """Seconds after the ack: completed, routed, urgent job started / finished."""
    with node.db.session() as session:
        study = session.execute(select(Study).where(Study.study_uid == study_uid)).scalar_one()
        jobs = list(session.execute(select(Job).where(Job.study_pk == study.id)
                                    .order_by(Job.id)).scalars())
        out: dict[str, Any] = {"completed": (_utc(study.completed_at) or acked) - acked}
        for job in jobs:
            name = job.pipeline or "routing"
            out[f"{name}.started"] = (_utc(job.started_at) or acked) - acked
            out[f"{name}.finished"] = (_utc(job.finished_at) or acked) - acked
            if job.pipeline:
                out["timings"] = job.timings or {}
                out["reason"] = job.reason or ""
    return out


def _wait(predicate: Any, timeout: float = 900, every: float = 0.05) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            sys.exit("timed out")
        time.sleep(every)


def _liver(node: Node) -> dict[str, float | None]:
    with node.db.session() as session:
        job = session.execute(select(Job).where(Job.pipeline == "liver_tumor")
                              .order_by(Job.id.desc()).limit(1)).scalar_one_or_none()
        if job is None:
            return {}
        return {"started": _utc(job.started_at), "finished": _utc(job.finished_at)}


def _not_routed(node: Node) -> None:
    """Exit with the reason when a study ended without a pipeline job (nothing to wait for)."""
    with node.db.session() as session:
        for job in session.execute(select(Job).where(Job.state == "no_result",
                                                     Job.pipeline.is_(None))).scalars():
            sys.exit(f"a study was not routed: {job.reason}")


def _alarm(node: Node, receiver: WebhookReceiver, files: list[Path]) -> dict[str, Any]:
    uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).StudyInstanceUID)
    seen = len(receiver.requests)
    acked = _storescu(node.scp.port, node.settings.ae_title, files)
    (request,) = [r for r in receiver.wait_for(seen + 1, timeout=900)[seen:]]
    assert request.body["study_instance_uid"] == uid
    return {"alarm_s": request.at - acked, "stages": _stages(node, uid, acked),
            "p_any": next(f["probability"] for f in request.body["findings"]
                          if f["finding"] == "any")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=int, default=512, help="Head in-plane matrix.")
    parser.add_argument("--rounds", type=int, default=3, help="Idle-node runs.")
    parser.add_argument("--abdomen-slices", type=int, default=120)
    parser.add_argument("--abdomen-matrix", type=int, default=256)
    parser.add_argument("--delay", type=float, default=1.0,
                        help="Seconds into the abdomen job when the head study is sent.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-ich-alarm-") as tmp:
        work = Path(tmp)
        head = sorted(p for p in write_phantom(
            make_phantom("head", HEAD_SEED, matrix=args.matrix, slices=40, spacing=5.0),
            work / "head") if p.suffix == ".dcm")
        abdomen = sorted(p for p in write_phantom(
            make_phantom("abdomen", seed=21, slices=args.abdomen_slices,
                         matrix=args.abdomen_matrix), work / "abdomen") if p.suffix == ".dcm")
        receiver = WebhookReceiver().start()
        with orthanc(work / "orthanc") as pacs:
            settings = load_settings(
                None, port=free_port(), bind_address="127.0.0.1", data_dir=work / "node",
                disk_reserve_mb=0, log_level="WARNING",
                peers={"ORTHANC": Peer(host="127.0.0.1", port=int(pacs["dicom_port"]))},
                notify={"webhooks": [Webhook(url=receiver.url)]})
            node = Node(settings)
            node.start()
            try:
                node.runner.warmed.wait(300)
                idle, peers = [], []
                for n in range(args.rounds):
                    # the PACS peer first, then the node: the same images, new UIDs each
                    copy = _copy_as_new_study(head, work / f"orthanc{n}")
                    started = time.time()
                    peers.append(_storescu(int(pacs["dicom_port"]), str(pacs["aet"]), copy)
                                 - started)
                    idle.append(_alarm(node, receiver, _copy_as_new_study(
                        head, work / f"idle{n}")))
                _storescu(node.scp.port, settings.ae_title,
                          _copy_as_new_study(abdomen, work / "abdomen-copy"))
                _wait(lambda: _liver(node).get("started") or _not_routed(node))
                time.sleep(args.delay)
                busy = _alarm(node, receiver, _copy_as_new_study(head, work / "busy"))
                liver = _wait(lambda: _liver(node) if _liver(node).get("finished") else None)
                busy_at = busy["stages"]
            finally:
                node.stop()
                receiver.stop()
    load = os.getloadavg()
    print(f"ICH alarm: head phantom seed {HEAD_SEED}, {len(head)} slices 5 mm "
          f"{args.matrix}x{args.matrix}, last ack -> webhook received; load average "
          f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    for r, peer in zip(idle, peers, strict=True):
        s = r["stages"]
        print(f"  idle: {r['alarm_s']:6.2f} s  (completed {s['completed']:.2f}, routed "
              f"{s['routing.finished']:.2f}, brain_ich {s['brain_ich.started']:.2f} -> "
              f"{s['brain_ich.finished']:.2f}; p(any) {r['p_any']:.4f}); Orthanc C-STORE of "
              f"the same study {peer:.2f} s")
        print("        stages: " + ", ".join(f"{k} {v:.2f}" for k, v in s["timings"].items()
                                             if not k.startswith("pipeline.")))
    liver_s = (liver["finished"] or 0) - (liver["started"] or 0)
    print(f"  busy: {busy['alarm_s']:6.2f} s  (routed {busy_at['routing.finished']:.2f}, "
          f"brain_ich {busy_at['brain_ich.started']:.2f} -> "
          f"{busy_at['brain_ich.finished']:.2f}); the abdomen job "
          f"({len(abdomen)} slices {args.abdomen_matrix}x{args.abdomen_matrix}) ran "
          f"{liver_s:.2f} s in all")
    print("        stages: " + ", ".join(f"{k} {v:.2f}" for k, v in busy_at["timings"].items()
                                         if not k.startswith("pipeline.")))
    med_idle = statistics.median(r["alarm_s"] for r in idle)
    med_peer = statistics.median(peers)
    print(f"  median idle alarm {med_idle:.2f} s (target <= 15 s); ratio to Orthanc's "
          f"C-STORE of the study {med_idle / med_peer:.2f}x")
    print(f"  busy alarm {busy['alarm_s']:.2f} s (target <= 30 s); ratio to the running "
          f"abdomen job {busy['alarm_s'] / liver_s:.2f}x")


if __name__ == "__main__":
    main()
