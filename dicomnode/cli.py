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


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
