"""The `ampo` command line."""

import typer

app = typer.Typer(no_args_is_help=True, add_completion=False, help="ampo: iterative self-play preference optimization.")


@app.command()
def version() -> None:
    """Print the ampo version."""
    from ampo import __version__

    typer.echo(__version__)


def main() -> None:
    app()
