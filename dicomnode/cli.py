"""The ``dicomnode`` command line: serve, status, process, phantom, encode, train, bench."""

from __future__ import annotations

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


@app.command()
def encode(
    series_dir: str = typer.Argument(..., help="Folder with the CT series."),
    labels: str = typer.Argument(..., help="Label map (NIfTI) drawn on that series."),
    structures: str = typer.Option(..., help="Structure table: headneck or abdomen."),
    out: str = typer.Option(..., help="Folder for seg.dcm, rtstruct.dcm and sr.dcm."),
) -> None:
    """Turn a label map made by any tool into SEG + RTSTRUCT + SR for its series."""
    import json

    from dicomnode.results.encode import encode_label_map

    try:
        result = encode_label_map(series_dir, labels, structures, out)
    except ValueError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(code=2) from exc
    typer.echo(json.dumps({"seg": str(result.seg), "rtstruct": str(result.rtstruct),
                           "sr": str(result.sr), "voxels": result.structures,
                           "ignored_labels": result.ignored_labels}, indent=2))


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
