"""The ``dicomnode`` command line: serve, status, process, phantom, encode, train, bench."""

from __future__ import annotations

import inspect
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
    except (OSError, ValueError) as exc:   # a port in use; a TLS file that cannot be loaded
        typer.echo(f"dicomnode: cannot start: {exc}", err=True)
        node.stop()
        raise typer.Exit(1) from exc
    ports = [f"{settings.bind_address}:{port}{tls}" for port, tls in (
        (node.scp.port, ""), (node.scp.tls_port, " (TLS)")) if port is not None]
    typer.echo(f"dicomnode: {settings.ae_title} listening on {', '.join(ports)}, "
               f"data in {settings.data_dir}", err=True)
    node.wait()


@app.command()
def worker(
    config: ConfigOption = None,
    queues: Annotated[str | None, typer.Option(
        help="Queues to take, comma-separated, in order (default: urgent,jobs), e.g. "
             "urgent,gpu0.")] = None,
    concurrency: Annotated[int, typer.Option(
        min=1, help="Jobs at once in this process; run one worker process per GPU.")] = 1,
) -> None:
    """Run pipeline jobs from the broker (executor celery) on this machine's GPU."""
    from dicomnode.logs import configure_logging
    from dicomnode.workflow.distributed import run_worker

    settings = _settings(config)
    configure_logging(settings.log_level, settings.log_format)
    if not settings.broker_url:
        typer.echo("dicomnode: configuration error: a worker needs broker_url "
                   "(amqp://USER:PASS@HOST:5672/VHOST)", err=True)
        raise typer.Exit(2)
    names = [q.strip() for q in queues.split(",") if q.strip()] if queues else None
    run_worker(settings, names, concurrency)


@app.command()
def status(
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    limit: Annotated[int, typer.Option(help="At most this many of each.")] = 100,
) -> None:
    """Print studies, jobs and deliveries with their states, and the queue per priority."""
    from dicomnode.store.db import Database
    from dicomnode.store.status import node_status

    settings = _settings(config)
    db = Database(settings.db_url)
    db.upgrade()
    report = node_status(db, limit)
    db.dispose()
    from dicomnode.workflow.jobs import priority_name

    for level in report["queue"]:
        level["name"] = priority_name(level["priority"])
    if as_json:
        typer.echo(json.dumps(report, indent=2))
        return
    typer.echo(f"{report['totals']['studies']} studies, {report['totals']['jobs']} jobs, "
               f"{report['totals']['deliveries']} deliveries, "
               f"{report['totals'].get('notifications', 0)} notifications")
    if report["pipelines"]:
        for name, state in sorted(report["pipelines"]["states"].items()):
            typer.echo(f"  pipeline {name:<14} {state}")
    if report["queue"]:
        typer.echo("  queue " + ", ".join(f"{q['name']} {q['queued']} queued {q['running']} "
                                          "running" for q in report["queue"]))
    for st in report["studies"]:
        typer.echo(f"  study {st['study_uid']}  {st['state']:<9} v{st['version']} "
                   f"{st['instances']:>5} instances  trigger={st['completion_trigger']}  "
                   f"from {st['calling_aet'] or '-'}")
    from dicomnode.workflow.routing import explain

    for job in report["jobs"]:
        typer.echo(f"  job {job['id']:>4} {job['state']:<10} {job['pipeline'] or 'routing':<14} "
                   f"{priority_name(job['priority']):<7} {job['study_uid']} v{job['version']}  "
                   f"{job['reason'] or ''}")
        if job["pipeline"] is None and job["routing"]:
            for line in explain(job["routing"]).splitlines():
                typer.echo(f"         {line}")
    for d in report["deliveries"]:
        typer.echo(f"  delivery {d['id']:>4} {d['state']:<8} {d['destination']}  "
                   f"files={d['files']} attempts={d['attempts']}  {d['last_error'] or ''}")
    for n in report.get("notifications", []):
        typer.echo(f"  notification {n['id']:>4} {n['state']:<8} {n['channel']} "
                   f"{n['target']}  {n['study_uid']} attempts={n['attempts']}  "
                   f"{n['last_error'] or ''}")


