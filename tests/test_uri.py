"""RFC 7512 PKCS#11 URIs (sans-IO)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dicom_card_agent.token.uri import Pkcs11Uri, Pkcs11UriError


def test_parses_rfc_7512_example() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=The%20Software%20PKCS%2311%20Softtoken;manufacturer=Snake%20Oil,%20Inc.;"
                          "model=1.0;object=my-certificate;type=cert;id=%69%95%3E%5C%F4%BD%EC%91;serial=")
    assert uri.token == "The Software PKCS#11 Softtoken"
    assert uri.manufacturer == "Snake Oil, Inc."
    assert uri.id == bytes.fromhex("69953e5cf4bdec91")
    assert uri.type == "cert" and uri.serial == ""


def test_query_attributes_and_unknown_attributes() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=alice;x-vendor=1?module-path=/usr/lib/softhsm/libsofthsm2.so&foo=bar")
    assert uri.token == "alice" and uri.module_path == "/usr/lib/softhsm/libsofthsm2.so"


@pytest.mark.parametrize("text, message", [
    ("pkcs11:token=alice?pin-value=123456", "pin-value are refused"),
    ("file:token=alice", "must start with 'pkcs11:'"),
    ("pkcs11:token", "without a value"),
    ("pkcs11:token=a;token=b", "given twice"),
    ("pkcs11:type=secret", "unknown object type"),
    ("pkcs11:token=%FF", "not UTF-8"),
])
def test_malformed_or_refused(text: str, message: str) -> None:
    with pytest.raises(Pkcs11UriError, match=message):
        Pkcs11Uri.parse(text)


def test_formats_binary_id_fully_encoded() -> None:
    uri = Pkcs11Uri(token="alice;bob", serial="12", id=b"\x01\xab", type="private")
    assert str(uri) == "pkcs11:token=alice%3Bbob;serial=12;id=%01%AB;type=private"


def test_matches_token_fields_given_only() -> None:
    uri = Pkcs11Uri.parse("pkcs11:token=alice")
    assert uri.matches_token(label="alice", serial="1", manufacturer="m", model="x")
    assert not uri.matches_token(label="bob", serial="1", manufacturer="m", model="x")


text = st.text(st.characters(blacklist_categories=("Cs",)), max_size=20)


@given(token=st.none() | text, serial=st.none() | text, object=st.none() | text, id=st.none() | st.binary(max_size=20),
       type=st.none() | st.sampled_from(["cert", "private", "public"]))
def test_format_then_parse_round_trips(token, serial, object, id, type) -> None:
    uri = Pkcs11Uri(token=token, serial=serial, object=object, id=id, type=type)
    assert Pkcs11Uri.parse(str(uri)) == uri


@given(st.text(max_size=60))
def test_parse_never_fails_except_with_its_own_error(text: str) -> None:
    try:
        Pkcs11Uri.parse("pkcs11:" + text)
    except Pkcs11UriError:
        pass
