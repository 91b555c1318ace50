"""The ``dicomnode`` command line: serve, status, process, phantom, encode, train, bench."""

from __future__ import annotations

from pathlib import Path

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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