@app.command("web-passwd")
def web_passwd(
    user: Annotated[str, typer.Argument(help="The user name to sign in with.")],
) -> None:
    """Make a password hash for the dashboard's `web.users` (asks for the password)."""
    from dicomnode.web.passwords import hash_password

    password = typer.prompt("Password", hide_input=True, confirmation_prompt=True)
    try:
        hashed = hash_password(password)
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from None
    typer.echo(f"web:\n  users:\n    {user}: \"{hashed}\"")


@app.command()
def process(
    study_dir: Annotated[Path, typer.Argument(help="Directory with the study's DICOM files.",
                                              exists=True, file_okay=False)],
    out: Annotated[Path, typer.Option("--out", help="Where result .dcm files go.")],
    pipeline: Annotated[str | None, typer.Option(help="Force this pipeline.")] = None,
    radiomics: Annotated[bool | None, typer.Option(
        "--radiomics/--no-radiomics",
        help="IBSI features of the segmented structures (default: the config's radiomics)."
    )] = None,
) -> None:
    """Process one study offline (no network) and print a JSON summary."""
    from dicomnode.config import load_settings
    from dicomnode.logs import configure_logging
    from dicomnode.workflow.jobs import process_study

    configure_logging("WARNING")
    files = sorted(p for p in study_dir.rglob("*") if p.is_file() and _looks_dicom(p))
    if not files:
        typer.echo(f"dicomnode: no DICOM files under {study_dir}", err=True)
        raise typer.Exit(2)
    try:
        features = load_settings().radiomics
    except ValueError as exc:
        typer.echo(f"dicomnode: {exc}", err=True)
        raise typer.Exit(2) from exc
    if radiomics is not None:
        features = features.model_copy(update={"enabled": radiomics})
    out.mkdir(parents=True, exist_ok=True)
    run = process_study(files, out, "", pipeline, radiomics=features)
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
def radiomics(
    study: Annotated[str, typer.Argument(help=(
        "A study folder (its DICOM files, or the result files of `dicomnode process`) or "
        "the Study Instance UID of a study the node has processed."))],
    config: ConfigOption = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
    as_csv: Annotated[bool, typer.Option("--csv", help="Print CSV (one row a feature).")] = False,
) -> None:
    """A table of the IBSI features per structure: read from the node's SR results.

    A study UID is looked up in the node's database and its SRs are read; a folder
    holding SRs with features is read as it is; a folder of CT images is processed
    (routing, pipeline, radiomics on) and its SR read, so every number is the SR's.
    """
    import csv
    import sys
    import tempfile

    import pydicom

    from dicomnode.logs import configure_logging
    from dicomnode.results.radiomics import features_from_sr

    configure_logging("WARNING")
    settings = _settings(config)
    path = Path(study)
    srs: list[Path] = []
    scratch = None
    if path.is_dir():
        srs = [p for p in sorted(path.rglob("*.dcm")) if _is_sr(p)]
        if not srs:
            from dicomnode.workflow.jobs import process_study

            files = sorted(p for p in path.rglob("*") if p.is_file() and _looks_dicom(p))
            if not files:
                typer.echo(f"dicomnode: no DICOM files under {path}", err=True)
                raise typer.Exit(2)
            scratch = tempfile.TemporaryDirectory(prefix="radiomics-")
            run = process_study(files, Path(scratch.name), "", None,
                                radiomics=settings.radiomics.model_copy(update={"enabled": True}))
            srs = [p for p in run.result_files if _is_sr(p)]
            if not srs:
                typer.echo(f"dicomnode: no result with structures for {path}: {run.reason}",
                           err=True)
                raise typer.Exit(1)
    else:
        srs = _study_srs(settings, study)
        if not srs:
            typer.echo(f"dicomnode: no SR result of study {study} in the node's records "
                       "(not processed, or no such folder)", err=True)
            raise typer.Exit(2)
    rows = [f for p in srs for f in features_from_sr(pydicom.dcmread(p))]
    if scratch is not None:
        scratch.cleanup()
    if not rows:
        typer.echo("dicomnode: the results carry no radiomics features (radiomics.enabled "
                   "was off when they were made)", err=True)
        raise typer.Exit(1)
    if as_json:
        table: dict[str, dict[str, Any]] = {}
        for f in rows:
            table.setdefault(f.structure, {})[f.ibsi_id] = {
                "feature": f.meaning, "value": f.value, "unit": f.unit}
        typer.echo(json.dumps(table, indent=2))
    elif as_csv:
        writer = csv.writer(sys.stdout, lineterminator="\n")
        writer.writerow(["structure", "ibsi_id", "feature", "value", "unit"])
        for f in rows:
            writer.writerow([f.structure, f.ibsi_id, f.meaning, repr(f.value), f.unit])
    else:
        structures = list(dict.fromkeys(f.structure for f in rows))
        values = {(f.structure, f.ibsi_id): f.value for f in rows}
        features = list(dict.fromkeys((f.ibsi_id, f.meaning, f.unit) for f in rows))
        typer.echo(f"{'IBSI':<5} {'feature':<52} {'unit':<14} "
                   + " ".join(f"{s[:12]:>12}" for s in structures))
        for code, meaning, unit in features:
            cells = [values.get((s, code)) for s in structures]
            typer.echo(f"{code:<5} {meaning[:52]:<52} {unit:<14} " + " ".join(
                f"{'-' if v is None else f'{v:.6g}':>12}" for v in cells))


