"""``card-agent softhsm init DIR``: test tokens and a test PKI for testers and demos."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.softhsm.provision import DEFAULT_REVOCATION_PORT, IDENTITIES, provision
from dicom_card_agent.softhsm.responder import start_background, stop_background

app = typer.Typer(help="SoftHSM test tokens and test PKI (tests and demos only).", no_args_is_help=True,
                  rich_markup_mode=None)


@app.command("init")
def init(
    directory: Annotated[Path, typer.Argument(metavar="DIR", hidden=True)],
    force: Annotated[bool, typer.Option("--force", help="Recreate tokens and PKI even if DIR is complete (files of "
                                                        "yours in DIR are left alone).")] = False,
    revocation_port: Annotated[int, typer.Option(
        "--revocation-port", metavar="PORT",
        help="Loopback port the certificates name for OCSP and CRLs (ocsp-responder).")
    ] = DEFAULT_REVOCATION_PORT,
) -> None:
    """Create SoftHSM tokens alice, bob, mallory, expired, stranger and their PKI in DIR (created if
    missing; nothing is written elsewhere).

    Prints the `export SOFTHSM2_CONF=...` line on standard output, so
    `eval "$(card-agent softhsm init DIR)"` sets it in a shell.
    """
    try:
        result = provision(directory, force=force, revocation_port=revocation_port)
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


@app.command("ocsp-responder")
def ocsp_responder(
    action: Annotated[str, typer.Argument(metavar="start|stop", hidden=True)],
    directory: Annotated[Path, typer.Argument(metavar="DIR", hidden=True)],
) -> None:
    """Start or stop the test PKI's OCSP responder and CRL distribution point (127.0.0.1 only) for
    DIR, the directory `card-agent softhsm init` provisioned.

    OCSP requests are answered by `openssl ocsp` over pki/ocsp/index.txt; GET /issuing-ca.crl and
    /root-ca.crl serve the CRLs of pki/crl-http/. The port is the one `softhsm init
    --revocation-port` wrote into the certificates."""
    if action == "start":
        try:
            pid, port = start_background(directory)
        except (RuntimeError, OSError) as error:
            typer.echo(f"card-agent: error: {error}", err=True)
            raise typer.Exit(1) from None
        typer.echo(f"revocation responder running on http://127.0.0.1:{port} (pid {pid}); "
                   f"`card-agent softhsm ocsp-responder stop {directory}` stops it", err=True)
    elif action == "stop":
        stopped = stop_background(directory)
        typer.echo("no responder was running" if stopped is None else f"stopped the responder (pid {stopped})",
                   err=True)
    else:
        typer.echo(f"card-agent: error: {action!r} is neither start nor stop", err=True)
        raise typer.Exit(2)
