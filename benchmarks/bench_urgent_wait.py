"""Urgent study's wait behind a running normal job: with the urgent lane and without.

A node with the default workers (one thread that takes any job) receives abdomen
phantoms over C-STORE (dcmtk ``storescu``); the real ``liver_tumor`` pipeline runs on
the first, the others queue. ``--delay`` seconds after that liver job started, a
non-contrast head phantom arrives; routing gives it ``brain_ich`` at ``urgent``
priority. The figure is the urgent study's wait: last instance acknowledged -> its
urgent pipeline job started (the node has routed it and begun the model). It is
measured twice in the same process, on fresh nodes over the same files:
``urgent_workers: 1`` (the lane) and ``urgent_workers: 0`` (the peer: no lane, the
urgent job takes the next free worker, ahead of the queued liver studies but after the
running one). The ratio is without / with.

Where ``brain_ich`` is not installed its job ends at once as "not installed"; the
wait to its start is the same either way, and the line says which it was.

Run: ``.venv/bin/python benchmarks/bench_urgent_wait.py [--matrix 256] [--slices 120]
[--studies 3] [--delay 1.0] [--rounds 1]``.
"""

from __future__ import annotations

import argparse
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
from dicomnode.config import load_settings
from dicomnode.node import Node
from dicomnode.phantoms import make_phantom, write_phantom
from dicomnode.store.models import Job, Study
from dicomnode.workflow.jobs import PRIORITY


def _utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is not None:
        return value
    return value.replace(tzinfo=UTC)


def _jobs(node: Node) -> list[dict[str, Any]]:
    with node.db.session() as session:
        return [{"study_uid": study_uid, "pipeline": job.pipeline, "priority": job.priority,
                 "state": job.state, "reason": job.reason, "worker": job.worker or "",
                 "timings": job.timings or {},
                 "started_at": _utc(job.started_at), "finished_at": _utc(job.finished_at)}
                for job, study_uid in session.execute(
                    select(Job, Study.study_uid).join(Study, Job.study_pk == Study.id)
                    .order_by(Job.id))]