def _is_sr(path: Path) -> bool:
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:
        return False
    return str(ds.get("SOPClassUID", "")) == "1.2.840.10008.5.1.4.1.1.88.34"


def _study_srs(settings: Any, study_uid: str) -> list[Path]:
    """The SR files of the newest finished pipeline jobs of a study, from the database."""
    from sqlalchemy import select

    from dicomnode.store.db import Database
    from dicomnode.store.models import Job, Study

    db = Database(settings.db_url)
    db.upgrade()
    try:
        with db.session() as session:
            jobs = session.scalars(
                select(Job).join(Study).where(Study.study_uid == study_uid,
                                              Job.pipeline.is_not(None))
                .order_by(Job.study_version.desc(), Job.id.desc())).all()
            newest = [job for job in jobs if job.study_version == jobs[0].study_version]
            files = [Path(f) for job in newest for f in (job.result or {}).get("files", [])]
    finally:
        db.dispose()
    return [f for f in files if f.is_file() and _is_sr(f)]


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
    resected: str | None = typer.Option(
        None, help="Head and neck: glands left out, e.g. Parotid_L,Glnd_Submand_R"),
) -> None:
    """Write a synthetic CT series with ground truth (labels.nii.gz, truth.json)."""
    from dicomnode.phantoms.command import run_phantom, summary_json

    try:
        summary = run_phantom(
            region, out, seed=seed, slices=slices, matrix=matrix, spacing=spacing,
            noise=noise, transfer_syntax=transfer_syntax, slice_order=slice_order,
            body_part=None if body_part.lower() == "none" else body_part,
            descriptions=descriptions, preview=preview, resected=resected)
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


