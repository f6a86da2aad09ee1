"""``card-agent softhsm init DIR``: test tokens and a test PKI for testers and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.softhsm.provision import IDENTITIES, provision

app = typer.Typer(help="SoftHSM test tokens and test PKI (tests and demos only).", no_args_is_help=True, rich_markup_mode=None)


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(metavar="DIR", hidden=True)],
    force: Annotated[bool, typer.Option("--force", help="Recreate tokens and PKI even if DIR is complete (files of "
                                                        "yours in DIR are left alone).")] = False,
) -> None:
    """Create SoftHSM tokens alice, bob, mallory, expired, stranger and their PKI in DIR (created if
    missing; nothing is written elsewhere).

    Prints the `export SOFTHSM2_CONF=...` line on standard output, so
    `eval "$(card-agent softhsm init DIR)"` sets it in a shell.
    """
    try:
        result = provision(directory, force=force)
    except OSError as error:  # DIR cannot be made or written: the user's to fix, not a bug to trace
        where = error.filename or directory
        raise CardAgentError(f"cannot write the test tokens and PKI in {directory}: {where}: "
                             f"{error.strerror or error}; choose a directory you can write") from None
    if result.created:
        typer.echo(f"created test PKI and tokens {', '.join(i.label for i in IDENTITIES)} in {result.directory} "
                   "(test PINs and file list: README.txt there)", err=True)
    else:
        typer.echo(f"{result.directory} is already provisioned; nothing changed (--force recreates it)", err=True)
    typer.echo(result.export_line)
