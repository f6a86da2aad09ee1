"""PKCS#11 module profiles."""

from __future__ import annotations

import pytest

from dicom_card_agent.token.profiles import AUTO_ORDER, ProfileError, all_profiles, detect_profile, get_profile


def test_every_family_has_a_profile() -> None:
    assert {"softhsm2", "opensc", "yubikey-ykcs11", "thales-luna", "nshield", "generic"} <= set(all_profiles())
    assert set(AUTO_ORDER) <= set(all_profiles())


def test_softhsm_profile_finds_the_installed_module_and_its_provider_quirks() -> None:
    profile = get_profile("softhsm2")
    assert profile.installed_module() == "/usr/lib/softhsm/libsofthsm2.so"
    assert profile.provider_quirks == ("no-deinit", "no-operation-state")
    assert profile.lab_only


def test_detect_by_path_then_by_manufacturer() -> None:
    assert detect_profile("/usr/lib/softhsm/libsofthsm2.so").name == "softhsm2"
    assert detect_profile("/opt/x/libother.so", "Yubico (www.yubico.com)").name == "yubikey-ykcs11"
    assert detect_profile("/opt/x/libother.so", "Acme").name == "generic"


def test_piv_profiles_prefer_the_authentication_key_and_skip_attestation() -> None:
    for name in ("opensc", "yubikey-ykcs11"):
        profile = get_profile(name)
        assert profile.preferred_key_ids == (b"\x01",)
        assert profile.is_attestation_certificate("X.509 Certificate for PIV Attestation 9a", set())
        assert not profile.is_attestation_certificate("Certificate for PIV Authentication", set())
    assert get_profile("yubikey-ykcs11").is_attestation_certificate("cert", {"1.3.6.1.4.1.41482.3.3"})


def test_unknown_profile_names_the_known_ones() -> None:
    with pytest.raises(ProfileError, match="known profiles: generic, nshield, opensc"):
        get_profile("acme")