class _ModelGroup(typer.core.TyperGroup):
    """``dicomnode train|evaluate MODEL``: one subcommand per model, built when asked for.

    Each model's own options (its recipe's :class:`~dicomnode.nn.recipe.Options` fields,
    a width per stage) appear on that model's subcommand only; the recipe, and torch
    with it, is imported only when the subcommand runs or shows its help.
    """

    build: Any = None

    def list_commands(self, ctx: Any) -> list[str]:
        from dicomnode.nn.recipe import BUILTIN

        return sorted(BUILTIN)

    def get_command(self, ctx: Any, cmd_name: str) -> Any:
        from dicomnode.nn.recipe import BUILTIN, get_recipe

        if cmd_name not in BUILTIN:
            return None
        command = typer.Typer(add_completion=False)
        command.command(name=cmd_name)(type(self).build(get_recipe(cmd_name)))
        return typer.main.get_command(command)

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        name = args[0] if args else ""
        if name and not name.startswith("-") and self.get_command(ctx, name) is None:
            from dicomnode.nn.recipe import BUILTIN

            typer.echo(f"dicomnode: Invalid 'model' value '{name}' - must be one of "
                       f"{', '.join(sorted(BUILTIN))}", err=True)
            raise typer.Exit(2)
        return super().resolve_command(ctx, args)


def _option(name: str, kind: type, default: Any, help_text: str) -> inspect.Parameter:
    """A keyword parameter that typer turns into ``--name`` (underscores as dashes)."""
    annotation = Annotated[kind | None if default is None else kind,  # type: ignore[valid-type]
                           typer.Option(help=help_text)]
    return inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                             annotation=annotation)


def _command(function: Any, parameters: list[inspect.Parameter], doc: str) -> Any:
    """``function(**values)`` with the signature typer reads its options from."""
    def command(**values: Any) -> None:
        function(**values)

    command.__signature__ = inspect.Signature(parameters)  # type: ignore[attr-defined]
    command.__doc__ = doc
    return command


_TRAIN_OPTIONS: list[tuple[str, type, Any, str]] = [
    ("data", Path, None, "Phantom folders and/or the model's public layout (see the model "
     "card)."),
    ("phantom_seeds", str, None, "Generate training phantoms from these seeds, e.g. "
     "1000-1063."),
    ("heldout_seeds", str, None, "Phantom seeds evaluated after training, e.g. 0-19."),
    ("val_seeds", str, None, "Phantom seeds on which the model's operating point is "
     "chosen, e.g. 2000-2019."),
    ("epochs", int, 10, "Epochs per stage."),
    ("steps_per_epoch", int, 40, "Batches per epoch (times the stage's factor)."),
    ("out", Path, Path("models"), "Models folder (weights, manifest)."),
    ("version", str, "1.0.0", "Version written to the manifest."),
    ("cache_dir", Path, None, "Cache of generated phantoms."),
    ("max_minutes", float, None, "Time budget per stage (the learning rate decays to it)."),
    ("stages", str, None, "Stages to train, comma-separated (default all; a stage left "
     "out keeps the --init weights; 'none' trains nothing)."),
    ("init", Path, None, "Start from this checkpoint's weights (fine-tuning, retraining "
     "one stage)."),
    ("lr", float, None, "Peak learning rate (cosine decay; default 0.003)."),
    ("device", str, "auto", "Where to train: auto (CUDA when present), cpu or cuda[:N]; "
     "bfloat16 autocast on CUDA."),
    ("batch_size", int, None, "Patches per step (default 4)."),
    ("workers", int, 1, "Processes that generate and prepare the cases."),
    ("threads", int, None, "torch CPU threads while training (default 2)."),
]


def _train_command(recipe: Any) -> Any:
    """``dicomnode train MODEL``: the shared options, a width per stage, the model's own."""
    from dicomnode.nn.recipe import option_help

    stages = ", ".join(s.name for s in recipe.stages)
    widths = [(f"width_{s.name}", int, None, f"Width of stage '{s.name}' (default "
               f"{s.width}); with --init, a trained stage of another width starts from "
               "scratch.") for s in recipe.stages]
    own = option_help(recipe)
    parameters = [_option(*spec) for spec in (*_TRAIN_OPTIONS, *widths, *own)]

    def run(**values: Any) -> None:
        from dicomnode.logs import configure_logging
        from dicomnode.nn.train import train_from_cli

        configure_logging("INFO")
        try:
            entry = train_from_cli(
                recipe.name, data=values["data"], phantom_seeds=values["phantom_seeds"],
                heldout_seeds=values["heldout_seeds"], val_seeds=values["val_seeds"],
                epochs=values["epochs"], steps_per_epoch=values["steps_per_epoch"],
                out=values["out"], version=values["version"], cache_dir=values["cache_dir"],
                max_minutes_per_stage=values["max_minutes"], stages=values["stages"],
                init_from=values["init"], lr=values["lr"], device=values["device"],
                batch_size=values["batch_size"], workers=values["workers"],
                threads=values["threads"],
                widths={s.name: values[f"width_{s.name}"] for s in recipe.stages},
                options={name: values[name] for name, *_ in own})
        except ValueError as exc:
            typer.echo(f"dicomnode: {exc}", err=True)
            raise typer.Exit(2) from exc
        typer.echo(json.dumps(entry, indent=2))

    return _command(run, parameters, f"Train {recipe.name} ({stages}) and record the "
                    "weights in the models manifest.")


