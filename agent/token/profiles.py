"""PKCS#11 module profiles: what the agent knows about each module family.

A profile (one TOML file in the ``pkcs11_profiles`` package) says where the module usually lives,
how to recognise it, which key serves TLS client authentication, which certificates are not
identities (attestation), and which quirks the OpenSSL pkcs11-provider needs with it.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass
from functools import cache
from importlib import resources

from dicom_card_agent.errors import CardAgentError

GENERIC = "generic"
AUTO = "auto"  # [identity] module = "auto": the first installed module of AUTO_ORDER
# The order in which "auto" tries installed modules: real cards before HSMs before lab tokens.
AUTO_ORDER = ("opensc", "yubikey-ykcs11", "thales-luna", "nshield", "softhsm2")


class ProfileError(CardAgentError):
    """A profile name is unknown or its module is not installed."""


@dataclass(frozen=True)
class ModuleProfile:
    name: str
    description: str
    module_paths: tuple[str, ...]
    library_manufacturers: tuple[str, ...]
    token_models: tuple[str, ...]
    lab_only: bool
    preferred_key_ids: tuple[bytes, ...]
    skip_certificate_labels: tuple[str, ...]
    skip_certificate_extension_oids: tuple[str, ...]
    provider_quirks: tuple[str, ...]
    provider_login_behavior: str | None
    protected_authentication_path: bool
    login_notes: str
    known_gaps: tuple[str, ...]
    card_readers: bool = True  # tokens sit in PC/SC readers (pcscd tells of insertions); False: SoftHSM's files
    # presence = "pcsc": the card loop learns of cards from pcscd alone and leaves the module to the
    # card-session process, because each process's first question about a card makes the module
    # probe it (OpenSC: ~2 s); "module" (the default): the card loop asks the module (agent/card).
    presence_from_pcsc: bool = False
    # What to check when the module loads but its C_Initialize fails (its configuration, its
    # service), for the error message; "" : nothing known beyond the generic advice.
    start_failure_hint: str = ""

    def installed_module(self) -> str | None:
        """The first of the profile's module paths present on this machine."""
        return next((path for path in self.module_paths if os.path.exists(path)), None)

    def is_attestation_certificate(self, label: str, extension_oids: set[str]) -> bool:
        lowered = label.lower()
        return any(word.lower() in lowered for word in self.skip_certificate_labels) or bool(
            extension_oids & set(self.skip_certificate_extension_oids)
        )


def _profile_from_toml(data: dict) -> ModuleProfile:
    tls_key = data.get("tls_key", {})
    provider = data.get("provider", {})
    login = data.get("login", {})
    return ModuleProfile(
        name=data["name"],
        description=data["description"],
        module_paths=tuple(data.get("module_paths", ())),
        library_manufacturers=tuple(data.get("library_manufacturers", ())),
        token_models=tuple(data.get("token_models", ())),
        lab_only=bool(data.get("lab_only", False)),
        preferred_key_ids=tuple(bytes.fromhex(i) for i in tls_key.get("preferred_ids", ())),
        skip_certificate_labels=tuple(tls_key.get("skip_certificate_labels", ())),
        skip_certificate_extension_oids=tuple(tls_key.get("skip_certificate_extension_oids", ())),
        provider_quirks=tuple(provider.get("quirks", ())),
        provider_login_behavior=provider.get("login_behavior"),
        protected_authentication_path=bool(login.get("protected_authentication_path", False)),
        login_notes=login.get("notes", ""),
        known_gaps=tuple(data.get("mechanisms", {}).get("known_gaps", ())),
        card_readers=bool(data.get("card_readers", True)),
        presence_from_pcsc=_presence(data) == "pcsc",
        start_failure_hint=data.get("start_failure", ""),
    )


def _presence(data: dict) -> str:
    presence = data.get("presence", "module")
    if presence not in ("module", "pcsc"):
        raise ValueError(f"profile {data.get('name')!r}: presence must be \"module\" or \"pcsc\", not {presence!r}")
    return presence


@cache
def all_profiles() -> dict[str, ModuleProfile]:
    profiles = {}
    for entry in resources.files("dicom_card_agent.pkcs11_profiles").iterdir():
        if entry.name.endswith(".toml"):
            profile = _profile_from_toml(tomllib.loads(entry.read_text(encoding="utf-8")))
            profiles[profile.name] = profile
    return profiles


def get_profile(name: str) -> ModuleProfile:
    try:
        return all_profiles()[name]
    except KeyError:
        raise ProfileError(
            f"unknown PKCS#11 profile {name!r}; known profiles: {', '.join(sorted(all_profiles()))}, "
            "or give the module's path"
        ) from None


def detect_profile(module_path: str, library_manufacturer: str = "", token_model: str = "") -> ModuleProfile:
    """The profile whose module path or identification strings match, else the generic one."""
    real = os.path.realpath(module_path)
    for profile in all_profiles().values():
        if any(os.path.realpath(p) == real for p in profile.module_paths if os.path.exists(p)):
            return profile
    for profile in all_profiles().values():
        if any(m.lower() in library_manufacturer.lower() for m in profile.library_manufacturers):
            return profile
        if token_model and any(m.lower() in token_model.lower() for m in profile.token_models):
            return profile
    return all_profiles()[GENERIC]
