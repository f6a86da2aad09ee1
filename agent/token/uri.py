"""RFC 7512 PKCS#11 URIs: parsing and formatting, free of I/O.

Only the attributes the agent selects tokens and objects by are modelled. A ``pin-value`` is
refused: a PIN does not belong in a URI, a config file or a command line.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote, unquote_to_bytes

from dicom_card_agent.errors import CardAgentError

SCHEME = "pkcs11:"

# RFC 7512 path attribute name -> dataclass field; "id" is binary, the rest are text.
_PATH_ATTRIBUTES = {
    "token": "token",
    "serial": "serial",
    "manufacturer": "manufacturer",
    "model": "model",
    "object": "object",
    "id": "id",
    "type": "type",
}
_QUERY_ATTRIBUTES = {"module-path": "module_path", "pin-source": "pin_source"}
_OBJECT_TYPES = ("cert", "private", "public", "secret-key", "data")


class Pkcs11UriError(CardAgentError):
    """A PKCS#11 URI does not follow RFC 7512 or asks for something the agent refuses."""


@dataclass(frozen=True)
class Pkcs11Uri:
    """A parsed ``pkcs11:`` URI; ``None`` means "any"."""

    token: str | None = None
    serial: str | None = None
    manufacturer: str | None = None
    model: str | None = None
    object: str | None = None
    id: bytes | None = None
    type: str | None = None
    module_path: str | None = None
    pin_source: str | None = None

    @classmethod
    def parse(cls, text: str) -> Pkcs11Uri:
        if not text.startswith(SCHEME):
            raise Pkcs11UriError(f"not a PKCS#11 URI (must start with {SCHEME!r}): {text!r}")
        path, _, query = text[len(SCHEME):].partition("?")
        values: dict[str, object] = {}
        for part, names, separator in ((path, _PATH_ATTRIBUTES, ";"), (query, _QUERY_ATTRIBUTES, "&")):
            for item in filter(None, part.split(separator)):
                name, equals, raw = item.partition("=")
                if not equals:
                    raise Pkcs11UriError(f"PKCS#11 URI attribute without a value: {item!r} in {text!r}")
                if name == "pin-value":
                    raise Pkcs11UriError(
                        "PKCS#11 URIs with pin-value are refused: give the PIN through the "
                        "agent's PIN source (prompt, pinentry, protected path), never in a URI"
                    )
                field = names.get(name)
                if field is None:
                    continue  # RFC 7512: unknown attributes are ignored
                if field in values:
                    raise Pkcs11UriError(f"PKCS#11 URI attribute {name!r} given twice in {text!r}")
                decoded = unquote_to_bytes(raw)
                if field == "id":
                    values[field] = decoded
                else:
                    try:
                        values[field] = decoded.decode("utf-8")
                    except UnicodeDecodeError:
                        raise Pkcs11UriError(f"PKCS#11 URI attribute {name!r} is not UTF-8 in {text!r}") from None
        if values.get("type") not in (None, *_OBJECT_TYPES):
            raise Pkcs11UriError(
                f"unknown object type {values['type']!r} in {text!r}; one of {', '.join(_OBJECT_TYPES)}")
        return cls(**values)  # type: ignore[arg-type]

    def __str__(self) -> str:
        path = []
        for name, field in _PATH_ATTRIBUTES.items():
            value = getattr(self, field)
            if value is None:
                continue
            if isinstance(value, bytes):
                encoded = "".join(f"%{byte:02X}" for byte in value)
            else:
                encoded = quote(value, safe="")
            path.append(f"{name}={encoded}")
        query = [
            f"{name}={quote(getattr(self, field), safe='/')}"
            for name, field in _QUERY_ATTRIBUTES.items()
            if getattr(self, field) is not None
        ]
        return SCHEME + ";".join(path) + ("?" + "&".join(query) if query else "")

    def matches_token(self, *, label: str, serial: str, manufacturer: str, model: str) -> bool:
        wanted = {"token": label, "serial": serial, "manufacturer": manufacturer, "model": model}
        return all(getattr(self, name) in (None, value) for name, value in wanted.items())


def is_pkcs11_uri(text: str) -> bool:
    return text.startswith(SCHEME)


__all__ = ["Pkcs11Uri", "Pkcs11UriError", "is_pkcs11_uri"]
