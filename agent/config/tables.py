"""Reading a TOML configuration table by table, with errors naming the file, the table and the key
(used by agent/config/model.py and agent/audit/config.py, which model.py imports: so not from model.py)."""

from __future__ import annotations

import difflib
import hashlib
import math
import os
import re
import stat
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NoReturn, overload

from dicom_card_agent.errors import ConfigError
from dicom_card_agent.file_trust import check_trusted_file

MISSPELT = 0.75  # how alike an unknown key must be to a known one to be named as its misspelling


class Section:
    """Typed access to one TOML table, with errors naming file, table and key."""

    def __init__(self, data: dict[str, Any], where: str, base: Path) -> None:
        self.data = dict(data)
        self.where = where
        self.base = base
        self.known: list[str] = []  # the keys asked for so far: all of this table's keys once done() is called

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(f"{self.where}.{key}: {message}")

    def take(self, key: str, kind: type | tuple[type, ...], default: Any = ..., *, required: bool = False) -> Any:
        if key not in self.known:
            self.known.append(key)
        if key not in self.data:
            if required or default is ...:
                self._missing(key)
            return default
        value = self.data.pop(key)
        if not isinstance(value, kind) or (kind in (int, float, (int, float)) and isinstance(value, bool)):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise self.error(key, f"must be {_article(names)}, not {value!r}")
        return value

    def seconds(self, key: str, limits: Seconds) -> float:
        """A duration in seconds, checked against ``limits``: a finite number in its range (TOML
        also has ``nan`` and ``inf``, and integers too large for a float), with an error naming the
        key, the value and the range (docs/configuration.md)."""
        value = self.take(key, (int, float), limits.default)
        shown = str(value)
        if isinstance(value, float) and not math.isfinite(value):
            raise self.error(key, f"{shown} is not a number of seconds: {limits.rule()}")
        # Compared before float(): Python compares an int and a float exactly, and float() of a huge
        # integer overflows.
        if not limits.allows_at_least(value):
            raise self.error(key, limits.too_short())
        if value > limits.maximum:
            raise self.error(key, limits.too_long(shown))
        return float(value)

    @overload
    def path(self, key: str, *, required: Literal[True], must_exist: bool = True) -> Path: ...

    @overload
    def path(self, key: str, *, required: bool = False, must_exist: bool = True) -> Path | None: ...

    def path(self, key: str, *, required: bool = False, must_exist: bool = True) -> Path | None:
        value = self.take(key, str, None, required=required)
        if value in (None, ""):
            if required:
                self._missing(key)
            return None
        path = (self.base / os.path.expanduser(value)).resolve()
        if must_exist and not path.is_file():
            raise self.error(key, f"file {path} does not exist")
        return path

    def _missing(self, key: str) -> NoReturn:
        """A required key is not there: name the misspelt key that probably meant it, if one is there."""
        self.check_misspelt(key)
        raise ConfigError(f"{self.where}: missing key {key!r}")

    def check_misspelt(self, key: str) -> None:
        """``key`` is missing: a ConfigError naming an unknown key that looks like it, if there is one."""
        unknown = [k for k in self.data if k not in self.known]
        for near in difflib.get_close_matches(key, unknown, n=1, cutoff=MISSPELT):
            meant = self._name(key, like=near, bare=True)
            raise ConfigError(f"{self.where}: unknown {self._name(near)} (did you mean {meant}?)")

    def done(self) -> None:
        """Every key must have been taken: an unknown one is an error naming it and what it may have meant."""
        if not self.data:
            return
        problems = []
        for key in sorted(self.data):
            near = difflib.get_close_matches(key, self.known, n=1, cutoff=MISSPELT)
            problems.append(f"unknown {self._name(key)}"
                            + (f" (did you mean {self._name(near[0], like=key, bare=True)}?)"
                               if near else f" (the keys here: {', '.join(self.known)})"))
        raise ConfigError(f"{self.where}: {'; '.join(problems)}")

    def _name(self, key: str, *, like: str | None = None, bare: bool = False) -> str:
        """``key`` as the file spells it: a table ``[trust]``, an array of tables ``[[tunnel]]``, or a key
        (``like``: the key whose value tells which, for a name the file does not have)."""
        value = self.data.get(like if like is not None else key)
        if isinstance(value, dict):
            return f"[{key}]" if bare else f"table [{key}]"
        if isinstance(value, list) and value and all(isinstance(v, dict) for v in value):
            return f"[[{key}]]" if bare else f"table [[{key}]]"
        return repr(key) if bare else f"key {key!r}"


