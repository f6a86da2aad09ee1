"""Options shared by several commands."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from dicom_card_agent.config.locate import ENVIRONMENT_VARIABLE, SYSTEM_CONFIG
from dicom_card_agent.token.profiles import AUTO

Module = Annotated[
    str,
    typer.Option(
        "--module", "-m", envvar="CARD_AGENT_MODULE", metavar="NAME|PATH",
        help="PKCS#11 module: a profile name (softhsm2, opensc, yubikey-ykcs11, ...), a path to the .so, or auto.",
    ),
]
MODULE_DEFAULT = AUTO
TokenSelector = Annotated[
    Optional[str],
    typer.Option("--token", "-t", metavar="TOKEN",
                 help="Token label, serial, or pkcs11: URI. Default: every token present."),
]
CaBundle = Annotated[
    Optional[Path],
    typer.Option("--ca", metavar="BUNDLE",
                 help="CA bundle (PEM) the server trusts: identities that do not chain to it are unusable."),
]
CrlFiles = Annotated[
    Optional[list[Path]],
    typer.Option("--crl", metavar="FILE",
                 help="CRL file (PEM or DER); repeat for several. Revoked identities are unusable."),
]
Json = Annotated[bool, typer.Option("--json", help="Machine-readable output.")]
ConfigFile = Annotated[
    Optional[Path],
    typer.Option("--config", "-c", show_default=False, metavar="FILE",
                 help=f"The agent's configuration. Default: ${ENVIRONMENT_VARIABLE}, else "
                      f"~/.config/dicom-card-agent/agent.toml, else {SYSTEM_CONFIG}."),
]
