"""``card-agent``: the command line."""

from __future__ import annotations

import io
import sys

import typer
from pkcs11.exceptions import PKCS11Error

from dicom_card_agent import logline
from dicom_card_agent.cli import audit_commands, check, control_commands, doctor, run, softhsm_commands, token_commands
from dicom_card_agent.errors import CardAgentError
from dicom_card_agent.version import agent_version

app = typer.Typer(
    name="card-agent",
    help="A smart card (PKCS#11) as the mutual-TLS identity of DICOM applications.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
    # Plain help: Rich markup would eat "[audit]" in texts and show flags as "<bool>".
    rich_markup_mode=None,
)


def _print_version(value: bool) -> None:
    if value:
        print(f"card-agent {agent_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """A smart card (PKCS#11) as the mutual-TLS identity of DICOM applications."""


app.command("tokens")(token_commands.tokens)
app.command("identities")(token_commands.identities)
app.command("doctor")(doctor.doctor)
app.command("check")(check.check)
app.command("run")(run.run)
app.command("status")(control_commands.status)
app.command("lock")(control_commands.lock)
app.add_typer(softhsm_commands.app, name="softhsm")
app.add_typer(audit_commands.app, name="audit")


def _escape_what_the_terminal_cannot_show() -> None:
    """Keep the terminal's encoding but escape (``\\u653e``) what it cannot encode: a Latin-1
    terminal (LANG=de_DE.ISO-8859-1) and a path, a site label or a certificate subject in another
    script would otherwise end a command with a traceback (exit 1, not a documented exit)."""
    for stream in (sys.stdout, sys.stderr):
        if isinstance(stream, io.TextIOWrapper):  # pytest and embedders may have put another stream there
            stream.reconfigure(errors="backslashreplace")


def main() -> None:
    _escape_what_the_terminal_cannot_show()
    logline.configure("card-agent")
    try:
        app()
    except CardAgentError as error:
        print(logline.error_line(f"card-agent: error: {error}"), file=sys.stderr)
        sys.exit(2)
    except PKCS11Error as error:
        # A PKCS#11 failure no check above anticipated: name it so that it can be looked up.
        failed = f"card-agent: error: the PKCS#11 module failed with {type(error).__name__} {error}".rstrip()
        print(logline.error_line(failed + "; run `card-agent doctor` to check the module and token"), file=sys.stderr)
        sys.exit(2)
