"""The ``dicomnode`` command line: serve, status, process, phantom, encode, train, bench."""

from __future__ import annotations

import json
import signal
from pathlib import Path
from typing import Annotated, Any

import typer

app = typer.Typer(
    name="dicomnode",
    help="A DICOM AI node for CT studies.",
    no_args_is_help=True,
    add_completion=False,
)


@app.callback()
def _root() -> None:
    """A DICOM AI node for CT studies."""


@app.command()
def version() -> None:
    """Print the dicomnode version."""
    from dicomnode import __version__

    typer.echo(__version__)


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file (default: DICOMNODE_CONFIG or the "
                 "embedded default).", dir_okay=False),
]


def _settings(config: Path | None, **overrides: Any) -> Any:
    from dicomnode.config import load_settings

    try:
        return load_settings(config, **{k: v for k, v in overrides.items() if v is not None})
    except ValueError as exc:
        typer.echo(f"dicomnode: configuration error: {exc}", err=True)
        raise typer.Exit(2) from exc


@app.command()
def serve(
    config: ConfigOption = None,
    port: Annotated[int | None, typer.Option(help="Override the listening port.")] = None,
    ae_title: Annotated[str | None, typer.Option(help="Override the AE title.")] = None,
    data_dir: Annotated[Path | None, typer.Option(help="Override the data directory.")] = None,
) -> None:
    """Run the node: listen for C-STORE, detect complete studies, process, send back."""
    from dicomnode.logs import configure_logging
    from dicomnode.node import Node

    settings = _settings(config, port=port, ae_title=ae_title, data_dir=data_dir)
    configure_logging(settings.log_level, settings.log_format)
    node = Node(settings)

    def _stop(signum: int, _frame: Any) -> None:
        node.stop()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    try:
        node.start()
    except OSError as exc:
        typer.echo(f"dicomnode: cannot start: {exc}", err=True)
        node.stop()
        raise typer.Exit(1) from exc
    typer.echo(f"dicomnode: {settings.ae_title} listening on {settings.bind_address}:"
               f"{node.scp.port}, data in {settings.data_dir}", err=True)
    node.wait()


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many of each.")] = 100,
) -> None:
    """Print studies, jobs and deliveries with their states."""
    from dicomnode.store.db import Database
    from dicomnode.store.status import node_status

    settings = _settings(config)
    db = Database(settings.db_url)
    db.upgrade()
    report = node_status(db, limit)
    db.dispose()
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['totals']['studies']} studies, {report['totals']['jobs']} jobs, "
               f"{report['totals']['deliveries']} deliveries")
    if report["pipelines"]:
        for name, state in sorted(report["pipelines"]["states"].items()):
            typer.echo(f"  pipeline {name:<14} {state}")
    for st in report["studies"]:
        typer.echo(f"  study {st['study_uid']}  {st['state']:<9} v{st['version']} "
                   f"{st['instances']:>5} instances  trigger={st['completion_trigger']}  "
                   f"from {st['calling_aet'] or '-'}")
    from dicomnode.workflow.routing import explain

    for job in report["jobs"]:
        typer.echo(f"  job {job['id']:>4} {job['state']:<10} {job['pipeline'] or 'routing':<14} "
                   f"{job['study_uid']} v{job['version']}  {job['reason'] or ''}")
        if job["pipeline"] is None and job["routing"]:
            for line in explain(job["routing"]).splitlines():
                typer.echo(f"         {line}")
    for d in report["deliveries"]:
        typer.echo(f"  delivery {d['id']:>4} {d['state']:<8} {d['destination']}  "
                   f"files={d['files']} attempts={d['attempts']}  {d['last_error'] or ''}")


