"""``card-agent audit tail``: the latest events of the local audit file, one readable line each."""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from pathlib import Path
from typing import Annotated, Optional

import typer

from dicom_card_agent.audit.config import load_audit_config
from dicom_card_agent.audit.messages import summarize
from dicom_card_agent.cli.options import ConfigFile
from dicom_card_agent.config.locate import locate_config
from dicom_card_agent.errors import ConfigError
from dicom_card_agent.logline import printable, printable_xml

app = typer.Typer(help="The audit trail (DICOM audit messages, IHE ATNA).", no_args_is_help=True, rich_markup_mode=None)

FOLLOW_INTERVAL = 0.5


@app.command("tail")
def tail(
    config: ConfigFile = None,
    file: Annotated[Optional[Path], typer.Option("--file", "-f", metavar="AUDIT_FILE",
                                                 help="An audit file (instead of --config).")] = None,
    lines: Annotated[int, typer.Option("-n", "--lines", min=0, metavar="N",
                                       help="How many of the latest events.")] = 20,
    follow: Annotated[bool, typer.Option("--follow", help="Keep printing new events as they are written.")] = False,
    xml: Annotated[bool, typer.Option("--xml", help="Print the audit messages (XML) as stored; control "
                                                     "characters as character references.")] = False,
) -> None:
    """Print the latest events of the local audit file ([audit] file of the configuration, or --file):
    time, event, outcome, user, remote, counts."""
    path = _audit_file(config, file)
    if not path.exists() and not follow:
        raise ConfigError(f"the audit file {path} does not exist yet (no event recorded)")
    for line in _last_lines(path, lines):
        _print(line, xml)
    if follow:
        try:
            _follow(path, xml)
        except KeyboardInterrupt:
            pass


def _audit_file(config: Path | None, file: Path | None) -> Path:
    if config is not None and file is not None:
        raise ConfigError("give --config FILE (the agent's configuration) or --file AUDIT_FILE, not both")
    if file is not None:
        return file
    config = locate_config(config)
    audit = load_audit_config(config)
    if audit is None or audit.file is None:
        raise ConfigError(f"{config}: no [audit] file is configured; audit tail reads the local audit file: "
                          "add file = \"PATH\" to [audit], or give --file AUDIT_FILE")
    return audit.file


def _last_lines(path: Path, count: int) -> list[bytes]:
    if count == 0 or not path.exists():
        return []
    with open(path, "rb") as handle:
        return [line.rstrip(b"\n") for line in deque(handle, maxlen=count) if line.strip()]


def _print(line: bytes, xml: bool) -> None:
    if xml:
        typer.echo(printable_xml(line.decode("utf-8", errors="replace")))
        return
    try:
        typer.echo(printable(summarize(line).line()))  # AE titles and reasons are peers' text
    except ValueError as error:
        print(f"card-agent: warning: a line of the audit file is not an audit message ({error}): "
              f"{printable(line[:80].decode('utf-8', errors='replace'))}", file=sys.stderr)


def _follow(path: Path, xml: bool) -> None:
    """Print lines appended from now on; reopen when the file is replaced or truncated (rotation)
    and print the new file from its start."""
    handle = _open_at(path, end=True)
    partial = b""
    while True:
        chunk = handle.read() if handle is not None else b""
        if chunk:
            partial += chunk
            *complete, partial = partial.split(b"\n")
            for line in complete:
                if line.strip():
                    _print(line, xml)
            sys.stdout.flush()
            continue
        time.sleep(FOLLOW_INTERVAL)
        if handle is None:
            handle = _open_at(path, end=False)
            continue
        try:
            stat = os.stat(path)
        except FileNotFoundError:
            continue
        current = os.fstat(handle.fileno())
        if (stat.st_dev, stat.st_ino) != (current.st_dev, current.st_ino) or stat.st_size < handle.tell():
            handle.close()
            handle, partial = _open_at(path, end=False), b""


def _open_at(path: Path, *, end: bool):
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        return None
    if end:
        handle.seek(0, os.SEEK_END)
    return handle