@dataclass(frozen=True)
class Seconds:
    """What a duration setting may be (``Section.seconds``): every one is finite and has an upper
    bound, so that nothing downstream meets ``nan``, ``inf`` or a number no timer can hold."""

    default: float
    maximum: float
    maximum_words: str  # the maximum for people: "an hour"
    minimum: float = 0.0  # 0: any positive number; else at least this
    off: bool = False  # 0 is allowed and turns the setting off
    why_minimum: str = ""  # said after the rule when a value is too small
    why_maximum: str = ""  # said when a value is too large

    def allows_at_least(self, seconds: float) -> bool:
        if self.off and seconds == 0:
            return True
        return seconds >= self.minimum if self.minimum else seconds > 0

    def lower(self) -> str:
        if self.minimum:
            return f"at least {_number(self.minimum)} seconds"
        return ("0 (off) or " if self.off else "") + "a positive number of seconds"

    def rule(self) -> str:
        return f"give {self.lower()}, at most {_number(self.maximum)} ({self.maximum_words}); default " \
               f"{_number(self.default)}"

    def too_short(self) -> str:
        return f"must be {self.lower()} (default {_number(self.default)})" + (
            f": {self.why_minimum}" if self.why_minimum else "")

    def too_long(self, shown: str) -> str:
        return f"{shown} seconds is too long: at most {_number(self.maximum)} ({self.maximum_words})" + (
            f": {self.why_maximum}" if self.why_maximum else "")


def content_digest(path: Path | None) -> str:
    """What the certificate or key file ``path`` holds now, as a SHA-256 ("" for no file), kept in the
    configuration so that comparing two readings of it sees a file whose bytes changed at the same
    path (a CA bundle that configuration management replaced, then SIGHUP: agent/session/reload.py).
    Never an error: a file that cannot be read gets its reason instead (reading it for use reports
    that in its own words, and `status` must load any configuration). Opened without waiting, so that
    a FIFO put there since Section.path looked is not waited on."""
    if path is None:
        return ""
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        return f"unreadable: {error.strerror}"
    digest = hashlib.sha256()
    with os.fdopen(descriptor, "rb") as file:
        try:
            if not stat.S_ISREG(os.fstat(descriptor).st_mode):
                return "not a regular file"
            for chunk in iter(lambda: file.read(1 << 16), b""):
                digest.update(chunk)
        except OSError as error:
            return f"unreadable: {error.strerror}"
    return "sha256:" + digest.hexdigest()


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else f"{value:g}"


def _article(names: str) -> str:
    return ("an " if names[0] in "aeiou" else "a ") + {"str": "string", "int": "integer", "float": "number",
                                                      "bool": "boolean (true/false)", "list": "list"}.get(names, names)


def host_port(value: str, error) -> tuple[str, int]:
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", value)
    if not match:
        raise error(f"{value!r} is not HOST:PORT (IPv6 as [::1]:PORT)")
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 0 < port < 65536:
        raise error(f"port {port} is out of range 1-65535")
    return host, port


MAX_CONFIG_BYTES = 4 * 1024 * 1024  # the agent's configuration travels to each card-session process


def read_toml(path: Path) -> dict[str, Any]:
    """The configuration file as TOML data; ConfigError when unreadable or not TOML, UnsafeFileError
    when another user could have written it (it names the file and the fix)."""
    return toml_of(read_config_file(path), path)


def read_config_file(path: Path) -> bytes:
    """The bytes of the configuration file ``path``, refused when another user could have written it
    (agent/file_trust.py) or when it is larger than :data:`MAX_CONFIG_BYTES`."""
    check_trusted_file(path, "the configuration file", "change the agent's settings")
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read configuration {path}: {error.strerror}") from None
    if len(raw) > MAX_CONFIG_BYTES:
        raise ConfigError(f"{path}: {len(raw)} bytes, more than the {MAX_CONFIG_BYTES // (1024 * 1024)} MiB a "
                          "configuration may have")
    return raw


def toml_of(raw: bytes, path: Path) -> dict[str, Any]:
    """``raw`` as TOML data (the configuration file ``path``, named in errors)."""
    try:
        # utf-8-sig: a byte order mark, which Windows editors (Notepad) write before UTF-8, is no
        # TOML; taken away, the file is the one the administrator sees.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ConfigError(not_utf8(path, raw, error.start)) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(f"{path}: not valid TOML: {error}") from None
    except RecursionError:  # arrays or inline tables nested thousands deep: tomllib recurses
        raise ConfigError(f"{path}: not valid TOML: arrays or inline tables nested too deeply") from None


def not_utf8(path: Path, raw: bytes, offset: int) -> str:
    """Where the first byte that is not UTF-8 is, and what to do: TOML files are UTF-8 (often the
    file was saved as Latin-1 or Windows-1252 by an editor, e.g. a site name with an umlaut)."""
    line_start = raw.rfind(b"\n", 0, offset) + 1
    line = raw.count(b"\n", 0, offset) + 1
    column = len(raw[line_start:offset].decode("utf-8", errors="replace")) + 1
    return (f"{path}: not valid TOML: byte 0x{raw[offset]:02x} at line {line}, column {column} (byte offset "
            f"{offset}) is not UTF-8, and a TOML file must be UTF-8: save the file as UTF-8 (one in Latin-1 "
            "converts with `iconv -f latin1 -t utf-8`)")