@app.command()
def process(
    study_dir: Annotated[Path, typer.Argument(help="Directory with the study's DICOM files.",
                                              exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Where result .dcm files go.")],
    pipeline: Annotated[str | None, typer.Option(help="Force this pipeline.")] = None,
) -> None:
    """Process one study offline (no network) and print a JSON summary."""
    from dicomnode.logs import configure_logging
    from dicomnode.workflow.jobs import process_study

    configure_logging("WARNING")
    files = sorted(p for p in study_dir.rglob("*") if p.is_file() and _looks_dicom(p))
    if not files:
        typer.echo(f"dicomnode: no DICOM files under {study_dir}", err=True)
        raise typer.Exit(2)
    out.mkdir(parents=True, exist_ok=True)
    run = process_study(files, out, "", pipeline)
    typer.echo(json.dumps(run.to_dict(), indent=2))
    if run.state.value == "failed":
        raise typer.Exit(1)


def _looks_dicom(path: Path) -> bool:
    try:
        with path.open("rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM" or path.suffix.lower() == ".dcm"


@app.command()
def encode(
    series_dir: str = typer.Argument(..., help="Folder with the CT series."),
    labels: str = typer.Argument(..., help="Label map (NIfTI) drawn on that series."),
    structures: str = typer.Option(..., help="Structure table: headneck or abdomen."),
    out: str = typer.Option(..., help="Folder for seg.dcm, rtstruct.dcm and sr.dcm."),
) -> None:
    """Turn a label map made by any tool into SEG + RTSTRUCT + SR for its series."""
    from dicomnode.results.encode import encode_label_map

    try:
        result = encode_label_map(series_dir, labels, structures, out)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(json.dumps({"seg": str(result.seg), "rtstruct": str(result.rtstruct),
                           "sr": str(result.sr), "voxels": result.structures,
                           "ignored_labels": result.ignored_labels}, indent=2))


@app.command()
def phantom(
    region: str = typer.Argument(..., help="headneck, abdomen or head"),
    out: Path = typer.Option(..., "--out", help="Directory for the .dcm files and truth"),
    seed: int = typer.Option(0, help="Everything random follows from it"),
    slices: int | None = typer.Option(None, help="Number of axial slices"),
    matrix: int = typer.Option(512, help="In-plane matrix (rows = columns)"),
    spacing: str | None = typer.Option(None, help="dz, 'dz,dxy' or 'dz,dy,dx' in mm"),
    noise: float | None = typer.Option(None, help="Noise standard deviation in HU"),
    transfer_syntax: str | None = typer.Option(None, help="explicit, jpegls or rle"),
    slice_order: str = typer.Option("ascending", help="ascending, descending or shuffled"),
    body_part: str = typer.Option("default", help="BodyPartExamined text, or 'none'"),
    descriptions: bool = typer.Option(True, help="Write Study/Series Description"),
    preview: bool = typer.Option(False, help="Also write preview.png with labels outlined"),
) -> None:
    """Write a synthetic CT series with ground truth (labels.nii.gz, truth.json)."""
    from dicomnode.phantoms.command import run_phantom, summary_json

    try:
        summary = run_phantom(
            region, out, seed=seed, slices=slices, matrix=matrix, spacing=spacing,
            noise=noise, transfer_syntax=transfer_syntax, slice_order=slice_order,
            body_part=None if body_part.lower() == "none" else body_part,
            descriptions=descriptions, preview=preview)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    typer.echo(summary_json(summary))



@app.command()
def route(
    study_dir: Path = typer.Argument(..., help="Directory with the study's DICOM files"),
    rules: Path | None = typer.Option(None, help="Routing YAML (default: the embedded rules)"),
    calling_aet: str | None = typer.Option(None, help="Route as if this AE had sent it"),
    as_json: bool = typer.Option(False, "--json", help="Print the decision as JSON"),
) -> None:
    """Print which pipeline(s) a study would go to, and why (exit 1 when not routed)."""
    from dicomnode.workflow.routing import route_directory

    code, text = route_directory(study_dir, rules, calling_aet, as_json=as_json)
    typer.echo(text, err=code == 2)
    raise typer.Exit(code)


@app.command()
def train(
    model: Annotated[str, typer.Argument(help="Model to train (liver_tumor).")],
    data: Annotated[Path | None, typer.Option(help="Phantom folders and/or LiTS pairs "
                                              "(volume-N.nii, segmentation-N.nii).")] = None,
    phantom_seeds: Annotated[str | None, typer.Option(help="Generate training phantoms "
                                                      "from these seeds, e.g. 1000-1063.")] = None,
    heldout_seeds: Annotated[str | None, typer.Option(help="Phantom seeds evaluated after "
                                                      "training, e.g. 0-19.")] = None,
    epochs: Annotated[int, typer.Option(help="Epochs per stage.")] = 10,
    steps_per_epoch: Annotated[int, typer.Option(help="Batches per epoch.")] = 40,
    out: Annotated[Path, typer.Option(help="Models folder (weights, manifest).")] = Path("models"),
    version: Annotated[str, typer.Option(help="Version written to the manifest.")] = "1.0.0",
    cache_dir: Annotated[Path | None, typer.Option(help="Cache of generated phantoms.")] = None,
    max_minutes: Annotated[float | None, typer.Option(help="Time budget per stage (the "
                                                      "learning rate decays to it).")] = None,
    stages: Annotated[str, typer.Option(help="Stages to train: liver,tumour (a stage left "
                                        "out keeps the --init weights; 'none' trains "
                                        "nothing).")] = "liver,tumour",
    val_seeds: Annotated[str | None, typer.Option(help="Phantom seeds on which the tumour "
                                                  "threshold is chosen, e.g. 2000-2019.")
                         ] = None,
    init: Annotated[Path | None, typer.Option(help="Start from this checkpoint's weights "
                                              "(fine-tuning, retraining one stage).")] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate (cosine decay; "
                                             "default 0.003).")] = None,
    device: Annotated[str, typer.Option(help="Where to train: auto (CUDA when present), "
                                        "cpu or cuda[:N]; bfloat16 autocast on CUDA.")
                      ] = "auto",
    batch_size: Annotated[int | None, typer.Option(help="Patches per step (default 4).")
                          ] = None,
    workers: Annotated[int, typer.Option(help="Processes that generate and prepare the "
                                         "cases.")] = 1,
    width_liver: Annotated[int | None, typer.Option(help="Stage-1 width (default 8); with "
                                                    "--init, a trained stage of another "
                                                    "width starts from scratch.")] = None,
    width_tumour: Annotated[int | None, typer.Option(help="Stage-2 width (default 12); "
                                                     "as --width-liver.")] = None,
    tumour_class_weight: Annotated[float | None, typer.Option(
        help="Cross-entropy weight of the tumour class in stage 2 (default 3.0; higher "
             "trades false positives for recall).")] = None,
    hu_shift: Annotated[float | None, typer.Option(
        help="Largest shift of a training patch's HU, augmentation (default 18; wider "
             "makes the network rely less on absolute HU).")] = None,
) -> None:
    """Train a model's weights and record them in the models manifest."""
    from dicomnode.logs import configure_logging
    from dicomnode.nn.train import train_from_cli

    configure_logging("INFO")
    try:
        entry = train_from_cli(model, data=data, phantom_seeds=phantom_seeds,
                               heldout_seeds=heldout_seeds, epochs=epochs,
                               steps_per_epoch=steps_per_epoch, out=out, version=version,
                               cache_dir=cache_dir, max_minutes_per_stage=max_minutes,
                               stages=stages, init_from=init, lr=lr, val_seeds=val_seeds,
                               device=device, batch_size=batch_size, workers=workers,
                               width_liver=width_liver, width_tumour=width_tumour,
                               tumour_class_weight=tumour_class_weight,
                               hu_shift=hu_shift)
    except ValueError as exc:
        typer.echo(f"dicomnode: {exc}", err=True)
        raise typer.Exit(2) from exc
    typer.echo(json.dumps(entry, indent=2))


@app.command()
def evaluate(
    model: Annotated[str, typer.Argument(help="Model to evaluate (liver_tumor).")],
    data: Annotated[Path | None, typer.Option(help="Test cases: phantom folders and/or "
                                              "LiTS pairs (volume-N.nii, "
                                              "segmentation-N.nii).")] = None,
    phantom_seeds: Annotated[str | None, typer.Option(help="Phantom seeds to generate and "
                                                      "evaluate, e.g. 0-19 (the shipped "
                                                      "weights' held-out seeds).")] = None,
    models: Annotated[Path | None, typer.Option(help="Models folder (default: "
                                                "DICOMNODE_MODELS_DIR or the shipped "
                                                "models/).")] = None,
    cache_dir: Annotated[Path | None, typer.Option(help="Cache of generated phantoms.")] = None,
    device: Annotated[str, typer.Option(help="auto (CUDA when present), cpu or cuda[:N].")
                      ] = "auto",
    min_diameter: Annotated[float, typer.Option(help="Smallest tumour (mm, longest axial "
                                                "diameter) counted by tumour Dice and "
                                                "detection.")] = 10.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (every case).")] = False,
) -> None:
    """Score the installed weights on cases with ground truth (Dice, detection)."""
    from dicomnode.logs import configure_logging
    from dicomnode.nn import datasets
    from dicomnode.nn.evaluate import evaluate as run_evaluation
    from dicomnode.nn.weights import WeightsError

    configure_logging("WARNING")
    if model != "liver_tumor":
        typer.echo(f"dicomnode: Invalid 'model' value '{model}' - must be 'liver_tumor'",
                   err=True)
        raise typer.Exit(2)
    try:
        seeds = datasets.parse_seeds(phantom_seeds) if phantom_seeds else []
        result = run_evaluation(seeds, data_dir=data, models=models, cache_dir=cache_dir,
                                device=device, min_diameter_mm=min_diameter)
    except (ValueError, WeightsError) as exc:
        typer.echo(f"dicomnode: {exc}", err=True)
        raise typer.Exit(2) from exc
    for line in result["warnings"]:
        typer.echo(f"dicomnode: warning: {line}", err=True)
    if as_json:
        typer.echo(json.dumps(result, indent=2))
        return
    info, summary = result["model"], result["summary"]
    typer.echo(f"{info['name']} {info['version']} (sha256 {info['sha256'][:12]}), "
               f"{summary['cases']} cases, tumours >= {min_diameter:g} mm")
    for row in result["cases"]:
        tumour = "-" if row["tumour_dice_ge_min"] is None else f"{row['tumour_dice_ge_min']:.3f}"
        typer.echo(f"  {row['case']:<20} liver Dice {row['liver_dice']:.3f}  tumour Dice "
                   f"{tumour:>5}  detected "
                   f"{row['detected_ge_min']}/{row['true_lesions_ge_min']}  false positives "
                   f"{row['false_positive_lesions']}")
    number = {key: "-" if summary.get(key) is None else f"{summary[key]:.3f}"
              for key in ("liver_dice_mean", "liver_dice_min", "tumour_dice_mean",
                          "tumour_dice_min", "tumour_dice_global", "detection_recall",
                          "false_positive_lesions_per_case")}
    typer.echo(f"liver Dice mean {number['liver_dice_mean']} (min {number['liver_dice_min']})")
    typer.echo(f"tumour Dice per case {number['tumour_dice_mean']} (min "
               f"{number['tumour_dice_min']}, {summary.get('tumour_cases', 0)} cases), "
               f"Dice global {number['tumour_dice_global']}")
    typer.echo(f"detection recall {number['detection_recall']} "
               f"({summary.get('lesions_detected', 0)}/{summary.get('lesions_ge_min', 0)}), "
               f"false positives per case {number['false_positive_lesions_per_case']}")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
