"""Entry point of the ``nagl`` command.

Commands live in one module per area (datasets, models, results, report, run);
each exposes ``register(app)``. A :class:`~nagl.errors.NaglError` is printed as a
one-paragraph message without a traceback, with exit status 2.
"""

from __future__ import annotations

import sys

import typer
from rich.console import Console

from nagl.cli import datasets, models, report, results, run, train
from nagl.errors import NaglError

_app = typer.Typer(
    name="nagl",
    help="Benchmark platform for generalist anomaly detection (NAGL and its peers).",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
for _module in (datasets, models, train, results, report, run):
    _module.register(_app)


def app() -> None:
    """Console-script entry: run the typer app, turning NaglError into a clean message."""
    try:
        _app(standalone_mode=False)
    except NaglError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}", highlight=False, soft_wrap=True)
        sys.exit(2)
    except typer.Exit as exit_:
        sys.exit(exit_.exit_code)
    except typer.Abort:
        sys.exit(130)
    except Exception as error:  # click usage errors arrive here in non-standalone mode
        import click

        if isinstance(error, click.ClickException):
            error.show()
            sys.exit(error.exit_code)
        raise


if __name__ == "__main__":
    app()
