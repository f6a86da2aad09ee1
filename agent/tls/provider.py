"""The OpenSSL 3 pkcs11-provider: its configuration and the PEM key files it loads.

``SSLContext.load_cert_chain`` only takes key files. The provider decodes a PEM of type
``PKCS#11 PROVIDER URI`` whose DER body is ``SEQUENCE { VisibleString desc, UTF8String uri }``
and turns it into a key that signs on the token. The file holds the URI only: no PIN.
"""

from __future__ import annotations

import base64
import os
import re
import subprocess
import tempfile
import textwrap
from collections.abc import Sequence
from pathlib import Path

from dicom_card_agent.errors import CardAgentError

PEM_LABEL = "PKCS#11 PROVIDER URI"
URI_DESCRIPTION = "PKCS#11 Provider URI v1.0"
PROVIDER_MODULE_NAME = "pkcs11.so"

_VISIBLE_STRING = 0x1A
_UTF8_STRING = 0x0C
_SEQUENCE = 0x30


class ProviderError(CardAgentError):
    """The pkcs11-provider is missing, cannot load, or a provider key file is malformed."""


def _der_length(length: int) -> bytes:
    if length < 0x80:
        return bytes([length])
    encoded = length.to_bytes((length.bit_length() + 7) // 8, "big")
    return bytes([0x80 | len(encoded)]) + encoded


def _der(tag: int, content: bytes) -> bytes:
    return bytes([tag]) + _der_length(len(content)) + content


def provider_key_pem(uri: str) -> bytes:
    """The PEM key file that makes OpenSSL use the token key named by ``uri``."""
    if "pin-value" in uri:
        raise ProviderError("refusing to write a PIN into a provider key file")
    body = _der(_SEQUENCE,
                _der(_VISIBLE_STRING, URI_DESCRIPTION.encode("ascii")) + _der(_UTF8_STRING, uri.encode("utf-8")))
    lines = textwrap.wrap(base64.b64encode(body).decode("ascii"), 64)
    return (f"-----BEGIN {PEM_LABEL}-----\n" + "\n".join(lines) + f"\n-----END {PEM_LABEL}-----\n").encode("ascii")


def _read_der(data: bytes, offset: int, tag: int) -> tuple[bytes, int]:
    if offset + 2 > len(data) or data[offset] != tag:
        raise ProviderError("malformed provider key file: unexpected DER tag")
    length = data[offset + 1]
    offset += 2
    if length & 0x80:
        count = length & 0x7F
        if count == 0 or count > 4 or offset + count > len(data):
            raise ProviderError("malformed provider key file: bad DER length")
        length = int.from_bytes(data[offset:offset + count], "big")
        offset += count
    if offset + length > len(data):
        raise ProviderError("malformed provider key file: truncated")
    return data[offset:offset + length], offset + length


def uri_from_provider_key_pem(pem: bytes) -> str:
    """The URI inside a provider key file (the inverse of :func:`provider_key_pem`)."""
    match = re.search(rb"-----BEGIN " + PEM_LABEL.encode() + rb"-----(.*?)-----END", pem, re.S)
    if not match:
        raise ProviderError(f"not a {PEM_LABEL} PEM file")
    try:
        der = base64.b64decode(b"".join(match.group(1).split()), validate=True)
    except ValueError:
        raise ProviderError("malformed provider key file: bad base64") from None
    sequence, end = _read_der(der, 0, _SEQUENCE)
    description, offset = _read_der(sequence, 0, _VISIBLE_STRING)
    uri, _ = _read_der(sequence, offset, _UTF8_STRING)
    if description != URI_DESCRIPTION.encode() or end != len(der):
        raise ProviderError("malformed provider key file: unknown description")
    return uri.decode("utf-8")


def openssl_modules_dir() -> Path | None:
    """Where this OpenSSL looks for providers (``openssl version -m``); None without an ``openssl``
    command that says. ProviderError when the command could not be run for a reason of the moment
    (no descriptor or memory left): that is not a missing package, and a later try may work."""
    try:
        out = subprocess.run(["openssl", "version", "-m"], capture_output=True, text=True, check=True).stdout
    except (FileNotFoundError, PermissionError, subprocess.CalledProcessError):
        return None
    except OSError as error:
        raise ProviderError(f"cannot run `openssl version -m` to find the pkcs11-provider: "
                            f"{error.strerror or error}") from error
    match = re.search(r'MODULESDIR:\s*"([^"]+)"', out)
    return Path(match.group(1)) if match else None


def provider_module_path() -> Path:
    """The installed pkcs11-provider module, or an error saying how to install it."""
    modules = openssl_modules_dir()
    candidates = [modules / PROVIDER_MODULE_NAME] if modules else []
    for candidate in candidates:
        if candidate.exists():
            return candidate
    raise ProviderError(
        f"the OpenSSL pkcs11-provider is not installed (looked for {PROVIDER_MODULE_NAME} in "
        f"{modules or 'the OpenSSL modules directory'}): install the pkcs11-provider package "
        "(Debian 12: `apt-get install -t bookworm-backports pkcs11-provider`)"
    )


def openssl_config(
    pkcs11_module: str,
    quirks: Sequence[str] = (),
    login_behavior: str | None = None,
    *,
    tls_groups: str | None = None,
    signature_algorithms: str | None = None,
) -> str:
    """An OpenSSL configuration activating the default and pkcs11 providers for one PKCS#11 module.

    ``tls_groups`` and ``signature_algorithms`` (as ``SignatureAlgorithms``, for the handshake
    signatures of either side, and ``ClientSignatureAlgorithms``, for client certificates) go to
    the ``system_default`` TLS settings, which Python's ``ssl`` module cannot set per context before
    Python 3.13: the card-session process that reads this configuration does nothing but the card's
    TLS, so process-wide is right.
    """
    lines = [
        "openssl_conf = openssl_init",
        "",
        "[openssl_init]",
        "providers = provider_sect",
    ]
    ssl_settings = [f"Groups = {tls_groups}"] if tls_groups else []
    if signature_algorithms:
        ssl_settings += [f"SignatureAlgorithms = {signature_algorithms}",
                         f"ClientSignatureAlgorithms = {signature_algorithms}"]
    if ssl_settings:
        lines += ["ssl_conf = ssl_sect", "", "[ssl_sect]", "system_default = tls_defaults_sect", "",
                  "[tls_defaults_sect]", *ssl_settings]
    lines += [
        "",
        "[provider_sect]",
        "default = default_sect",
        "pkcs11 = pkcs11_sect",
        "",
        "[default_sect]",
        "activate = 1",
        "",
        "[pkcs11_sect]",
        f"module = {provider_module_path()}",
        f"pkcs11-module-path = {pkcs11_module}",
    ]
    if quirks:
        lines.append(f"pkcs11-module-quirks = {' '.join(quirks)}")
    if login_behavior:
        lines.append(f"pkcs11-module-login-behavior = {login_behavior}")
    lines += ["activate = 1", ""]
    return "\n".join(lines)


def check_provider_loads(config_text: str) -> str:
    """Ask the ``openssl`` command to load the configuration; return its provider listing."""
    with tempfile.NamedTemporaryFile("w", suffix=".cnf", prefix="card-agent-") as config:
        config.write(config_text)
        config.flush()
        env = {**os.environ, "OPENSSL_CONF": config.name}
        result = subprocess.run(["openssl", "list", "-providers"], capture_output=True, text=True, env=env)
    listing = result.stdout + result.stderr
    if result.returncode != 0 or not re.search(r"pkcs11\s*\n(\s+\w+:.*\n)*?\s+status: active", result.stdout):
        raise ProviderError(
            "OpenSSL could not activate the pkcs11-provider with the generated configuration: "
            + " ".join(listing.split())[:400]
        )
    return result.stdout