def _poll(node: Node, done: Any, timeout: float = 1800, every: float = 0.2) -> list[dict[str, Any]]:
    """Job rows once ``done(rows)``; polled gently (the node runs in this process)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = _jobs(node)
        if done(rows):
            return rows
        if time.monotonic() > deadline:
            sys.exit(f"timed out: {rows}")
        time.sleep(every)


def _send(node: Node, files: list[Path]) -> datetime:
    subprocess.run(["storescu", "-aec", node.settings.ae_title, "127.0.0.1",
                    str(node.scp.port), *map(str, files)],
                   env=ENV, check=True, capture_output=True, timeout=600)
    return datetime.now(UTC)


def one_run(work: Path, abdomen: list[list[Path]], head: list[Path], urgent_workers: int,
            delay: float) -> dict[str, Any]:
    """One fresh node: liver studies, then the head study ``delay`` s into the first."""
    settings = load_settings(None, port=free_port(), bind_address="127.0.0.1",
                             data_dir=work / f"node-lane{urgent_workers}", disk_reserve_mb=0,
                             log_level="WARNING", urgent_workers=urgent_workers)
    head_uid = str(pydicom.dcmread(head[0], stop_before_pixels=True).StudyInstanceUID)
    node = Node(settings)
    node.start()
    try:
        node.runner.warmed.wait(300)
        _send(node, [f for study in abdomen for f in study])
        rows = _poll(node, lambda rows: any(r["pipeline"] == "liver_tumor" and r["started_at"]
                                            for r in rows), every=0.05)
        time.sleep(delay)
        acked = _send(node, head)
        rows = _poll(node, lambda rows: any(
            r["study_uid"] == head_uid and r["priority"] == PRIORITY["urgent"]
            and r["finished_at"] for r in rows))
        # the liver job that was running when the head study arrived, to its end
        liver = _poll(node, lambda rows: next(r for r in rows if r["pipeline"] == "liver_tumor"
                                              )["finished_at"] is not None)
    finally:
        node.stop()
    (urgent,) = [r for r in rows if r["study_uid"] == head_uid
                 and r["priority"] == PRIORITY["urgent"]]
    (routing,) = [r for r in rows if r["study_uid"] == head_uid and r["pipeline"] is None]
    running = next(r for r in liver if r["pipeline"] == "liver_tumor")
    queued_started = [r["started_at"] for r in liver if r["pipeline"] == "liver_tumor"
                      and r["started_at"] and r is not running]
    return {
        "wait_s": (urgent["started_at"] - acked).total_seconds(),
        "routed_s": (routing["finished_at"] - acked).total_seconds(),
        "finished_s": (urgent["finished_at"] - acked).total_seconds(),
        "urgent": urgent,
        "liver_s": (running["finished_at"] - running["started_at"]).total_seconds(),
        "liver_stages": running["timings"],
        "liver_left_s": (running["finished_at"] - acked).total_seconds(),
        "ahead_of_queue": all(urgent["started_at"] < t for t in queued_started),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--matrix", type=int, default=256, help="Abdomen in-plane matrix.")
    parser.add_argument("--slices", type=int, default=120, help="Abdomen slices.")
    parser.add_argument("--studies", type=int, default=3, help="Abdomen studies queued.")
    parser.add_argument("--rounds", type=int, default=1,
                        help="Runs of each, alternating which goes first.")
    parser.add_argument("--delay", type=float, default=1.0,
                        help="Seconds into the running liver job when the head study is sent.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-urgent-") as tmp:
        work = Path(tmp)
        phantom = make_phantom("abdomen", seed=21, slices=args.slices, matrix=args.matrix)
        first = sorted(p for p in write_phantom(phantom, work / "abdomen0")
                       if p.suffix == ".dcm")
        abdomen = [first] + [_copy_as_new_study(first, work / f"abdomen{k}")
                             for k in range(1, args.studies)]
        head = sorted(p for p in write_phantom(make_phantom("head", seed=5, matrix=256),
                                               work / "head") if p.suffix == ".dcm")
        runs: dict[int, list[dict[str, Any]]] = {1: [], 0: []}
        for n in range(args.rounds):
            # alternate which goes first (this machine's load drifts); the same images
            # under new UIDs each run: a fresh node, a fresh study
            for lane in (1, 0) if n % 2 == 0 else (0, 1):
                where = work / f"round{n}-lane{lane}"
                runs[lane].append(one_run(
                    where, [_copy_as_new_study(s, where / str(k))
                            for k, s in enumerate(abdomen)],
                    _copy_as_new_study(head, where / "head"), lane, args.delay))
    print(f"urgent wait: {args.studies} abdomen phantoms {args.matrix}x{args.matrix}x"
          f"{len(first)} (liver_tumor, workers 1), head phantom {len(head)} slices sent "
          f"{args.delay:.1f} s into the first liver job, {args.rounds} round(s)")
    for lane, label in ((1, "with the urgent lane (urgent_workers 1)"),
                        (0, "without (urgent_workers 0), the peer")):
        print(f"  {label}:")
        for r in runs[lane]:
            u = r["urgent"]
            print(f"    last ack -> urgent job started {r['wait_s']:7.2f} s  "
                  f"(routed {r['routed_s']:.2f} s, ended {r['finished_s']:.2f} s: "
                  f"{u['state']}{', ' + u['reason'] if u['reason'] else ''}; "
                  f"worker {u['worker']})")
            print(f"      running liver job: {r['liver_s']:.2f} s in all, "
                  f"{r['liver_left_s']:.2f} s left at the ack; urgent ahead of every "
                  f"queued liver study: {r['ahead_of_queue']}")
            print("      its stages: " + ", ".join(
                f"{k} {v:.2f}" for k, v in r["liver_stages"].items()
                if isinstance(v, int | float) and not k.startswith("pipeline.")))
    with_lane = statistics.median(r["wait_s"] for r in runs[1])
    without = statistics.median(r["wait_s"] for r in runs[0])
    print(f"  median wait: with the lane {with_lane:.2f} s, without {without:.2f} s; "
          f"ratio without / with {without / with_lane:.1f}x")


if __name__ == "__main__":
    main()
