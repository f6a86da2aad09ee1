"""``card-agent softhsm init DIR``: test tokens and a test PKI for testers and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dicom_card_agent.softhsm.provision import IDENTITIES, provision

app = typer.Typer(help="SoftHSM test tokens and test PKI (tests and demos only).", no_args_is_help=True)


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(help="Directory to create everything in (nothing is written elsewhere).")],
    force: Annotated[bool, typer.Option("--force", help="Recreate tokens and PKI even if DIR is complete.")] = False,
) -> None:
    """Create SoftHSM tokens alice, bob, mallory, expired, stranger and their PKI in DIR.

    Prints the `export SOFTHSM2_CONF=...` line on standard output, so
    `eval "$(card-agent softhsm init DIR)"` sets it in a shell.
    """
    result = provision(directory, force=force)
    if result.created:
        typer.echo(f"created test PKI and tokens {', '.join(i.label for i in IDENTITIES)} in {result.directory} "
                   "(test PINs and file list: README.txt there)", err=True)
    else:
        typer.echo(f"{result.directory} is already provisioned; nothing changed (--force recreates it)", err=True)
    typer.echo(result.export_line)
