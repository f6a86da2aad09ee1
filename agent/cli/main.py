"""``card-agent``: the command line."""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Iterator, Mapping, MutableMapping
from typing import Any

import typer
import typer.core
import typer.main

from dicom_card_agent import logline
from dicom_card_agent.errors import CardAgentError

# Each command's module is imported only when that command runs, or when help lists the commands:
# `status` and `lock` need a small part of what `run` imports, and imported all of it (0.5 s of
# CPU per process on an idle machine; an administrator's monitoring asks `status` often).
COMMANDS: dict[str, tuple[str, str]] = {  # name: (module in dicom_card_agent.cli, its command or group)
    "tokens": ("token_commands", "tokens"),
    "identities": ("token_commands", "identities"),
    "doctor": ("doctor", "doctor"),
    "check": ("check", "check"),
    "run": ("run", "run"),
    "status": ("control_commands", "status"),
    "lock": ("control_commands", "lock"),
    "softhsm": ("softhsm_commands", "app"),
    "audit": ("audit_commands", "app"),
}


class _CommandsOnDemand(MutableMapping[str, Any]):
    """The commands of :data:`COMMANDS` as click wants them, each made when first looked up."""

    def __init__(self) -> None:
        self._made: dict[str, Any] = {}

    def __getitem__(self, name: str) -> Any:
        if name not in self._made:
            module, attribute = COMMANDS[name]
            target = getattr(importlib.import_module(f"dicom_card_agent.cli.{module}"), attribute)
            self._made[name] = _command(name, target)
        return self._made[name]

    def __setitem__(self, name: str, command: Any) -> None:
        raise TypeError(f"commands are listed in COMMANDS, not added: {name}")

    def __delitem__(self, name: str) -> None:
        raise TypeError(f"commands are listed in COMMANDS, not removed: {name}")

    def __iter__(self) -> Iterator[str]:
        return iter(COMMANDS)

    def __len__(self) -> int:
        return len(COMMANDS)


def _command(name: str, target: Any) -> Any:
    """The click command of ``target``: a group of commands (a Typer) or a command's function."""
    if isinstance(target, typer.Typer):
        command: Any = typer.main.get_group(target)
    else:
        single = typer.Typer(rich_markup_mode=None, add_completion=False)
        single.command(name)(target)
        command = typer.main.get_command(single)
    command.name = name
    return command


class _Commands(typer.core.TyperGroup):
    """The top-level group: its commands are those of :data:`COMMANDS` (typer hands it none, as
    none is registered with the app)."""

    def __init__(self, *, commands: Mapping[str, Any] | None = None, **attrs: Any) -> None:
        super().__init__(**attrs)
        self.commands = _CommandsOnDemand()


app = typer.Typer(
    cls=_Commands,
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
        # Imported here: importlib.metadata, which finds the installed distribution, costs each
        # command that never tells the version (`status`, which monitoring may ask every minute) about
        # 25 ms of CPU.
        from dicom_card_agent.version import agent_version

        print(f"card-agent {agent_version()}")
        raise typer.Exit()


@app.callback()
def _options(
    version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                 help="Show the version and exit."),
) -> None:
    """A smart card (PKCS#11) as the mutual-TLS identity of DICOM applications."""


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
    except Exception as error:
        # A PKCS#11 failure no check above anticipated: name it so that it can be looked up. Only a
        # command that imported python-pkcs11 can raise one; the others need not import it.
        pkcs11_exceptions = sys.modules.get("pkcs11.exceptions")
        if pkcs11_exceptions is None or not isinstance(error, pkcs11_exceptions.PKCS11Error):
            raise
        failed = f"card-agent: error: the PKCS#11 module failed with {type(error).__name__} {error}".rstrip()
        print(logline.error_line(failed + "; run `card-agent doctor` to check the module and token"), file=sys.stderr)
        sys.exit(2)
