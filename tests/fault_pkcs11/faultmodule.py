"""Build and steer ``fault_pkcs11``, a fault-injecting PKCS#11 module for tests.

The module (``fault_pkcs11.c``) wraps a real PKCS#11 module (SoftHSM by
default) and reads a small control file on every call, so a test can make a
card disappear, swap cards, fail calls, slow signatures down or emulate a PIN
retry counter while a client process keeps running.

    so = build(Path("tests/fault_pkcs11/build"))
    ctl = FaultControl(tmp_path / "card.ctl")
    env = {**os.environ, **ctl.env()}      # give this to the client process
    ... load `so` as the PKCS#11 module in that process ...
    ctl.remove_card(); ctl.insert_card(); ctl.bounce(); ctl.show("bob"); ctl.readers("alice", None)
    ctl.fail("C_Sign", "CKR_DEVICE_REMOVED"); ctl.sign_delay(500)
    ctl.pin_retries(3); ctl.signatures()

Control keys (``key = value`` lines): present, show_token, generation, fail,
crash_in, sign_delay_ms, login_delay_ms, find_delay_ms, pin_retries, token_flags_set, token_flags_clear,
protected_pin, log.  See the comment at the top of fault_pkcs11.c.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping

__all__ = ["HERE", "SOURCES", "DEFAULT_TARGET", "CFLAGS", "RSA_PSS_MECHANISMS", "BuildError", "build", "FaultControl"]

HERE = Path(__file__).resolve().parent
SOURCES = (HERE / "fault_pkcs11.c", HERE / "pkcs11_min.h")
DEFAULT_TARGET = "/usr/lib/softhsm/libsofthsm2.so"
CFLAGS = ("-std=c99", "-O2", "-fPIC", "-shared", "-fvisibility=hidden", "-Wall", "-Wextra")
LIBS = ("-ldl", "-lpthread")

# token flags (PKCS#11 v2.40)
CKF_PROTECTED_AUTHENTICATION_PATH = 0x100
CKF_USER_PIN_COUNT_LOW = 0x10000
CKF_USER_PIN_FINAL_TRY = 0x20000
CKF_USER_PIN_LOCKED = 0x40000

# CKM_RSA_PKCS_PSS and its hashing variants: hide_mechanisms(RSA_PSS_MECHANISMS) is a card without
# RSA-PSS, as many PIV and CAC cards are.
RSA_PSS_MECHANISMS = [0x0D, 0x0E, 0x43, 0x44, 0x45, 0x47]


class BuildError(RuntimeError):
    """gcc is missing or failed; the message carries its stderr."""


def build(dest_dir: Path, cc: str | None = None) -> Path:
    """Compile fault_pkcs11.so into ``dest_dir`` and return its path.

    The file name carries a hash of the sources and flags, so a repeated call
    returns the existing library at once.  Concurrent builds are safe (compile
    to a temporary name, then rename).
    """
    cc = cc or os.environ.get("CC") or "gcc"
    digest = hashlib.sha256()
    for src in SOURCES:
        digest.update(src.name.encode() + b"\0" + src.read_bytes() + b"\0")
    digest.update(" ".join((cc,) + CFLAGS + LIBS).encode())
    dest_dir = Path(dest_dir)
    out = dest_dir / f"fault_pkcs11-{digest.hexdigest()[:16]}.so"
    if out.is_file():
        return out
    if shutil.which(cc) is None:
        raise BuildError(f"cannot build fault_pkcs11: compiler {cc!r} not found")
    dest_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".fault_pkcs11-", suffix=".so", dir=dest_dir)
    os.close(fd)
    try:
        proc = subprocess.run(
            [cc, *CFLAGS, "-o", tmp, str(SOURCES[0]), *LIBS],
            capture_output=True, text=True, check=False,
        )
        if proc.returncode != 0:
            raise BuildError(f"cannot build fault_pkcs11 ({cc} exit {proc.returncode}):\n{proc.stderr}")
        os.replace(tmp, out)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return out


def _ckr(value: str | int) -> str:
    if isinstance(value, int):
        return hex(value)
    value = value.strip()
    if not value.startswith("CKR_") and not value.startswith("0x"):
        value = "CKR_" + value
    return value


def _fn(name: str) -> str:
    return name if name.startswith("C_") else "C_" + name


class FaultControl:
    """The control file of one emulated card (and its state and log files).

    ``<path>.state`` holds the emulated PIN retry counter, ``<path>.log`` the
    call log (enabled by default: ``log=False`` to turn it off).  Every write
    replaces the control file atomically.
    """

    def __init__(self, path: Path | str, target: str | None = None, log: bool = True):
        self.path = Path(path)
        self.target = target or os.environ.get("FAULT_PKCS11_TARGET") or DEFAULT_TARGET
        self.state_path = Path(f"{self.path}.state")
        self.log_path = Path(f"{self.path}.log")
        if log and "log" not in self.keys():
            self.set(log=str(self.log_path))

    # -- raw access -------------------------------------------------------
    def keys(self) -> dict[str, str]:
        """The keys currently in the control file."""
        try:
            text = self.path.read_text()
        except FileNotFoundError:
            return {}
        out: dict[str, str] = {}
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#") or "=" not in line:
                continue
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
        return out

    def _write(self, keys: Mapping[str, str]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        body = "".join(f"{k} = {v}\n" for k, v in keys.items())
        fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w") as f:
                f.write(body)
            os.replace(tmp, self.path)
        except BaseException:
            if os.path.exists(tmp):
                os.unlink(tmp)
            raise

    def set(self, **keys: object) -> None:
        """Merge keys into the control file; a value of None removes the key."""
        cur = self.keys()
        for key, value in keys.items():
            if value is None:
                cur.pop(key, None)
            elif isinstance(value, bool):
                cur[key] = "1" if value else "0"
            else:
                text = str(value)
                if "\n" in text:
                    raise ValueError(f"{key}: value must be one line")
                cur[key] = text
        self._write(cur)

    def clear(self) -> None:
        """No faults: drop every key but ``log`` and ``generation``, reset the PIN counter."""
        cur = self.keys()
        self._write({k: v for k, v in cur.items() if k in ("log", "generation")})
        self.reset_pin_counter()

    # -- card events ------------------------------------------------------
    def _bump(self) -> str:
        try:
            return str(int(self.keys().get("generation", "0")) + 1)
        except ValueError:
            return "1"

    def remove_card(self) -> None:
        self.set(present=0, generation=self._bump())

    def insert_card(self) -> None:
        """Insert the card again; sessions from before the removal stay invalid."""
        self.set(present=1, generation=self._bump())

    def bounce(self) -> None:
        """Pull the card and put it back within one look: its sessions become invalid (as after
        a removal and insertion), and no look sees the slot empty, as one between two looks would
        not (remove_card() then insert_card() leaves a moment a look may fall into)."""
        self.set(present=1, generation=self._bump())

    def show(self, label: str | None) -> None:
        """Expose only the token ``label`` as slot 0 (None: all slots pass through)."""
        self.set(show_token=label, generation=self._bump())

    def readers(self, *labels: str | None) -> None:
        """Several readers: token ``labels[i]`` in reader (slot) i, None an empty reader. Only the
        readers whose card changes see a removal or insertion; the others' sessions live on."""
        self.set(show_token=",".join(label or "" for label in labels) + ("," if len(labels) == 1 else ""))

    # -- faults -----------------------------------------------------------
    def fail(self, func: str, ckr: str | int | None) -> None:
        """Make ``func`` return ``ckr`` (a CKR_ name or number); None stops it."""
        func = _fn(func)
        entries = [e for e in self.keys().get("fail", "").split(",") if e.strip()]
        entries = [e for e in entries if e.split(":", 1)[0].strip() != func]
        if ckr is not None:
            entries.append(f"{func}:{_ckr(ckr)}")
        self.set(fail=",".join(entries) or None)

    def crash_in(self, func: str | None) -> None:
        """Make ``func`` abort the process calling it (SIGABRT: a module that crashes on this card);
        None stops it."""
        self.set(crash_in=_fn(func) if func is not None else None)

    def hide_mechanisms(self, mechanisms: list[int] | None) -> None:
        """Make the token lack these CKM_ mechanisms (None: show all again)."""
        self.set(hide_mechanisms=",".join(hex(m) for m in mechanisms) if mechanisms else None)

    def sign_delay(self, ms: int | None) -> None:
        self.set(sign_delay_ms=ms)

    def login_delay(self, ms: int | None) -> None:
        """C_Login waits ``ms`` before logging in (a slow card); the log says ``login-delay ms=N``."""
        self.set(login_delay_ms=ms)

    def find_delay(self, ms: int | None) -> None:
        """C_FindObjectsInit waits ``ms`` first (a slow read of the card's certificates and keys, as
        a card session's probe makes); the log says ``find-delay ms=N``."""
        self.set(find_delay_ms=ms)

    def pin_retries(self, n: int | None, reset: bool = True) -> None:
        """Emulate a retry counter of ``n`` tries (None: off); ``reset`` restarts it at n."""
        if reset:
            self.reset_pin_counter()
        self.set(pin_retries=n)

    def reset_pin_counter(self) -> None:
        self.state_path.unlink(missing_ok=True)

    def pin_remaining(self) -> int | None:
        """Tries left per the state file (None if no try was recorded yet)."""
        try:
            text = self.state_path.read_text()
        except FileNotFoundError:
            return None
        return int(text.partition("=")[2] or text)

    def token_flags(self, set: int = 0, clear: int = 0) -> None:  # noqa: A002
        self.set(token_flags_set=hex(set) if set else None, token_flags_clear=hex(clear) if clear else None)

    def pin_pad(self, pin: str | None) -> None:
        """Show CKF_PROTECTED_AUTHENTICATION_PATH; a NULL-PIN login uses ``pin``.

        ``pin=None`` keeps the flag but makes pad logins fail (CKR_PIN_INCORRECT).
        """
        flags = int(self.keys().get("token_flags_set", "0"), 16) | CKF_PROTECTED_AUTHENTICATION_PATH
        self.set(token_flags_set=hex(flags), protected_pin=pin)

    # -- observation ------------------------------------------------------
    def log_lines(self) -> list[str]:
        path = self.keys().get("log")
        if not path:
            return []
        try:
            return Path(path).read_text().splitlines()
        except FileNotFoundError:
            return []

    def signatures(self, pid: int | None = None) -> int:
        """Signatures the token made (C_Sign/C_SignFinal that returned CKR_OK).

        Size queries and injected failures are not counted.
        """
        count = 0
        for line in self.log_lines():
            f = line.split()
            if len(f) < 2 or f[0] not in ("C_Sign", "C_SignFinal") or f[1] != "rv=0x0":
                continue
            if "size_query" in f or "injected" in f:
                continue
            if pid is not None and f"pid={pid}" not in f:
                continue
            count += 1
        return count

    def signature_intervals(self) -> list[tuple[int, int, int]]:
        """(begin_ns, end_ns, pid) of every signature made, on CLOCK_MONOTONIC, in log order."""
        intervals = []
        for line in self.log_lines():
            fields = line.split()
            if len(fields) < 2 or fields[0] not in ("C_Sign", "C_SignFinal") or fields[1] != "rv=0x0":
                continue
            values = dict(field.split("=", 1) for field in fields[1:] if "=" in field)
            if "size_query" in fields or "begin_ns" not in values:
                continue
            intervals.append((int(values["begin_ns"]), int(values["end_ns"]), int(values["pid"])))
        return intervals

    def env(self) -> dict[str, str]:
        return {"FAULT_PKCS11_CONTROL": str(self.path), "FAULT_PKCS11_TARGET": self.target}
