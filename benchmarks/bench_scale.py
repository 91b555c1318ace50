"""Scaled out against embedded: abdomen studies per minute, and an urgent study's wait.

``--studies`` abdomen phantoms (the same images under new UIDs) are sent in one
association with dcmtk ``storescu``; right after them a non-contrast head phantom, which
routing makes an urgent ``brain_ich`` job. Two set-ups in the same run, on the same
files:

- **embedded**, the peer: one ``dicomnode serve`` process as shipped (SQLite, one worker
  thread and the urgent lane);
- **scaled**: the node with ``executor: celery`` on PostgreSQL and RabbitMQ (Debian's,
  started here on loopback ports), and ``--workers`` ``dicomnode worker`` processes.

Figures: studies per minute (last abdomen instance acknowledged -> last liver job
finished), their ratio scaled / embedded, and the urgent head study's queue wait (its
last instance acknowledged -> its urgent job started). The workers share this machine's
cores with the node: on 2 cores the gain is bounded by the cores, while the design's
gain is one worker per GPU server.

Run: ``.venv/bin/python benchmarks/bench_scale.py [--studies 20] [--workers 2]
[--matrix 256] [--slices 120]``.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pydicom
import yaml
from kombu import Connection

from benchmarks.bench_end_to_end import _copy_as_new_study
from benchmarks.bench_ingest import free_port
from benchmarks.bench_urgent_wait import _poll, _send
from dicomnode.config import load_settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.workflow.jobs import PRIORITY
from tests.postgres import postgres_server
from tests.rabbitmq import rabbitmq_server


def _consumers(url: str, queue: str) -> int:
    """Workers consuming ``queue`` (0 before the first worker declared it)."""
    try:
        with Connection(url) as conn:
            return int(conn.default_channel.queue_declare(queue, passive=True).consumer_count)
    except Exception:  # not declared yet
        return 0


def _measure(node: Node, abdomen: list[list[Path]], head: list[Path]) -> dict[str, Any]:
    """Send the abdomen studies, then the head study; wait for every job to end."""
    head_uid = str(pydicom.dcmread(head[0], stop_before_pixels=True).StudyInstanceUID)
    acked = _send(node, [f for study in abdomen for f in study])
    head_acked = _send(node, head)
    rows = _poll(node, lambda rows: sum(
        r["pipeline"] == "liver_tumor" and r["finished_at"] is not None for r in rows)
        == len(abdomen) and any(r["study_uid"] == head_uid and r["priority"] ==
                                PRIORITY["urgent"] and r["finished_at"] for r in rows),
        timeout=3600, every=1.0)
    liver = [r for r in rows if r["pipeline"] == "liver_tumor"]
    (urgent,) = [r for r in rows if r["study_uid"] == head_uid
                 and r["priority"] == PRIORITY["urgent"]]
    last = max(r["finished_at"] for r in liver)
    minutes = (last - acked).total_seconds() / 60
    return {"per_minute": len(abdomen) / minutes, "minutes": minutes,
            "states": sorted({r["state"] for r in liver}),
            "workers": len({r["worker"] for r in liver}),
            "urgent_wait_s": (urgent["started_at"] - head_acked).total_seconds(),
            "urgent_state": urgent["state"], "urgent_reason": urgent["reason"] or ""}


def embedded(work: Path, abdomen: list[list[Path]], head: list[Path]) -> dict[str, Any]:
    """The single process as shipped: SQLite, one worker thread and the urgent lane."""
    settings = load_settings(None, port=free_port(), bind_address="127.0.0.1",
                             data_dir=work / "embedded", disk_reserve_mb=0,
                             log_level="WARNING")
    node = Node(settings)
    node.start()
    try:
        node.runner.warmed.wait(300)
        return _measure(node, abdomen, head)
    finally:
        node.stop()


def scaled(work: Path, abdomen: list[list[Path]], head: list[Path], workers: int,
           ) -> dict[str, Any]:
    """The node on PostgreSQL + RabbitMQ and ``workers`` worker processes."""
    with postgres_server() as pg, rabbitmq_server() as mq:
        common = {"data_dir": str(work / "scaled"), "database_url": pg.create_database(),
                  "executor": "celery", "broker_url": mq.url, "disk_reserve_mb": 0,
                  "log_level": "WARNING"}
        config = work / "scaled.yaml"
        config.write_text(yaml.safe_dump({**common, "seg_writer_process": False}))
        settings = load_settings(None, port=free_port(), bind_address="127.0.0.1", **common)
        node = Node(settings)
        node.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("DICOMNODE_")}
        env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
        procs = [subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "worker",
                                   "--config", str(config)], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                 for _ in range(workers)]
        try:
            # every worker warm and consuming before the first study
            deadline = time.monotonic() + 600
            while _consumers(mq.url, settings.celery.queue) < workers:
                if time.monotonic() > deadline:
                    sys.exit("the workers did not start")
                time.sleep(1)
            return _measure(node, abdomen, head)
        finally:
            for proc in procs:
                proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(120)
                except subprocess.TimeoutExpired:
                    proc.kill()
            node.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20, help="Abdomen studies.")
    parser.add_argument("--workers", type=int, default=2, help="Worker processes.")
    parser.add_argument("--matrix", type=int, default=256, help="Abdomen in-plane matrix.")
    parser.add_argument("--slices", type=int, default=120, help="Abdomen slices.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        work = Path(tmp)
        phantom = make_phantom("abdomen", seed=21, slices=args.slices, matrix=args.matrix)
        first = sorted(p for p in write_phantom(phantom, work / "abdomen")
                       if p.suffix == ".dcm")
        head = sorted(p for p in write_phantom(make_phantom("head", seed=5, matrix=256),
                                               work / "head") if p.suffix == ".dcm")
        runs = {}
        for name in ("embedded", "scaled"):  # fresh UIDs per set-up: fresh studies
            studies = [_copy_as_new_study(first, work / name / "in" / str(k))
                       for k in range(args.studies)]
            urgent = _copy_as_new_study(head, work / name / "in" / "head")
            runs[name] = (embedded(work, studies, urgent) if name == "embedded"
                          else scaled(work, studies, urgent, args.workers))
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M")
    print(f"scale-out ({when} UTC, {os.cpu_count()} cores): {args.studies} abdomen phantoms "
          f"{args.matrix}x{args.matrix}x{len(first)} (liver_tumor), then a head phantom "
          "(brain_ich, urgent)")
    for name, label in (("embedded", "embedded (SQLite, 1 worker thread + urgent lane)"),
                        ("scaled", f"scaled (PostgreSQL, RabbitMQ, {args.workers} workers)")):
        r = runs[name]
        print(f"  {label}: {r['per_minute']:.2f} studies/min ({r['minutes']:.2f} min; "
              f"liver jobs {','.join(r['states'])} on {r['workers']} worker(s)); urgent "
              f"study waited {r['urgent_wait_s']:.2f} s ({r['urgent_state']}"
              f"{', ' + r['urgent_reason'] if r['urgent_reason'] else ''})")
    ratio = runs["scaled"]["per_minute"] / runs["embedded"]["per_minute"]
    print(f"  ratio scaled / embedded: {ratio:.2f}x studies per minute")


if __name__ == "__main__":
    main()