def _evaluate_command(recipe: Any) -> Any:
    """``dicomnode evaluate MODEL``: the shared options and the model's own."""
    own = [(name, kind, default, help_text)
           for name, (kind, default, help_text) in recipe.evaluation_options().items()]
    shared: list[tuple[str, type, Any, str]] = [
        ("data", Path, None, "Test cases: phantom folders and/or the model's public layout."),
        ("phantom_seeds", str, None, "Phantom seeds to generate and evaluate, e.g. 0-19 "
         "(the shipped weights' held-out seeds)."),
        ("models", Path, None, "Models folder (default: DICOMNODE_MODELS_DIR or the "
         "shipped models/)."),
        ("cache_dir", Path, None, "Cache of generated phantoms."),
        ("device", str, "auto", "auto (CUDA when present), cpu or cuda[:N]."),
        ("perturb", str, None, "Score the cases as another scanner would show them: "
         "hu+30, hu-30, noise2x, soft or sharp (robustness)."),
    ]
    parameters = [_option(*spec) for spec in (*shared, *own)]
    parameters.append(inspect.Parameter(
        "as_json", inspect.Parameter.KEYWORD_ONLY, default=False,
        annotation=Annotated[bool, typer.Option("--json", help="Print JSON (every case).")]))

    def run(**values: Any) -> None:
        from dicomnode.logs import configure_logging
        from dicomnode.nn import datasets
        from dicomnode.nn.evaluate import evaluate as run_evaluation
        from dicomnode.nn.weights import WeightsError

        configure_logging("WARNING")
        recipe.configure_evaluation(**{name: values[name] for name, *_ in own})
        try:
            seeds = (datasets.parse_seeds(values["phantom_seeds"])
                     if values["phantom_seeds"] else [])
            result = run_evaluation(recipe, seeds, data_dir=values["data"],
                                    models=values["models"], cache_dir=values["cache_dir"],
                                    device=values["device"], perturbation=values["perturb"])
        except (ValueError, WeightsError) as exc:
            typer.echo(f"dicomnode: {exc}", err=True)
            raise typer.Exit(2) from exc
        for line in result["warnings"]:
            typer.echo(f"dicomnode: warning: {line}", err=True)
        if values["as_json"]:
            typer.echo(json.dumps(result, indent=2))
            return
        for line in recipe.report_lines(result):
            typer.echo(line)

    return _command(run, parameters, f"Score the installed {recipe.name} weights on cases "
                    "with ground truth.")


class _TrainGroup(_ModelGroup):
    build = staticmethod(_train_command)


class _EvaluateGroup(_ModelGroup):
    build = staticmethod(_evaluate_command)


app.add_typer(typer.Typer(cls=_TrainGroup, no_args_is_help=True), name="train",
              help="Train a model's weights and record them in the models manifest "
                   "(dicomnode train MODEL --help for its options).")
app.add_typer(typer.Typer(cls=_EvaluateGroup, no_args_is_help=True), name="evaluate",
              help="Score the installed weights of a model on cases with ground truth "
                   "(Dice and the model's own scores).")


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
